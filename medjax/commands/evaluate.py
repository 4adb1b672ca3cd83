"""`medjax evaluate --workdir RUN [--split test] [--checkpoint STEP]`."""

from __future__ import annotations

HELP = "score a trained run on its held-out subjects"


def add_arguments(parser) -> None:
  parser.description = (
      "Score a run's checkpoint on the held-out subjects of a split. Needs the run\n"
      "directory and that split only (the training shards may be gone); writes\n"
      "eval/<step>/<split>_summary.json, <split>_subjects.csv and <split>_report/.")
  parser.add_argument("--workdir", required=True, help="the run directory")
  parser.add_argument("--split", default="test", choices=("val", "test"))
  parser.add_argument("--checkpoint", type=int, metavar="STEP",
                      help="checkpoint step (default: the latest)")


def run(args) -> int:
  from medjax import evaluate, parallel
  from medjax.run import Run
  parallel.enable_compilation_cache()
  summary = evaluate.evaluate_run(Run.load(args.workdir, step=args.checkpoint), args.split,
                                  prefix=f"{args.split}_")
  print(evaluate.format_summary(summary))
  return 0
