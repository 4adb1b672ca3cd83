"""What can go wrong that a user should read as one line, and the exit status it gives.

Library modules raise these; only the command line (`medjax.cli`) turns them into
`medjax <command>: error: …` and an exit status (docs/design.md, "Command line"):

  2  UserError and its kinds: the request cannot run as asked (a flag, a config key, a
     missing or broken file, a workdir of another experiment). Refused before any work.
  1  RunError: the work started and stopped (a non-finite loss), or PartialFailure: some
     subjects failed, the others were written.

An `OSError` with an errno is the system's word on a path and is reported as one line
`<path>: <strerror>` too (`os_error_status`, `os_error_line`): 2 when the path cannot be
used as given (missing, not a folder, not writable, a read-only file system), 1 when the
system gave out while writing (a full disk or quota, a file-size limit, an I/O error).
`disk_error` recognises a failed write in the many forms writers report it.
"""

from __future__ import annotations

import errno
import os
import re

USAGE, FAILURE = 2, 1

# The path as given cannot be used: fix the flag, the folder or its permissions (exit 2).
PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                         errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG,
                         errno.ELOOP})
# Out of room: a full disk or quota, a file-size limit (ulimit -f). Freeing space and
# running the same command again continues where it stopped (exit 1).
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# A write refused because of where it goes, not what it holds: it would fail for every
# other item too, so a batch (`prepare`, `translate --input-dir`) stops on it instead of
# skipping item after item.
DISK_ERRNOS = FULL_ERRNOS | {errno.EROFS, errno.EACCES, errno.EPERM}


class MedjaxError(Exception):
  """Base of every error medjax reports without a traceback."""
  exit_status = USAGE


class UserError(MedjaxError):
  """What was asked for cannot run: a bad flag, value, file or folder."""


class ConfigError(UserError):
  """A user config that cannot run; the message says which key and why."""


class WorkdirError(UserError):
  """The workdir belongs to another experiment, or is not a medjax run."""


class RunError(MedjaxError):
  """The work started and could not go on."""
  exit_status = FAILURE


class NonFiniteError(RunError):
  """The loss or gradient norm stopped being finite; nothing from that step is saved."""


class PartialFailure(MedjaxError):
  """Some items (subjects, sweep points) failed; the others are done and written."""
  exit_status = FAILURE

  def __init__(self, message: str, failed: dict | None = None):
    super().__init__(message)
    self.failed = dict(failed or {})


def os_error_status(error: OSError) -> int:
  return USAGE if error.errno in PATH_ERRNOS else FAILURE


def os_error_line(error: OSError) -> str:
  """`<path>: <strerror>` (both paths of a rename), with what to do when the disk is full."""
  text = error.strerror or str(error)
  if error.filename is not None:
    paths = [error.filename] + ([error.filename2] if error.filename2 is not None else [])
    text = f"{' -> '.join(map(os.fsdecode, paths))}: {text}"
  if error.errno in FULL_ERRNOS:
    text += ("; what was complete is kept: free space (or raise the file-size limit) and "
             "run the same command again")
  return text


def disk_error(error: BaseException, path=None) -> OSError | None:
  """`error` as `OSError(errno, strerror, path)` if it says a write failed for one of
  DISK_ERRNOS, else None. Writers say so in many forms: an OSError (Python, nibabel), a
  RuntimeError with the strerror in words (ArrayRecord), a ValueError with
  `os_error_code=N` (TensorStore under orbax), or one of these as the cause of another.
  `path` (what the user knows: the output file, the checkpoint) replaces the writer's
  own, often a temporary's. A `MedjaxError` already says what went wrong: None."""
  if isinstance(error, MedjaxError):
    return None
  seen = 0
  while error is not None and seen < 16:
    code = None
    if isinstance(error, OSError) and error.errno is not None:
      code = error.errno
    else:
      text = str(error)
      found = re.search(r"os_error_code='?(\d+)", text)
      if found:
        code = int(found.group(1))
      else:
        code = next((c for c in sorted(DISK_ERRNOS) if os.strerror(c) in text), None)
    if code in DISK_ERRNOS:
      filename = path if path is not None else getattr(error, "filename", None)
      return OSError(code, os.strerror(code), None if filename is None else str(filename))
    error, seen = error.__cause__ or error.__context__, seen + 1
  return None
