"""Volume in, volume out: a trained run translates NIfTI files in the geometry of the input.

The model only ever saw axial slices made by `preprocess.preprocess` with the run's
`Recipe`; `translate_file` runs that same function on the new file (sources only, the
automatic body mask unless a mask is given), translates the slices in batches on the
mesh and undoes every step (`preprocess.to_original`), so the written volume has the
input's shape, affine, qform/sform codes and zooms.

Output intensities: CT/CBCT targets in HU; MR targets have no physical unit, so they are
written on [0, 1] — the target's robust range (0.5th–99.5th foreground percentile) maps to
[0, 1], the scale the `mri` protocol scores on. Standard deviations are in the same units.
By default the run's own sampling settings (`translator.sample_steps`, `.samples`) are
used: what evaluation scored is what a user gets.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from medjax import any2any, ensemble, evaluate, files, modalities, sliding
from medjax.data import inputs as input_checks
from medjax.data import intensity, layouts, volumes
from medjax.data.preprocess import preprocess, to_original
from medjax.errors import DISK_ERRNOS, NonFiniteError, UserError

INDEX = "translations.json"  # directory mode: what was written from what (read by `score`)
TRANSLATE_SEED_OFFSET = 20_000_003


def translate_slices(run, source: np.ndarray, *, steps: int | None = None,
                     samples: int | None = None, batch_size: int | None = None, rng=None,
                     desc: str = "translate", progress: bool = True,
                     overlap: float | None = None, tta: str | None = None):
  """(Z, H, W, C) model-scale volume → (mean, std) through `evaluate.predict_volume` (the
  evaluation's path), with a bar. An `Ensemble`'s members each predict with the same
  `rng` and combine by the mixture law (`sliding.combine`)."""
  runs = ensemble.members(run)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  unit = "window" if any(evaluate.dims(r.config) == 3 for r in runs) else "slice"
  total = sum(evaluate.work_units(r, source.shape, overlap=overlap, tta=tta) for r in runs)
  bar = tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not progress,
             dynamic_ncols=True)
  try:
    predictions = [evaluate.predict_volume(r, source, rng, overlap=overlap, tta=tta,
                                           batch_size=batch_size, steps=steps,
                                           samples=samples, on_batch=bar.update)
                   for r in runs]
  finally:
    bar.close()
  return sliding.combine([p.mean for p in predictions], [p.std for p in predictions])


def has_spread(run, samples: int | None, tta: str | None) -> bool:
  """Whether the std can be non-zero: draws, mirror TTA members or ensemble members."""
  samples = samples or run.config.translator.samples
  _, tta = evaluate.inference_settings(run.config, None, tta)
  return samples > 1 or tta != "none" or len(ensemble.members(run)) > 1


def to_output(mean: np.ndarray, std: np.ndarray | None, geometry: dict, target: str):
  """Model-scale (Z, H, W[, 1]) mean and std → the input file's grid, in output units."""
  params = intensity.fit(None, target) if modalities.is_ct(target) else {"lo": -1.0, "hi": 1.0}
  volume = intensity.to_output_units(to_original(mean, geometry, fill=-1.0), params, target)
  if std is None:
    return volume, None
  spread = np.maximum(to_original(std, geometry, fill=0.0), 0.0)
  return volume, intensity.std_to_output_units(spread, params, target)


def direction(run, inputs, target: str | None = None):
  """What the model reads and writes for `inputs`: (sources, paths, target).

  `inputs` is a list in the run's source order, or {modality: path} (`--input
  t1w=A.nii.gz`). A one-direction run takes exactly its sources (named ones are put in
  its order) and its own target. An any-to-any run takes any non-empty subset of its
  modalities, named, and a `target` among the others (default: the one modality not
  given, if exactly one is missing); anything else is a `UserError` saying what the run
  takes."""
  names = any2any.modalities(run.config)
  if isinstance(inputs, dict):
    named = {}
    for key, path in inputs.items():
      try:
        named[modalities.canonical(key)] = path
      except ValueError:
        raise UserError(f"--input {key}={path}: {key!r} is not a modality name") from None
    inputs = named
  if not names:
    sources = tuple(run.recipe.sources)
    if isinstance(inputs, dict):
      if set(inputs) != set(sources):
        raise UserError(f"the model takes {', '.join(sources)} and translates to "
                        f"{run.target}; got inputs {', '.join(inputs)}")
      inputs = [inputs[m] for m in sources]
    check_own_target(run, target)
    return sources, list(inputs), run.target
  if not isinstance(inputs, dict):
    raise UserError(f"this run is any-to-any over {', '.join(names)}: name each input, "
                    "e.g. --input t1w=A.nii.gz --input t2w=B.nii.gz --target flair")
  unseen = [m for m in inputs if m not in names]
  if unseen:
    raise UserError(f"--input {unseen[0]}=…: the run never saw {unseen[0]}; it takes any of "
                    f"{', '.join(names)}")
  if not inputs:
    raise UserError("give at least one --input MODALITY=FILE")
  if target is None:
    missing = [m for m in names if m not in inputs]
    if len(missing) != 1:
      raise UserError(f"give --target: the run synthesises any of {', '.join(names)} and "
                      f"{', '.join(missing) or 'none'} are not given")
    target = missing[0]
  try:
    target = modalities.canonical(target)
  except ValueError:
    raise UserError(f"--target {target}: not a modality name") from None
  if target not in names:
    raise UserError(f"--target {target}: the run synthesises {', '.join(names)}, not {target}")
  if target in inputs:
    raise UserError(f"--target {target} is also given as an input: the model synthesises a "
                    "missing modality from the others (drop that --input, or name another "
                    "target)")
  sources = tuple(m for m in names if m in inputs)
  return sources, [inputs[m] for m in sources], target


def check_own_target(run, target: str | None) -> None:
  """A one-direction run takes no `--target` but its own."""
  if target is not None and modalities.canonical(target) != run.target:
    raise UserError(f"--target {target}: this run translates "
                    f"{'+'.join(run.recipe.sources)} to {run.target} only (an any-to-any "
                    "run, data.any2any, takes any target)")


def translate_file(run, inputs, output=None, *, target: str | None = None,
                   uncertainty=None, mask=None,
                   output_dicom=None, uncertainty_dicom=None, series_uid=None,
                   strict_inputs: bool = False,
                   steps: int | None = None, samples: int | None = None,
                   batch_size: int | None = None, seed: int | None = None,
                   overlap: float | None = None, tta: str | None = None,
                   progress: bool = True, name: str | None = None, sidecar: bool = True,
                   max_voxels: int | None = volumes.DEFAULT_MAX_VOXELS) -> dict:
  """Translate one subject's sources into `output` (and its std into `uncertainty`).

  `inputs` are the source files — or DICOM series folders (`series_uid` picks one where a
  folder holds several) — in the run's source order, or {modality: file}; an any-to-any
  run takes any subset of its modalities and a `target` (`direction`); `mask`, if given, replaces the
  automatic body mask. Written: the NIfTI `output`, and/or with a DICOM input and a CT
  target a CT series `output_dicom` (std: `uncertainty_dicom`), and beside the first of
  them a JSON sidecar (`sidecar_path`) saying what made it and how the input compared
  with the training inputs (`sidecar=False`: only returned, as "record"; directory mode
  keeps it in its index). `run` may be an `ensemble.Ensemble`; `overlap`, `tta`
  default to the run's `eval.overlap`, `eval.tta`. Inputs outside that range print warnings, or with
  `strict_inputs` are refused before anything is written. A volume of more than
  `max_voxels` voxels is refused before it is read. Returns {"slices", "seconds",
  "output", "uncertainty", "warnings", "sidecar", "record"}.
  """
  from medjax.data import dicom
  start = time.perf_counter()
  sources, inputs, target = direction(run, inputs, target)
  inputs = [Path(p) for p in inputs]
  if len(inputs) != len(sources):
    raise UserError(f"the model takes {len(sources)} input(s) ({', '.join(sources)}),"
                    f" got {len(inputs)}: {' '.join(map(str, inputs))}")
  if output is None and output_dicom is None:
    raise UserError("nothing to write: give an output file (or a DICOM output folder)")
  read = [dicom.read_series(p, series_uid, max_voxels=max_voxels) if p.is_dir() else p
          for p in inputs]
  reference = read[0]
  if (output_dicom or uncertainty_dicom) and not isinstance(reference, dicom.Series):
    raise UserError(f"--output-dicom needs a DICOM series as input (its patient, study and "
                    f"frame of reference go into the new series); {inputs[0]} is a file")
  if (output_dicom or uncertainty_dicom) and not modalities.is_ct(target):
    raise UserError(f"--output-dicom writes a CT series; this run translates to {target}")
  given = dict(zip(sources, read)) | ({"mask": Path(mask)} if mask else {})
  label = name or inputs[0].name
  names = any2any.modalities(run.config)
  # any-to-any: the given modalities on the first given one's grid (docs/design.md,
  # "Any-to-any synthesis"); the rest of the recipe is the run's.
  recipe = dataclasses.replace(run.recipe, sources=sources) if names else run.recipe
  prepared = preprocess(given, recipe, subject_id=label, targets=False,
                        max_voxels=max_voxels)
  warnings = check_inputs(run, prepared, read, sources)
  if strict_inputs and warnings:
    raise UserError(f"{label}: --strict-inputs: " + "; ".join(warnings) + ". Nothing was "
                    "written")
  for line in warnings:
    print(f"medjax translate: warning: {label}: {line}", file=sys.stderr)
  if prepared.geometry["body_cropped"] > 0.005:
    print(f"medjax translate: {label}: the run's {'x'.join(map(str, run.recipe.size))}"
          f" slices cut off {100 * prepared.geometry['body_cropped']:.1f} % of the body; "
          "that part of the output is background", file=sys.stderr)
  seed = run.config.seed if seed is None else seed
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), TRANSLATE_SEED_OFFSET)
  source = prepared.model_source(run.recipe.context)
  if names:
    images = np.zeros(source.shape[:-1] + (len(names),), np.float32)
    for channel, modality in enumerate(sources):
      images[..., names.index(modality)] = source[..., channel]
    source = any2any.condition(images, names, sources, target)
  mean, std = translate_slices(run, source, steps=steps,
                               samples=samples, batch_size=batch_size, rng=rng,
                               desc=label, progress=progress, overlap=overlap, tta=tta)
  with_std = uncertainty or uncertainty_dicom
  volume, spread = to_output(mean, std if with_std else None, prepared.geometry, target)
  refuse_non_finite(output or output_dicom, volume, spread)
  written = {}
  if output_dicom:
    description = dicom.series_description("sCT", run)
    series = dicom.write_ct_series(volume, reference, output_dicom, description=description,
                                   derivation=_derivation(run, steps, samples, seed, overlap, tta))
    written["dicom"] = {"folder": str(series), "series_uid": _series_uid(series)}
  if uncertainty_dicom:
    series = dicom.write_ct_series(spread, reference, uncertainty_dicom, intercept=0.0,
                                   description=dicom.series_description("sCT std", run),
                                   derivation="per-voxel std (HU) of the draws of "
                                   + _derivation(run, steps, samples, seed, overlap, tta))
    written["uncertainty_dicom"] = {"folder": str(series), "series_uid": _series_uid(series)}
  if output:
    volumes.save_like(volume, reference, output)
  if uncertainty:
    volumes.save_like(spread, reference, uncertainty)
  record = {
      "inputs": [str(p) for p in inputs], "input_modalities": list(sources),
      "target": target, "output": str(output) if output else None,
      "uncertainty": str(uncertainty) if uncertainty else None, **written,
      "model": _model_record(run, steps, samples, seed, overlap, tta),
      "input_check": {"warnings": warnings, "strict": strict_inputs,
                      "input": prepared.inputs, "trained": run.inputs,
                      "thresholds": input_checks.THRESHOLDS},
      "seconds": round(time.perf_counter() - start, 3)}
  path = sidecar_path(output or output_dicom) if sidecar else None
  if path:
    files.write_json(path, record)
  return {"slices": int(mean.shape[0]), "seconds": time.perf_counter() - start,
          "output": str(output or output_dicom),
          "uncertainty": str(uncertainty) if uncertainty else None,
          "warnings": warnings, "sidecar": str(path) if path else None, "record": record}


