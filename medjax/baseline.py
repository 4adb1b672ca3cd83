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


@dataclasses.dataclass(frozen=True)
class DirectionalMap:
  """The any-to-any baseline: one table per (input modality → target modality) pair.

  A direction's baseline maps its first available modality (in the run's order) to the
  target, read from the any-to-any model input itself (availability and target one-hot
  channels; docs/design.md, "Any-to-any synthesis"), so evaluation calls it as it calls
  `IntensityMap`.
  """
  modalities: tuple[str, ...]
  tables: dict  # (given index, target index) → table

  def __call__(self, source: np.ndarray) -> np.ndarray:
    count = len(self.modalities)
    first = source.reshape(-1, source.shape[-1])[0]
    given = int(np.flatnonzero(first[count:2 * count] > 0.5)[0])
    target = int(np.argmax(first[2 * count:]))
    return IntensityMap(self.tables[(given, target)], given)(source)

  def to_dict(self) -> dict:
    return {"modalities": list(self.modalities),
            "pairs": {f"{self.modalities[i]}>{self.modalities[j]}": [float(v) for v in table]
                      for (i, j), table in sorted(self.tables.items())}}

  @classmethod
  def from_dict(cls, values: dict) -> "DirectionalMap":
    names = tuple(values["modalities"])
    tables = {}
    for key, table in values["pairs"].items():
      given, target = key.split(">")
      tables[(names.index(given), names.index(target))] = np.asarray(table, np.float32)
    return cls(names, tables)


def from_dict(values: dict):
  """A saved baseline (baseline.json) of either kind."""
  return DirectionalMap.from_dict(values) if "pairs" in values else IntensityMap.from_dict(values)


def fit_pairs(images, names, num_bins: int = NUM_BINS) -> DirectionalMap:
  """Every ordered pair's mean-target-per-bin table over `images`: an iterable of (…, M)
  arrays holding the M modalities of `names`."""
  count = len(names)
  sums = np.zeros((count, count, num_bins))
  counts = np.zeros((count, num_bins))
  for stack in images:
    flat = np.asarray(stack).reshape(-1, count)
    bins = np.clip(np.round((flat + 1.0) * 0.5 * (num_bins - 1)).astype(int), 0, num_bins - 1)
    for i in range(count):
      counts[i] += np.bincount(bins[:, i], minlength=num_bins)
      for j in range(count):
        sums[i, j] += np.bincount(bins[:, i], flat[:, j], num_bins)
  centres = np.linspace(-1.0, 1.0, num_bins)
  tables = {}
  for i in range(count):
    seen = counts[i] > 0
    if not seen.any():
      raise ValueError("cannot fit the intensity maps: no training voxels")
    for j in range(count):
      if i != j:
        tables[(i, j)] = np.interp(centres, centres[seen],
                                   sums[i, j][seen] / counts[i][seen]).astype(np.float32)
  return DirectionalMap(tuple(names), tables)
