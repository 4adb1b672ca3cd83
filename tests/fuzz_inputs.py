"""Hostile inputs for every file reader medjax has, and what surviving one means.

Shared by tests/test_fuzz.py (hypothesis makes the choices, so a failure shrinks to a
minimal file) and benchmarks/robustness.py (`tally`: the same inputs from a seeded
`random.Random`, counted per reader). A plain module, not a conftest: import it with
`sys.path.insert(0, "tests")`.

Each `Reader` writes one hostile input into an empty folder (`make(pick, folder)`, the
choices coming from a `Pick`), hands it to a medjax reader (`read`) and judges the result
(`attempt` → `Outcome`). The contract every reader must keep (issue 15):

  ok        it read the input and the result is sane (`check`: finite float32 3D volumes
            with a plausible affine, well-formed records, subjects whose files exist …);
  refused   it raised its documented error (`errors`) in one line naming the file
            (`named`);

and nothing else. Anything else is counted against it:

  traceback    another exception escaped (what a user would see as a traceback);
  bad_message  the documented error, but over several lines or without the file's name;
  insane       it returned, but what it returned is not usable (`check` failed);
  hang         it ran past the time limit (`attempt`'s `timeout_s`, a SIGALRM).

Generators (`make_*`) for: nifti (.nii: every header field, extensions, truncation, bit
flips), nifti_gz (the same gzipped, then the gzip stream truncated, flipped, extended),
mha (MetaImage header keys and values, pixel data, truncation, flips), csv (a subjects
table: columns, ragged rows, hostile ids and paths, encodings, BOMs, NUL bytes), manifest
(manifest.json read by `shards.recipe`), manifest_resume (the same, met by `prepare`
resuming on that folder), record (`records.decode` on altered bytes), shard (a whole
.array_record file: `shards.read_shard`), shard_slices (the grain source over a split:
`shards.ShardSlices`), subject_json (`<id>.json` beside a shard: `split_metadata`,
`split_volumes`), split (shard and json together: `split_volumes`), translations
(translate's index read by `score`).
"""

from __future__ import annotations

import codecs
import contextlib
import copy
import csv
import dataclasses
import gzip
import io
import json
import math
import os
import random
import shutil
import signal
import struct
import time
import traceback
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

NAN, INF = float("nan"), float("inf")


# --- choices ------------------------------------------------------------------------------

class Pick:
  """Where a generator's choices come from. Subclasses: hypothesis or `random.Random`."""

  def one(self, options):
    raise NotImplementedError

  def integer(self, low: int, high: int) -> int:
    raise NotImplementedError

  def chance(self) -> bool:
    raise NotImplementedError

  def few(self, most: int) -> int:
    """How many times to do something: 0 … most, small numbers first."""
    return self.integer(0, most)


class RandomPick(Pick):
  """Choices from a seeded `random.Random` (benchmarks/robustness.py)."""

  def __init__(self, rng: random.Random):
    self.rng = rng

  def one(self, options):
    return options[self.rng.randrange(len(options))]

  def integer(self, low, high):
    return self.rng.randint(low, high)

  def chance(self):
    return self.rng.random() < 0.5

  def few(self, most):
    # Mostly light damage, as real files have: 0 or 1 changes, sometimes many.
    return min(most, int(self.rng.expovariate(1.0)))


class HypothesisPick(Pick):
  """Choices drawn from a hypothesis `data` object, so that failures shrink: towards the
  first option, the low end, False and 0 (the undamaged file)."""

  def __init__(self, data):
    from hypothesis import strategies as st
    self.data, self.st = data, st

  def one(self, options):
    return options[self.data.draw(self.st.integers(0, len(options) - 1))]

  def integer(self, low, high):
    return self.data.draw(self.st.integers(low, high))

  def chance(self):
    return self.data.draw(self.st.booleans())


# --- byte-level damage --------------------------------------------------------------------

def damage_bytes(pick: Pick, raw: bytes, *, hot: list[tuple[int, int]] | None = None,
                 flips: int = 4) -> bytes:
  """Truncate, flip bits, overwrite or append: what copies, disks and downloads do.
  `hot` are (start, end) byte ranges where flips matter (not padding)."""
  raw = bytearray(raw)
  ranges = [r for r in (hot or [(0, len(raw))]) if r[1] > r[0]]
  for _ in range(pick.few(flips)):
    if not ranges:
      break
    start, end = pick.one(ranges)
    position = pick.integer(start, min(end, len(raw)) - 1) if min(end, len(raw)) > start else 0
    if position < len(raw):
      raw[position] ^= 1 << pick.integer(0, 7)
  if pick.chance():
    kind = pick.one(["truncate", "append", "zero_run", "random_run", "duplicate"])
    if kind == "truncate":
      raw = raw[:pick.integer(0, max(len(raw) - 1, 0))]
    elif kind == "append":
      raw += pick.one([b"\x00", b"junk", bytes(1000), b"\xff" * 7])
    elif kind in ("zero_run", "random_run") and raw:
      start = pick.integer(0, len(raw) - 1)
      length = pick.integer(1, 64)
      fill = (bytes(length) if kind == "zero_run"
              else bytes(pick.integer(0, 255) for _ in range(min(length, 8))) * 8)
      raw[start:start + length] = fill[:length]
    elif kind == "duplicate":
      raw = raw + raw
  return bytes(raw)