def sidecar_path(output) -> Path:
  """OUT.nii.gz → OUT.json (BIDS' habit); a DICOM folder DIR → DIR.json beside it, so
  the folder holds DICOM files only."""
  output = Path(output)
  for suffix in volumes.NIFTI_SUFFIXES:
    if output.name.endswith(suffix):
      return output.with_name(output.name[:-len(suffix)] + ".json")
  return output.with_name(output.name + ".json")


def check_inputs(run, prepared, read, sources=None) -> list[str]:
  """The input against the run's training inputs (`data.inputs.check`), in words."""
  from medjax.data import dicom
  sources = run.recipe.sources if sources is None else sources
  dicom_modality = read[0].modality if isinstance(read[0], dicom.Series) else None
  if not run.inputs:
    warnings = input_checks.check(prepared.inputs, {}, sources,
                                  dicom_modality=dicom_modality)
    return warnings + ["the model records no ranges of its training inputs (trained "
                       "before medjax kept inputs.json): spacing, field of view and "
                       "intensities were not checked"]
  return input_checks.check(prepared.inputs, run.inputs, sources,
                            dicom_modality=dicom_modality)


def _series_uid(folder) -> str:
  import pydicom
  first = sorted(Path(folder).iterdir())[0]
  return str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID)


def _model_record(run, steps, samples, seed, overlap=None, tta=None) -> dict:
  from importlib import metadata
  overlap, tta = evaluate.inference_settings(run.config, overlap, tta)
  return {"workdir": str(run.workdir) if run.workdir else None, "step": run.step,
          "translator": run.translator.name, "sources": list(run.recipe.sources),
          "target": run.target, "any2any": list(any2any.modalities(run.config)) or None,
          "sample_steps": steps or run.config.translator.sample_steps,
          "samples": samples or run.config.translator.samples,
          "seed": run.config.seed if seed is None else seed,
          "tta": tta, "overlap": overlap,
          # every run whose predictions were combined (one, or an ensemble's members)
          "members": [{"workdir": str(r.workdir) if r.workdir else None, "step": r.step,
                       "translator": r.translator.name,
                       "sample_steps": steps or r.config.translator.sample_steps,
                       "samples": samples or r.config.translator.samples}
                      for r in ensemble.members(run)],
          "medjax": metadata.version("medjax")}


