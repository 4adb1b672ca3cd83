"""`medjax` command line: dispatch to `medjax.commands.<name>`, and report errors.

This module only dispatches. Each command parses its own flags (the shared grammar is in
`medjax.commands.common`) and calls library functions; the errors library code raises
(`medjax.errors`) become one line here, with the documented exit status.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
import warnings

from medjax.commands import COMMANDS, common
from medjax import errors
from medjax.errors import MedjaxError

USAGE = """usage: medjax <command> [options]        (medjax <command> --help for its options)

commands:
{commands}

the path from data to a scored prediction:
  medjax phantom --output-dir data/phantom --subjects 20 --shape 48x48x32
  medjax train --config experiments/phantom.py --workdir runs/phantom_flow
  medjax translate --workdir runs/phantom_flow --input data/phantom/phantom_019/t1w.nii.gz \\
      --output out/phantom_019.nii.gz
  medjax score --pred-dir out --target-dir data/phantom --layout phantom --target t2w \\
      --protocol mri

flags: hyphenated (--batch-size; --batch_size is read too); --X names a file or a
modality, --X-dir a folder; sizes and spacings are written 160x160x96, 1x1x2.5.

exit status: 0 done · 1 partly done (some subjects or sweep points failed, the others
were written) or the run stopped (e.g. a non-finite loss, a full disk) · 2 the request
cannot run as asked (a flag, config key, input file, a folder in use or not writable;
nothing was written) · 130 interrupted (Ctrl-C or SIGTERM)."""


def usage() -> str:
  width = max(map(len, COMMANDS))
  return USAGE.format(commands="\n".join(f"  {name:{width}s}  {text}"
                                         for name, text in COMMANDS.items()))


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help"):
    print(usage())
    return 0 if len(argv) >= 2 else 2
  name = argv[1]
  if name not in COMMANDS:
    print(f"medjax: error: unknown command {name!r}; commands: {', '.join(COMMANDS)}",
          file=sys.stderr)
    return 2
  module = importlib.import_module(f"medjax.commands.{name}")
  # A write that failed (a full disk) leaves orbax's pending async array writes un-awaited;
  # Python would print a RuntimeWarning about them at exit, under the one-line error.
  warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited",
                          category=RuntimeWarning)
  parser = common.Parser(prog=f"medjax {name}", renamed=getattr(module, "RENAMED", {}))
  # SIGTERM (a cluster's scheduler, `sweep` stopping its trainers) ends a command like
  # Ctrl-C: the pending checkpoint is finished, temporaries go and the folder's lock is
  # released (medjax/lock.py), which a plain SIGTERM death would leave behind.
  previous = _sigterm(_interrupt)
  try:
    module.add_arguments(parser)
    if getattr(module, "OVERRIDES", False):
      args, extra = parser.parse_known_args(argv[2:])
      args.overrides = common.split_overrides(extra, parser.prog)
    else:
      args = parser.parse_args(argv[2:])
    return module.run(args) or 0
  except SystemExit as exit_:  # --help
    return int(exit_.code or 0)
  except MedjaxError as error:
    print(f"medjax {name}: error: {_one_line(error)}", file=sys.stderr)
    return error.exit_status
  except OSError as error:
    if error.errno is None:  # a library's complaint, not the system's: a bug, shown whole
      raise
    # The system's word on a path: 2 if the path cannot be used as given, 1 if the
    # system gave out while writing (docs/design.md, "Command line").
    print(f"medjax {name}: error: {_one_line(errors.os_error_line(error))}", file=sys.stderr)
    return errors.os_error_status(error)
  except KeyboardInterrupt:
    print(f"medjax {name}: interrupted; the last complete checkpoint and files are kept",
          file=sys.stderr)
    return 130
  finally:
    _sigterm(previous)


def _interrupt(signum, frame):
  raise KeyboardInterrupt


def _sigterm(handler):
  """Install `handler` for SIGTERM; the previous one. Only the main thread may (a
  command run from another thread keeps the default)."""
  if handler is None or threading.current_thread() is not threading.main_thread():
    return None
  return signal.signal(signal.SIGTERM, handler)


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split())


if __name__ == "__main__":
  sys.exit(main())
