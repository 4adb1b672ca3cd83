"""Image-quality metrics (MAE, PSNR, SSIM, MS-SSIM) and the evaluation protocols.

Metrics take single-channel 2D (H, W) or 3D (D, H, W) arrays and are jit-able. SSIM
reproduces scikit-image's `structural_similarity` (scipy 'reflect' borders, map averaged
after cropping the window radius); `score` applies one protocol of docs/design.md to one
subject volume and returns python floats (docs/design.md, "Evaluation protocols").
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from medjax import modalities

PROTOCOLS = ("synthrad2023", "synthrad2025", "mri")
MIN_SIDE = 11  # voxels per axis every protocol's SSIM window fits in (mri: 11 taps)


def protocol_for(target_modality: str) -> str:
  """The protocol a run's own evaluation scores a target with: HU for CT, [0, 1] for MR."""
  return "synthrad2023" if modalities.is_ct(target_modality) else "mri"
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

# Protocol intensity windows in HU: (low, high); data range = high - low.
_SYNTHRAD2023_HU = (-1024.0, 3000.0)
_SYNTHRAD2025_HU = (-1024.0, 3071.0)


def _check_shapes(pred, target, mask=None):
  if pred.shape != target.shape:
    raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
  if mask is not None and mask.shape != target.shape:
    raise ValueError(f"mask shape {mask.shape} != target shape {target.shape}")
  if pred.ndim not in (2, 3):
    raise ValueError(f"expected a 2D or 3D single-channel image, got shape {pred.shape}")


def _as_float(*arrays):
  # float32 unless the caller hands in float64 with x64 enabled.
  dtype = jnp.result_type(*arrays, jnp.float32)
  return [jnp.asarray(a, dtype) for a in arrays]


def _masked_mean(values, mask):
  if mask is None:
    return jnp.mean(values)
  weights = (mask > 0).astype(values.dtype)
  return jnp.sum(values * weights) / jnp.sum(weights)


@jax.jit
def mae(pred, target, mask=None):
  """Mean absolute error over the mask voxels (all voxels without a mask)."""
  _check_shapes(pred, target, mask)
  pred, target = _as_float(pred, target)
  return _masked_mean(jnp.abs(pred - target), mask)


@jax.jit
def psnr(pred, target, data_range, mask=None):
  """10 log10(data_range^2 / MSE), the MSE taken over the mask voxels only."""
  _check_shapes(pred, target, mask)
  pred, target = _as_float(pred, target)
  mse = _masked_mean(jnp.square(pred - target), mask)
  return 10.0 * jnp.log10(jnp.square(data_range) / mse)


def _window_taps(window, sigma, win_size):
  """1D filter taps, normalised to sum to one."""
  if window == "gaussian":
    # truncate=3.5 as scikit-image: sigma 1.5 gives Wang et al.'s 11-tap window.
    radius = int(3.5 * sigma + 0.5) if win_size is None else (win_size - 1) // 2
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
  elif window == "uniform":
    taps = np.ones(7 if win_size is None else win_size)
  else:
    raise ValueError(f"unknown window {window!r}; expected 'gaussian' or 'uniform'")
  if taps.size % 2 != 1:
    raise ValueError(f"window size must be odd, got {taps.size}")
  return taps / taps.sum()


def _filter(volume, taps, ndim):
  """Separable filter along the last `ndim` axes with scipy's 'reflect' borders.

  Sums of shifted slices rather than `lax.conv`: XLA fuses them, and on CPU this is
  ~20x faster than a convolution with a 1D kernel.
  """
  radius = (len(taps) - 1) // 2
  for axis in range(volume.ndim - ndim, volume.ndim):
    widths = [(0, 0)] * volume.ndim
    widths[axis] = (radius, radius)
    # numpy 'symmetric' (edge voxel repeated) is what scipy.ndimage calls 'reflect'.
    padded = jnp.pad(volume, widths, mode="symmetric")
    n = volume.shape[axis]
    volume = sum(float(tap) * jax.lax.slice_in_dim(padded, i, i + n, axis=axis)
                 for i, tap in enumerate(taps))
  return volume