# --- NIfTI --------------------------------------------------------------------------------

_NIFTI_DTYPES = [np.int16, np.uint8, np.float32, np.int32, np.float64, np.int8, np.uint16]
_FLOATS = [0.0, 1.0, -1.0, 1e-30, 1e30, NAN, INF, -INF, 3.4e38, 0.5, 2.0]
_NIFTI_FIELDS = {
    # field: (indices or None, hostile values)
    "sizeof_hdr": (None, [348, 540, 0, 1, -348, 2 ** 31 - 1, 1543569408]),
    "dim": (range(8), [0, 1, 2, 3, 4, 7, 8, -1, 255, 10000, 32767, -32768]),
    "datatype": (None, [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536,
                        1792, 2048, 2304, 255, 999, -1, 32767]),
    "bitpix": (None, [0, -1, 8, 16, 32, 1000]),
    "pixdim": (range(8), _FLOATS),
    "vox_offset": (None, [352.0, 0.0, 10.0, 347.0, 348.0, 353.0, 1e9, 3.4e38, NAN, INF,
                          -1.0, -352.0, 2.0 ** 31, 1e6]),
    "scl_slope": (None, [1.0, 0.0, NAN, INF, -INF, 1e38, 1e-38, -1.0, 3.4e38]),
    "scl_inter": (None, [0.0, NAN, INF, -INF, 1e38, -1e38, 1.0]),
    "qform_code": (None, [0, 1, 2, 3, 4, 5, -1, 99, 32767]),
    "sform_code": (None, [0, 1, 2, 3, 4, 5, -1, 99, 32767]),
    "quatern_b": (None, _FLOATS),
    "quatern_c": (None, _FLOATS),
    "quatern_d": (None, _FLOATS),
    "qoffset_x": (None, _FLOATS),
    "qoffset_y": (None, _FLOATS),
    "qoffset_z": (None, _FLOATS),
    "srow_x": (range(4), _FLOATS),
    "srow_y": (range(4), _FLOATS),
    "srow_z": (range(4), _FLOATS),
    "xyzt_units": (None, [0, 2, 7, 255]),
    "intent_code": (None, [0, 1001, 2005, 32767, -1]),
    "dim_info": (None, [0, 255, 57]),
    "slice_code": (None, [0, 6, 255]),
    "magic": (None, [b"n+1\x00", b"ni1\x00", b"n+2\x00", b"\x00\x00\x00\x00", b"xyz\x00"]),
}


def _patch(raw: bytearray, header_class, field: str, index, value) -> None:
  fields = header_class.template_dtype.fields
  if field not in fields:
    return
  sub, offset = fields[field][:2]
  base = sub.base if sub.shape else sub
  if sub.shape:
    offset += int(index) * base.itemsize
  with warnings.catch_warnings(), np.errstate(all="ignore"):
    warnings.simplefilter("ignore")
    if base.kind == "S":
      encoded = bytes(value)[:base.itemsize].ljust(base.itemsize, b"\x00")
    else:
      encoded = np.array(value).astype(base, casting="unsafe").tobytes()
  raw[offset:offset + len(encoded)] = encoded


def nifti_bytes(pick: Pick) -> bytes:
  """An uncompressed NIfTI-1 (or -2) file: a valid small image, then hostile header
  fields, header extensions and byte damage."""
  import nibabel as nib
  two = pick.chance() and pick.chance()
  shape = tuple(pick.integer(1, 5) for _ in range(3)) + ((pick.integer(1, 2),)
                                                         if pick.chance() and pick.chance() else ())
  dtype = pick.one(_NIFTI_DTYPES)
  values = np.arange(math.prod(shape)) % 97 - (0 if np.dtype(dtype).kind == "u" else 40)
  spacing = [pick.one([1.0, 0.5, 2.5, 3.0]) for _ in range(3)]
  affine = np.diag(spacing + [1.0])
  affine[:3, 3] = [pick.one([0.0, -10.0, 100.0]) for _ in range(3)]
  image_class = nib.Nifti2Image if two else nib.Nifti1Image
  image = image_class(values.reshape(shape).astype(dtype), affine)
  image.set_qform(affine, code=pick.one([1, 0, 2]))
  image.set_sform(affine, code=pick.one([1, 0, 2, 4]))
  raw = bytearray(image.to_bytes())
  header_class = type(image.header)
  names = list(_NIFTI_FIELDS)
  for _ in range(pick.few(6)):
    field = pick.one(names)
    indices, options = _NIFTI_FIELDS[field]
    _patch(raw, header_class, field, pick.one(list(indices)) if indices else None,
           pick.one(options))
  size = header_class.sizeof_hdr
  if pick.chance() and pick.chance():  # a header extension, maybe lying about its size
    raw[size] = 1
    esize = pick.one([16, 32, 0, 8, -16, 1, 2 ** 31 - 1, 24])
    ecode = pick.one([6, 0, 2, 4, 14, 32, 44, -1])
    body = struct.pack("<ii", esize, ecode) + b"comment!" * pick.integer(0, 3)
    raw[size + 4:size + 4] = body
    _patch(raw, header_class, "vox_offset", None,
           pick.one([size + 4 + len(body), size + 4, size + 4 + 16, 1e6]))
  return damage_bytes(pick, bytes(raw), hot=[(0, size + 40), (size + 40, len(raw))])


