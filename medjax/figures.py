"""Every picture medjax writes, and the Markdown page that links them.

- `save_grid`: rows of axial slices, one column per image (source | prediction | target |
  |error| | std), what training writes to `images/` and `medjax compare` per task;
- `save_views`: one subject in three planes (axial, coronal, sagittal through the centre
  of its mask), what `medjax score --report-dir` and evaluation reports show;
- `write_report`: a PNG per subject and `report.md` listing metrics and pictures;
- `save_curves`: metric-against-setting line plots (sampling steps, sweep values).

Matplotlib's object API only (no pyplot), so a notebook's backend is left alone. Volumes
come in RAS voxel order (X, Y, Z); a slice is shown with anterior up and the patient's
right on the left (radiological convention). Files are written whole (`files.atomic_write`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from medjax import files, metrics
from medjax.data import intensity

COLUMNS = ("source", "prediction", "target", "|error|", "std")
VIEWS = ("axial", "coronal", "sagittal")
WINDOWS = {  # display windows per protocol family; a source gets its own percentile window
    "mri": {"image": (0.0, 1.0), "error": (0.0, 0.25), "units": "[0, 1]"},
    "ct": {"image": (-1000.0, 1500.0), "error": (0.0, 500.0), "units": "HU"},
}
ERROR_COLUMNS = ("|error|", "std")


def window(protocol: str) -> dict:
  return WINDOWS["mri" if protocol == "mri" else "ct"]


def _save(fig, path, dpi: int = 80) -> str:
  with files.atomic_write(path) as tmp:
    fig.savefig(tmp, dpi=dpi, format="png")
  return str(path)


# --- slices side by side ----------------------------------------------------------------

def display(slice_xy: np.ndarray) -> np.ndarray:
  """An (X, Y) RAS slice → (rows, cols) with anterior up and the patient's right on the left."""
  return np.rot90(slice_xy)


def save_grid(path, rows: list[dict[str, np.ndarray]], ranges: dict[str, tuple],
              units: str = "") -> str:
  """`rows` of {column name: 2D (X, Y) slice}; `ranges` gives each column's (vmin, vmax)."""
  columns = list(rows[0])
  fig = Figure(figsize=(2.2 * len(columns), 2.2 * len(rows)))
  axes = fig.subplots(len(rows), len(columns), squeeze=False)
  for r, row in enumerate(rows):
    for c, name in enumerate(columns):
      ax = axes[r][c]
      vmin, vmax = ranges.get(name, (None, None))
      cmap = "magma" if name in ERROR_COLUMNS else "gray"
      shown = ax.imshow(display(row[name]), cmap=cmap, vmin=vmin, vmax=vmax)
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(name, fontsize=9)
      if r == len(rows) - 1 and name in ERROR_COLUMNS:
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label=units)
  fig.tight_layout()
  return _save(fig, path)


def foreground_slices(mask: np.ndarray, count: int) -> np.ndarray:
  """`count` axial slices evenly spaced through the mask's extent ((Z, H, W[, 1]) mask)."""
  filled = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(1))
  lo, hi = (filled[0], filled[-1]) if filled.size else (0, mask.shape[0] - 1)
  return np.linspace(lo, hi, count + 2).round().astype(int)[1:-1]


def evaluation_grid(path, volume, prediction, *, target_modality: str, num_slices: int,
                    stochastic: bool, source_channel: int = 0) -> str:
  """Axial slices of one evaluated subject (model-scale `Volume` and its `Prediction`)."""
  params, protocol = volume.target_params, metrics.protocol_for(target_modality)
  physical = lambda unit: intensity.to_output_units(unit, params, target_modality)
  rows = []
  for z in foreground_slices(volume.mask, num_slices):
    target, pred = physical(volume.target[z, ..., 0]), physical(prediction.mean[z, ..., 0])
    row = {"source": volume.source[z, ..., source_channel], "prediction": pred,
           "target": target, "|error|": np.abs(pred - target)}
    if stochastic:
      row["std"] = intensity.std_to_output_units(prediction.std[z, ..., 0], params,
                                                 target_modality)
    rows.append(row)
  shown = window(protocol)
  ranges = {"source": (-1, 1), "prediction": shown["image"], "target": shown["image"],
            "|error|": shown["error"], "std": shown["error"]}
  return save_grid(path, rows, ranges, shown["units"])


# --- one subject in three planes --------------------------------------------------------

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