def _moments(pred, target, taps, use_sample_covariance):
  """Local means, variances and covariance under the window."""
  ndim = pred.ndim
  # Variances are shift-invariant; filtering around a common offset stops float32
  # losing them to cancellation in uxx - ux^2 when intensities sit far from zero
  # compared with their local spread.
  offset = jax.lax.stop_gradient(0.5 * (jnp.mean(pred) + jnp.mean(target)))
  x, y = pred - offset, target - offset
  ux, uy, uxx, uyy, uxy = _filter(jnp.stack([x, y, x * x, y * y, x * y]), taps, ndim)
  n_window = len(taps) ** ndim
  cov_norm = n_window / (n_window - 1) if use_sample_covariance else 1.0
  vx = cov_norm * (uxx - ux * ux)
  vy = cov_norm * (uyy - uy * uy)
  vxy = cov_norm * (uxy - ux * uy)
  return ux + offset, uy + offset, vx, vy, vxy


def _check_window_fits(shape, win_size):
  if min(shape) < win_size:
    raise ValueError(f"window of {win_size} voxels exceeds image shape {shape}")


def _cropped_mean(values, mask, crop):
  core = tuple(slice(crop, s - crop) for s in values.shape)
  return _masked_mean(values[core], None if mask is None else mask[core])


@functools.partial(jax.jit, static_argnames=(
    "window", "sigma", "win_size", "use_sample_covariance"))
def ssim_map(pred, target, data_range, *, window="gaussian", sigma=1.5, win_size=None,
             k1=0.01, k2=0.03, use_sample_covariance=False):
  """Per-voxel SSIM map over the whole image (scikit-image's `full=True` map).

  For the Gaussian window, `win_size` (when given) sets the number of taps; by default
  it is 2 * int(3.5 sigma + 0.5) + 1, as in scikit-image.
  """
  _check_shapes(pred, target)
  pred, target = _as_float(pred, target)
  taps = _window_taps(window, sigma, win_size)
  _check_window_fits(pred.shape, len(taps))
  ux, uy, vx, vy, vxy = _moments(pred, target, taps, use_sample_covariance)
  c1 = jnp.square(k1 * data_range)
  c2 = jnp.square(k2 * data_range)
  return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


@functools.partial(jax.jit, static_argnames=(
    "window", "sigma", "win_size", "use_sample_covariance", "crop"))
def ssim(pred, target, data_range, mask=None, *, window="gaussian", sigma=1.5,
         win_size=None, k1=0.01, k2=0.03, use_sample_covariance=False, crop=None):
  """Mean SSIM. Defaults follow Wang et al. 2004 (Gaussian sigma 1.5, 11 taps,
  population covariance); window="uniform", win_size=7, use_sample_covariance=True is
  scikit-image's default.

  The map is computed on the whole image; its mean is taken after cropping `crop`
  voxels (default: the window radius) from every border, over the mask voxels if given.
  """
  _check_shapes(pred, target, mask)
  values = ssim_map(pred, target, data_range, window=window, sigma=sigma,
                    win_size=win_size, k1=k1, k2=k2,
                    use_sample_covariance=use_sample_covariance)
  if crop is None:
    crop = (len(_window_taps(window, sigma, win_size)) - 1) // 2
  return _cropped_mean(values, mask, crop)