def nifti_gz_bytes(pick: Pick) -> bytes:
  """A NIfTI (`nifti_bytes`) gzipped, then the gzip stream itself damaged."""
  compressed = gzip.compress(nifti_bytes(pick), compresslevel=pick.one([6, 1, 9]),
                             mtime=0)
  if pick.chance() and pick.chance():  # two members: gzip allows it
    compressed += gzip.compress(b"trailing member", mtime=0)
  return damage_bytes(pick, compressed)


# --- MetaImage ----------------------------------------------------------------------------

_MHA_TYPES = {"MET_SHORT": "<i2", "MET_UCHAR": "u1", "MET_FLOAT": "<f4", "MET_DOUBLE": "<f8",
              "MET_INT": "<i4"}
_MHA_VALUES = {
    "NDims": ["3", "0", "1", "2", "4", "-1", "100", "2147483647", "x", ""],
    "DimSize": ["4 5 6", "0 5 6", "-1 5 6", "4 5", "4 5 6 7", "10000 10000 10000",
                "4294967295 1 1", "x y z", "4.5 5 6", "", "1 1 1", "4 5 6 1",
                "99999999999999999999 2 2"],
    "ElementType": ["MET_SHORT", "MET_UCHAR", "MET_FLOAT", "MET_DOUBLE", "MET_LONG_LONG",
                    "MET_NONE", "MET_OTHER", "MET_STRING", "MET_FLOAT_ARRAY", "MET_CHAR_ARRAY",
                    "garbage", ""],
    "ElementSpacing": ["1 1 1", "0 1 1", "-1 1 1", "nan 1 1", "inf 1 1", "1e-30 1 1",
                       "1e30 1 1", "x", "1 1", ""],
    "TransformMatrix": ["1 0 0 0 1 0 0 0 1", "0 0 0 0 0 0 0 0 0", "nan 0 0 0 1 0 0 0 1",
                        "1 0 0", "1 0 0 1 0 0 0 0 1", "x", "inf inf inf inf inf inf inf inf inf"],
    "Offset": ["0 0 0", "nan 0 0", "1e308 0 0", "x", "1e400 0 0"],
    "ElementNumberOfChannels": ["1", "0", "3", "-1", "1000000000"],
    "CompressedData": ["False", "True"],
    "CompressedDataSize": ["0", "10", "-1", "99999999999"],
    "HeaderSize": ["0", "-1", "10", "100000"],
    "BinaryDataByteOrderMSB": ["False", "True"],
    "ElementDataFile": ["LOCAL", "missing.raw", "/dev/zero", "/dev/stdin", "LIST",
                        "x%03d.raw 1 3 1", "", ".", "/", "x.mha", "data.raw"],
    "AnatomicalOrientation": ["RAI", "LPS", "???", ""],
}


