"""`medjax score --pred-dir DIR --target-dir DIR --protocol P` (per-subject metrics)."""

from __future__ import annotations

import sys
from pathlib import Path

from medjax.commands import common
from medjax.errors import PartialFailure, UserError

HELP = "metrics of predicted volumes against their targets, per subject"


def add_arguments(parser) -> None:
  from medjax import metrics
  parser.description = (
      "Match predictions to targets by subject and score each 3D volume with a protocol:\n"
      "synthrad2023 / synthrad2025 (HU inside the mask) or mri ([0, 1] inside the mask).\n"
      "Writes a per-subject CSV and a summary JSON beside it; --report-dir adds a picture per\n"
      "subject (axial, coronal, sagittal) and a Markdown page. Without masks, the target's\n"
      "automatic body mask is scored.")
  parser.epilog = ("example:\n  medjax score --pred-dir out/ --target-dir /data/new --layout "
                   "synthrad2023 --protocol synthrad2023 --report-dir out/report")
  parser.add_argument("--pred-dir", required=True, help="folder of predicted volumes")
  common.alias(parser, "--pred", "pred_dir")
  parser.add_argument("--target-dir", required=True,
                      help="folder of target volumes, or a dataset folder with --layout")
  parser.add_argument("--mask-dir", help="folder of masks, named as the targets")
  parser.add_argument("--protocol", required=True, choices=metrics.PROTOCOLS)
  parser.add_argument("--layout", help="read --target-dir as a dataset (synthrad2023, phantom, …)")
  parser.add_argument("--target", help="the target modality in a --layout dataset (default: ct "
                      "for synthrad protocols, else what translate wrote)")
  common.alias(parser, "--modality", "target")
  parser.add_argument("--pred-scale", choices=("unit", "robust"), default="unit",
                      help="mri: predictions already on [0, 1] (unit), or scale them by"
                      " their own robust range like the targets (robust)")
  parser.add_argument("--output", metavar="FILE.csv",
                      help="per-subject CSV (default: PRED_DIR/scores.csv); the summary JSON "
                           "goes beside it")
  common.alias(parser, "--out", "output")
  parser.add_argument("--report-dir", help="also write a PNG per subject and report.md here")
  common.alias(parser, "--report", "report_dir")
  parser.add_argument("--segmentation", metavar="RUN",
                      help="also segment each subject (phantom layout) with RUN's segmenter "
                           "(trained once, cached in RUN/segmenter/): per-label Dice with the "
                           "real images, the prediction substituted, and the target blank")
  common.add_max_voxels(parser)


def _modality(args) -> str | None:
  if args.target:
    if Path(args.target).exists():
      raise UserError(f"--target is the target modality (ct, t2w, …); the folder "
                      f"{args.target} goes to --target-dir")
    return args.target
  from medjax import score
  index = score.read_index(args.pred_dir)
  if index is not None:
    target = index.get("target")
    if target is not None and not isinstance(target, str):
      raise UserError(f"{Path(args.pred_dir) / score.INDEX}: 'target' is not a modality name;"
                      " give --target")
    return target
  return "ct" if args.protocol.startswith("synthrad") else None


def run(args) -> int:
  from medjax import figures, score
  modality = _modality(args)
  if args.segmentation and args.layout != "phantom":
    raise UserError("--segmentation needs --layout phantom (phantom files on the run's "
                    "grid); a prepared dataset is scored by segmentation with `medjax "
                    "evaluate --segmentation`")
  index = score.read_index(args.pred_dir) or {"subjects": {}}
  per_subject = all(isinstance(e, dict) and e.get("target") for e in index["subjects"].values())
  if args.layout and not modality and not (index["subjects"] and per_subject):
    raise UserError("--layout needs --target (which modality of each subject is the target)")
  cases = score.cases(args.pred_dir, args.target_dir, args.mask_dir, layout=args.layout,
                      modality=modality)
  if not cases:
    raise UserError(f"no volumes in {args.pred_dir} or {args.target_dir}")
  rows, failed = score.score_cases(cases, protocol=args.protocol, modality=modality,
                                   pred_scale=args.pred_scale, max_voxels=args.max_voxels,
                                   log=lambda line: print(line, file=sys.stderr))
  if not rows:
    raise UserError(f"no subject could be scored ({len(failed)} failed; first:"
                    f" {next(iter(failed.values()))})")
  task = None
  if args.segmentation:
    rows, task = score.add_segmentation(
        rows, failed, cases, run_dir=args.segmentation, layout=args.layout,
        target_dir=args.target_dir, modality=modality, pred_dir=args.pred_dir,
        max_voxels=args.max_voxels,
        log=lambda line: print(line, file=sys.stderr),
        progress=lambda line: print(line, file=sys.stderr))
    if not rows:
      raise UserError(f"no subject could be segmented (first: {next(iter(failed.values()))})")
  result = score.summary(rows, failed, args.protocol)
  if task:
    result["segmentation"] = task
  out = Path(args.output or Path(args.pred_dir) / "scores.csv")
  summary_path = score.write_results(out, rows, result)
  print(score.format_table(rows, result))
  if task:
    from medjax import segmentation
    print(segmentation.format_table(result["metrics"], task["ceiling"]))
  print(f"{len(rows)} subject(s) scored ({args.protocol}) → {out}, {summary_path}"
        + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""))
  if args.report_dir:
    page = figures.write_report(args.report_dir, score.report_subjects(
        cases, rows, protocol=args.protocol, modality=modality, pred_scale=args.pred_scale,
        max_voxels=args.max_voxels),
        protocol=args.protocol)
    print(f"report: {page}")
  if failed:
    raise PartialFailure(f"{len(failed)} subject(s) could not be scored: "
                         f"{', '.join(failed)}", failed)
  return 0
