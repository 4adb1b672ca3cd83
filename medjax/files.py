"""Writing files whole or not at all, and names that stay inside their folder.

Every file medjax writes goes through `atomic_write`: the content lands in a hidden
temporary file beside the target (`.tmp-<pid>-<name>`, so readers and dataset scanners
skip it) and is renamed over the target only once complete. A crash or Ctrl-C halfway
leaves the previous file, never half of a new one, and removes the temporary.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from pathlib import Path

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_write(path):
  """Yield a temporary path with the target's name and suffixes; rename it on success."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def write_text(path, text: str) -> Path:
  with atomic_write(path) as tmp:
    Path(tmp).write_text(text)
  return Path(path)


def write_json(path, value, indent: int | None = 2) -> Path:
  return write_text(path, json.dumps(value, indent=indent, default=_plain) + "\n")


def write_csv(path, rows: list[dict], columns: list[str] | None = None) -> Path:
  columns = columns or (list(rows[0]) if rows else [])
  with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  return Path(path)


def remove_stale(directory) -> list[Path]:
  """Temporaries a killed process left in `directory` (not recursive); removed."""
  stale = sorted(Path(directory).glob(TMP_PREFIX + "*")) if Path(directory).is_dir() else []
  for path in stale:
    path.unlink(missing_ok=True)
  return stale


def _plain(value):
  if hasattr(value, "tolist"):  # numpy scalars and arrays
    return value.tolist()
  if isinstance(value, (tuple, set, Path)):
    return list(value) if not isinstance(value, Path) else str(value)
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def safe_stem(name: str) -> str:
  """A subject id as one file name that cannot leave its folder: `a/b` → `a__b`,
  `../x` → `__x` (no leading dots), NUL, newlines and other odd characters → `_`."""
  stem = _UNSAFE.sub("_", str(name).replace("/", "__").replace("\\", "__"))
  stem = stem.lstrip(".") or "_"
  return stem
