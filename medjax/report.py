"""What a person looks at after scoring: one PNG per subject and one Markdown page.

Each PNG has three rows (axial, coronal, sagittal planes through the centre of the mask)
and five columns: source | prediction | target | |error| | std; a column with nothing to
show (no source, a deterministic model) is left blank. `report.md` lists the subjects
with their metrics and links each picture.

Volumes come in RAS voxel order, (X, Y, Z) — `volumes.to_ras` of a file, or
`np.moveaxis(v[..., 0], 0, 2)` of the (Z, H, W, C) slices evaluation works on — so every
view is displayed the same way whatever the orientation of the files.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone
import numpy as np

COLUMNS = ("source", "prediction", "target", "|error|", "std")
VIEWS = ("axial", "coronal", "sagittal")
RANGES = {  # display windows per protocol; source gets its own percentile window
    "mri": {"image": (0.0, 1.0), "error": (0.0, 0.25), "units": "[0, 1]"},
    "ct": {"image": (-1000.0, 1500.0), "error": (0.0, 500.0), "units": "HU"},
}


@dataclasses.dataclass
class Subject:
  """One subject's volumes, (X, Y, Z) in RAS voxel order, in the protocol's units."""
  id: str
  prediction: np.ndarray
  target: np.ndarray | None = None
  source: np.ndarray | None = None
  std: np.ndarray | None = None
  mask: np.ndarray | None = None
  metrics: dict = dataclasses.field(default_factory=dict)
  spacing: tuple = (1.0, 1.0, 1.0)  # mm, for the aspect ratio of the views


def file_stem(subject_id: str) -> str:
  return subject_id.replace("/", "__")


def centre(subject: Subject) -> tuple[int, int, int]:
  """The voxel at the centre of the mask's bounding box (of the volume without a mask)."""
  shape = subject.prediction.shape
  if subject.mask is not None and np.any(subject.mask):
    hits = np.nonzero(subject.mask)
    return tuple(int((h.min() + h.max()) // 2) for h in hits)
  return tuple(n // 2 for n in shape)


def planes(volume: np.ndarray, at, spacing):
  """{view: (2D image with superior/anterior up, aspect)} through voxel `at`."""
  x, y, z = at
  sx, sy, sz = spacing
  # rot90 turns an (a, b) plane so that b runs up the page and a across it.
  return {"axial": (np.rot90(volume[:, :, z]), sy / sx),
          "coronal": (np.rot90(volume[:, y, :]), sz / sx),
          "sagittal": (np.rot90(volume[x, :, :]), sz / sy)}


def save_views(path, subject: Subject, protocol: str = "mri") -> str:
  """`path`: 3 rows (views) × 5 columns (source, prediction, target, |error|, std)."""
  window = RANGES["mri" if protocol == "mri" else "ct"]
  error = (np.abs(subject.prediction - subject.target) if subject.target is not None
           else None)
  volumes = {"source": subject.source, "prediction": subject.prediction,
             "target": subject.target, "|error|": error, "std": subject.std}
  at = centre(subject)
  fig = Figure(figsize=(2.3 * len(COLUMNS), 2.3 * len(VIEWS)))
  axes = fig.subplots(len(VIEWS), len(COLUMNS), squeeze=False)
  for c, name in enumerate(COLUMNS):
    volume = volumes[name]
    if name == "source" and volume is not None:
      lo, hi = np.percentile(volume, (1, 99))
    elif name in ("|error|", "std"):
      lo, hi = window["error"]
    else:
      lo, hi = window["image"]
    views = planes(volume, at, subject.spacing) if volume is not None else {}
    for r, view in enumerate(VIEWS):
      ax = axes[r][c]
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(name, fontsize=9)
      if c == 0:
        ax.set_ylabel(view, fontsize=9)
      if view not in views:
        ax.set_facecolor("0.9")
        continue
      image, aspect = views[view]
      cmap = "magma" if name in ("|error|", "std") else "gray"
      shown = ax.imshow(image, cmap=cmap, vmin=lo, vmax=hi, aspect=aspect,
                        interpolation="nearest")
      if r == len(VIEWS) - 1 and name in ("|error|", "std"):
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label=window["units"])
  fig.suptitle(subject.id, fontsize=10)
  fig.tight_layout()
  path = str(path)
  tmp = os.path.join(os.path.dirname(path) or ".", ".tmp-" + os.path.basename(path))
  fig.savefig(tmp, dpi=80, format="png")
  os.replace(tmp, path)
  return path


def markdown(subjects_metrics: list[tuple[str, dict]], protocol: str) -> str:
  names = []
  for _, values in subjects_metrics:
    names += [k for k in values if k not in names]
  lines = [f"# Evaluation report ({protocol})", "",
           "| subject | " + " | ".join(names) + " | views |",
           "|---|" + "---:|" * len(names) + "---|"]
  for sid, values in subjects_metrics:
    cells = [f"{values[k]:.4f}" if k in values else "" for k in names]
    lines.append(f"| {sid} | " + " | ".join(cells) + f" | [png]({file_stem(sid)}.png) |")
  if subjects_metrics and names:
    for label, reduce in (("mean", np.mean), ("median", np.median)):
      cells = [f"{reduce([v[k] for _, v in subjects_metrics if k in v]):.4f}" for k in names]
      lines.append(f"| **{label}** | " + " | ".join(cells) + " | |")
  lines.append("")
  for sid, _ in subjects_metrics:
    lines += [f"## {sid}", "", f"![{sid}]({file_stem(sid)}.png)", ""]
  return "\n".join(lines)


def from_evaluation(volumes, predictions, rows, target_modality: str, spacing=(1.0, 1.0, 1.0)):
  """`Subject`s from what `evaluate.evaluate` returns (its (Z, H, W, C) volumes, their
  predictions and rows), with the model's metrics: for `medjax evaluate` and training."""
  from medjax import evaluate
  protocol = evaluate.protocol_for(target_modality)
  ras = lambda v: np.moveaxis(np.asarray(v)[..., 0], 0, 2)  # (Z, X, Y, C) → (X, Y, Z)
  for volume, prediction, row in zip(volumes, predictions, rows):
    params = volume.target_params
    yield Subject(
        id=volume.subject, source=ras(volume.source[..., :1]),
        prediction=ras(evaluate.to_physical(prediction.mean, params, protocol)),
        target=ras(evaluate.to_physical(volume.target, params, protocol)),
        std=ras(evaluate.std_to_physical(prediction.std, params, protocol)),
        mask=ras(volume.mask) > 0.5, spacing=tuple(spacing),
        metrics={k[len("model_"):]: v for k, v in row.items() if k.startswith("model_")})


def write_report(directory, subjects, protocol: str = "mri") -> str:
  """`<directory>/<id>.png` per subject and `<directory>/report.md`; the page's path.

  `subjects` may be any iterable (a generator keeps one subject in memory at a time).
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  listed = []
  for subject in subjects:
    save_views(directory / f"{file_stem(subject.id)}.png", subject, protocol)
    listed.append((subject.id, dict(subject.metrics)))
  page = directory / "report.md"
  tmp = directory / ".tmp-report.md"
  tmp.write_text(markdown(listed, protocol))
  os.replace(tmp, page)
  return str(page)
