"""`medjax phantom --output-dir DIR --subjects N [--shape 160x160x96] [--spacing 1x1x1]
[--misalign MM]`."""

from __future__ import annotations

import sys

from medjax.commands import common

HELP = "write phantom subjects as NIfTI files"


def add_arguments(parser) -> None:
  parser.description = (
      "Write phantom subjects as DIR/phantom_XXX/{t1w,t2w,pd,flair,ct,cbct,mask}.nii.gz\n"
      "(float32, RAS affine), labels.nii.gz (uint8 tissue labels) and DIR/split.json. Subject i of seed s is the same head on\n"
      "any grid: `--shape 48x48x32` gives what the default experiment trains on.\n"
      "--misalign 2 writes ct and cbct misaligned by ~2 mm (another session than the MR)\n"
      "and the truth as ct_aligned, cbct_aligned.")
  parser.add_argument("--output-dir", required=True, help="where the subject folders go")
  common.alias(parser, "--out", "output_dir")
  parser.add_argument("--subjects", type=common.positive_int, required=True)
  parser.add_argument("--shape", type=common.numbers(int, 3), default=[160, 160, 96],
                      help="voxels, e.g. 160x160x96 (default)")
  parser.add_argument("--spacing", type=common.numbers(float, 3),
                      help="voxel size in mm, e.g. 1x1x1 (default: the shape spans the "
                           "whole head, 160x160x96 mm)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--misalign", type=common.non_negative_float, default=0.0, metavar="MM",
                      help="misalign ct and cbct by a rigid motion and smooth deformation of "
                           "about MM mm (default 0: perfectly aligned pairs)")


def run(args) -> int:
  from medjax.data import phantom
  shape = tuple(args.shape)
  spacing = tuple(args.spacing) if args.spacing else phantom.fov_spacing(shape)
  paths = phantom.write_subjects(args.output_dir, args.subjects, shape=shape, spacing=spacing,
                                 seed=args.seed, misalign_mm=args.misalign)
  print(f"wrote {len(paths)} phantom subjects ({'x'.join(map(str, shape))} voxels of "
        f"{'x'.join(f'{s:g}' for s in spacing)} mm) to {args.output_dir}")
  empty = [name for name, ids in phantom.split_subjects(args.subjects).items() if not ids]
  if empty:
    print(f"medjax phantom: warning: {args.subjects} subject(s) leave the {' and '.join(empty)} "
          "split(s) empty (split.json); a training run needs at least 3 subjects",
          file=sys.stderr)
  return 0
