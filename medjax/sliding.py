"""Sliding-window inference with Gaussian weights, mirror TTA, and the mixture law.

Pure numpy around a `predict(batch, index) -> (mean, std)` callable: nothing here knows a
translator or a device. A volume is cut into overlapping windows (nnU-Net's rule: evenly
spaced starts, the last flush with the end), each window's prediction is weighted by a
Gaussian centred in it (a network sees least context at a window's border), and the
weighted predictions are combined by the mixture law (docs/design.md, "Sliding windows,
TTA and ensembles"): every voxel's prediction is a mixture of the components
(mean m_k, std s_k) with weights w_k, so

  mean = Σ w_k m_k / Σ w_k,   var = Σ w_k (s_k² + m_k²) / Σ w_k − mean².

The same law with equal weights combines mirror TTA members and ensemble members
(`combine`): the std is the draws' spread plus the members' disagreement.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

SIGMA_SCALE = 1.0 / 8  # nnU-Net's σ = window / 8
WEIGHT_FLOOR = 1e-4  # no voxel gets weight 0, however far from every window's centre


def window_starts(size: int, window: int, overlap: float) -> list[int]:
  """Start offsets along one axis: step = max(1, int(window·(1 − overlap))), then
  n = ceil((size − window) / step) + 1 evenly spaced starts from 0 to size − window.
  A size below the window gives one start at 0 (the volume is padded)."""
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"overlap={overlap}: expected a fraction in [0, 1)")
  if window < 1:
    raise ValueError(f"window={window}: expected a positive number of voxels")
  if size <= window:
    return [0]
  step = max(1, int(window * (1.0 - overlap)))
  count = math.ceil((size - window) / step) + 1
  actual = (size - window) / (count - 1)
  return [int(round(actual * i)) for i in range(count)]


def gaussian_importance(window, sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
  """Weights over a window: a Gaussian centred in it, σ = window · sigma_scale per axis,
  1 at the centre, clamped below at `WEIGHT_FLOOR` (float32, shape `window`)."""
  weights = np.ones((), np.float64)
  for size in window:
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    sigma = max(size * sigma_scale, 1e-6)
    weights = np.multiply.outer(weights, np.exp(-0.5 * (offsets / sigma) ** 2))
  weights /= weights.max()
  return np.maximum(weights, WEIGHT_FLOOR).astype(np.float32)


def _pad_widths(shape, window) -> list[tuple[int, int]]:
  """Centred padding of each spatial axis up to the window (none where it fits)."""
  widths = []
  for size, length in zip(shape, window):
    missing = max(length - size, 0)
    widths.append((missing // 2, missing - missing // 2))
  return widths


def window_grid(shape, window, overlap: float) -> list[tuple[int, ...]]:
  """Every window's start corner on the (padded) grid, in C order."""
  padded = [max(s, w) for s, w in zip(shape, window)]
  return list(itertools.product(*(window_starts(s, w, overlap)
                                   for s, w in zip(padded, window))))


def sliding_window(predict, volume: np.ndarray, window, *, overlap: float = 0.5,
                   batch_size: int, pad_value: float = -1.0, on_batch=None,
                   sigma_scale: float = SIGMA_SCALE):
  """(mean, std) of a (*spatial, C) volume, predicted window by window.

  The volume is padded (constant `pad_value`, centred) to at least `window`, cut into
  `window_grid` windows, and `predict(batch, index)` runs on batches of `batch_size`
  windows (*window, C) — the last batch filled up by repeating its last window — with
  `index` the batch number (for the caller's random keys). It returns (mean, std) of
  shape (batch, *window, C_out). The Gaussian-weighted mixture of the windows is cropped
  back to the volume's shape. `on_batch(n)` is told the real windows of each batch.
  """
  window = tuple(int(w) for w in window)
  spatial = volume.shape[:-1]
  if len(window) != len(spatial):
    raise ValueError(f"window {window} has {len(window)} axes; the volume "
                     f"{volume.shape} has {len(spatial)} spatial axes")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be positive")
  widths = _pad_widths(spatial, window)
  padded = np.pad(volume, widths + [(0, 0)], constant_values=pad_value)
  corners = window_grid(spatial, window, overlap)
  weights = gaussian_importance(window, sigma_scale).astype(np.float64)[..., None]
  # float64 sums: var = E[s² + m²] − mean² cancels, and float32 would leave a spurious
  # std of ~1e-3 where every window agrees.
  total = np.zeros(padded.shape[:-1] + (1,), np.float64)
  first = second = None
  for index, begin in enumerate(range(0, len(corners), batch_size)):
    chunk = corners[begin:begin + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))
    batch = np.stack([padded[_region(c, window)] for c in chunk])
    mean, std = predict(batch, index)
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if first is None:
      first = np.zeros(padded.shape[:-1] + mean.shape[-1:], np.float64)
      second = np.zeros_like(first)
    real = min(batch_size, len(corners) - begin)
    for corner, m, s in zip(chunk[:real], mean, std):
      region = _region(corner, window)
      total[region] += weights
      first[region] += weights * m
      second[region] += weights * (s * s + m * m)
    if on_batch is not None:
      on_batch(real)
  mean = first / total
  std = np.sqrt(np.maximum(second / total - mean * mean, 0.0))
  crop = tuple(slice(before, before + size) for (before, _), size in zip(widths, spatial))
  dtype = np.result_type(volume.dtype, np.float32)
  return mean[crop].astype(dtype), std[crop].astype(dtype)


def _region(corner, window) -> tuple[slice, ...]:
  return tuple(slice(c, c + w) for c, w in zip(corner, window))


def combine(means, stds):
  """Equal-weight mixture of several (mean, std) predictions of one volume (TTA members,
  ensemble members): mean of means; var = mean(s² + m²) − mean²."""
  if len(means) != len(stds) or not means:
    raise ValueError(f"combine needs as many stds as means (≥ 1), got {len(means)} and "
                     f"{len(stds)}")
  if len(means) == 1:
    return means[0], stds[0]
  dtype = np.result_type(means[0], np.float32)
  m = np.stack([np.asarray(v, np.float64) for v in means])
  s = np.stack([np.asarray(v, np.float64) for v in stds])
  mean = m.mean(0)
  std = np.sqrt(np.maximum((s * s + m * m).mean(0) - mean * mean, 0.0))
  return mean.astype(dtype), std.astype(dtype)


def mirror_sets(axes) -> list[tuple[int, ...]]:
  """Every subset of `axes` (2^k of them), the empty one (no mirror) first."""
  axes = tuple(axes)
  return [subset for r in range(len(axes) + 1) for subset in itertools.combinations(axes, r)]


def mirror_tta(predict, volume: np.ndarray, axes):
  """Mirror test-time augmentation: `predict(volume, member) -> (mean, std)` on the volume
  mirrored along every subset of `axes` (member 0: as is), each prediction mirrored
  back, all combined by the mixture law (`combine`)."""
  means, stds = [], []
  for member, flipped in enumerate(mirror_sets(axes)):
    source = np.flip(volume, flipped) if flipped else volume
    mean, std = predict(np.ascontiguousarray(source), member)
    if flipped:
      mean, std = np.flip(mean, flipped), np.flip(std, flipped)
    means.append(np.ascontiguousarray(mean))
    stds.append(np.ascontiguousarray(std))
  return combine(means, stds)
