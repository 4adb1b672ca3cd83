"""`medjax prepare --layout L --input-dir DIR --output-dir DIR --source M --target M …`."""

from __future__ import annotations

from medjax.commands import common

HELP = "dataset folder → subject-split ArrayRecord shards + manifest"
RENAMED = {"--split": "the split fractions are now --fractions TRAIN,VAL,TEST "
                      "(--split names a held-out split in `medjax evaluate`)"}


def add_arguments(parser) -> None:
  from medjax.data import layouts
  parser.description = (
      "Turn a dataset folder into subject-level-split ArrayRecord shards of slice pairs\n"
      "and OUT/manifest.json. Each subject goes through the preprocessing `medjax\n"
      "translate` repeats on new files: RAS, resampled to --spacing on the first source's\n"
      "grid, intensities to [-1, 1] (CT: fixed HU window; MR: robust range in the body\n"
      "mask), cropped or padded in-plane to --size around the body. A broken subject is\n"
      "reported and skipped (--strict: an error); running again finishes what is missing.")
  parser.epilog = ("example:\n  medjax prepare --layout synthrad2023 --input-dir /data/SynthRAD2023 "
                   "--output-dir data/synthrad_brain \\\n      --source mr --target ct "
                   "--spacing 1x1x2.5 --size 256x256 --context 1")
  parser.add_argument("--layout", required=True, choices=sorted(layouts.LAYOUTS))
  parser.add_argument("--input-dir", required=True,
                      help="the dataset folder (csv layout: the .csv file or its folder)")
  common.alias(parser, "--root", "input_dir")
  parser.add_argument("--output-dir", required=True, help="where shards and manifest.json go")
  common.alias(parser, "--out", "output_dir")
  parser.add_argument("--source", required=True, type=common.modality_list,
                      help="source modalities, comma-separated; the first sets the grid")
  parser.add_argument("--target", required=True, type=common.modality_list,
                      help="target modality")
  parser.add_argument("--spacing", type=common.numbers(float, 3), default=[1.0, 1.0, 1.0],
                      help="voxel size in mm, XxYxZ or one number (default 1x1x1)")
  parser.add_argument("--size", type=common.numbers(int, 2), default=[256, 256],
                      help="in-plane size of every slice after crop/pad around the body, "
                           "in voxels of --spacing: HxW or one number (default 256x256; "
                           "256 at 1 mm covers 25.6 cm)")
  parser.add_argument("--context", type=int, default=0,
                      help="2.5D: neighbouring slices each side as extra source channels")
  parser.add_argument("--fractions", type=common.numbers(float, 3, zero=True),
                      default=[0.8, 0.1, 0.1],
                      help="train,val,test shares of the subjects (default 0.8,0.1,0.1)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the subject split")
  parser.add_argument("--workers", type=common.positive_int, default=1,
                      help="processes preparing subjects in parallel")
  parser.add_argument("--register", choices=["none", "rigid"], default="none",
                      help="rigid: co-register off-grid modalities with SimpleITK first")
  parser.add_argument("--strict", action="store_true", help="any skipped subject is an error")
  common.add_max_voxels(parser)


def run(args) -> int:
  from medjax.data import prepare
  prepare.prepare(args.layout, args.input_dir, args.output_dir, args.source, args.target,
                  spacing=args.spacing, size=args.size, context=args.context,
                  fractions=args.fractions, seed=args.seed, workers=args.workers,
                  strict=args.strict, register=None if args.register == "none" else args.register,
                  max_voxels=args.max_voxels)
  return 0