def _derivation(run, steps, samples, seed, overlap=None, tta=None) -> str:
  record = _model_record(run, steps, samples, seed, overlap, tta)
  extra = "".join([f", ensemble of {len(record['members'])}" if len(record["members"]) > 1
                   else "", ", mirror TTA" if record["tta"] == "flip" else ""])
  return (f"synthetic CT by medjax {record['medjax']} ({record['translator']}, "
          f"{'+'.join(record['sources'])} to {record['target']}, step {record['step']}, "
          f"{record['sample_steps']} steps x {record['samples']} samples{extra}); "
          "research use only")


def refuse_non_finite(output, volume: np.ndarray, spread: np.ndarray | None) -> None:
  """NaN or Inf is never written to a NIfTI (a viewer shows it as a plausible image, a
  metric turns NaN): a `NonFiniteError` before either file is written."""
  for what, values in (("output", volume), ("std", spread)):
    if values is not None and not np.isfinite(values).all():
      bad = int(values.size - np.isfinite(values).sum())
      raise NonFiniteError(
          f"{output}: the model's {what} is not finite in {bad} of {values.size} voxels "
          "(NaN/Inf); nothing was written. The run's parameters may be damaged (try an "
          "earlier --checkpoint), or the input is far outside what it was trained on")


# BraTS 2023's file tags: an any-to-any run filling in a `brasyn` folder names its outputs
# as the missing files would be named (docs/design.md, "Any-to-any synthesis").
BRATS_TAGS = {"t1w": "t1n", "t1c": "t1c", "t2w": "t2w", "flair": "t2f"}


