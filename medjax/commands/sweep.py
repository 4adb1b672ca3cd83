"""`medjax sweep --config FILE.py[:ARG] --sweep SWEEP.py --workdir ROOT [--parallel N]`."""

from __future__ import annotations

from medjax.commands import common
from medjax.errors import PartialFailure

HELP = "one config over a grid of overrides, one process per point"


def add_arguments(parser) -> None:
  parser.description = (
      "Train one experiment at every point of a sweep file's grid, each point its own\n"
      "`medjax train` process in ROOT/<point>/ pinned to its own accelerators. Running\n"
      "again skips finished points and resumes the others; at the end ROOT/sweep.csv\n"
      "(best first) and ROOT/sweep.png.")
  parser.epilog = ("example:\n  medjax sweep --config experiments/phantom.py --sweep "
                   "experiments/sweeps/phantom_lr.py --workdir runs/phantom_lr --parallel 2")
  parser.add_argument("--config", required=True, metavar="FILE.py[:ARG]", help="experiment")
  parser.add_argument("--sweep", required=True, help="sweep file with get_sweep()")
  parser.add_argument("--workdir", required=True, help="root: one sub-workdir per point")
  parser.add_argument("--parallel", type=common.positive_int,
                      help="points run at once (default: accelerators / devices-per-run; "
                           "1 on a CPU)")
  parser.add_argument("--devices-per-run", type=common.positive_int, default=1,
                      help="accelerators per point (on a CPU: virtual devices; with 1, "
                           "each point running at once gets its share of the cores)")
  parser.add_argument("--dry-run", action="store_true",
                      help="print each point's command and state; run nothing")
  parser.add_argument("--emit", choices=("slurm",),
                      help="write ROOT/sweep.slurm (a job array) instead of running")


def run(args) -> int:
  from medjax.sweep import runner
  state = runner.run_sweep(args.config, args.sweep, args.workdir, parallel=args.parallel,
                           devices_per_run=args.devices_per_run, dry_run=args.dry_run,
                           emit=args.emit, log=lambda line: print(line, flush=True))
  if state["unfinished"] and not (args.dry_run or args.emit):
    raise PartialFailure(f"unfinished points: {', '.join(state['unfinished'])}; logs in "
                         f"{args.workdir}/logs", dict.fromkeys(state["unfinished"], "unfinished"))
  return 0
