"""What a model was trained on, and whether a new input looks like it (docs/design.md,
"Input checks").

`describe` summarises one subject's source volumes as preprocessing sees them: voxel
spacing and field of view (mm, along R, A, S), the body's extent, and intensity
percentiles inside the body mask. `medjax prepare` keeps it per subject in the manifest;
training folds the training subjects' descriptions into a range per statistic
(`envelope`, the run's `inputs.json`); `medjax translate` describes the new input the
same way and `check` names every statistic outside the trained range, widened by the
tolerances in `THRESHOLDS`. A model still translates such an input (a warning), unless
`--strict-inputs` asks for a refusal.

Intensities: CT and CBCT are in HU, so their percentiles are compared as they are. MR
has no unit — preprocessing rescales each volume by its own robust range — so MR is
compared by the shape of its histogram: the 0.5th and 50th percentiles as fractions of the
99.5th. Whatever the modality, a volume whose low end is HU-like air (< −500) is called
CT-like, so an MR model given a CT (or the reverse) is told so.
"""

from __future__ import annotations

import numpy as np

from medjax import modalities

PERCENTILES = (0.5, 50.0, 99.5)
# How far outside the trained range a statistic may fall before a warning. Geometry: a
# factor on the range's ends (spacing 1.0–1.2 mm admits 0.67–1.8 mm). HU: the range
# widened by a quarter of its width, at least 200 HU. MR histogram fractions: ± 0.15.
THRESHOLDS = {"geometry_factor": 1.5, "hu_widen": 0.25, "hu_min_margin": 200.0,
              "mr_fraction_margin": 0.15, "ct_air_hu": -500.0}
AXES = "RAS"


def describe(on_grid: dict, mask: np.ndarray, *, ras_shape, ras_spacing,
             grid_spacing) -> dict:
  """One subject's sources (`on_grid`: modality → volume on the recipe's grid, original
  units) with its body `mask` on that grid → a JSON-ready description."""
  ras_spacing = np.asarray(ras_spacing, float)
  extent = np.zeros(3)
  for axis in range(3):
    along = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    if along.size:
      extent[axis] = (along[-1] - along[0] + 1) * float(grid_spacing[axis])
  intensity = {}
  for modality, volume in on_grid.items():
    inside = volume[mask]
    values = np.percentile(inside, PERCENTILES) if inside.size else np.zeros(3)
    low = float(np.percentile(volume, 1.0))
    intensity[modality] = {"p0.5": float(values[0]), "p50": float(values[1]),
                           "p99.5": float(values[2]), "volume_p1": low}
  return {"spacing_mm": [round(float(s), 4) for s in ras_spacing],
          "fov_mm": [round(float(n * s), 2) for n, s in zip(ras_shape, ras_spacing)],
          "body_extent_mm": [round(float(e), 2) for e in extent],
          "intensity": intensity}


def envelope(descriptions: list[dict]) -> dict:
  """Training subjects' descriptions → [min, max] of every statistic."""
  descriptions = [d for d in descriptions if d]
  if not descriptions:
    return {}

  def span(values):
    values = np.asarray(values, float)
    return [np.round(values.min(0), 4).tolist(), np.round(values.max(0), 4).tolist()]

  result = {"subjects": len(descriptions)}
  for key in ("spacing_mm", "fov_mm", "body_extent_mm"):
    result[key] = span([d[key] for d in descriptions])
  result["intensity"] = {}
  for modality in descriptions[0]["intensity"]:
    stats = [d["intensity"][modality] for d in descriptions if modality in d["intensity"]]
    result["intensity"][modality] = {
        name: span([s[name] for s in stats]) for name in stats[0]} | {
        "fraction_p0.5": span([_fraction(s, "p0.5") for s in stats]),
        "fraction_p50": span([_fraction(s, "p50") for s in stats])}
  return result


def _fraction(stats: dict, name: str) -> float:
  top = stats["p99.5"]
  return float(stats[name] / top) if abs(top) > 1e-12 else 0.0


def _mm(values) -> str:
  return "×".join(f"{v:.3g}" for v in values)


def _range(low, high, unit="") -> str:
  return f"{low:,.3g}–{high:,.3g}{unit}" if abs(high) < 1000 else f"{low:,.0f}–{high:,.0f}{unit}"


def check(description: dict, trained: dict, sources, *, dicom_modality: str | None = None
          ) -> list[str]:
  """Every way `description` falls outside `trained` (an `envelope`), in words."""
  warnings = []
  factor = THRESHOLDS["geometry_factor"]
  words = {"spacing_mm": "voxel spacing", "fov_mm": "field of view",
           "body_extent_mm": "body extent"}
  for key, what in words.items():
    if key not in trained:
      continue
    low, high = (np.asarray(v, float) for v in trained[key])
    value = np.asarray(description[key], float)
    outside = [AXES[a] for a in range(3) if value[a] < low[a] / factor
               or value[a] > high[a] * factor]
    if outside:
      warnings.append(f"input {what} {_mm(value)} mm vs trained "
                      f"{'; '.join(_range(lo, hi) for lo, hi in zip(low, high))} mm "
                      f"(outside along {', '.join(outside)})")
  for modality in sources:
    stats = description["intensity"].get(modality)
    if stats is None:
      continue
    ct = modalities.is_ct(modality)
    air = stats["volume_p1"] < THRESHOLDS["ct_air_hu"]
    if ct and not air:
      warnings.append(f"{modality} input has no air in HU (1st percentile "
                      f"{stats['volume_p1']:,.0f}, expected below "
                      f"{THRESHOLDS['ct_air_hu']:,.0f}): not a CT in Hounsfield units?")
    elif not ct and air:
      warnings.append(f"{modality} input looks like a CT in HU (1st percentile "
                      f"{stats['volume_p1']:,.0f}); the model expects MR")
    if dicom_modality and dicom_modality != _dicom_word(modality):
      warnings.append(f"input is a DICOM {dicom_modality} series; the model was trained on "
                      f"{modality} ({_dicom_word(modality)})")
    ranges = trained.get("intensity", {}).get(modality)
    if not ranges:
      continue
    if ct:
      for name in PERCENTILES:
        key = f"p{name:g}"
        low, high = ranges[key]
        margin = max(THRESHOLDS["hu_widen"] * (high - low), THRESHOLDS["hu_min_margin"])
        if not low - margin <= stats[key] <= high + margin:
          warnings.append(f"{modality} intensity range unlike training: {_ordinal(name)} "
                          f"percentile in the body {stats[key]:,.0f} HU vs "
                          f"{_range(low, high)} HU")
    else:
      margin = THRESHOLDS["mr_fraction_margin"]
      for name in ("p0.5", "p50"):
        low, high = ranges[f"fraction_{name}"]
        value = _fraction(stats, name)
        if not low - margin <= value <= high + margin:
          warnings.append(f"{modality} contrast unlike training: the {_ordinal(float(name[1:]))}"
                          f" percentile in the body is {value:.2f} of the 99.5th vs "
                          f"{low:.2f}–{high:.2f}")
  return warnings


def _dicom_word(modality: str) -> str:
  return "CT" if modalities.is_ct(modality) else "MR"


def _ordinal(value: float) -> str:
  text = f"{value:g}"
  return text + ("st" if text.endswith("1") and not text.endswith("11") else
                 "nd" if text.endswith("2") and not text.endswith("12") else
                 "rd" if text.endswith("3") and not text.endswith("13") else "th")
