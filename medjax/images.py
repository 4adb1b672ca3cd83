"""PNG grids a person looks at: source | prediction | target | |error| | std, per slice."""

from __future__ import annotations

import os

from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone
import numpy as np


def display(slice_xy: np.ndarray) -> np.ndarray:
  """An (X, Y) RAS slice → (rows, cols) with anterior up and the patient's right on the left."""
  return np.rot90(slice_xy)


def save_grid(path: str, rows: list[dict[str, np.ndarray]], ranges: dict[str, tuple],
              units: str = "") -> str:
  """`rows` of {column name: 2D slice}; `ranges` gives each column's (vmin, vmax)."""
  columns = list(rows[0])
  fig = Figure(figsize=(2.2 * len(columns), 2.2 * len(rows)))
  axes = fig.subplots(len(rows), len(columns), squeeze=False)
  for r, row in enumerate(rows):
    for c, name in enumerate(columns):
      ax = axes[r][c]
      vmin, vmax = ranges.get(name, (None, None))
      cmap = "magma" if name in ("|error|", "std") else "gray"
      im = ax.imshow(display(row[name]), cmap=cmap, vmin=vmin, vmax=vmax)
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(name, fontsize=9)
      if r == len(rows) - 1 and name in ("|error|", "std"):
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label=units)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=80)
  os.replace(tmp, path)
  return path
