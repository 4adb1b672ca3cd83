"""`medjax translate --workdir RUN --input IN.nii.gz --output OUT.nii.gz` (or a folder)."""

from __future__ import annotations

import sys
from pathlib import Path

from medjax.commands import common
from medjax.errors import PartialFailure, UserError

HELP = "NIfTI or DICOM in → NIfTI or DICOM out with a trained run (input geometry, HU)"
RENAMED = {"--steps": "sampling steps are --sample-steps (training steps are --train-steps)"}


def add_arguments(parser) -> None:
  parser.description = (
      "Translate new volumes with a trained run: the run's own preprocessing is applied\n"
      "and undone, so the output has the input's shape, affine, qform/sform and zooms;\n"
      "CT in HU, MR targets on [0, 1]. Without --mask the body mask is found automatically.\n"
      "The run's sampling settings (translator.sample_steps, .samples) are the defaults,\n"
      "so a translated file matches what the run's evaluation scored.\n"
      "A DICOM series folder is an input too; --output-dicom then writes the synthetic CT\n"
      "as a new CT series in the input's frame of reference. Every input is compared with\n"
      "what the model was trained on (spacing, field of view, body extent, intensities):\n"
      "a warning names what is out of range (--strict-inputs: an error). OUT.json beside\n"
      "the output records the model, the settings and that check.\n"
      "Several --workdir runs (same preprocessing, sources and target) translate as an\n"
      "ensemble: their predictions are averaged, the std holds their disagreement.\n"
      "--tta flip also predicts on the mirrored input; a 3D run predicts in overlapping\n"
      "Gaussian-weighted windows (--overlap).")
  parser.epilog = ("examples:\n"
                   "  medjax translate --workdir runs/mr_ct --input p1_mr.nii.gz --output p1_sct.nii.gz\n"
                   "  medjax translate --workdir runs/mr_ct --input-dir /data/new --layout "
                   "synthrad2023 --output-dir out/\n"
                   "  medjax translate --workdir runs/mr_ct --input dicom/MR_series/ "
                   "--output-dicom dicom/sCT/ --output p1_sct.nii.gz\n"
                   "  medjax translate --workdir runs/any2any --input t1w=t1.nii.gz --input "
                   "t2w=t2.nii.gz --target flair --output flair.nii.gz\n"
                   "  medjax translate --workdir runs/any2any --input-dir /data/BraSyn_val "
                   "--layout brasyn --output-dir out/   # every missing modality")
  parser.add_argument("--workdir", nargs="+", metavar="RUN",
                      help="the trained run directory; several: an ensemble of them")
  parser.add_argument("--model", metavar="MODEL_DIR",
                      help="an exported model folder (medjax export), instead of --workdir")
  parser.add_argument("--input", nargs="+", action="extend", metavar="[MODALITY=]FILE",
                      help="source file(s) or DICOM series folder(s) of one subject, in the "
                           "run's source order, or named (t1w=A.nii.gz; repeatable): an "
                           "any-to-any run takes any subset of its modalities")
  parser.add_argument("--target", metavar="MODALITY",
                      help="the modality to synthesise (an any-to-any run; default: the one "
                           "of its modalities not given; --input-dir: every missing one)")
  parser.add_argument("--output", metavar="FILE", help="output .nii or .nii.gz (with --input)")
  parser.add_argument("--output-dicom", metavar="DIR",
                      help="write the synthetic CT as a DICOM CT series into DIR (new or "
                           "empty; with a DICOM --input and a CT target)")
  parser.add_argument("--uncertainty-dicom", metavar="DIR",
                      help="the per-voxel std (HU) as a second DICOM series (samples ≥ 2)")
  parser.add_argument("--series-uid", nargs="+", metavar="UID",
                      help="the SeriesInstanceUID to read where an input folder holds "
                           "several series")
  parser.add_argument("--strict-inputs", action="store_true",
                      help="refuse an input outside what the model was trained on, "
                           "instead of warning")
  parser.add_argument("--mask", metavar="FILE",
                      help="body mask of --input (default: found automatically)")
  parser.add_argument("--uncertainty", metavar="FILE",
                      help="output .nii.gz for the per-voxel std of the draws (samples ≥ 2)")
  parser.add_argument("--input-dir", help="a dataset folder: translate every subject")
  parser.add_argument("--layout", help="the dataset layout of --input-dir (phantom, ixi, …)")
  parser.add_argument("--output-dir", help="where OUT/<id>.nii.gz go (with --input-dir)")
  parser.add_argument("--sample-steps", type=common.positive_int,
                      help="sampling steps (default: the run's translator.sample_steps)")
  parser.add_argument("--samples", type=common.positive_int,
                      help="draws per slice; their mean is the output, their std the "
                           "uncertainty (default: the run's translator.samples)")
  parser.add_argument("--checkpoint", type=int, metavar="STEP",
                      help="checkpoint step (default: the latest)")
  parser.add_argument("--batch-size", type=common.positive_int,
                      help="slices per batch (default: the run's eval.batch_size)")
  parser.add_argument("--seed", type=int, help="seed of the draws (default: the run's seed)")
  common.add_window_options(parser, "; recorded in the sidecar")
  common.add_max_voxels(parser)


