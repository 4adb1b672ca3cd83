"""Run `medjax …` in this process and SIGKILL it in the middle of writing a chosen file.

  python tests/kill_at.py PATTERN N medjax ARGS…

The N-th file whose name matches PATTERN (fnmatch) written through `files.atomic_write`
gets its content written to the temporary, and then the process kills itself before the
rename: the state a power cut or `kill -9` leaves. PATTERN `checkpoint` instead kills right
after the N-th `Checkpointer.save` was issued, while orbax is still writing it in the
background. Used by tests/test_kills.py and benchmarks/robustness.py.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import signal
import sys


def die():
  os.kill(os.getpid(), signal.SIGKILL)


def arm(pattern: str, count: int) -> None:
  from medjax import checkpoint, files
  seen = [0]

  def hit() -> bool:
    seen[0] += 1
    return seen[0] == count

  if pattern == "checkpoint":
    save = checkpoint.Checkpointer.save

    def dying_save(self, *args, **kwargs):
      save(self, *args, **kwargs)
      if hit():
        die()

    checkpoint.Checkpointer.save = dying_save
    return

  atomic_write = files.atomic_write

  @contextlib.contextmanager
  def dying_write(path):
    with atomic_write(path) as tmp:
      yield tmp
      if fnmatch.fnmatch(os.path.basename(str(path)), pattern) and hit():
        die()

  files.atomic_write = dying_write


if __name__ == "__main__":
  pattern, count, *argv = sys.argv[1:]
  arm(pattern, int(count))
  from medjax import cli
  sys.exit(cli.main(argv))