def mha_files(pick: Pick, folder: Path) -> Path:
  """`folder/x.mha` (with, sometimes, a `data.raw` beside it): a MetaImage header of
  hostile keys and values over valid or damaged pixel data."""
  kind = pick.one(list(_MHA_TYPES))
  shape = (4, 5, 6)
  pixels = (np.arange(math.prod(shape)) % 50).astype(_MHA_TYPES[kind]).tobytes()
  compressed = pick.chance() and pick.chance()
  data = zlib.compress(pixels) if compressed else pixels
  header = {"ObjectType": "Image", "NDims": "3", "BinaryData": "True",
            "BinaryDataByteOrderMSB": "False", "CompressedData": str(compressed)}
  if compressed:
    header["CompressedDataSize"] = str(len(data))
  header.update({"TransformMatrix": "1 0 0 0 1 0 0 0 1", "Offset": "0 0 0",
                 "CenterOfRotation": "0 0 0", "AnatomicalOrientation": "RAI",
                 "ElementSpacing": "1 1 1", "DimSize": "4 5 6", "ElementType": kind,
                 "ElementDataFile": "LOCAL"})
  keys = list(_MHA_VALUES)
  for _ in range(pick.few(4)):
    key = pick.one(keys)
    header[key] = pick.one(_MHA_VALUES[key])
  lines = [f"{k} = {v}" for k, v in header.items() if k != "ElementDataFile"]
  for _ in range(pick.few(2)):  # a line lost or doubled
    if lines:
      i = pick.integer(0, len(lines) - 1)
      lines.insert(i, lines[i]) if pick.chance() else lines.pop(i)
  lines.append(f"ElementDataFile = {header['ElementDataFile']}")
  text = ("\n".join(lines) + "\n").encode()
  if header["ElementDataFile"] == "data.raw":
    (folder / "data.raw").write_bytes(damage_bytes(pick, data))
    raw = damage_bytes(pick, text)
  else:
    raw = damage_bytes(pick, text + data, hot=[(0, len(text)), (len(text), len(text) + len(data))])
  path = folder / "x.mha"
  path.write_bytes(raw)
  return path


# --- CSV subject tables -------------------------------------------------------------------

_CSV_COLUMNS = ["subject", "t1w", "t2w", "Subject ", "id", "participant_id", "T1", "FLAIR",
                "ct", "mask", "site", "group", "notes", "", "subject", "t1"]
_CSV_IDS = ["a", "b", "a", "../../x", "/abs/path", "a\nb", "", " ", "x" * 300, "é", "a,b",
            '"unbalanced', "sub-01", "..", "."]
_CSV_PATHS = ["img.nii.gz", "missing.nii.gz", "", "/", ".", "..", "sub", "x" * 5000,
              "/dev/null", "../img.nii.gz", "img.nii.gz ", "sub/../img.nii.gz"]
_CSV_ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "latin-1", "cp1252",
                  "utf-32"]


def csv_files(pick: Pick, folder: Path) -> Path:
  """`folder/subjects.csv` beside `img.nii.gz` and a folder `sub`: columns, rows, cells,
  quoting, line ends, encodings and byte damage."""
  (folder / "img.nii.gz").write_bytes(b"")
  (folder / "sub").mkdir(exist_ok=True)
  columns = ["subject", "t1w"] if pick.chance() else [
      pick.one(_CSV_COLUMNS) for _ in range(pick.integer(0, 5))]
  rows = []
  for _ in range(pick.integer(0, 4)):
    cells = [pick.one(_CSV_IDS)] + [pick.one(_CSV_PATHS) for _ in range(len(columns) - 1)]
    for _ in range(pick.few(2)):  # ragged: a cell too few or too many
      cells.pop() if cells and pick.chance() else cells.append(pick.one(_CSV_PATHS))
    rows.append(cells)
  ending = pick.one(["\n", "\r\n", "\r"])
  out = io.StringIO()
  if pick.chance():
    writer = csv.writer(out, lineterminator=ending)
    writer.writerow(columns)
    writer.writerows(rows)
  else:  # by hand: quotes and commas as they come
    out.write(ending.join(",".join(row) for row in [columns] + rows) + ending)
  encoding = "utf-8" if pick.chance() else pick.one(_CSV_ENCODINGS)
  raw = out.getvalue().encode(encoding, errors="replace")
  if pick.chance() and pick.chance():
    raw = pick.one([codecs.BOM_UTF8, codecs.BOM_UTF16_LE, b"\x00", b"\xff"]) + raw
  path = folder / "subjects.csv"
  path.write_bytes(damage_bytes(pick, raw))
  return path


# --- JSON files ---------------------------------------------------------------------------

_JSON_VALUES = [None, True, False, 0, -1, 1e308, NAN, "", "x", "../../x", [], {}, [1, 2],
                {"a": 1}, 2 ** 70, "t1w", [None], -0.0]


def _json_paths(value, prefix=()):
  yield prefix
  if isinstance(value, dict):
    for key, item in value.items():
      yield from _json_paths(item, prefix + (key,))
  elif isinstance(value, list):
    for i, item in enumerate(value):
      yield from _json_paths(item, prefix + (i,))


def damage_json(pick: Pick, value) -> bytes:
  """A JSON document with values retyped, keys removed or added, then its text damaged:
  truncation, bit flips, another encoding, deep nesting."""
  value = json.loads(json.dumps(value))
  for _ in range(pick.few(3)):
    paths = list(_json_paths(value))
    path = pick.one(paths)
    if not path:
      value = copy.deepcopy(pick.one(_JSON_VALUES + [[value]]))
      continue
    parent = value
    for key in path[:-1]:
      parent = parent[key]
    action = pick.one(["retype", "delete", "add"])
    if action == "retype":
      parent[path[-1]] = copy.deepcopy(pick.one(_JSON_VALUES))
    elif action == "delete":
      del parent[path[-1]]
    elif isinstance(parent, dict):
      parent[pick.one(["extra", "subjects", "recipe"])] = copy.deepcopy(pick.one(_JSON_VALUES))
  text = json.dumps(value, indent=pick.one([None, 1]))
  if pick.chance() and pick.chance():
    text = pick.one(["[" * 100000, "{\"a\":" * 50000, "\ufeff" + text, text + "garbage"])
  raw = text.encode(pick.one(["utf-8"] * 4 + ["utf-16", "latin-1"]), errors="replace")
  return damage_bytes(pick, raw, flips=3)


