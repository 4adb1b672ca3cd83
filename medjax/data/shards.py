"""Reading what `medjax prepare` wrote: the manifest, a split's slices, held-out volumes.

A split folder holds `<id>.array_record` (the subject's foreground slices) beside
`<id>.json` (its geometry and normalisation), so evaluating a split needs that folder
only: the training shards may be gone (docs/design.md, "Run directory").

Everything here may meet a damaged file (a truncated copy, a flipped bit, an edit by
hand): each reader checks what it reads and raises a one-line `UserError` naming the
file, never a traceback. ArrayRecord files carry hashes of every chunk (Riegeli), so
damage in a shard is found when it is opened or read, and reported the same way.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medjax import files
from medjax.data import records
from medjax.data.preprocess import Recipe, Volume
from medjax.errors import UserError

# The folder `medjax prepare` writes (docs/design.md, "Shards").
SPLITS = ("train", "val", "test")
SHARD_SUFFIX = ".array_record"
MANIFEST = "manifest.json"

_REMAKE = "delete it and run `medjax prepare` again on the folder to remake it"


def _expect(path, mapping: dict, key: str, kind, *, required: bool = True, item=None):
  """mapping[key], refused with a `UserError` naming the file unless of type `kind`
  (and, for lists, every item of type `item`)."""
  if key not in mapping:
    if required:
      raise UserError(f"{path}: no {key!r} entry; {_REMAKE}")
    return None
  value = mapping[key]
  ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
  if ok and item is not None:
    ok = all(isinstance(v, item) and not isinstance(v, bool) for v in value)
  if not ok:
    want = getattr(kind, "__name__", str(kind)) + (f" of {item.__name__}" if item else "")
    raise UserError(f"{path}: {key!r} is {type(value).__name__} {_short(value)}, expected "
                    f"{want}; {_REMAKE}")
  return value


def _short(value) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def load_manifest(directory) -> dict:
  """OUT/manifest.json, its entries checked for the types readers rely on."""
  path = Path(directory) / MANIFEST
  if not path.exists():
    raise UserError(f"no {MANIFEST} in {directory}: run `medjax prepare` first")
  manifest = files.read_json(path, dict)
  _expect(path, manifest, "settings", dict, required=False)
  _expect(path, manifest, "recipe", dict, required=False)
  _expect(path, manifest, "subjects", list, required=False, item=str)
  _expect(path, manifest, "complete", bool, required=False)
  return manifest


def recipe(directory) -> Recipe:
  """The preprocessing recipe the shards were made with."""
  manifest = load_manifest(directory)
  path = Path(directory) / MANIFEST
  if "recipe" not in manifest:
    raise UserError(f"{path} has no recipe: it was written by an older "
                    "medjax; prepare the data again")
  try:
    return Recipe.from_dict(manifest["recipe"])
  except (TypeError, ValueError) as error:
    raise UserError(f"{path}: its recipe is not valid ({error}); {_REMAKE}") from None


def shard_paths(directory, split: str) -> list[Path]:
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
  # pathlib's glob matches hidden names too: a killed writer's temporary is not a shard.
  return sorted(p for p in (Path(directory) / split).glob("*" + SHARD_SUFFIX)
                if not p.name.startswith(files.TMP_PREFIX))


def meta_path(shard: Path) -> Path:
  """The per-subject json beside a shard."""
  return shard.with_name(shard.name[:-len(SHARD_SUFFIX)] + ".json")


def subject_meta(path) -> dict:
  """A `<id>.json` beside a shard, checked for what readers use (subject, split, targets,
  slices, geometry, each target's normalisation)."""
  path = Path(path)
  meta = files.read_json(path, dict)
  _expect(path, meta, "subject", str)
  split = _expect(path, meta, "split", str, required=False)
  if split is not None and split not in SPLITS:
    raise UserError(f"{path}: split {_short(split)} is not one of {', '.join(SPLITS)}")
  targets = _expect(path, meta, "targets", list, item=str)
  if not targets:
    raise UserError(f"{path}: no target modality; {_REMAKE}")
  slices = _expect(path, meta, "slices", list, item=int)
  if any(z < 0 for z in slices) or len(set(slices)) != len(slices):
    raise UserError(f"{path}: slice indices must be distinct and non-negative; {_REMAKE}")
  _expect(path, meta, "geometry", dict)
  normalisation = _expect(path, meta, "normalisation", dict)
  for target in targets:
    params = normalisation.get(target)
    lo, hi = (params.get("lo"), params.get("hi")) if isinstance(params, dict) else (None, None)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in (lo, hi)) or not hi > lo:
      raise UserError(f"{path}: the {target} normalisation {_short(params)} is not two finite "
                      f"numbers lo < hi; {_REMAKE}")
  return meta


def _open_error(path, error: Exception) -> UserError:
  text = " ".join(str(error).split())
  text = text if len(text) <= 200 else text[:200] + "…"
  return UserError(f"{path}: damaged shard ({type(error).__name__}: {text or 'unreadable'});"
                   f" {_REMAKE}")


def _regular(path: Path) -> None:
  if not path.is_file():  # a pipe named like a shard would block the reader forever
    raise UserError(f"{path}: not a regular file; {_REMAKE}")


def _decode(data, path, index: int) -> dict:
  try:
    return records.decode(data)
  except ValueError as error:
    raise UserError(f"{path}: record {index}: {error}; {_REMAKE}") from None


