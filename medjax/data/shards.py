"""Reading what `medjax prepare` wrote: the manifest, a split's slices, held-out volumes.

A split folder holds `<id>.array_record` (the subject's foreground slices) beside
`<id>.json` (its geometry and normalisation), so evaluating a split needs that folder
only: the training shards may be gone (docs/design.md, "Run directory").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medjax import files
from medjax.data import records
from medjax.data.prepare import MANIFEST, SHARD_SUFFIX, SPLITS
from medjax.data.preprocess import Recipe, Volume
from medjax.errors import UserError


def load_manifest(directory) -> dict:
  path = Path(directory) / MANIFEST
  if not path.exists():
    raise UserError(f"no {MANIFEST} in {directory}: run `medjax prepare` first")
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise UserError(f"{path}: not a readable manifest ({error})") from None


def recipe(directory) -> Recipe:
  """The preprocessing recipe the shards were made with."""
  manifest = load_manifest(directory)
  if "recipe" not in manifest:
    raise UserError(f"{Path(directory) / MANIFEST} has no recipe: it was written by an older "
                    "medjax; prepare the data again")
  return Recipe.from_dict(manifest["recipe"])


def shard_paths(directory, split: str) -> list[Path]:
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
  # pathlib's glob matches hidden names too: a killed writer's temporary is not a shard.
  return sorted(p for p in (Path(directory) / split).glob("*" + SHARD_SUFFIX)
                if not p.name.startswith(files.TMP_PREFIX))


class ShardSlices:
  """The slice records of one split, random access, decoded to float32.

  A grain `RandomAccessDataSource` (the protocol: `__len__`, `__getitem__`). grain is
  imported here, not at the top, so that `prepare`'s worker processes start quickly.
  """

  def __init__(self, directory, split: str):
    import grain
    self._directory, self._split = str(directory), split
    paths = shard_paths(directory, split)
    if not paths:
      raise UserError(f"no {split} shards under {directory}")
    self._records = grain.sources.ArrayRecordDataSource([str(p) for p in paths])

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index) -> dict:
    return records.decode(self._records[index])

  def __getitems__(self, indices) -> list[dict]:
    return [records.decode(b) for b in self._records.__getitems__(indices)]

  def __repr__(self) -> str:
    return f"ShardSlices({self._directory!r}, {self._split!r})"


def read_shard(path) -> list[dict]:
  from array_record.python.array_record_module import ArrayRecordReader
  reader = ArrayRecordReader(str(path))
  try:
    return [records.decode(b) for b in reader.read_all()]
  finally:
    reader.close()


def split_metadata(directory, split: str) -> list[dict]:
  """The per-subject json `prepare` wrote beside each shard of `split`."""
  return [json.loads(path.with_name(path.name[:-len(SHARD_SUFFIX)] + ".json").read_text())
          for path in shard_paths(directory, split)]


def split_volumes(directory, split: str) -> list[Volume]:
  """Each subject of `split` as a `Volume`: its foreground slices in order.

  Reads only that split's folder (each shard and the metadata beside it).
  """
  result = []
  for path in shard_paths(directory, split):
    meta = json.loads(path.with_name(path.name[:-len(SHARD_SUFFIX)] + ".json").read_text())
    subject_records = sorted(read_shard(path), key=lambda r: int(r["slice"]))
    target = meta["targets"][0]
    result.append(Volume(
        subject=meta["subject"],
        source=np.stack([r["source"] for r in subject_records]),
        target=np.stack([r["target"] for r in subject_records]),
        mask=np.stack([r["mask"] for r in subject_records]),
        target_params=meta["normalisation"][target]))
  if not result:
    raise UserError(f"no {split} subjects under {directory}: the evaluation needs at least one")
  return sorted(result, key=lambda v: v.subject)