# --- shard records and files --------------------------------------------------------------

def record_template(pick: Pick, subject: int = 0, z: int = 0) -> dict:
  height, width = pick.integer(1, 4), pick.integer(1, 4)
  cs, ct = pick.integer(1, 3), pick.integer(1, 2)
  grid = np.linspace(-1, 1, height * width).reshape(height, width, 1)
  return {"source": np.repeat(grid, cs, -1), "target": np.repeat(-grid, ct, -1),
          "mask": (grid > 0).astype(np.float32), "subject": subject, "slice": z}


def record_bytes(pick: Pick) -> bytes:
  """An encoded slice record with its header fields and bytes altered."""
  from medjax.data import records
  raw = bytearray(records.encode(record_template(pick)))
  header = records._HEADER
  for _ in range(pick.few(3)):
    field = pick.integer(0, 6)
    values = list(header.unpack_from(raw))
    values[field] = (pick.one([b"MJX1", b"MJX2", b"\x00\x00\x00\x00"]) if field == 0
                     else pick.one([0, 1, 2, 3, 4, 255, 65535]) if field < 5
                     else pick.one([0, 1, -1, 2 ** 31 - 1, -2 ** 31]))
    raw[:header.size] = header.pack(*values)
  return damage_bytes(pick, bytes(raw), hot=[(0, header.size), (header.size, len(raw))])


def _write_shard(path: Path, payloads: list[bytes]) -> None:
  from array_record.python.array_record_module import ArrayRecordWriter

  from medjax.data.prepare import WRITER_OPTIONS
  writer = ArrayRecordWriter(str(path), WRITER_OPTIONS)
  for payload in payloads:
    writer.write(payload)
  writer.close()


def _damage_shard(pick: Pick, path: Path) -> None:
  raw = path.read_bytes()
  block = 1 << 16
  # Where the bytes are: the records at the start, the block header at 64 kB, the footer
  # and postscript at the end; the rest is padding, where a flip changes nothing.
  hot = [(0, 2048), (block, block + 256), (max(len(raw) - 512, 0), len(raw))]
  if pick.chance() and pick.chance():
    raw = pick.one([b"", b"not a shard", os.urandom(70000), bytes(70000)])
  path.write_bytes(damage_bytes(pick, raw, hot=hot, flips=3))


def shard_files(pick: Pick, folder: Path) -> Path:
  """`folder/s.array_record`: one to three records (maybe altered), then the file damaged."""
  from medjax.data import records
  payloads = [records.encode(record_template(pick, z=z)) for z in range(pick.integer(1, 3))]
  if pick.chance() and pick.chance():
    payloads[0] = record_bytes(pick)
  path = folder / "s.array_record"
  _write_shard(path, payloads)
  _damage_shard(pick, path)
  return path


def _subject_meta(subject: str, slices: list[int]) -> dict:
  return {"subject": subject, "index": 0, "split": "val", "sources": ["t1w"],
          "targets": ["t2w"], "geometry": {"reference": "t1w", "mask": "auto"},
          "normalisation": {"t1w": {"kind": "mr", "lo": 0.0, "hi": 400.0},
                            "t2w": {"kind": "mr", "lo": 1.0, "hi": 300.0}},
          "slices": slices}


def split_folder(pick: Pick, folder: Path, *, damage_shard: bool | None = None,
                 damage_meta: bool | None = None) -> Path:
  """`folder/val/<id>.array_record` + `<id>.json` of two subjects, one of them damaged
  (its shard, its json or both)."""
  from medjax.data import records
  split = folder / "val"
  split.mkdir(parents=True, exist_ok=True)
  for subject in ("good", "bad"):
    template = record_template(pick)
    payloads = [records.encode({**template, "slice": z}) for z in range(3)]
    _write_shard(split / f"{subject}.array_record", payloads)
    (split / f"{subject}.json").write_text(json.dumps(_subject_meta(subject, [0, 1, 2])))
  shard, meta = split / "bad.array_record", split / "bad.json"
  if damage_shard if damage_shard is not None else pick.chance():
    _damage_shard(pick, shard)
  if damage_meta if damage_meta is not None else pick.chance():
    meta.write_bytes(damage_json(pick, _subject_meta("bad", [0, 1, 2])))
  return folder


