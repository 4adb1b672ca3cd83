"""Metrics of predicted volumes against their targets, per subject (`medjax score`).

Files are matched by subject. A plain folder names each volume by its path without the
suffix (`OUT/phantom_003.nii.gz` → `phantom_003`), the way `medjax translate --output-dir`
writes them (its `translations.json` also gives the sources and stds for the report); a
dataset folder read through `--layout` gives each subject's target modality and its mask.
The maths is `medjax.metrics.score`: nothing is computed here that training's evaluation
does not compute the same way.

Intensities: `synthrad2023`/`synthrad2025` take HU as stored. `mri` scores on [0, 1]: the
target is scaled by its own robust range inside the mask (as in training), the prediction
is read as already on [0, 1] (what `medjax translate` writes for MR targets) unless
`--pred-scale robust` scales it the same way as the target. Without a mask, the
target's automatic body mask (`mask.body_mask`) is the scoring region.
"""

from __future__ import annotations

import dataclasses
import errno
import sys
from pathlib import Path

import numpy as np

from medjax import figures, files, metrics
from medjax.data import intensity, layouts, volumes
from medjax.data.mask import body_mask
from medjax.errors import UserError

SUFFIXES = (".nii.gz", ".nii", ".mha")
INDEX = "translations.json"


@dataclasses.dataclass
class Case:
  """One subject's files."""
  id: str
  pred: Path | None = None
  target: Path | None = None
  mask: Path | None = None
  source: Path | None = None
  std: Path | None = None


def read_index(directory) -> dict | None:
  """translate's `translations.json` in `directory` (None if there is none), checked:
  {"subjects": {id: {"prediction": file, "std": file or None, "sources": [file…]}}}."""
  index = Path(directory) / INDEX
  if not index.exists():
    return None
  value = files.read_json(index, dict)
  subjects = value.get("subjects")
  if not isinstance(subjects, dict):
    raise UserError(f"{index}: no 'subjects' object; it is damaged (translate again)")
  for sid, entry in subjects.items():
    ok = (isinstance(entry, dict) and isinstance(entry.get("prediction"), str)
          and isinstance(entry.get("std"), (str, type(None)))
          and isinstance(entry.get("sources", []), list)
          and all(isinstance(s, str) for s in entry.get("sources", [])))
    if not ok:
      raise UserError(f"{index}: the entry of subject {sid!r} is damaged (translate again)")
  return value


def image_files(directory) -> dict[str, Path]:
  """{subject: file} for every volume under `directory`; the subject is the relative
  path without its suffix. With a `translations.json` (translate's index) its entries.
  Symlinked folders are followed, each folder once (`layouts.walk`)."""
  directory = Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(errno.ENOENT, "directory does not exist", str(directory))
  index = read_index(directory)
  if index is not None:
    return {sid: directory / entry["prediction"] for sid, entry in index["subjects"].items()}
  found, notes = {}, []
  for folder, _, filenames in layouts.walk(directory, notes):
    for filename in filenames:
      path, name = folder / filename, filename.lower()
      suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
      if suffix and path.is_file() and not name.startswith(files.TMP_PREFIX):
        found[path.relative_to(directory).as_posix()[:-len(suffix)]] = path
  for note in notes:
    print(f"medjax score: {note}", file=sys.stderr)
  return dict(sorted(found.items()))


def translation_extras(directory) -> dict[str, dict]:
  """{subject: {"source": path, "std": path}} from translate's index, if there is one."""
  index = read_index(directory)
  if index is None:
    return {}
  extras = {}
  for sid, entry in index["subjects"].items():
    extras[sid] = {"source": Path(entry["sources"][0]) if entry.get("sources") else None,
                   "std": Path(directory) / entry["std"] if entry.get("std") else None}
  return extras


def cases(pred_dir, target_dir, mask_dir=None, *, layout=None, modality=None) -> list[Case]:
  """Every subject seen in either folder; a missing side stays None and is reported."""
  preds = image_files(pred_dir)
  masks = image_files(mask_dir) if mask_dir else {}
  if layout:
    try:
      subjects = layouts.find_subjects(layout, target_dir)
    except ValueError as error:
      raise UserError(str(error)) from None
    # an any-to-any translation names each subject's target (a brasyn fill: the missing one)
    index = read_index(pred_dir) or {"subjects": {}}
    own = {sid: entry.get("target") for sid, entry in index["subjects"].items()}
    targets = {s.id: s.files.get(own.get(s.id) or modality) for s in subjects}
    if not mask_dir:
      masks = {s.id: s.files["mask"] for s in subjects if "mask" in s.files}
  else:
    targets = image_files(target_dir)
  extras = translation_extras(pred_dir)
  return [Case(sid, preds.get(sid), targets.get(sid), masks.get(sid),
               extras.get(sid, {}).get("source"), extras.get(sid, {}).get("std"))
          for sid in sorted(preds.keys() | targets.keys())]