def centre(subject: Subject) -> tuple[int, int, int]:
  """The voxel at the centre of the mask's bounding box (of the volume without a mask)."""
  if subject.mask is not None and np.any(subject.mask):
    hits = np.nonzero(subject.mask)
    return tuple(int((h.min() + h.max()) // 2) for h in hits)
  return tuple(n // 2 for n in subject.prediction.shape)


def planes(volume: np.ndarray, at, spacing):
  """{view: (2D image with superior/anterior up, aspect)} through voxel `at`."""
  x, y, z = at
  sx, sy, sz = spacing
  # rot90 turns an (a, b) plane so that b runs up the page and a across it.
  return {"axial": (np.rot90(volume[:, :, z]), sy / sx),
          "coronal": (np.rot90(volume[:, y, :]), sz / sx),
          "sagittal": (np.rot90(volume[x, :, :]), sz / sy)}


def save_views(path, subject: Subject, protocol: str = "mri") -> str:
  """`path`: 3 rows (views) × 5 columns (source, prediction, target, |error|, std); a column
  with nothing to show (no source, a deterministic model) is left blank."""
  shown = window(protocol)
  error = (np.abs(subject.prediction - subject.target) if subject.target is not None
           else None)
  columns = {"source": subject.source, "prediction": subject.prediction,
             "target": subject.target, "|error|": error, "std": subject.std}
  at = centre(subject)
  fig = Figure(figsize=(2.3 * len(COLUMNS), 2.3 * len(VIEWS)))
  axes = fig.subplots(len(VIEWS), len(COLUMNS), squeeze=False)
  for c, name in enumerate(COLUMNS):
    volume = columns[name]
    if name == "source" and volume is not None:
      lo, hi = np.percentile(volume, (1, 99))
    else:
      lo, hi = shown["error"] if name in ERROR_COLUMNS else shown["image"]
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
      cmap = "magma" if name in ERROR_COLUMNS else "gray"
      drawn = ax.imshow(image, cmap=cmap, vmin=lo, vmax=hi, aspect=aspect,
                        interpolation="nearest")
      if r == len(VIEWS) - 1 and name in ERROR_COLUMNS:
        fig.colorbar(drawn, ax=ax, fraction=0.046, pad=0.02, label=shown["units"])
  fig.suptitle(subject.id, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def markdown(subjects_metrics: list[tuple[str, dict]], protocol: str) -> str:
  names = []
  for _, values in subjects_metrics:
    names += [k for k in values if k not in names]
  lines = [f"# Evaluation report ({protocol})", "",
           "| subject | " + " | ".join(names) + " | views |",
           "|---|" + "---:|" * len(names) + "---|"]
  for sid, values in subjects_metrics:
    cells = [f"{values[k]:.4f}" if k in values else "" for k in names]
    lines.append(f"| {_md(sid)} | " + " | ".join(cells)
                 + f" | [png]({files.safe_stem(sid)}.png) |")
  if subjects_metrics and names:
    for label, reduce in (("mean", np.mean), ("median", np.median)):
      cells = [f"{reduce([v[k] for _, v in subjects_metrics if k in v]):.4f}" for k in names]
      lines.append(f"| **{label}** | " + " | ".join(cells) + " | |")
  lines.append("")
  for sid, _ in subjects_metrics:
    lines += [f"## {_md(sid)}", "", f"![{_md(sid)}]({files.safe_stem(sid)}.png)", ""]
  return "\n".join(lines)


def _md(text) -> str:
  """A subject id as one Markdown table cell: a newline or `|` in it would break the table."""
  return " ".join(str(text).split()).replace("|", "\\|").replace("]", "\\]")


def evaluation_subjects(volumes, predictions, rows, target_modality: str,
                        spacing=(1.0, 1.0, 1.0), source_channel: int = 0):
  """`Subject`s of an evaluation (its (Z, H, W, C) volumes, predictions and rows), with the
  model's metrics: what training and `medjax evaluate` put in their reports."""
  ras = lambda v: np.moveaxis(np.asarray(v)[..., 0], 0, 2)  # (Z, X, Y, C) → (X, Y, Z)
  for volume, prediction, row in zip(volumes, predictions, rows):
    params = volume.target_params
    yield Subject(
        id=volume.subject,
        source=ras(volume.source[..., source_channel:source_channel + 1]),
        prediction=ras(intensity.to_output_units(prediction.mean, params, target_modality)),
        target=ras(intensity.to_output_units(volume.target, params, target_modality)),
        std=ras(intensity.std_to_output_units(prediction.std, params, target_modality)),
        mask=ras(volume.mask) > 0.5, spacing=tuple(spacing),
        metrics={k[len("model_"):]: v for k, v in row.items() if k.startswith("model_")})


def write_report(directory, subjects, protocol: str = "mri") -> str:
  """`<directory>/<id>.png` per subject and `<directory>/report.md`; the page's path.

  `subjects` may be any iterable (a generator keeps one subject in memory at a time).
  """
  directory = Path(directory)
  listed = []
  for subject in subjects:
    save_views(directory / f"{files.safe_stem(subject.id)}.png", subject, protocol)
    listed.append((subject.id, dict(subject.metrics)))
  page = directory / "report.md"
  files.write_text(page, markdown(listed, protocol))
  return str(page)


# --- curves -----------------------------------------------------------------------------

def save_curves(path, panels: list[dict], *, width: float = 4.6) -> str:
  """Line plots side by side. Each panel: {"title", "xlabel", "ylabel", "lines":
  [(label, xs, ys)], optional "hline": (label, y), "xlog": bool, "xticks": labels}."""
  fig = Figure(figsize=(width * len(panels), 3.5))
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, panel in zip(axes, panels):
    for label, xs, ys in panel["lines"]:
      ax.plot(xs, ys, "o-", ms=4, label=label)
    if panel.get("hline") is not None:
      label, y = panel["hline"]
      ax.axhline(y, color="gray", ls="--", lw=1, label=label)
    if panel.get("xlog"):
      ax.set_xscale("log")
      ax.xaxis.set_major_formatter(ScalarFormatter())  # 1, 2, 4 … not 2×10⁰
    if panel.get("xticks"):
      ax.set_xticks(range(len(panel["xticks"])), panel["xticks"])
    ax.set_xlabel(panel.get("xlabel", ""))
    ax.set_ylabel(panel.get("ylabel", ""))
    ax.set_title(panel.get("title", ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, path, dpi=90)