# --- manifests and indexes ----------------------------------------------------------------

def manifest_template() -> dict:
  from medjax.data import prepare, records
  from medjax.data.preprocess import Recipe
  recipe = Recipe(sources=("t1w",), targets=("t2w",), spacing=(1.0, 1.0, 2.0), size=(24, 24))
  return {"version": 2, "command": "medjax prepare …", "root": "/data",
          "settings": {"layout": "csv", "fractions": [1.0, 0.0, 0.0], "seed": 0,
                       "storage": records.STORAGE},
          "recipe": recipe.to_dict(), "channels": {"source": ["t1w"], "target": ["t2w"]},
          "subjects": ["a", "b"], "complete": True,
          "splits": {name: (["a", "b"] if name == "train" else []) for name in prepare.SPLITS},
          "skipped": [], "issues": {}}


def manifest_folder(pick: Pick, folder: Path) -> Path:
  """`folder/manifest.json` altered."""
  (folder / "manifest.json").write_bytes(damage_json(pick, manifest_template()))
  return folder


def translations_folder(pick: Pick, folder: Path) -> Path:
  """`folder/translations.json` (translate's index, read by `score`) altered."""
  index = {"target": "t2w", "sources": ["t1w"], "step": 6,
           "subjects": {"a": {"prediction": "a.nii.gz", "std": None,
                              "sources": ["/data/a/t1w.nii.gz"], "mask": None,
                              "seconds": 0.1}},
           "failed": {}}
  (folder / "a.nii.gz").write_bytes(b"")
  (folder / "translations.json").write_bytes(damage_json(pick, index))
  return folder


# --- prepare resuming on a damaged output folder ------------------------------------------

_RESUME_CACHE: dict[str, Path] = {}


def _prepared_template(scratch: Path) -> tuple[Path, Path]:
  """A tiny csv dataset and its prepared output folder, made once per scratch folder."""
  key = str(scratch)
  if key not in _RESUME_CACHE:
    import nibabel as nib

    from medjax.data import prepare
    root = scratch / "resume_dataset"
    root.mkdir(parents=True, exist_ok=True)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (12, 12, 6)), indexing="ij")
    body = x ** 2 + y ** 2 < 0.5
    rows = ["subject,t1w,t2w"]
    for i, sid in enumerate(["a", "b"]):
      for modality, scale in (("t1w", 300), ("t2w", 200)):
        data = np.where(body, scale + 10 * (i + 1) * (x + z), 0).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), root / f"{sid}_{modality}.nii.gz")
      rows.append(f"{sid},{sid}_t1w.nii.gz,{sid}_t2w.nii.gz")
    (root / "subjects.csv").write_text("\n".join(rows) + "\n")
    out = scratch / "resume_prepared"
    prepare.prepare("csv", root / "subjects.csv", out, ["t1w"], "t2w", size=12,
                    fractions=(1, 0, 0), progress=False)
    _RESUME_CACHE[key] = root
  return _RESUME_CACHE[key], scratch / "resume_prepared"


def resume_folder(pick: Pick, folder: Path) -> Path:
  """A finished `prepare` output copied to `folder/out` with its manifest (or a subject's
  json) altered; `read` runs the same `prepare` on it again."""
  _, template = _prepared_template(folder.parent)
  out = folder / "out"
  shutil.copytree(template, out)
  if pick.chance() or pick.chance():
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_bytes(damage_json(pick, manifest))
  else:
    meta = out / "train" / "a.json"
    meta.write_bytes(damage_json(pick, json.loads(meta.read_text())))
  return out


def _resume(out: Path):
  from medjax.data import prepare
  root = _RESUME_CACHE[str(out.parent.parent)]
  return prepare.prepare("csv", root / "subjects.csv", out, ["t1w"], "t2w", size=12,
                         fractions=(1, 0, 0), progress=False)


# --- what a success must look like --------------------------------------------------------

def check_volume(result, path) -> None:
  from medjax.data import volumes
  data, affine = result
  assert isinstance(data, np.ndarray) and data.dtype == np.float32, data.dtype
  assert data.ndim == 3 and min(data.shape) >= 1, data.shape
  assert np.isfinite(data).all(), "non-finite voxels"
  assert affine.shape == (4, 4) and np.isfinite(affine).all(), affine
  volumes.check_affine(path, affine)


def check_subjects(result, path) -> None:
  ids = [s.id for s in result]
  assert len(set(ids)) == len(ids), ids
  for subject in result:
    assert isinstance(subject.id, str) and subject.id.strip(), repr(subject.id)
    for modality, file in subject.files.items():
      assert isinstance(file, Path) and file.is_file(), (modality, file)
    assert all(isinstance(issue, str) for issue in subject.issues)


