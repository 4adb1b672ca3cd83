"""`medjax compare --experiments SPEC … --workdir ROOT --train-steps N`."""

from __future__ import annotations

from medjax.commands import common

HELP = "train several methods at one budget, one table"
RENAMED = {"--steps": "training steps are --train-steps (sampling steps: --sample-steps "
                      "in translate, translator.sample_steps in a config)"}


def add_arguments(parser) -> None:
  from medjax import compare
  parser.description = (
      "Train every experiment at one budget in ROOT/<run>/<budget>/ (an unfinished run\n"
      "resumes; a finished one at the same budget is not retrained), score each on the\n"
      "held-out test subjects beside the intensity-mapping baseline, and sweep the\n"
      "stochastic ones over sampling steps. Writes compare.md/.csv, compare_<task>.png,\n"
      "steps.csv/.png under ROOT.")
  parser.add_argument("--experiments", nargs="+", default=compare.DEFAULT_EXPERIMENTS,
                      metavar="FILE.py[:ARG]",
                      help="experiments (default: every method, T1w→T2w and T1w→CT)")
  common.alias(parser, "--configs", "experiments", nargs="+")
  parser.add_argument("--workdir", required=True, help="root of the runs and the table")
  parser.add_argument("--train-steps", type=common.positive_int, default=300,
                      help="training steps of every method (default 300); an any-to-any "
                           "experiment over M modalities gets M times as many, the total "
                           "of M dedicated runs")
  parser.add_argument("--train-seconds", type=common.positive_float, metavar="S",
                      help="a wall-clock budget instead of --train-steps: each experiment's "
                           "step rate is measured here first and its steps set to fill S "
                           "seconds (a two-stage run is charged its first stage's time)")
  parser.add_argument("--batch-size", type=common.positive_int,
                      help="training batch of every method (default: each experiment's)")
  parser.add_argument("--samples", type=common.positive_int,
                      help="draws the stochastic methods average (default: each experiment's)")
  parser.add_argument("--sweep-steps", default=",".join(map(str, compare.SWEEP_STEPS)),
                      help="sampling steps of the quality sweep, comma-separated ('' to skip)")
  parser.add_argument("--sweep-subjects", type=int, default=1,
                      help="test subjects the sweep scores (0: all)")
  parser.add_argument("--image-slices", type=common.positive_int, default=3)


def run(args) -> int:
  from medjax import compare, host, parallel
  host.configure()
  parallel.enable_compilation_cache()
  budget = compare.Budget(
      train_steps=args.train_steps, train_seconds=args.train_seconds,
      batch_size=args.batch_size, samples=args.samples,
      sweep_steps=tuple(int(s) for s in args.sweep_steps.split(",") if s.strip()),
      sweep_subjects=args.sweep_subjects, image_slices=args.image_slices)
  compare.compare(args.experiments, args.workdir, budget,
                  log=lambda line: print(line, flush=True))
  with open(f"{args.workdir}/compare.md") as f:
    print(f.read())
  return 0