def _pad_to(volume, min_size, mode):
  widths = []
  for n in volume.shape:
    before = max((min_size - n) // 2, 0)
    widths.append((before, max(min_size - n - before, 0)))
  return jnp.pad(volume, widths, mode=mode)


def _downsample(volume):
  """Halve every axis as the SynthRAD2025 code does: fftconvolve with a 2^n box,
  mode='same', then keep every other voxel. Output voxel m averages inputs 2m-1 and
  2m, so the first voxel along each axis is averaged with a zero."""
  for axis in range(volume.ndim):
    n = volume.shape[axis]
    half = (n + 1) // 2
    widths = [(0, 0)] * volume.ndim
    widths[axis] = (1, 0)
    padded = jax.lax.slice_in_dim(jnp.pad(volume, widths), 0, 2 * half, axis=axis)
    pairs = padded.reshape(padded.shape[:axis] + (half, 2) + padded.shape[axis + 1:])
    volume = jnp.mean(pairs, axis=axis + 1)
  return volume


@functools.partial(jax.jit, static_argnames=(
    "win_size", "use_sample_covariance", "min_size"))
def ms_ssim(pred, target, data_range, mask=None, weights=MS_SSIM_WEIGHTS, *,
            win_size=7, k1=0.01, k2=0.03, use_sample_covariance=True, min_size=97):
  """Masked multi-scale SSIM, as computed by the SynthRAD2025 evaluation code
  (github.com/SynthRAD2025/evaluation, image_metrics.py, `ms_ssim`).

  Images should already be non-negative (luminance is not shift-invariant), e.g. HU
  shifted by +1024. Volumes are edge-padded to `min_size` per axis so five scales fit.
  At each scale: scikit-image's uniform 7-voxel SSIM components, each clipped at 0,
  combined per voxel as (l * c * s) ** weight, averaged inside the mask after cropping
  the window radius, clipped to [0, 1]; the product over scales is the result.

  Departures from Wang et al. 2003, kept because the challenge scores this way:
  luminance enters at every scale (not only the coarsest), the weight is applied per
  voxel before averaging, and the mask is decimated (every other voxel), not pooled.
  """
  _check_shapes(pred, target, mask)
  pred, target = _as_float(pred, target)
  mask = jnp.ones(pred.shape, bool) if mask is None else mask > 0
  pred, target = _pad_to(pred, min_size, "edge"), _pad_to(target, min_size, "edge")
  mask = _pad_to(mask, min_size, "edge")
  taps = _window_taps("uniform", None, win_size)
  crop = (win_size - 1) // 2
  c1 = jnp.square(k1 * data_range)
  c2 = jnp.square(k2 * data_range)
  c3 = c2 / 2
  result = 1.0
  for level, weight in enumerate(weights):
    if level:
      pred, target = _downsample(pred), _downsample(target)
      mask = mask[(slice(None, None, 2),) * mask.ndim]
    _check_window_fits(pred.shape, win_size)
    ux, uy, vx, vy, vxy = _moments(pred, target, taps, use_sample_covariance)
    sx = jnp.sqrt(jnp.maximum(vx, 0))
    sy = jnp.sqrt(jnp.maximum(vy, 0))
    luminance = jnp.maximum((2 * ux * uy + c1) / (ux * ux + uy * uy + c1), 0)
    contrast = jnp.maximum((2 * sx * sy + c2) / (vx + vy + c2), 0)
    structure = jnp.maximum((vxy + c3) / (sx * sy + c3), 0)
    values = jnp.power(luminance * contrast * structure, weight)
    result = result * jnp.clip(_cropped_mean(values, mask, crop), 0, 1)
  return result


def through_plane_mae(pred, target, mask, axis: int = 0) -> float:
  """Slice-consistency error: the mean over neighbour voxel pairs (z, z+1) along `axis`
  (the axial axis), both inside the mask, of |(pred[z+1] − pred[z]) − (target[z+1] −
  target[z])|. A slice-wise model whose slices flicker scores high even where each slice's
  MAE is low; a constant offset scores 0. No such pair (one slice): 0.0."""
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  mask = np.asarray(mask) > 0
  _check_shapes(pred, target, mask)
  n = pred.shape[axis]
  lower = lambda v: np.take(v, range(n - 1), axis=axis)
  upper = lambda v: np.take(v, range(1, n), axis=axis)
  pairs = lower(mask) & upper(mask)
  if not pairs.any():
    return 0.0
  error = np.abs((upper(pred) - lower(pred)) - (upper(target) - lower(target)))
  return float(error[pairs].mean())


def _prepare(pred, target, mask, protocol):
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
  pred, target, mask = np.asarray(pred), np.asarray(target), np.asarray(mask)
  _check_shapes(pred, target, mask)
  mask = mask > 0
  if not mask.any():
    raise ValueError("empty mask")
  dtype = np.float64 if jax.config.jax_enable_x64 and np.float64 in (pred.dtype, target.dtype) \
      else np.float32
  return pred.astype(dtype), target.astype(dtype), mask


def _ct_window(volume, mask, hu_range):
  """Clip to the HU window, set voxels outside the mask to its floor, shift to >= 0."""
  low, high = hu_range
  return jnp.where(mask, jnp.clip(volume, low, high), low) - low


# Scored volumes are padded to a multiple of this along every axis, so subjects of many
# depths share a few compiled programs instead of one each.
BUCKET = 16


def _bucket(volume: np.ndarray, shape, mode: str) -> np.ndarray:
  return np.pad(volume, [(0, n - s) for s, n in zip(volume.shape, shape)], mode=mode)


def _core(mask: np.ndarray, crop: int) -> np.ndarray:
  """The mask without `crop` voxels at every border of the volume (skimage's crop)."""
  core = np.zeros_like(mask)
  inner = tuple(slice(crop, n - crop) for n in mask.shape)
  core[inner] = mask[inner]
  return core


def _padded_ssim(pred, target, mask, data_range, **window):
  """`ssim` of the unpadded volumes, computed on volumes padded to `BUCKET`: the padding
  continues each volume as scipy's 'reflect' border would (np.pad 'symmetric'), so every
  real voxel's window sees what it saw unpadded, and only the real core is averaged."""
  taps = len(_window_taps(window.get("window", "gaussian"), window.get("sigma", 1.5),
                          window.get("win_size")))
  _check_window_fits(pred.shape, taps)
  shape = tuple(-(-n // BUCKET) * BUCKET for n in pred.shape)
  weights = _core(mask.astype(np.float32), (taps - 1) // 2)
  return ssim(_bucket(pred, shape, "symmetric"), _bucket(target, shape, "symmetric"),
              data_range, _bucket(weights, shape, "constant"), crop=0, **window)


def score(pred, target, mask, protocol, axial_axis: int = 0):
  """One subject's metrics under `protocol` (docs/design.md); numpy in, floats out.

  synthrad2023 / synthrad2025: pred and target in HU. mri: both already on [0, 1].
  `axial_axis`: the volume's slice axis z, along which `through_plane_mae` pairs voxels.
  """
  pred, target, mask = _prepare(pred, target, mask, protocol)
  if protocol == "synthrad2025":  # MS-SSIM's downsampling would see the padding: unpadded
    hu_range = _SYNTHRAD2025_HU
    pred_w, target_w = _ct_window(pred, mask, hu_range), _ct_window(target, mask, hu_range)
    data_range = hu_range[1] - hu_range[0]
    metrics = {"mae": mae(pred, target, mask), "psnr": psnr(pred_w, target_w, data_range, mask),
               "ms_ssim": ms_ssim(pred_w, target_w, data_range, mask),
               "through_plane_mae": through_plane_mae(pred, target, mask, axial_axis)}
    return {name: float(value) for name, value in metrics.items()}
  shape = tuple(-(-n // BUCKET) * BUCKET for n in pred.shape)
  padded_mask = _bucket(np.asarray(mask), shape, "constant")
  if protocol == "mri":
    pred, target = np.clip(pred, 0, 1), np.clip(target, 0, 1)
    metrics = {"mae": mae(_bucket(pred, shape, "edge"), _bucket(target, shape, "edge"),
                          padded_mask),
               "psnr": psnr(_bucket(pred, shape, "edge"), _bucket(target, shape, "edge"), 1.0,
                            padded_mask),
               "ssim": _padded_ssim(pred, target, np.asarray(mask), 1.0)}
  else:
    data_range = _SYNTHRAD2023_HU[1] - _SYNTHRAD2023_HU[0]
    # Outside the mask both windowed volumes equal the floor, so masked PSNR on them is
    # PSNR on the clipped masked voxels.
    pred_w = np.asarray(_ct_window(pred, mask, _SYNTHRAD2023_HU))
    target_w = np.asarray(_ct_window(target, mask, _SYNTHRAD2023_HU))
    metrics = {"mae": mae(_bucket(pred, shape, "edge"), _bucket(target, shape, "edge"),
                          padded_mask),
               "psnr": psnr(_bucket(pred_w, shape, "edge"), _bucket(target_w, shape, "edge"),
                            data_range, padded_mask),
               "ssim": _padded_ssim(pred_w, target_w, np.asarray(mask), data_range,
                                    window="uniform", win_size=7, use_sample_covariance=True)}
  # In the units MAE is in: HU as given for CT, [0, 1] after the clipping for mri.
  metrics["through_plane_mae"] = through_plane_mae(pred, target, mask, axial_axis)
  return {name: float(value) for name, value in metrics.items()}


def summarise(rows):
  """Per-metric mean, std (population, ddof=0), median and count over subjects (NaN
  skipped)."""
  # Non-numeric columns (subject ids) are not metrics.
  names = sorted({name for row in rows for name, value in row.items()
                  if isinstance(value, (int, float, np.number)) and not isinstance(value, bool)})
  summary = {}
  for name in names:
    values = np.array([row[name] for row in rows if name in row], np.float64)
    # NaN is "not measurable here" (a Dice whose label is in neither volume): skipped, so
    # n counts the subjects that had a value; None when none had.
    values = values[~np.isnan(values)]
    if not values.size:
      summary[name] = {"mean": None, "std": None, "median": None, "n": 0}
      continue
    summary[name] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                     "median": float(np.median(values)), "n": int(values.size)}
  return summary
