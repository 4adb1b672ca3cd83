"""One writer per folder: `medjax.lock` in a run directory and in `prepare`'s output.

Two `medjax train` in one workdir would interleave their checkpoints, logs and
evaluations; two `prepare` in one output folder would race for the same shards and
manifest. Each takes its folder's lock first, and a second starter is refused with a
`WorkdirError` naming the process that holds it, before it writes anything
(docs/design.md, "Run directory" and "Files and failures").

The lock is a small JSON file — pid, host, the command, its start time, and what tells
the process apart from a later one with the same pid (its start time in /proc, the
host's boot id) — created with O_CREAT|O_EXCL, which the file system grants to one
creator only. A SIGKILLed process cannot remove its lock, so on the same host a lock
whose pid is gone, or now belongs to another process, is stale: it is taken over, with
one line on stderr. A lock written on another host cannot be checked from here; it is
refused, and the message says how to remove it once that process is gone. Released
when the work ends, normally or by an error (Ctrl-C and, through `medjax.cli`, SIGTERM
included).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import socket
import sys
import time
from pathlib import Path

from medjax.errors import WorkdirError

LOCK = "medjax.lock"
# A starter that has just created the file may not have written it yet: an unreadable
# lock is read again for this long before it is reported.
_UNREADABLE_WAIT_S = 2.0


def _host() -> str:
  return socket.gethostname()


def _boot_id() -> str | None:
  try:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
  except OSError:
    return None


def process_start(pid: int) -> int | None:
  """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22): a pid
  reused by a later process has another. None where /proc does not tell."""
  try:
    stat = Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  # Field 2 is the command name in parentheses and may itself hold spaces or ')'.
  fields = stat[stat.rfind(")") + 2:].split()
  try:
    return int(fields[19])  # field 22 counted from 1; 3 fields precede the ones split here
  except (IndexError, ValueError):
    return None


def identity(command: str) -> dict:
  """What the lock file holds about this process."""
  return {"pid": os.getpid(), "host": _host(), "command": command, "argv": list(sys.argv),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
          "process_start": process_start(os.getpid()), "boot_id": _boot_id()}


def stale_reason(holder: dict) -> str | None:
  """Why `holder` (a lock's content) no longer runs, or None while it may run (alive on
  this host, or on another host, which cannot be checked from here)."""
  if holder.get("host") != _host():
    return None
  boot = _boot_id()
  if holder.get("boot_id") and boot and holder["boot_id"] != boot:
    return "this host restarted since"
  pid = holder.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return f"it names no process (pid {pid!r})"
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return f"process {pid} is gone"
  except PermissionError:  # alive, another user's
    pass
  started = process_start(pid)
  if started is not None and holder.get("process_start") not in (None, started):
    return f"pid {pid} now belongs to another process"
  return None


def _describe(holder: dict) -> str:
  return (f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')} on host "
          f"{holder.get('host', '?')}, started {holder.get('started', '?')})")


class Lock:
  """A held lock; `release()` removes its file if it is still this process's."""

  def __init__(self, path: Path, content: bytes):
    self.path, self._content = path, content

  def release(self) -> None:
    try:
      if self.path.read_bytes() == self._content:
        self.path.unlink()
    except OSError:
      pass  # removed by hand, or the folder is gone: nothing of ours is left


def _read(path: Path) -> tuple[bytes, dict] | None:
  """(raw bytes, content) of an existing lock; None if it disappeared meanwhile. A lock
  that stays unreadable (empty or not JSON) is a `WorkdirError`."""
  deadline = time.monotonic() + _UNREADABLE_WAIT_S
  while True:
    try:
      raw = path.read_bytes()
    except FileNotFoundError:
      return None
    try:
      holder = json.loads(raw)
      if isinstance(holder, dict):
        return raw, holder
    except ValueError:
      pass
    if time.monotonic() > deadline:
      raise WorkdirError(f"{path} exists but is not a readable medjax lock; if no medjax "
                         f"process uses {path.parent}, remove it")
    time.sleep(0.05)


def acquire(directory, command: str) -> Lock:
  """Take `directory`'s lock (creating the folder), or raise `WorkdirError` naming the
  process holding it."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / LOCK
  content = (json.dumps(identity(command), indent=1) + "\n").encode()
  for _ in range(10):  # each pass either wins, refuses, or clears a stale lock
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      found = _read(path)
      if found is None:
        continue  # released between our open and our read: try again
      raw, holder = found
      reason = stale_reason(holder)
      if reason is None:
        where = ("on this host: wait for it to finish or stop it"
                 if holder.get("host") == _host() else
                 "on another host, which cannot be checked from here: if that process is "
                 f"gone, remove {path}")
        raise WorkdirError(f"{directory} is in use by {_describe(holder)} {where}")
      if _remove_if_unchanged(path, raw):
        print(f"medjax: {path}: took over the lock of {_describe(holder)}: {reason}",
              file=sys.stderr)
      continue
    try:
      os.write(fd, content)
    except BaseException:
      os.close(fd)
      path.unlink(missing_ok=True)
      raise
    os.close(fd)
    return Lock(path, content)
  raise WorkdirError(f"{path}: could not take the lock (other processes keep taking it)")


def _remove_if_unchanged(path: Path, raw: bytes) -> bool:
  """Remove the stale lock whose bytes are `raw`, never a fresh one written meanwhile by
  a process that took it over first: it is renamed to a name of ours, checked, and put
  back if it turns out to be someone else's."""
  aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return False  # another starter removed it first
  if aside.read_bytes() == raw:
    aside.unlink()
    return True
  try:
    os.link(aside, path)  # not rename: it must not replace a lock created meanwhile
  except FileExistsError:
    pass
  aside.unlink()
  return False


@contextlib.contextmanager
def held(directory, command: str):
  """`directory` locked for the block. Folders the lock created and nothing else filled
  are removed again, so a refused or failed start leaves nothing behind."""
  directory = Path(directory)
  created = []
  for folder in [directory, *directory.parents]:
    if folder.exists():
      break
    created.append(folder)
  try:
    lock = acquire(directory, command)
    try:
      yield lock
    finally:
      lock.release()
  finally:
    for folder in created:  # deepest first
      try:
        folder.rmdir()
      except OSError:
        break  # not empty: the work wrote something


def holding(argument: str, command: str, *, when=None):
  """Decorator: the folder passed as `argument` is locked while the function runs
  (only where `when()` is true, e.g. on process 0 of a multi-host run)."""
  def decorate(function):
    signature = inspect.signature(function)

    @functools.wraps(function)
    def locked(*args, **kwargs):
      if when is not None and not when():
        return function(*args, **kwargs)
      with held(signature.bind(*args, **kwargs).arguments[argument], command):
        return function(*args, **kwargs)
    return locked
  return decorate
