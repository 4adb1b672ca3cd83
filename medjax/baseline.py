"""The per-voxel intensity-mapping baseline: a lookup table source value → target value.

Fitted on training pairs (mean target per source-intensity bin), it is what a model must
beat to show it learned anything beyond a global intensity transfer: on T1w→T2w it gets
the tissue contrasts roughly right; on MR→CT it cannot tell bone from air, both dark.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NUM_BINS = 256


@dataclasses.dataclass(frozen=True)
class IntensityMap:
  table: np.ndarray  # target value at each source bin centre, in [-1, 1]
  channel: int = 0  # the source channel it reads (the centre slice under 2.5D context)

  def __call__(self, source: np.ndarray) -> np.ndarray:
    """(…, Cs) normalised source → (…, 1) predicted target."""
    centres = np.linspace(-1.0, 1.0, len(self.table))
    value = source[..., self.channel:self.channel + 1]
    return np.interp(value, centres, self.table).astype(np.float32)

  def to_dict(self) -> dict:
    return {"table": [float(v) for v in self.table], "channel": int(self.channel)}

  @classmethod
  def from_dict(cls, values: dict) -> "IntensityMap":
    return cls(np.asarray(values["table"], np.float32), int(values["channel"]))


def fit(records, num_bins: int = NUM_BINS, channel: int = 0) -> IntensityMap:
  """Mean target per source bin over every voxel of `records` (dicts with source, target)."""
  sums = np.zeros(num_bins)
  counts = np.zeros(num_bins)
  for record in records:
    source = np.asarray(record["source"])[..., channel].ravel()
    target = np.asarray(record["target"])[..., 0].ravel()
    bins = np.clip(np.round((source + 1.0) * 0.5 * (num_bins - 1)).astype(int), 0, num_bins - 1)
    sums += np.bincount(bins, target, num_bins)
    counts += np.bincount(bins, minlength=num_bins)
  if not counts.any():
    raise ValueError("cannot fit the intensity map: no training voxels")
  seen = counts > 0
  centres = np.linspace(-1.0, 1.0, num_bins)
  # Bins no training voxel fell in borrow from their neighbours.
  table = np.interp(centres, centres[seen], sums[seen] / counts[seen])
  return IntensityMap(table.astype(np.float32), channel)