def load_case(case: Case, *, protocol: str, modality: str | None = None,
              pred_scale: str = "unit",
              max_voxels: int | None = volumes.DEFAULT_MAX_VOXELS) -> dict:
  """Pred, target and mask as arrays on one grid, in the protocol's units; a `UserError`
  naming the file for whatever is missing, unreadable, on another grid, or empty."""
  if case.pred is None:
    raise UserError(f"no prediction for target {case.target}")
  if case.target is None:
    raise UserError(f"no target for prediction {case.pred}")
  arrays = {}
  for name in ("pred", "target", "mask"):
    path = getattr(case, name)
    if path is None:
      continue
    try:
      arrays[name], arrays[name + "_affine"] = volumes.load(path, max_voxels)
    except volumes.VolumeError as error:
      raise UserError(f"{path}: {error.reason}") from None
  target, affine = arrays["target"], arrays["target_affine"]
  for name in ("pred", "mask"):
    if name in arrays and not volumes.same_grid(arrays[name].shape, arrays[name + "_affine"],
                                                target.shape, affine):
      raise UserError(
          f"{getattr(case, name)}: its grid (shape {arrays[name].shape}) differs from the"
          f" target {case.target} (shape {target.shape}); resample it onto the target first")
  if "mask" in arrays:
    mask = arrays["mask"] > 0
    if not mask.any():
      raise UserError(f"{case.mask}: empty mask")
  else:
    reference = target if protocol == "mri" else np.maximum(target, intensity.HU_MIN)
    mask = body_mask(reference)  # no mask file: the target's body
    if not mask.any():
      raise UserError(f"{case.target}: no foreground to score in (give --mask)")
  pred = arrays["pred"]
  if protocol == "mri":
    modality = modality or "mr"
    unit = lambda v: intensity.to_unit_interval(
        intensity.normalise(v, intensity.fit(v, modality, mask)))
    target = unit(target)
    if pred_scale == "robust":
      pred = unit(pred)
  return {"pred": pred, "target": target, "mask": mask, "affine": affine}


def axial_axis(affine) -> int:
  """The voxel axis of a file that runs closest to S (inferior–superior): its slice axis z,
  whatever the file's voxel order (`through_plane_mae` pairs voxels along it)."""
  import nibabel.orientations as nio
  codes = nio.io_orientation(np.asarray(affine))[:, 0]
  return int(np.flatnonzero(codes == 2)[0]) if (codes == 2).any() else 2


def score_cases(all_cases, *, protocol: str, modality=None, pred_scale="unit", log=None,
                max_voxels: int | None = volumes.DEFAULT_MAX_VOXELS):
  """Per-subject rows and {subject: reason} for those that could not be scored."""
  rows, failed = [], {}
  for case in all_cases:
    try:
      loaded = load_case(case, protocol=protocol, modality=modality, pred_scale=pred_scale,
                         max_voxels=max_voxels)
      row = {"subject": case.id, **metrics.score(loaded["pred"], loaded["target"],
                                                 loaded["mask"], protocol=protocol,
                                                 axial_axis=axial_axis(loaded["affine"]))}
    except (UserError, ValueError) as error:
      failed[case.id] = str(error)
      if log:
        log(f"medjax score: {case.id}: {error}")
      continue
    rows.append(row)
  return rows, failed


