"""`medjax translate`: NIfTI volume in, NIfTI volume out, in the geometry of the input.

The model only ever saw axial slices prepared one way (orientation, voxel size, intensity
scaling, in-plane crop/pad, 2.5D context); `preprocessing(config)` recovers that recipe
from the run, `prepare_input` applies it to new files, and `to_output` undoes every step
so the written volume has the input's shape, affine, qform/sform codes and zooms.

Output intensities: CT/CBCT targets in HU; MR targets have no physical unit, so they are
written on [0, 1] — the target's robust range (0.5th–99.5th foreground percentile) maps to
[0, 1], the scale the `mri` protocol scores on. Standard deviations are in the same units.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from medjax import checkpoint as checkpoint_lib
from medjax import config as config_lib
from medjax import evaluate as evaluate_lib
from medjax import parallel
from medjax.cli import UserError
from medjax.data import intensity, volumes

INDEX = "translations.json"  # directory mode: what was written from what (read by `score`)
NIFTI_SUFFIXES = (".nii.gz", ".nii")


# --- the recipe the model was trained with ---------------------------------------------

def preprocessing(config) -> dict:
  """{spacing, size, context, sources, targets, register} of the run's training data.

  Phantom runs have no manifest: their slices are the phantom grid itself (no crop, no
  context); shard runs read what `medjax prepare` recorded.
  """
  if config.data.kind == "phantom":
    phantom = config.data.phantom
    return {"spacing": [float(s) for s in phantom.spacing],
            "size": [int(s) for s in tuple(phantom.shape)[:2]], "context": 0,
            "sources": list(config_lib.source_modalities(config)),
            "targets": [config.data.target], "register": None}
  path = Path(config.data.dir) / "manifest.json"
  if not path.exists():
    raise FileNotFoundError(
        f"{path} does not exist: the run was trained on shards and their manifest records"
        " the preprocessing to repeat")
  settings = json.loads(path.read_text())["settings"]
  return {key: settings.get(key) for key in
          ("spacing", "size", "context", "sources", "targets", "register")}


# --- volume → slices -------------------------------------------------------------------

@dataclasses.dataclass
class PreparedInput:
  source: np.ndarray  # (Z, H, W, Cs·(2K+1)) on [-1, 1], the model's input slices
  mask: np.ndarray  # (Z, H, W) bool, the body on the model's grid
  geometry: dict  # what `volumes.to_original` needs to go back
  normalisation: dict  # modality → intensity.fit parameters


def with_context(source: np.ndarray, context: int) -> np.ndarray:
  """(Z, H, W, Cs) → (Z, H, W, Cs·(2K+1)), neighbours edge-clamped, modality-major
  channels [m0(z-K) … m0(z+K), m1(z-K) …] as `PreparedSubject.context_source`."""
  if not context:
    return source
  depth = source.shape[0]
  near = np.clip(np.arange(depth)[:, None] + np.arange(-context, context + 1), 0, depth - 1)
  stack = source[near]  # (Z, 2K+1, H, W, Cs)
  return np.ascontiguousarray(stack.transpose(0, 2, 3, 4, 1).reshape(*source.shape[:3], -1))


def prepare_input(paths, recipe: dict, mask_path=None) -> PreparedInput:
  """Source files (one per source modality, in the run's order) → model slices.

  The same steps as `volumes.preprocess_subject`, without a target: the first file sets
  the grid; the others are resampled onto it through their own affines.
  """
  sources = list(recipe["sources"])
  paths = [Path(p) for p in paths]
  if len(paths) != len(sources):
    raise UserError(f"the model takes {len(sources)} input(s) ({', '.join(sources)}),"
                    f" got {len(paths)}: {' '.join(map(str, paths))}")
  original, original_affine = volumes.load(paths[0])
  ras, ras_affine = volumes.to_ras(original, original_affine)
  grid_affine, grid_shape = volumes.resized_grid(ras_affine, ras.shape, recipe["spacing"])
  on_grid = []
  for i, path in enumerate(paths):
    data, affine = (ras, ras_affine) if i == 0 else volumes.to_ras(*volumes.load(path))
    world = None
    if (i and recipe.get("register") == "rigid"
        and not volumes.same_grid(data.shape, affine, ras.shape, ras_affine)):
      world = volumes.register_rigid(on_grid[0], grid_affine, data, affine)
    on_grid.append(volumes.resample(data, affine, grid_affine, grid_shape, order=1,
                                    cval=float(data.min()), world=world))
  if mask_path is not None:
    data, affine = volumes.to_ras(*volumes.load(mask_path))
    mask = volumes.resample(data > 0, affine, grid_affine, grid_shape, order=1) >= 0.5
  else:
    mask = volumes.body_mask(on_grid[0])
  if not mask.any():
    raise volumes.VolumeError(mask_path or paths[0], "empty body mask")
  normalisation = {m: intensity.fit(v, m, mask) for m, v in zip(sources, on_grid)}
  size = tuple(recipe["size"])
  start = volumes.crop_start(mask, size)
  unit = np.stack([volumes.window(intensity.normalise(v, normalisation[m]), start, size, -1.0)
                   for m, v in zip(sources, on_grid)], -1)
  geometry = {
      "original_shape": list(original.shape), "original_affine": original_affine.tolist(),
      "ras_shape": list(ras.shape), "ras_affine": ras_affine.tolist(),
      "grid_shape": list(grid_shape), "grid_affine": grid_affine.tolist(),
      "crop_start": list(start), "size": list(size)}
  axial = lambda v: np.ascontiguousarray(np.moveaxis(v, 2, 0))  # (X, Y, Z…) → (Z, X, Y…)
  return PreparedInput(source=with_context(axial(unit), int(recipe["context"] or 0)),
                       mask=axial(volumes.window(mask, start, size, False)),
                       geometry=geometry, normalisation=normalisation)


# --- slices → volume -------------------------------------------------------------------

def to_output(mean: np.ndarray, std: np.ndarray | None, geometry: dict, target: str):
  """Model-scale (Z, H, W[, 1]) mean and std → the input file's grid, in output units."""
  params = intensity.fit(None, target) if intensity.is_ct(target) else {"lo": -1.0, "hi": 1.0}
  protocol = evaluate_lib.protocol_for(target)
  volume = evaluate_lib.to_physical(volumes.to_original(mean, geometry, fill=-1.0), params,
                                    protocol)
  if std is None:
    return volume, None
  spread = volumes.to_original(std, geometry, fill=0.0)
  return volume, evaluate_lib.std_to_physical(np.maximum(spread, 0.0), params, protocol)


def save_like(volume: np.ndarray, reference, path) -> None:
  """Write float32 `volume` with the reference file's header: affine, qform/sform and their
  codes, zooms and units survive. A non-NIfTI reference (.mha) gives its RAS affine."""
  path, reference = Path(path), Path(reference)
  if not str(path).endswith(NIFTI_SUFFIXES):
    raise UserError(f"{path}: output must be a .nii or .nii.gz file")
  volume = np.asarray(volume, np.float32)
  if str(reference).endswith(NIFTI_SUFFIXES):
    ref = nib.load(reference)
    if int(np.prod(ref.shape)) == volume.size:
      volume = volume.reshape(ref.shape)  # e.g. a trailing singleton axis
    header = ref.header.copy()
    header.set_data_dtype(np.float32)
    image = type(ref)(volume, ref.affine, header)
    image.set_qform(ref.header.get_qform(), code=int(ref.header["qform_code"]))
    image.set_sform(ref.header.get_sform(), code=int(ref.header["sform_code"]))
    image.header.set_slope_inter(1.0, 0.0)
  else:
    _, affine = volumes.load(reference)
    image = nib.Nifti1Image(volume, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(".tmp-" + path.name)
  nib.save(image, tmp)
  os.replace(tmp, path)


# --- the model -------------------------------------------------------------------------

@dataclasses.dataclass
class Model:
  """A run's translator and inference (EMA) parameters, with its preprocessing recipe."""
  config: object
  translator: object
  params: object
  mesh: object
  recipe: dict
  step: int
  _compiled: dict = dataclasses.field(default_factory=dict)

  @property
  def target(self) -> str:
    return self.config.data.target

  def translate_fn(self, steps: int, samples: int):
    key = (steps, samples)
    if key not in self._compiled:
      self._compiled[key] = evaluate_lib.make_translate_fn(
          self.translator, self.mesh, steps=steps, samples=samples)
    return self._compiled[key]


def example_record(recipe: dict) -> dict:
  """One slice record of the training data's shapes: all `create_state` needs."""
  height, width = recipe["size"]
  channels = len(recipe["sources"]) * (2 * int(recipe["context"] or 0) + 1)
  plane = lambda c: np.zeros((height, width, c), np.float32)
  return {"source": plane(channels), "target": plane(len(recipe["targets"])),
          "mask": plane(1), "subject": np.int32(0), "slice": np.int32(0)}


def _state(config, mesh, recipe):
  from medjax import train
  translator = train.build_translator(config)
  abstract, init = train.create_state(translator, config, mesh, [example_record(recipe)])
  return translator, abstract, init


def load_model(workdir, *, step: int | None = None, mesh=None) -> Model:
  """The run's checkpoint at `step` (the latest by default); FileNotFoundError naming
  what is missing (the workdir's config.json, the checkpoint step)."""
  from medjax import train
  config = train.load_config(str(workdir))
  recipe = preprocessing(config)
  mesh = mesh or parallel.make_mesh()
  translator, abstract, _ = _state(config, mesh, recipe)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {workdir}: {directory} does not exist")
  checkpointer = checkpoint_lib.Checkpointer(directory, async_save=False)
  try:
    state = checkpointer.restore(abstract, step=step)
  finally:
    checkpointer.close()
  return Model(config, translator, translator.inference_params(state), mesh, recipe,
               int(state.step))


def fresh_model(config, *, mesh=None) -> Model:
  """Freshly initialised parameters (timing, tests): the same path as a trained model."""
  mesh = mesh or parallel.make_mesh()
  recipe = preprocessing(config)
  translator, _, init = _state(config, mesh, recipe)
  state = init()
  return Model(config, translator, translator.inference_params(state), mesh, recipe, 0)


# --- translating -----------------------------------------------------------------------

def balanced_batch(depth: int, batch_size: int, devices: int) -> int:
  """At most `batch_size` slices per batch, as few batches as that allows, evened out so
  the last one is not mostly padding (67 slices: 3 × 24, not 3 × 32). Sizes are rounded
  to a multiple of 8 (and of the devices) so volumes of many depths share compilations."""
  multiple = math.lcm(8, devices)
  if batch_size < multiple:  # a small batch asked for (memory): keep to it
    multiple = devices
  batches = -(-depth // max(batch_size, 1))
  return -(-(-(-depth // batches)) // multiple) * multiple


def translate_slices(model: Model, source: np.ndarray, *, steps: int, samples: int,
                     batch_size: int, rng, desc: str = "translate", progress: bool = True):
  """(Z, H, W, C) model-scale slices → (mean, std), in batches on the mesh, with a bar."""
  batch_size = balanced_batch(source.shape[0], batch_size, model.mesh.size)
  fn = model.translate_fn(steps, samples)
  bar = tqdm(total=source.shape[0], desc=desc, unit="slice", leave=False,
             disable=not progress, dynamic_ncols=True)

  def counted(params, batch, key):
    out = fn(params, batch, key)
    bar.update(min(batch_size, bar.total - bar.n))
    return out

  try:
    prediction = evaluate_lib.translate_volume(counted, model.params, source, rng, model.mesh,
                                               batch_size)
  finally:
    bar.close()
  return prediction.mean, prediction.std


def translate_file(model: Model, inputs, output, *, uncertainty=None, mask=None,
                   steps: int | None = None, samples: int = 1, batch_size: int | None = None,
                   seed: int = 0, progress: bool = True, name: str | None = None) -> dict:
  """Translate one subject's source files into `output` (and its std into `uncertainty`).

  Returns {"slices", "seconds", "output", "uncertainty"}.
  """
  start = time.perf_counter()
  steps = steps or model.config.translator.steps
  prepared = prepare_input(inputs, model.recipe, mask)
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), 20_000_003)
  mean, std = translate_slices(model, prepared.source, steps=steps, samples=samples,
                               batch_size=batch_size or model.config.eval.batch_size, rng=rng,
                               desc=name or Path(inputs[0]).name, progress=progress)
  volume, spread = to_output(mean, std if uncertainty else None, prepared.geometry,
                             model.target)
  save_like(volume, inputs[0], output)
  if uncertainty:
    save_like(spread, inputs[0], uncertainty)
  return {"slices": int(prepared.source.shape[0]), "seconds": time.perf_counter() - start,
          "output": str(output), "uncertainty": str(uncertainty) if uncertainty else None}


def translate_directory(model: Model, input_dir, output_dir, layout: str, **options):
  """Every subject of a dataset folder → OUT/<id>.nii.gz (+ OUT/<id>_std.nii.gz with
  samples ≥ 2) and OUT/translations.json. A bad subject is reported and skipped.

  Returns (done: {id: entry}, failed: {id: reason}).
  """
  from medjax.data import layouts
  try:
    subjects = layouts.find_subjects(layout, input_dir)
  except ValueError as error:
    raise UserError(str(error)) from None
  if not subjects:
    raise UserError(f"no {layout} subjects under {input_dir}")
  output_dir = Path(output_dir)
  sources = model.recipe["sources"]
  with_std = options.get("samples", 1) > 1
  done, failed = {}, {}
  for subject in subjects:
    missing = subject.missing(sources)
    if missing:
      failed[subject.id] = f"missing {', '.join(missing)} in {input_dir}"
      print(f"medjax translate: {subject.id}: {failed[subject.id]}", file=sys.stderr)
      continue
    inputs = [subject.files[m] for m in sources]
    output = output_dir / f"{subject.id}.nii.gz"
    uncertainty = output_dir / f"{subject.id}_std.nii.gz" if with_std else None
    try:
      result = translate_file(model, inputs, output, uncertainty=uncertainty,
                              mask=subject.files.get("mask"), name=subject.id, **options)
    except (volumes.VolumeError, UserError, ValueError, OSError) as error:
      failed[subject.id] = str(error)
      print(f"medjax translate: {subject.id}: {error}", file=sys.stderr)
      continue
    _report_time(subject.id, result)
    done[subject.id] = {
        "prediction": os.path.relpath(output, output_dir),
        "std": os.path.relpath(uncertainty, output_dir) if uncertainty else None,
        "sources": [str(Path(p).resolve()) for p in inputs],
        "mask": str(Path(subject.files["mask"]).resolve()) if "mask" in subject.files else None,
        "seconds": round(result["seconds"], 3)}
  index = {"target": model.target, "sources": sources, "step": model.step,
           "subjects": done, "failed": failed}
  output_dir.mkdir(parents=True, exist_ok=True)
  (output_dir / INDEX).write_text(json.dumps(index, indent=1))
  return done, failed


def _report_time(name: str, result: dict) -> None:
  rate = result["slices"] / max(result["seconds"], 1e-9)
  print(f"{name}: {result['slices']} slices in {result['seconds']:.1f} s "
        f"({rate:.1f} slices/s) → {result['output']}")


# --- command line ----------------------------------------------------------------------

def add_translate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  parser.add_argument("--workdir", required=True, help="the training run directory")
  parser.add_argument("--input", nargs="+", help="source file(s), in the run's source order")
  parser.add_argument("--output", help="output .nii.gz (one subject)")
  parser.add_argument("--mask", help="body mask file (default: Otsu on the first input)")
  parser.add_argument("--input-dir", help="a dataset folder: translate every subject")
  parser.add_argument("--output-dir", help="where OUT/<id>.nii.gz go (with --input-dir)")
  parser.add_argument("--layout", help="the dataset layout of --input-dir (phantom, ixi, …)")
  parser.add_argument("--steps", type=int, default=None,
                      help="sampling steps (default: the run's translator.steps)")
  parser.add_argument("--samples", type=int, default=1,
                      help="draws per slice: their mean is the output, their std the uncertainty")
  parser.add_argument("--uncertainty", help="output .nii.gz for the per-voxel std (--samples ≥ 2)")
  parser.add_argument("--checkpoint", type=int, default=None, help="step (default: the latest)")
  parser.add_argument("--batch-size", type=int, default=None,
                      help="slices per batch (default: the run's eval.batch_size)")
  parser.add_argument("--seed", type=int, default=0)
  return parser


def _check_args(args) -> None:
  if bool(args.input) == bool(args.input_dir):
    raise UserError("give either --input FILE [FILE ...] --output FILE, or --input-dir DIR"
                    " --output-dir DIR --layout LAYOUT")
  if args.input and not args.output:
    raise UserError("--input needs --output FILE.nii.gz")
  if args.input_dir and not (args.output_dir and args.layout):
    raise UserError("--input-dir needs --output-dir DIR and --layout LAYOUT")
  if args.samples < 1 or (args.steps is not None and args.steps < 1):
    raise UserError("--samples and --steps must be positive")
  if args.uncertainty and args.samples < 2:
    raise UserError("--uncertainty needs --samples 2 or more (the std of the draws)")
  for path in args.input or ():
    if not Path(path).exists():
      raise FileNotFoundError(f"input {path} does not exist")
  if args.input_dir and not Path(args.input_dir).is_dir():
    raise FileNotFoundError(f"input directory {args.input_dir} does not exist")


def translate_main(args) -> int:
  _check_args(args)
  model = load_model(args.workdir, step=args.checkpoint)
  if args.samples > 1 and not model.translator.stochastic:
    print(f"medjax translate: {model.translator.name} is deterministic: the std is zero",
          file=sys.stderr)
  options = dict(steps=args.steps, samples=args.samples, batch_size=args.batch_size,
                 seed=args.seed)
  if args.input:
    try:
      result = translate_file(model, args.input, args.output, uncertainty=args.uncertainty,
                              mask=args.mask, **options)
    except volumes.VolumeError as error:
      raise UserError(f"{error.path}: {error.reason}") from None
    except ValueError as error:  # e.g. a constant image intensity.fit cannot scale
      raise UserError(f"{args.input[0]}: {error}") from None
    _report_time(Path(args.input[0]).name, result)
    return 0
  done, failed = translate_directory(model, args.input_dir, args.output_dir, args.layout,
                                     **options)
  print(f"translated {len(done)} subject(s) to {args.output_dir}"
        + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""))
  if not done:
    raise UserError(f"no subject of {args.input_dir} could be translated")
  return 1 if failed else 0