def _spread_possible(args) -> bool:
  """Whether the std can be non-zero before the run's settings are known."""
  return len(args.workdir or ()) > 1 or args.tta == "flip"


def named_inputs(items):
  """`--input` items → a list of paths, or {modality: path} when they are named
  (MODALITY=FILE, the name a modality: t1w, t2f, …); mixing the two is refused."""
  from medjax import modalities
  named = {}
  for item in items or ():
    key, sep, path = str(item).partition("=")
    try:
      modality = modalities.canonical(key) if sep else None
    except ValueError:
      modality = None
    if modality is not None:
      if modality in named:
        raise UserError(f"--input {item}: {modality} is given twice")
      named[modality] = path
  if named and len(named) != len(items):
    raise UserError("--input: name every input (t1w=A.nii.gz t2w=B.nii.gz) or none")
  return named or list(items or ())


def _check(args) -> None:
  if (args.workdir is None) == (args.model is None):
    raise UserError("give either --workdir RUN or --model MODEL_DIR")
  if args.model is not None and args.checkpoint is not None:
    raise UserError("--checkpoint goes with --workdir; a --model holds one checkpoint")
  if bool(args.input) == bool(args.input_dir):
    raise UserError("give either --input FILE [FILE ...] --output FILE, or --input-dir DIR"
                    " --layout LAYOUT --output-dir DIR")
  if args.input and not (args.output or args.output_dicom):
    raise UserError("--input needs --output FILE.nii.gz (or --output-dicom DIR)")
  if (args.output_dicom or args.uncertainty_dicom or args.series_uid) and not args.input:
    raise UserError("--output-dicom, --uncertainty-dicom and --series-uid go with --input")
  for folder in (args.output_dicom, args.uncertainty_dicom):
    if folder and Path(folder).exists() and (not Path(folder).is_dir()
                                             or any(Path(folder).iterdir())):
      raise UserError(f"{folder} exists and is not an empty folder: nothing was written "
                      "(give a new folder for the DICOM series)")
  if (args.uncertainty_dicom and args.samples is not None and args.samples < 2
      and not _spread_possible(args)):
    raise UserError("--uncertainty-dicom needs --samples 2 or more (the std of the draws)")
  if args.input_dir and not (args.output_dir and args.layout):
    raise UserError("--input-dir needs --layout LAYOUT and --output-dir DIR")
  if args.uncertainty and args.samples is not None and args.samples < 2 \
      and not _spread_possible(args):
    raise UserError("--uncertainty needs --samples 2 or more (the std of the draws)")
  inputs = named_inputs(args.input)
  for path in (inputs.values() if isinstance(inputs, dict) else inputs):
    if not Path(path).exists():
      raise UserError(f"input {path} does not exist")
  if args.mask and not Path(args.mask).is_file():
    raise UserError(f"mask {args.mask} does not exist")
  if args.input_dir and not Path(args.input_dir).is_dir():
    raise UserError(f"input directory {args.input_dir} does not exist")


def run(args) -> int:
  _check(args)
  from medjax import host, infer, parallel
  host.configure()
  from medjax.ensemble import Ensemble
  from medjax.run import Run
  parallel.enable_compilation_cache()
  if args.model is not None:
    run = Run.load_model(args.model)
  elif len(args.workdir) == 1:
    run = Run.load(args.workdir[0], step=args.checkpoint)
  else:
    run = Ensemble.load(args.workdir, step=args.checkpoint)
  samples = args.samples or run.config.translator.samples
  spread = infer.has_spread(run, args.samples, args.tta)
  if samples > 1 and not run.translator.stochastic and not infer.has_spread(run, 1, args.tta):
    print(f"medjax translate: {run.translator.name} is deterministic: the std is zero",
          file=sys.stderr)
  if (args.uncertainty or args.uncertainty_dicom) and not spread:
    raise UserError(f"--uncertainty needs 2 or more draws; the run samples {samples} "
                    "(give --samples, --tta flip or several --workdir runs)")
  options = dict(steps=args.sample_steps, samples=args.samples, batch_size=args.batch_size,
                 seed=args.seed, max_voxels=args.max_voxels,
                 strict_inputs=args.strict_inputs, overlap=args.overlap, tta=args.tta)
  if args.input:
    result = infer.translate_file(run, named_inputs(args.input), args.output,
                                  target=args.target, uncertainty=args.uncertainty,
                                  mask=args.mask, output_dicom=args.output_dicom,
                                  uncertainty_dicom=args.uncertainty_dicom,
                                  series_uid=args.series_uid, **options)
    infer.report_time(Path(result["record"]["inputs"][0]).name, result)
    return 0
  done, failed = infer.translate_directory(run, args.input_dir, args.output_dir, args.layout,
                                           target=args.target, **options)
  print(f"translated {len(done)} subject(s) to {args.output_dir}"
        + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""))
  if not done:
    raise UserError(f"no subject of {args.input_dir} could be translated")
  if failed:
    raise PartialFailure(f"{len(failed)} of {len(done) + len(failed)} subjects failed "
                         f"({', '.join(failed)}); the others are in {args.output_dir}", failed)
  return 0
