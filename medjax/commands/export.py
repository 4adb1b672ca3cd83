"""`medjax export --workdir RUN --out MODEL_DIR [--checkpoint STEP] [--force]`."""

from __future__ import annotations

from medjax.commands import common

HELP = "a trained run → a self-contained model folder (translate --model)"


def add_arguments(parser) -> None:
  parser.description = (
      "Write one checkpoint of a run as a model folder that translates on its own: the\n"
      "config, preprocessing recipe, baseline, the EMA parameters only (no optimiser\n"
      "state), model.json and MODEL_CARD.md. `medjax translate --model DIR` and\n"
      "medjax.load_model(DIR) use it without the run directory or any training data.")
  parser.epilog = ("example:\n"
                   "  medjax export --workdir runs/mr_ct --out models/mr_ct\n"
                   "  medjax translate --model models/mr_ct --input p1_mr.nii.gz "
                   "--output p1_sct.nii.gz")
  parser.add_argument("--workdir", required=True, help="the trained run directory")
  parser.add_argument("--out", required=True, metavar="MODEL_DIR",
                      help="the model folder to write (new or empty)")
  common.alias(parser, "--output-dir", "out")
  parser.add_argument("--checkpoint", type=int, metavar="STEP",
                      help="checkpoint step (default: the latest)")
  parser.add_argument("--force", action="store_true",
                      help="replace an earlier export in --out")


def run(args) -> int:
  from medjax import export
  marker = export.export(args.workdir, args.out, step=args.checkpoint, force=args.force)
  print(f"exported {args.workdir} step {marker['step']} ({' + '.join(marker['source'])} → "
        f"{marker['target']}, {marker['translator']}) to {args.out}")
  return 0