def check_record(record, path=None) -> None:
  h, w, cs = record["source"].shape
  assert record["target"].shape[:2] == (h, w) and record["mask"].shape == (h, w, 1)
  assert min(h, w, cs, record["target"].shape[2]) >= 1
  for name in ("source", "target", "mask"):
    values = record[name]
    assert values.dtype == np.float32 and np.isfinite(values).all(), name
    assert np.abs(values).max() <= 1.0001, name
  assert set(np.unique(record["mask"])) <= {0.0, 1.0}


def check_records(result, path) -> None:
  assert isinstance(result, list)
  for record in result:
    check_record(record)


def check_slices(source, path) -> None:
  for i in range(len(source)):
    check_record(source[i])


def check_volumes(result, path) -> None:
  assert result
  for volume in result:
    assert volume.source.ndim == 4 and volume.source.shape[:3] == volume.target.shape[:3]
    assert volume.mask.shape[:3] == volume.source.shape[:3]
    for array in (volume.source, volume.target, volume.mask):
      assert np.isfinite(array).all()
    lo, hi = volume.target_params["lo"], volume.target_params["hi"]
    assert math.isfinite(lo) and math.isfinite(hi) and hi > lo


def check_metadata(result, path) -> None:
  for meta in result:
    assert isinstance(meta["subject"], str) and isinstance(meta["slices"], list)


def check_recipe(result, path) -> None:
  from medjax import modalities
  assert result.sources and all(m in modalities.ALL for m in result.sources)
  assert result.targets and all(m in modalities.ALL for m in result.targets)
  assert len(result.spacing) == 3 and all(math.isfinite(s) and s > 0 for s in result.spacing)
  assert len(result.size) == 2 and all(s >= 1 for s in result.size)
  assert result.context >= 0


def check_manifest(result, path) -> None:
  assert isinstance(result, dict) and result["complete"] is True


def check_index(result, path) -> None:
  files, extras = result
  assert all(isinstance(p, Path) for p in files.values())
  for extra in extras.values():
    assert all(v is None or isinstance(v, Path) for v in extra.values())


# --- the readers --------------------------------------------------------------------------

def _user_errors():
  from medjax.errors import UserError
  return (UserError,)


def _layout_errors():
  from medjax.errors import UserError
  return (UserError, ValueError)


def _read_slices(folder: Path):
  from medjax.data import shards
  source = shards.ShardSlices(folder, "train")
  return [source[i] for i in range(len(source))]


def _read_split(folder: Path):
  from medjax.data import shards
  return shards.split_volumes(folder, "val")


def _read_metadata(folder: Path):
  from medjax.data import shards
  shards.split_volumes(folder, "val")
  return shards.split_metadata(folder, "val")


def _write(suffix: str, make_bytes: Callable[[Pick], bytes]):
  def make(pick: Pick, folder: Path) -> Path:
    path = folder / f"x{suffix}"
    path.write_bytes(make_bytes(pick))
    return path
  return make


def _shard_in_train(pick: Pick, folder: Path) -> Path:
  (folder / "train").mkdir()
  shard = shard_files(pick, folder)
  shard.rename(folder / "train" / shard.name)
  return folder


def _load(path):
  from medjax.data import volumes
  return volumes.load(path)


def _find_csv(path):
  from medjax.data import layouts
  return layouts.find_subjects("csv", path)


def _recipe(folder):
  from medjax.data import shards
  shards.load_manifest(folder)
  return shards.recipe(folder)


def _decode(path):
  from medjax.data import records
  return records.decode(path.read_bytes())


def _read_shard(path):
  from medjax.data import shards
  return shards.read_shard(path)


def _index(folder):
  from medjax import score
  return score.image_files(folder), score.translation_extras(folder)


@dataclasses.dataclass(frozen=True)
class Reader:
  """A reader under test: how to make its hostile input, read it and judge the result."""
  name: str
  make: Callable[[Pick, Path], Path]  # writes the input under an empty folder
  read: Callable[[Path], object]
  check: Callable[[object, Path], None]
  errors: Callable[[], tuple]  # the documented error types (imported late)
  named: Callable[[Path], list[str]] = lambda path: [str(path)]  # any of these names it