class ShardSlices:
  """The slice records of one split, random access, decoded to float32.

  A grain `RandomAccessDataSource` (the protocol: `__len__`, `__getitem__`). grain is
  imported here, not at the top, so that `prepare`'s worker processes start quickly.
  A damaged shard is a `UserError` naming it (or the split folder and record index).
  """

  def __init__(self, directory, split: str):
    import grain
    self._directory, self._split = str(directory), split
    paths = shard_paths(directory, split)
    if not paths:
      raise UserError(f"no {split} shards under {directory}")
    for path in paths:
      _regular(path)
    try:
      self._records = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
    except Exception:  # which file? open each on its own to name it
      for path in paths:
        _count(path)
      raise
    self._paths = paths

  def __len__(self) -> int:
    return len(self._records)

  def _where(self, index) -> str:
    try:  # array_record's own index → file map; a private name, so only for the message
      reader, position = self._records._reader_idx_and_position(index)
      return f"{self._paths[reader]}: record {position}"
    except Exception:
      return f"{Path(self._directory) / self._split}: record {index} of the split"

  def __getitem__(self, index) -> dict:
    if not 0 <= int(index) < len(self):
      raise IndexError(f"record {index} of {len(self)} in {self!r}")
    try:
      return records.decode(self._records[index])
    except Exception as error:
      text = " ".join(str(error).split())[:200]
      raise UserError(f"{self._where(index)}: damaged ({type(error).__name__}: {text}); "
                      f"{_REMAKE}") from None

  def __getitems__(self, indices) -> list[dict]:
    try:
      return [records.decode(b) for b in self._records.__getitems__(indices)]
    except Exception:
      return [self[i] for i in indices]  # one by one, to name the damaged record

  def __repr__(self) -> str:
    return f"ShardSlices({self._directory!r}, {self._split!r})"


def _count(path: Path) -> int:
  from array_record.python.array_record_module import ArrayRecordReader
  try:
    reader = ArrayRecordReader(str(path))
  except Exception as error:
    raise _open_error(path, error) from None
  try:
    count = reader.num_records()
    reader.close()  # reports damage met while reading, too
  except Exception as error:
    _close_quietly(reader)
    raise _open_error(path, error) from None
  return count


def _close_quietly(reader) -> None:
  try:
    reader.close()
  except Exception:  # the damage is being reported already
    pass


def read_shard(path) -> list[dict]:
  """Every record of one shard, decoded; a `UserError` naming it if it is damaged."""
  from array_record.python.array_record_module import ArrayRecordReader
  path = Path(path)
  _regular(path)
  try:
    reader = ArrayRecordReader(str(path))
  except Exception as error:  # the C++ reader reports damage as RuntimeError
    raise _open_error(path, error) from None
  try:
    raw = reader.read_all()
    reader.close()  # reports damage met while reading, too
  except Exception as error:
    _close_quietly(reader)
    raise _open_error(path, error) from None
  return [_decode(data, path, i) for i, data in enumerate(raw)]


def labels_path(shard) -> Path:
  """`<stem>.array_record` → `<stem>.seg.npz`: the subject's segmentation labels on its
  foreground slices, (Z, H, W) uint8, when its dataset had a `seg` file."""
  return Path(shard).with_suffix(".seg.npz")


def read_labels(directory, split: str, meta: dict) -> np.ndarray | None:
  """A subject's labels (`labels_path`), in its shard's slice order; None without."""
  if not meta.get("labels"):
    return None
  path = Path(directory) / split / meta["labels"]
  try:
    with np.load(path) as saved:
      labels = saved["labels"]
  except (OSError, ValueError, KeyError) as error:
    raise UserError(f"{path}: not readable labels ({error}); prepare again") from None
  if labels.ndim != 3 or labels.shape[0] != len(meta["slices"]):
    raise UserError(f"{path}: labels of shape {labels.shape} for {len(meta['slices'])} "
                    "slices; prepare again")
  return labels


def split_metadata(directory, split: str) -> list[dict]:
  """The per-subject json `prepare` wrote beside each shard of `split`."""
  return [subject_meta(meta_path(path)) for path in shard_paths(directory, split)]


def split_volumes(directory, split: str) -> list[Volume]:
  """Each subject of `split` as a `Volume`: its foreground slices in order.

  Reads only that split's folder (each shard and the metadata beside it).
  """
  result = []
  for path in shard_paths(directory, split):
    meta = subject_meta(meta_path(path))
    subject_records = sorted(read_shard(path), key=lambda r: int(r["slice"]))
    if not subject_records:
      raise UserError(f"{path}: holds no slice; {_REMAKE}")
    slices = [int(r["slice"]) for r in subject_records]
    if slices != sorted(meta["slices"]):
      raise UserError(f"{path}: holds slices {_short(slices)}, {meta_path(path)} lists "
                      f"{_short(sorted(meta['slices']))}: one of them is damaged; delete both "
                      "and run `medjax prepare` again on the folder to remake them")
    shapes = {(r["source"].shape, r["target"].shape) for r in subject_records}
    if len(shapes) > 1:
      raise UserError(f"{path}: records of different shapes {sorted(shapes)}; {_REMAKE}")
    target = meta["targets"][0]
    result.append(Volume(
        subject=meta["subject"],
        source=np.stack([r["source"] for r in subject_records]),
        target=np.stack([r["target"] for r in subject_records]),
        mask=np.stack([r["mask"] for r in subject_records]),
        target_params=meta["normalisation"][target],
        labels=read_labels(directory, split, meta)))
  if not result:
    raise UserError(f"no {split} subjects under {directory}: the evaluation needs at least one")
  return sorted(result, key=lambda v: v.subject)
