"""`medjax evaluate --workdir RUN [--split test] [--checkpoint STEP]`."""

from __future__ import annotations

from medjax.commands import common

HELP = "score a trained run on its held-out subjects"


def add_arguments(parser) -> None:
  parser.description = (
      "Score a run's checkpoint on the held-out subjects of a split. Needs the run\n"
      "directory and that split only (the training shards may be gone); writes\n"
      "eval/<step>/<split>_summary.json, <split>_subjects.csv and <split>_report/\n"
      "(<split>_tta-flip_…, <split>_overlap-0.75_… when --tta / --overlap are given, so\n"
      "evaluations at other settings sit beside each other).")
  parser.add_argument("--workdir", required=True, help="the run directory")
  parser.add_argument("--split", default="test", choices=("val", "test"))
  parser.add_argument("--checkpoint", type=int, metavar="STEP",
                      help="checkpoint step (default: the latest)")
  common.add_window_options(parser, "; recorded in the summary")
  parser.add_argument("--directions", choices=("standard", "missing_one"),
                      help="an any-to-any run's directions (default: its eval.directions); "
                           "the summary is written as <split>_directions-<choice>_…")
  parser.add_argument("--segmentation", action="store_true", default=None,
                      help="also score by segmentation: the Dice of a U-Net trained once on "
                           "the real training images (cached in WORKDIR/segmenter/) with the "
                           "real, the synthesised and a blank target (phantom runs; shards "
                           "prepared with the dataset's seg files)")


def run(args) -> int:
  from medjax import evaluate, host, parallel
  host.configure()
  from medjax.run import Run
  parallel.enable_compilation_cache()
  prefix = f"{args.split}_"
  if args.tta is not None:
    prefix += f"tta-{args.tta}_"
  if args.overlap is not None:
    prefix += f"overlap-{args.overlap:g}_"
  if args.directions is not None:
    prefix += f"directions-{args.directions}_"
  summary = evaluate.evaluate_run(Run.load(args.workdir, step=args.checkpoint), args.split,
                                  prefix=prefix, overlap=args.overlap, tta=args.tta,
                                  segmentation=args.segmentation, directions=args.directions)
  print(evaluate.format_summary(summary))
  return 0