def add_segmentation(rows, failed, all_cases, *, run_dir, layout, target_dir, modality,
                     pred_dir=None, max_voxels=volumes.DEFAULT_MAX_VOXELS, log=None,
                     progress=None):
  """Task-based scores (`segmentation.score_subject`) joined to each scored subject's row;
  a subject that cannot be segmented moves from `rows` to `failed`. Returns (rows,
  {"run", "modalities", "target", "ceiling"}) (docs/design.md, "Segmentation-based
  evaluation")."""
  from medjax import segmentation
  if layout != "phantom":
    raise UserError("--segmentation needs --layout phantom (phantom files on the run's "
                    "grid); a prepared dataset is scored by segmentation with `medjax "
                    "evaluate --segmentation`")
  segmenter = segmentation.segmenter_for(run_dir, progress=progress)
  subjects = {s.id: s for s in layouts.find_subjects(layout, target_dir)}
  by_id = {c.id: c for c in all_cases}
  # an any-to-any translation names each subject's target in its index
  index = read_index(pred_dir) if pred_dir is not None and not modality else None
  own = {sid: e.get("target") for sid, e in (index or {"subjects": {}})["subjects"].items()}
  kept = []
  for row in rows:
    sid = row["subject"]
    try:
      columns = segmentation.score_subject(segmenter, subjects[sid].files, by_id[sid].pred,
                                           modality or own.get(sid), max_voxels=max_voxels)
    except (UserError, ValueError) as error:
      failed[sid] = f"segmentation: {error}"
      if log:
        log(f"medjax score: {sid}: segmentation: {error}")
      continue
    kept.append({**row, **columns})
  return kept, {"run": str(run_dir), "modalities": list(segmenter.modalities),
                "target": modality, "ceiling": segmentation.val_dice(run_dir)}


def summary(rows, failed, protocol: str) -> dict:
  """{"protocol", "subjects", "failed", "metrics": {name: {mean, std, median, n}}}."""
  return {"protocol": protocol, "subjects": len(rows), "failed": failed,
          "metrics": metrics.summarise(rows)}


def write_results(path, rows, result: dict) -> Path:
  """The per-subject CSV at `path`, the summary as JSON beside it (same name, .json)."""
  path = Path(path)
  files.write_csv(path, rows, ["subject"] + [k for k in rows[0] if k != "subject"]
                  if rows else ["subject"])
  return files.write_json(path.with_suffix(".json"), result)


def format_table(rows, result: dict) -> str:
  # The Dice columns of --segmentation have a table of their own (segmentation.format_table).
  names = [k for k in rows[0] if k != "subject" and not k.startswith("dice_")] if rows else []
  width = max([len("subject"), len("median")] + [len(r["subject"]) for r in rows])
  lines = [f"{'subject':{width}s}" + "".join(f"{n:>20s}" for n in names)]
  lines += [f"{r['subject']:{width}s}" + "".join(f"{r[n]:20.4f}" for n in names) for r in rows]
  stats = result["metrics"]
  lines.append(f"{'mean ± std':{width}s}" + "".join(
      f"{stats[n]['mean']:.4f} ± {stats[n]['std']:.4f}".rjust(20) for n in names))
  lines.append(f"{'median':{width}s}" + "".join(f"{stats[n]['median']:20.4f}" for n in names))
  return "\n".join(lines)


# --- report ----------------------------------------------------------------------------

def report_subjects(all_cases, rows, *, protocol, modality=None, pred_scale="unit",
                    max_voxels: int | None = volumes.DEFAULT_MAX_VOXELS):
  """`figures.Subject`s (RAS voxel order) of the scored cases."""
  by_id = {c.id: c for c in all_cases}
  for row in rows:
    case = by_id[row["subject"]]
    loaded = load_case(case, protocol=protocol, modality=modality, pred_scale=pred_scale,
                       max_voxels=max_voxels)
    affine = loaded["affine"]
    ras = lambda v: None if v is None else volumes.to_ras(np.asarray(v, np.float32), affine)[0]
    extra = {}
    for name in ("source", "std"):
      path = getattr(case, name)
      extra[name] = (ras(_optional_volume(path, affine, loaded["target"].shape, max_voxels))
                     if path is not None and path.exists() else None)
    yield figures.Subject(
        id=case.id, prediction=ras(loaded["pred"]), target=ras(loaded["target"]),
        mask=ras(loaded["mask"]), metrics={k: v for k, v in row.items() if k != "subject"},
        spacing=tuple(volumes.voxel_spacing(volumes.to_ras(loaded["target"], affine)[1])),
        **extra)


def _optional_volume(path, affine, shape, max_voxels):
  """The source or std a report shows beside a scored subject; None (no panel) when it is
  unreadable or on another grid, since the scores do not depend on it."""
  try:
    data, data_affine = volumes.load(path, max_voxels)
  except volumes.VolumeError:
    return None
  return data if volumes.same_grid(data.shape, data_affine, shape, affine) else None
