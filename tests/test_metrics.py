"""Metrics against scikit-image and a port of the SynthRAD2025 evaluation code."""
import jax
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, uniform_filter
from scipy.signal import fftconvolve
from skimage import data, transform
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.util import crop

from medjax import metrics

RTOL = 1e-4


@pytest.fixture(autouse=True)
def x64():
  # 1e-4 agreement with scikit-image (which works in float64) needs float64 here too.
  with jax.enable_x64(True):
    yield


def _pair(target, noise, seed):
  rng = np.random.default_rng(seed)
  return target + noise * rng.standard_normal(target.shape), target


def _images():
  rng = np.random.default_rng(0)
  camera = transform.resize(data.camera().astype(np.float64) / 255, (96, 112))
  blobs = gaussian_filter(rng.standard_normal((24, 40, 36)), 3.0)
  blobs = (blobs - blobs.min()) / (blobs.max() - blobs.min())
  return {
      "random2d": (rng.random((64, 80)), rng.random((64, 80))),
      "camera2d": _pair(camera, 0.05, 1),
      "random3d": (rng.random((20, 24, 28)), rng.random((20, 24, 28))),
      "blobs3d": _pair(blobs, 0.05, 2),
  }


IMAGES = _images()


def _ct_phantom(shape, seed):
  """A body ellipsoid of soft tissue around a bone core, with a noisy, biased prediction
  that leaves the HU windows on both sides."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
  radius = np.sqrt(np.sum(grid**2, axis=0))
  mask = radius < 0.85
  target = np.where(mask, 40.0, -1000.0) + np.where(radius < 0.35, 1400.0, 0.0)
  target = target + gaussian_filter(rng.standard_normal(shape), 1.5) * 200
  pred = target + 60 * rng.standard_normal(shape) + 25.0
  pred[radius < 0.1] = 3500.0
  pred[(radius > 0.6) & (radius < 0.65)] = -1500.0
  return pred, target, mask


def _through_plane_loop(pred, target, mask, axis=0):
  """Slice-consistency error by plain loops over the neighbour pairs along `axis`."""
  pred, target, mask = (np.moveaxis(np.asarray(v), axis, 0) for v in (pred, target, mask))
  total, count = 0.0, 0
  for z in range(pred.shape[0] - 1):  # one pair of neighbour slices at a time
    both = mask[z].astype(bool) & mask[z + 1].astype(bool)
    steps = (pred[z + 1].astype(np.float64) - pred[z]) - (target[z + 1].astype(np.float64)
                                                          - target[z])
    total += np.abs(steps[both]).sum()
    count += both.sum()
  return total / count if count else 0.0


def _masked_cropped_mean(values, mask, pad):
  return crop(values, pad)[crop(mask, pad)].mean()


@pytest.mark.parametrize("name", IMAGES)
def test_psnr_matches_skimage(name):
  pred, target = IMAGES[name]
  expected = peak_signal_noise_ratio(target, pred, data_range=1.0)
  np.testing.assert_allclose(metrics.psnr(pred, target, 1.0), expected, rtol=RTOL)


@pytest.mark.parametrize("name", IMAGES)
def test_masked_psnr_matches_skimage_on_mask_voxels(name):
  pred, target = IMAGES[name]
  mask = target > np.median(target)
  expected = peak_signal_noise_ratio(target[mask], pred[mask], data_range=1.0)
  np.testing.assert_allclose(metrics.psnr(pred, target, 1.0, mask), expected, rtol=RTOL)


@pytest.mark.parametrize("name", IMAGES)
def test_ssim_matches_skimage_gaussian(name):
  pred, target = IMAGES[name]
  expected = structural_similarity(target, pred, data_range=1.0, gaussian_weights=True,
                                   sigma=1.5, use_sample_covariance=False)
  np.testing.assert_allclose(metrics.ssim(pred, target, 1.0), expected, rtol=RTOL)


@pytest.mark.parametrize("name", IMAGES)
def test_ssim_uniform_matches_skimage_default(name):
  pred, target = IMAGES[name]
  expected = structural_similarity(target, pred, data_range=1.0)
  actual = metrics.ssim(pred, target, 1.0, window="uniform", win_size=7,
                        use_sample_covariance=True)
  np.testing.assert_allclose(actual, expected, rtol=RTOL)


@pytest.mark.parametrize("name", ["camera2d", "blobs3d"])
def test_masked_ssim_matches_cropped_skimage_map(name):
  pred, target = IMAGES[name]
  mask = target > np.percentile(target, 30)
  _, full = structural_similarity(target, pred, data_range=1.0, gaussian_weights=True,
                                  sigma=1.5, use_sample_covariance=False, full=True)
  np.testing.assert_allclose(metrics.ssim(pred, target, 1.0, mask),
                             _masked_cropped_mean(full, mask, 5), rtol=RTOL)
  np.testing.assert_allclose(metrics.ssim_map(pred, target, 1.0), full, rtol=RTOL, atol=1e-6)


def test_mae_matches_numpy():
  pred, target = IMAGES["blobs3d"]
  mask = target > 0.5
  np.testing.assert_allclose(metrics.mae(pred, target), np.abs(pred - target).mean(), rtol=RTOL)
  np.testing.assert_allclose(metrics.mae(pred, target, mask),
                             np.abs(pred - target)[mask].mean(), rtol=RTOL)


def test_score_synthrad2023_matches_hand_assembled_protocol():
  pred, target, mask = _ct_phantom((30, 44, 50), seed=3)
  low, high = -1024.0, 3000.0
  pred_c, target_c = np.clip(pred, low, high), np.clip(target, low, high)
  pred_s = np.where(mask, pred_c, low) + 1024
  target_s = np.where(mask, target_c, low) + 1024
  _, full = structural_similarity(target_s, pred_s, data_range=4024.0, full=True)
  expected = {
      "mae": np.abs(pred - target)[mask].mean(),
      "psnr": peak_signal_noise_ratio(target_c[mask], pred_c[mask], data_range=4024.0),
      "ssim": _masked_cropped_mean(full, mask, 3),
      "through_plane_mae": _through_plane_loop(pred, target, mask),  # raw HU, as MAE
  }
  actual = metrics.score(pred, target, mask, "synthrad2023")
  assert actual.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(actual[name], expected[name], rtol=RTOL, err_msg=name)


def test_score_synthrad2023_in_float32_stays_close():
  # Default precision (no x64): CT-scale intensities must not wreck the SSIM variances.
  pred, target, mask = _ct_phantom((30, 44, 50), seed=4)
  expected = metrics.score(pred, target, mask, "synthrad2023")
  with jax.enable_x64(False):
    actual = metrics.score(pred.astype(np.float32), target.astype(np.float32), mask,
                           "synthrad2023")
  for name in expected:
    np.testing.assert_allclose(actual[name], expected[name], rtol=1e-4, err_msg=name)


def test_float32_ssim_with_large_offset():
  # Intensities far from zero relative to their spread: uxx - ux^2 cancels in float32.
  rng = np.random.default_rng(8)
  target = 2e4 + 100 * rng.random((20, 24, 28))
  pred = target + 5 * rng.standard_normal(target.shape)
  expected = structural_similarity(target, pred, data_range=100.0, gaussian_weights=True,
                                   sigma=1.5, use_sample_covariance=False)
  with jax.enable_x64(False):
    actual = metrics.ssim(pred.astype(np.float32), target.astype(np.float32), 100.0)
  np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_score_mri_matches_skimage():
  pred, target = IMAGES["blobs3d"]
  pred = pred.copy()
  pred[0, 0, :5] = 1.7  # outside [0, 1]: the protocol clips
  mask = target > 0.3
  pred_c = np.clip(pred, 0, 1)
  _, full = structural_similarity(target, pred_c, data_range=1.0, gaussian_weights=True,
                                  sigma=1.5, use_sample_covariance=False, full=True)
  expected = {
      "mae": np.abs(pred_c - target)[mask].mean(),
      "psnr": peak_signal_noise_ratio(target[mask], pred_c[mask], data_range=1.0),
      "ssim": _masked_cropped_mean(full, mask, 5),
      "through_plane_mae": _through_plane_loop(pred_c, np.clip(target, 0, 1), mask),
  }
  actual = metrics.score(pred, target, mask, "mri")
  assert actual.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(actual[name], expected[name], rtol=RTOL, err_msg=name)


def _synthrad2025_reference(gt, pred, mask):
  """Port of SynthRAD2025/evaluation image_metrics.py (ImageMetrics.score_patient),
  built from scipy and scikit-image as the challenge code is."""
  low, high = -1024.0, 3071.0
  mask = mask > 0
  gt = np.where(mask, gt, low)
  pred = np.where(mask, pred, low)
  mae = np.abs(gt - pred)[mask].mean()
  gt_c, pred_c = np.clip(gt, low, high), np.clip(pred, low, high)
  psnr = peak_signal_noise_ratio(gt_c[mask], pred_c[mask], data_range=high - low)

  gt_s, pred_s, mask_f = gt_c - low, pred_c - low, mask.astype(np.float64)
  weights = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])
  pads = [(max((97 - n) // 2, 0), max(97 - n - (97 - n) // 2, 0)) for n in gt.shape]
  gt_s, pred_s, mask_f = (np.pad(v, pads, mode="edge") for v in (gt_s, pred_s, mask_f))
  c1, c2 = (0.01 * (high - low)) ** 2, (0.03 * (high - low)) ** 2
  c3 = c2 / 2
  cov_norm = 7**3 / (7**3 - 1)
  levels = []
  for w in weights:
    ux, uy = uniform_filter(gt_s, 7), uniform_filter(pred_s, 7)
    vx = cov_norm * (uniform_filter(gt_s * gt_s, 7) - ux * ux)
    vy = cov_norm * (uniform_filter(pred_s * pred_s, 7) - uy * uy)
    vxy = cov_norm * (uniform_filter(gt_s * pred_s, 7) - ux * uy)
    sx, sy = np.clip(vx, 0, None) ** 0.5, np.clip(vy, 0, None) ** 0.5
    lum = np.clip((2 * ux * uy + c1) / (ux * ux + uy * uy + c1), 0, None)
    con = np.clip((2 * sx * sy + c2) / (vx + vy + c2), 0, None)
    struct = np.clip((vxy + c3) / (sx * sy + c3), 0, None)
    ssim_map = lum**w * con**w * struct**w
    levels.append(crop(ssim_map, 3)[crop(mask_f, 3).astype(bool)].mean())
    box = np.ones((2, 2, 2)) / 8
    gt_s, pred_s = (fftconvolve(v, box, mode="same") for v in (gt_s, pred_s))
    gt_s, pred_s, mask_f = (v[::2, ::2, ::2] for v in (gt_s, pred_s, mask_f))
  ms_ssim = np.prod([np.clip(v, 0, 1) for v in levels])
  return {"mae": mae, "psnr": psnr, "ms_ssim": ms_ssim}


@pytest.mark.parametrize("shape", [(30, 44, 50), (25, 100, 61)])
def test_score_synthrad2025_matches_challenge_code(shape):
  pred, target, mask = _ct_phantom(shape, seed=5)
  expected = {**_synthrad2025_reference(target, pred, mask),
              "through_plane_mae": _through_plane_loop(pred, target, mask)}
  actual = metrics.score(pred, target, mask, "synthrad2025")
  assert actual.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(actual[name], expected[name], rtol=RTOL, err_msg=name)


@pytest.mark.parametrize("axis", [0, 2])
def test_through_plane_mae_matches_a_loop(axis):
  rng = np.random.default_rng(8)
  pred, target = rng.normal(size=(2, 6, 7, 5))
  mask = rng.random((6, 7, 5)) < 0.6
  np.testing.assert_allclose(metrics.through_plane_mae(pred, target, mask, axis),
                             _through_plane_loop(pred, target, mask, axis), rtol=1e-12)
  # A constant offset changes no slice-to-slice step; one slice has no pair.
  assert metrics.through_plane_mae(target + 37.0, target, mask, axis) == pytest.approx(0, abs=1e-9)
  assert metrics.through_plane_mae(pred[:1], target[:1], mask[:1], 0) == 0.0
  assert _through_plane_loop(pred, target, mask, axis) > 0.5


def test_score_pairs_slices_along_the_axial_axis():
  pred, target, mask = _ct_phantom((12, 12, 12), seed=9)  # a cube: one compilation
  scores = metrics.score(target + 50.0, target, mask, "synthrad2023")
  assert scores["through_plane_mae"] == pytest.approx(0, abs=1e-6) and scores["mae"] > 49
  moved = [np.moveaxis(v, 0, 2) for v in (pred, target, mask)]
  assert metrics.score(*moved, "synthrad2023", axial_axis=2)["through_plane_mae"] == \
      pytest.approx(_through_plane_loop(pred, target, mask), rel=1e-9)


def test_ms_ssim_is_one_for_identical_and_falls_with_noise():
  _, target, mask = _ct_phantom((24, 32, 40), seed=6)
  target = np.clip(target, -1024, 3071) + 1024
  rng = np.random.default_rng(7)
  noise = rng.standard_normal(target.shape)
  np.testing.assert_allclose(metrics.ms_ssim(target, target, 4095.0, mask), 1.0, rtol=1e-12)
  values = [float(metrics.ms_ssim(target + sigma * noise, target, 4095.0, mask))
            for sigma in (10.0, 50.0, 200.0, 800.0)]
  assert all(a > b for a, b in zip(values, values[1:])), values
  assert 0 < values[-1] < values[0] < 1


def test_jit_matches_eager():
  pred, target = IMAGES["camera2d"]
  mask = target > 0.4
  for fn, args in [(metrics.psnr, (pred, target, 1.0, mask)),
                   (metrics.ssim, (pred, target, 1.0, mask))]:
    jitted = jax.jit(fn)(*args)
    with jax.disable_jit():
      eager = fn(*args)
    np.testing.assert_allclose(jitted, eager, rtol=1e-10)


def test_unknown_protocol_lists_valid_ones():
  pred, target, mask = _ct_phantom((8, 8, 8), seed=0)
  with pytest.raises(ValueError, match="synthrad2023, synthrad2025, mri"):
    metrics.score(pred, target, mask, "brats")


def test_empty_mask():
  pred, target, mask = _ct_phantom((8, 8, 8), seed=0)
  with pytest.raises(ValueError, match="empty mask"):
    metrics.score(pred, target, np.zeros_like(mask), "synthrad2023")


def test_shape_mismatch_names_both_shapes():
  a, b = np.zeros((8, 9, 10)), np.zeros((8, 9, 11))
  with pytest.raises(ValueError, match=r"\(8, 9, 10\).*\(8, 9, 11\)"):
    metrics.psnr(a, b, 1.0)
  with pytest.raises(ValueError, match=r"\(8, 9, 10\).*\(8, 9, 11\)"):
    metrics.ssim(a, b, 1.0)
  with pytest.raises(ValueError, match=r"\(8, 9, 10\).*\(8, 9, 11\)"):
    metrics.score(a, b, np.ones((8, 9, 11), bool), "mri")


def test_summarise_matches_numpy():
  rows = [{"subject": "1BA001", "mae": 60.0, "psnr": 28.0},
          {"subject": "1BA002", "mae": 80.0, "psnr": 30.5},
          {"subject": "1BA003", "mae": 75.0, "psnr": 27.0}]
  summary = metrics.summarise(rows)
  assert set(summary) == {"mae", "psnr"}
  mae = np.array([60.0, 80.0, 75.0])
  assert summary["mae"]["mean"] == pytest.approx(mae.mean())
  assert summary["mae"]["std"] == pytest.approx(mae.std())
  assert summary["mae"]["median"] == pytest.approx(75.0)


def test_summarise_skips_nan():
  # NaN: not measurable for that subject (a Dice whose label is in neither volume).
  rows = [{"dice": 0.5, "none": float("nan")}, {"dice": float("nan"), "none": float("nan")},
          {"dice": 0.9, "none": float("nan")}]
  summary = metrics.summarise(rows)
  assert summary["dice"] == {"mean": pytest.approx(0.7), "std": pytest.approx(0.2),
                             "median": pytest.approx(0.7), "n": 2}
  assert summary["none"] == {"mean": None, "std": None, "median": None, "n": 0}


def test_subjects_of_many_depths_share_compiled_scoring():
  """Evaluation scores whole volumes whose depth is each subject's own; padded to a
  multiple of metrics.BUCKET they share a compiled program (and score as unpadded)."""
  rng = np.random.default_rng(3)
  scores = []
  for depth in (33, 38, 45):
    target = rng.random((depth, 20, 20)).astype(np.float32)
    pred = np.clip(target + 0.1 * rng.standard_normal(target.shape), 0, 1).astype(np.float32)
    mask = np.zeros(target.shape, bool)
    mask[2:-2, 3:-3, 3:-3] = True
    if depth == 33:
      metrics.score(pred, target, mask, protocol="mri")  # compiles the 48-deep bucket
      before = metrics.ssim._cache_size()
    scores.append(metrics.score(pred, target, mask, protocol="mri"))
    expected = structural_similarity(target, pred, data_range=1.0, gaussian_weights=True,
                                     sigma=1.5, use_sample_covariance=False, full=True)[1]
    core = np.zeros_like(mask)
    core[5:-5, 5:-5, 5:-5] = mask[5:-5, 5:-5, 5:-5]
    assert scores[-1]["ssim"] == pytest.approx(expected[core].mean(), rel=1e-4)
  assert metrics.ssim._cache_size() == before  # depths 38 and 45: the same 48 bucket
