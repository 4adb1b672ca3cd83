"""Intensity normalisation to [-1, 1] and its inverse (docs/design.md, "Intensities").

CT keeps a fixed, physical mapping (HU clipped to [-1024, 3000]) so that a prediction
can always be read back in HU. MR has no absolute unit, so each volume is scaled by its
own robust range (0.5th and 99.5th percentile inside the foreground); those two numbers
are what `denormalise` needs and are stored per subject.
"""

from __future__ import annotations

import numpy as np

from medjax import modalities

HU_MIN, HU_MAX = -1024.0, 3000.0
MR_PERCENTILES = (0.5, 99.5)


def fit(volume: np.ndarray, modality: str, mask: np.ndarray | None = None) -> dict:
  """Parameters of the [-1, 1] mapping for one volume of one modality."""
  if modalities.is_ct(modality):
    return {"kind": "ct", "lo": HU_MIN, "hi": HU_MAX}
  values = volume[mask > 0.5] if mask is not None and np.any(mask > 0.5) else volume.ravel()
  values = values[np.isfinite(values)]
  if values.size == 0:
    raise ValueError(f"{modality}: no finite foreground voxels to scale")
  lo, hi = np.percentile(values, MR_PERCENTILES)
  if not hi > lo:
    raise ValueError(f"{modality}: constant foreground intensity {lo!r}, cannot scale")
  return {"kind": "mr", "lo": float(lo), "hi": float(hi)}


def normalise(volume: np.ndarray, params: dict) -> np.ndarray:
  """Physical units → [-1, 1] (clipped)."""
  lo, hi = params["lo"], params["hi"]
  unit = 2.0 * (np.asarray(volume, np.float32) - lo) / (hi - lo) - 1.0
  return np.clip(unit, -1.0, 1.0).astype(np.float32)


def denormalise(unit, params: dict):
  """[-1, 1] → physical units (HU for CT, the scanner's arbitrary units for MR).

  Works on numpy and jax arrays alike.
  """
  lo, hi = params["lo"], params["hi"]
  return (unit + 1.0) * 0.5 * (hi - lo) + lo


def to_unit_interval(unit):
  """[-1, 1] → [0, 1]: the scale on which the `mri` protocol scores MR."""
  return (unit + 1.0) * 0.5


def to_output_units(unit, params: dict, modality: str):
  """[-1, 1] → what medjax writes and scores: HU for CT/CBCT, [0, 1] for MR (which has no
  physical unit; [0, 1] is the target's robust range, the scale the `mri` protocol uses)."""
  if modalities.is_ct(modality):
    return denormalise(unit, params)
  return to_unit_interval(unit)


def std_to_output_units(std, params: dict, modality: str):
  """A standard deviation on the [-1, 1] scale in the units of `to_output_units`."""
  return std * (0.5 * (params["hi"] - params["lo"]) if modalities.is_ct(modality) else 0.5)