def _fill_plan(run, subject, target):
  """Any-to-any directory mode: [(available sources, target)] for one subject, and a note.

  With `target`: that modality from every other one the subject has. Without: every
  modality of the run the subject lacks (BraSyn: one), each from all it has."""
  names = any2any.modalities(run.config)
  have = [m for m in names if m in subject.files and m != target]
  if not have:
    raise UserError(f"none of the run's modalities {', '.join(names)} is there to "
                    "translate from")
  if target is not None:
    return [(tuple(have), target)], None
  missing = [m for m in names if m not in subject.files]
  note = None
  if not missing:
    note = f"has every modality of the run ({', '.join(names)}): nothing to synthesise"
  elif len(missing) > 1:
    note = (f"{len(missing)} modalities missing ({', '.join(missing)}); each synthesised "
            f"from {'+'.join(have)}")
  return [(tuple(have), m) for m in missing], note


def translate_directory(run, input_dir, output_dir, layout: str, *, target=None, log=None,
                        **options):
  """Every subject of a dataset folder → OUT/<id>.nii.gz (+ OUT/<id>_std.nii.gz with
  samples ≥ 2) and OUT/translations.json. An any-to-any run translates each subject to
  `target` from every other modality it has, or without `target` fills in every
  modality the subject lacks (a `brasyn` folder: the one removed), written as
  OUT/<id>/<id>-<tag>.nii.gz (BraTS 2023's tags for brats layouts). A bad subject is reported and skipped; subject
  ids become safe file names, so nothing is written outside `output_dir`. A full or
  read-only output disk stops the run with that `OSError` (the volumes written so far are
  complete), and so does a non-finite model output (`NonFiniteError`).

  Returns (done: {id: entry}, failed: {id: reason}).
  """
  log = log or (lambda line: print(line, file=sys.stderr))
  try:
    subjects = layouts.find_subjects(layout, input_dir)
  except ValueError as error:
    raise UserError(str(error)) from None
  if not subjects:
    raise UserError(f"no {layout} subjects under {input_dir}")
  from medjax.data.prepare import refuse_shared_stems
  refuse_shared_stems([s.id for s in subjects], f"{layout} subjects under {input_dir}")
  output_dir = Path(output_dir)
  files.remove_stale(output_dir)  # a killed earlier run's half-written volumes
  sources = run.recipe.sources
  with_std = has_spread(run, options.get("samples"), options.get("tta"))
  stems = {files.safe_stem(s.id): s.id for s in subjects}
  clash = [stem for stem in stems if with_std and stem.endswith("_std") and stem[:-4] in stems]
  if clash:  # subject `a`'s std would overwrite subject `a_std`'s volume
    raise UserError(f"subjects {stems[clash[0][:-4]]!r} and {stems[clash[0]]!r} under "
                    f"{input_dir}: the std of the first would be written as the second "
                    f"({clash[0]}.nii.gz); rename one, or translate with --samples 1"
                    " (one run, --tta none)")
  done, failed, notes = {}, {}, {}
  names = any2any.modalities(run.config)
  if target is not None and not names:
    check_own_target(run, target)
    target = None
  for subject in subjects:
    if names:
      try:
        plan, note = _fill_plan(run, subject, target)
      except UserError as error:
        failed[subject.id] = str(error)
        log(f"medjax translate: {subject.id}: {error}")
        continue
      if note:
        notes[subject.id] = note
        log(f"medjax translate: {subject.id}: {note}")
      entry = _translate_any2any(run, subject, plan, output_dir, layout, with_std,
                                 fill=target is None, failed=failed, log=log, **options)
      if entry is not None:
        done[subject.id] = entry
      continue
    missing = subject.missing(sources)
    if missing:
      failed[subject.id] = f"missing {', '.join(missing)} in {input_dir}"
      log(f"medjax translate: {subject.id}: {failed[subject.id]}")
      continue
    inputs = [subject.files[m] for m in sources]
    stem = files.safe_stem(subject.id)
    output = output_dir / f"{stem}.nii.gz"
    uncertainty = output_dir / f"{stem}_std.nii.gz" if with_std else None
    try:
      result = translate_file(run, inputs, output, uncertainty=uncertainty,
                              mask=subject.files.get("mask"), name=subject.id,
                              sidecar=False, **options)
    except (UserError, ValueError, OSError) as error:
      if isinstance(error, OSError) and _output_fault(error, output_dir):
        raise  # a full or read-only disk: every later subject would fail alike
      failed[subject.id] = str(error)
      log(f"medjax translate: {subject.id}: {error}")
      continue
    report_time(subject.id, result)
    done[subject.id] = {
        "prediction": os.path.relpath(output, output_dir),
        "std": os.path.relpath(uncertainty, output_dir) if uncertainty else None,
        "sources": [str(Path(p).resolve()) for p in inputs],
        "mask": str(Path(subject.files["mask"]).resolve()) if "mask" in subject.files else None,
        "seconds": round(result["seconds"], 3),
        "input_check": {"warnings": result["warnings"],
                        "input": result["record"]["input_check"]["input"]}}
  # The index is the folder's sidecar: what made it, and each input against the training
  # inputs (docs/design.md, "Input checks").
  index = {"target": target if names else run.target,
           "sources": list(names or sources), "step": run.step,
           "model": _model_record(run, options.get("steps"), options.get("samples"),
                                  options.get("seed"), options.get("overlap"),
                                  options.get("tta")),
           "trained_inputs": run.inputs, "thresholds": input_checks.THRESHOLDS,
           "subjects": done, "failed": failed, **({"notes": notes} if notes else {})}
  files.write_json(output_dir / INDEX, index, indent=1)
  return done, failed