READERS = {reader.name: reader for reader in [
    Reader("nifti", _write(".nii", nifti_bytes), _load, check_volume, _user_errors),
    Reader("nifti_gz", _write(".nii.gz", nifti_gz_bytes), _load, check_volume, _user_errors),
    Reader("mha", mha_files, _load, check_volume, _user_errors),
    Reader("csv", csv_files, _find_csv, check_subjects, _layout_errors),
    Reader("manifest", manifest_folder, _recipe, check_recipe, _user_errors,
           lambda folder: [str(folder / "manifest.json")]),
    Reader("manifest_resume", resume_folder, _resume, check_manifest, _user_errors,
           lambda out: [str(out)]),
    Reader("record", _write(".record", record_bytes), _decode, check_record,
           lambda: (ValueError,), lambda path: [""]),  # bytes in memory: no file to name
    Reader("shard", shard_files, _read_shard, check_records, _user_errors),
    Reader("shard_slices", _shard_in_train, _read_slices, check_records, _user_errors,
           lambda folder: [str(folder / "train")]),
    Reader("subject_json", lambda pick, folder: split_folder(pick, folder, damage_shard=False,
                                                             damage_meta=True),
           _read_metadata, check_metadata, _user_errors,
           lambda folder: [str(folder / "val" / "bad.json")]),
    Reader("split", split_folder, _read_split, check_volumes, _user_errors,
           lambda folder: [str(folder / "val" / "bad.")]),
    Reader("translations", translations_folder, _index, check_index, _user_errors,
           lambda folder: [str(folder / "translations.json")]),
]}


# --- running one input --------------------------------------------------------------------

class Hang(BaseException):
  """The reader ran past its time limit (raised by SIGALRM)."""


@contextlib.contextmanager
def time_limit(seconds: float):
  """Raise `Hang` in the main thread after `seconds` (elsewhere: no limit)."""
  if seconds is None or not hasattr(signal, "setitimer") or \
      signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
    yield
    return
  import threading
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def alarm(signum, frame):
    raise Hang(f"still running after {seconds} s")

  previous = signal.signal(signal.SIGALRM, alarm)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@dataclasses.dataclass
class Outcome:
  kind: str  # ok, refused, traceback, bad_message, insane, hang
  detail: str = ""
  seconds: float = 0.0

  @property
  def kept_the_contract(self) -> bool:
    return self.kind in ("ok", "refused")


def attempt(reader: Reader, pick: Pick, folder: Path, timeout_s: float = 20.0) -> Outcome:
  """Make one input under `folder` (emptied first), read it and judge what happened."""
  if folder.exists():
    shutil.rmtree(folder)
  folder.mkdir(parents=True)
  path = reader.make(pick, folder)
  start = time.perf_counter()
  try:
    with time_limit(timeout_s), warnings.catch_warnings():
      warnings.simplefilter("ignore")
      result = reader.read(path)
  except Hang as error:
    return Outcome("hang", str(error), time.perf_counter() - start)
  except reader.errors() as error:
    seconds = time.perf_counter() - start
    message = str(error)
    if "\n" in message.strip() or "Traceback" in message:
      return Outcome("bad_message", f"over several lines: {message!r}", seconds)
    if not any(name in message for name in reader.named(path)):
      return Outcome("bad_message", f"does not name {reader.named(path)}: {message!r}",
                     seconds)
    return Outcome("refused", message, seconds)
  except Exception:
    return Outcome("traceback", traceback.format_exc(limit=-8), time.perf_counter() - start)
  seconds = time.perf_counter() - start
  try:
    reader.check(result, path)
  except Exception as error:
    return Outcome("insane", f"{type(error).__name__}: {error}", seconds)
  return Outcome("ok", "", seconds)


def describe_input(folder: Path, limit: int = 3000) -> str:
  """The files of a failing input, for the report: names, sizes, and each file's bytes
  (base64, cut at `limit` characters)."""
  import base64
  lines = []
  for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    raw = path.read_bytes()
    text = base64.b64encode(raw).decode()
    lines.append(f"{path} ({len(raw)} bytes) base64: {text[:limit]}"
                 + ("…" if len(text) > limit else ""))
  return "\n".join(lines)


def tally(names=None, examples: int = 200, seed: int = 0, scratch=None,
          timeout_s: float = 20.0) -> dict[str, dict]:
  """Try `examples` seeded inputs per reader: {reader: {"tried", "ok", "refused",
  "traceback", "bad_message", "insane", "hang", "seconds", "first_problem"}}.

  For benchmarks/robustness.py: the same generators as the tests, without hypothesis.
  `first_problem` is the first input that broke the contract (its outcome and files).
  """
  import tempfile
  scratch = Path(scratch or tempfile.mkdtemp(prefix="medjax-fuzz-"))
  results = {}
  for name in names or READERS:
    reader = READERS[name]
    rng = random.Random(f"{seed}-{name}")
    counts = {"tried": 0, "ok": 0, "refused": 0, "traceback": 0, "bad_message": 0,
              "insane": 0, "hang": 0, "seconds": 0.0, "first_problem": None}
    for i in range(examples):
      folder = scratch / name / "input"
      outcome = attempt(reader, RandomPick(rng), folder, timeout_s)
      counts["tried"] += 1
      counts[outcome.kind] += 1
      counts["seconds"] += outcome.seconds
      if not outcome.kept_the_contract and counts["first_problem"] is None:
        counts["first_problem"] = (f"example {i}: {outcome.kind}: {outcome.detail}\n"
                                   + describe_input(folder))
    results[name] = counts
  return results
