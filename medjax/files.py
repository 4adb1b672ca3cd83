"""Writing files whole or not at all, and names that stay inside their folder.

Every file medjax writes goes through `atomic_write`: the content lands in a hidden
temporary file beside the target (`.tmp-<pid>-<name>`, so readers and dataset scanners
skip it) and is renamed over the target only once complete. A crash or Ctrl-C halfway
leaves the previous file, never half of a new one, and removes the temporary; what a
SIGKILL leaves behind is removed by the next write of the same file (its writer's pid is
gone) or by `remove_stale`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from medjax.errors import UserError, disk_error

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_write(path):
  """Yield a temporary path with the target's name and suffixes; rename it on success."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  _remove_dead_temporaries(path)
  tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException as error:
    tmp.unlink(missing_ok=True)
    # A full disk or a read-only folder, said in the words of whichever writer ran
    # (nibabel, ArrayRecord, …), becomes one OSError naming the file the user asked for.
    failed = disk_error(error, path) if isinstance(error, Exception) else None
    if failed is not None:
      raise failed from error
    raise


@contextlib.contextmanager
def atomic_directory(path, *, replace: bool = False):
  """`atomic_write` for a folder of files (a DICOM series, an exported model): yield a
  temporary sibling folder, renamed to `path` once complete. `path` must not exist or be
  empty, unless `replace`: then a folder already there is renamed aside at the end and
  deleted after the new one is in place (the caller decides what may be replaced)."""
  path = Path(path)
  if path.exists() and not path.is_dir():
    raise UserError(f"{path} exists and is not a folder: nothing was written")
  if not replace and path.is_dir() and any(path.iterdir()):
    raise UserError(f"{path} exists and is not an empty folder: nothing was written "
                    "(give a new folder)")
  path.parent.mkdir(parents=True, exist_ok=True)
  _remove_dead_temporaries(path)
  tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    yield tmp
    aside = None
    if path.is_dir() and any(path.iterdir()):
      aside = path.with_name(f"{TMP_PREFIX}{os.getpid()}-old-{path.name}")
      shutil.rmtree(aside, ignore_errors=True)
      os.rename(path, aside)
    os.replace(tmp, path)  # rename(2) replaces an empty folder itself
    if aside is not None:
      shutil.rmtree(aside, ignore_errors=True)
  except BaseException as error:
    shutil.rmtree(tmp, ignore_errors=True)
    # A full or read-only disk names the folder asked for, not the temporary one.
    failed = disk_error(error, path) if isinstance(error, Exception) else None
    if failed is not None:
      raise failed from error
    raise


def _remove(path: Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    path.unlink(missing_ok=True)


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


JSON_MAX_BYTES = 1 << 30  # far above any manifest medjax writes (~2 kB per subject)


def read_json(path, kind=None):
  """The JSON value in `path`, or a `UserError` naming the file: missing, unreadable,
  truncated, not UTF-8, nested too deep; with `kind` (dict, list), of that type."""
  from medjax.errors import UserError
  path = Path(path)
  try:
    if path.stat().st_size > JSON_MAX_BYTES:
      raise UserError(f"{path}: {path.stat().st_size} bytes is too large for a medjax JSON file")
    value = json.loads(path.read_bytes().decode("utf-8"))
  except UserError:
    raise
  except FileNotFoundError:
    raise UserError(f"{path}: file does not exist") from None
  except OSError as error:
    raise UserError(f"{path}: cannot be read ({error.strerror or error})") from None
  except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError
    text = " ".join(str(error).split())[:160]
    raise UserError(f"{path}: not readable JSON ({type(error).__name__}: {text}); the file "
                    "is damaged or truncated") from None
  if kind is not None and not isinstance(value, kind):
    raise UserError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                    f"found {type(value).__name__}")
  return value


def remove_stale(directory) -> list[Path]:
  """Temporaries a killed process left in `directory` (not recursive); removed. A
  temporary whose writer (the pid in its name) still runs on this host is left alone."""
  found = sorted(Path(directory).glob(TMP_PREFIX + "*")) if Path(directory).is_dir() else []
  stale = [path for path in found if not _writer_alive(path.name)]
  for path in stale:
    _remove(path)
  return stale


def _remove_dead_temporaries(path: Path) -> None:
  """A killed earlier writer of this very file left its temporary: it goes now."""
  for tmp in path.parent.glob(f"{TMP_PREFIX}*-{path.name}"):
    pid, _, name = tmp.name[len(TMP_PREFIX):].partition("-")
    if pid.isdigit() and name == path.name and not _writer_alive(tmp.name):
      _remove(tmp)


def _writer_alive(name: str) -> bool:
  pid = name[len(TMP_PREFIX):].split("-", 1)[0]
  if not pid.isdigit() or int(pid) == os.getpid():
    return False
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def _plain(value):
  if hasattr(value, "tolist"):  # numpy scalars and arrays
    return value.tolist()
  if isinstance(value, (tuple, set, Path)):
    return list(value) if not isinstance(value, Path) else str(value)
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# A file name may have 255 bytes: less `.array_record` (the longest suffix medjax puts on
# a stem) and `atomic_write`'s `.tmp-<pid>-` prefix (13 each). Stems this long or shorter
# are kept as they are, so names written before the limit existed stay the same.
STEM_MAX = 229
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def safe_stem(name: str) -> str:
  """A subject id as one file name that cannot leave its folder: `a/b` → `a__b`,
  `../x` → `__x` (no leading dots), NUL, newlines and other odd characters → `_`.
  A stem longer than `STEM_MAX` characters is cut and ends in a hash of the whole id, so
  that every name made from it stays within the 255 bytes a file name may have."""
  stem = _UNSAFE.sub("_", str(name).replace("/", "__").replace("\\", "__"))
  stem = stem.lstrip(".") or "_"
  if len(stem) > STEM_MAX:
    digest = hashlib.sha256(str(name).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    stem = f"{stem[:STEM_MAX - 17]}-{digest}"
  return stem