def _translate_any2any(run, subject, plan, output_dir: Path, layout: str, with_std: bool, *,
                       fill: bool, failed: dict, log, **options):
  """One subject's directions (`_fill_plan`) → its files and index entry, or None."""
  stem = files.safe_stem(subject.id)
  filled, seconds, warnings, first = {}, 0.0, [], None
  for available, target in plan:
    if fill:
      tag = BRATS_TAGS.get(target, target) if layout in ("brats2023", "brasyn") else target
      output = output_dir / stem / f"{stem}-{tag}.nii.gz"
    else:
      output = output_dir / f"{stem}.nii.gz"
    uncertainty = output.with_name(output.name[:-len(".nii.gz")] + "_std.nii.gz") \
        if with_std else None
    try:
      output.parent.mkdir(parents=True, exist_ok=True)
      result = translate_file(run, {m: subject.files[m] for m in available}, output,
                              target=target, uncertainty=uncertainty,
                              mask=subject.files.get("mask"), name=subject.id,
                              sidecar=False, **options)
    except (UserError, ValueError, OSError) as error:
      if isinstance(error, OSError) and _output_fault(error, output_dir):
        raise
      failed[subject.id] = str(error)
      log(f"medjax translate: {subject.id}: {error}")
      return None
    report_time(f"{subject.id} {target}", result)
    seconds += result["seconds"]
    warnings += result["warnings"]
    filled[target] = {"prediction": os.path.relpath(output, output_dir),
                      "std": os.path.relpath(uncertainty, output_dir) if uncertainty else None,
                      "available": list(available)}
    first = first or (target, filled[target], result)
  if first is None:
    return None
  target, entry, result = first
  return {"prediction": entry["prediction"], "std": entry["std"], "target": target,
          "sources": [str(Path(subject.files[m]).resolve()) for m in entry["available"]],
          "filled": filled,
          "mask": str(Path(subject.files["mask"]).resolve()) if "mask" in subject.files else None,
          "seconds": round(seconds, 3),
          "input_check": {"warnings": warnings,
                          "input": result["record"]["input_check"]["input"]}}


def _output_fault(error: OSError, output_dir: Path) -> bool:
  """The output folder cannot take the file (full, over quota, too large, read-only,
  not writable) — not an input that could not be read."""
  if error.errno in (errno.EACCES, errno.EPERM):
    return error.filename is not None and Path(error.filename).resolve().is_relative_to(
        output_dir.resolve())
  return error.errno in DISK_ERRNOS


def report_time(name: str, result: dict) -> None:
  rate = result["slices"] / max(result["seconds"], 1e-9)
  print(f"{name}: {result['slices']} slices in {result['seconds']:.1f} s "
        f"({rate:.1f} slices/s) → {result['output']}")
