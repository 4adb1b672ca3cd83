"""Imperfect pairs: `phantom.misalign` moves a volume as a second session would, and
nothing else; the in-memory target and `medjax phantom --misalign` use it."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medjax import cli, config as config_lib
from medjax.data import phantom, pipeline
from medjax.errors import ConfigError

SHAPE, SPACING = (80, 80, 48), (2.0, 2.0, 2.0)
SEED = 0


@pytest.fixture(scope="module")
def mask():
  return phantom.generate(SEED, 1, SHAPE, SPACING)["mask"]


def _surface_distance(a, b, spacing):
  """Mean distance (mm) from a's boundary voxels to b's boundary."""
  edge = lambda m: m & ~ndimage.binary_erosion(m)
  to_b = ndimage.distance_transform_edt(~edge(b), sampling=spacing)
  return to_b[edge(a)].mean()


def test_zero_is_the_identity(mask):
  assert phantom.misalign(mask, SPACING, SEED, 1, 0.0) is mask
  for bad in (-1.0, float("nan"), float("inf")):
    with pytest.raises(ValueError):
      phantom.misalign(mask, SPACING, SEED, 1, bad)


@pytest.mark.parametrize("magnitude", [2.0, 5.0])
def test_displacement_of_the_head_is_about_the_magnitude(mask, magnitude):
  for subject in (1, 2, 3):
    warped = phantom.misalign(mask, SPACING, SEED, subject, magnitude, order=0)
    centroid = np.linalg.norm((np.array(ndimage.center_of_mass(warped))
                               - ndimage.center_of_mass(mask)) * SPACING)
    surface = _surface_distance(warped > 0, mask > 0, SPACING)
    moved = max(centroid, surface)
    assert 0.3 * magnitude <= moved <= 3 * magnitude, (subject, centroid, surface)


def test_the_deformation_is_smooth():
  # A ramp along x, warped linearly, is x + the field's x component: its slope stays
  # near 1 (no folding, no tearing) and changes gently.
  x = (np.arange(SHAPE[0]) * SPACING[0]).astype(np.float32)
  ramp = np.broadcast_to(x[:, None, None], SHAPE).copy()
  warped = phantom.misalign(ramp, SPACING, SEED, 1, 5.0)
  slope = np.diff(warped, axis=0)[4:-4, 4:-4, 4:-4] / SPACING[0]
  assert 0.6 < slope.min() and slope.max() < 1.4
  assert np.abs(np.diff(slope, axis=0)).max() / SPACING[0] < 0.05  # per mm


def test_deterministic_per_subject(mask):
  one = phantom.misalign(mask, SPACING, SEED, 1, 3.0)
  np.testing.assert_array_equal(one, phantom.misalign(mask, SPACING, SEED, 1, 3.0))
  for seed, subject in ((SEED, 2), (SEED + 1, 1)):
    assert not np.array_equal(one, phantom.misalign(mask, SPACING, seed, subject, 3.0))


def _config(misalign, target="ct"):
  config = config_lib.base_config()
  config.data.target = target
  config.data.phantom.update(shape=(32, 32, 12), spacing=(5.0, 5.0, 8.0), subjects=5,
                             misalign=misalign)
  config_lib.validate(config)
  return config


def test_phantom_volume_keeps_the_aligned_target():
  plain = pipeline.phantom_volume(_config(0.0), 1)
  assert plain.target_aligned is None
  moved = pipeline.phantom_volume(_config(3.0), 1)
  np.testing.assert_array_equal(moved.source, plain.source)
  np.testing.assert_array_equal(moved.mask, plain.mask)  # the source's head
  np.testing.assert_array_equal(moved.target_aligned, plain.target)  # CT: a fixed window
  assert moved.target.shape == plain.target.shape and not np.array_equal(moved.target, plain.target)
  # An MR target: the aligned one is scaled with the misaligned target's parameters.
  mr = pipeline.phantom_volume(_config(3.0, "t2w"), 1)
  vols = phantom.generate(SEED, 1, (32, 32, 12), (5.0, 5.0, 8.0))
  from medjax.data import intensity
  expected = intensity.normalise(vols["t2w"], mr.target_params)
  np.testing.assert_array_equal(mr.target_aligned[..., 0], np.moveaxis(expected, -1, 0))
  # Training sees the misaligned pair.
  record = pipeline.PhantomSlices(_config(3.0), [1])[5]
  np.testing.assert_array_equal(record["target"], moved.target[5])


def test_config_refuses_a_negative_misalignment():
  for bad in (-1.0, float("nan")):
    with pytest.raises(ConfigError, match="misalign"):
      _config(bad)


def test_command_writes_misaligned_ct_and_the_truth(tmp_path):
  common = ["--subjects", "1", "--shape", "24x24x12", "--seed", "3"]
  assert cli.main(["medjax", "phantom", "--output-dir", str(tmp_path / "a"), *common]) == 0
  assert cli.main(["medjax", "phantom", "--output-dir", str(tmp_path / "m"), *common,
                   "--misalign", "2"]) == 0
  read = lambda path: np.asarray(nib.load(path).dataobj)
  plain, moved = tmp_path / "a" / "phantom_000", tmp_path / "m" / "phantom_000"
  assert not (plain / "ct_aligned.nii.gz").exists()
  for name in ("ct", "cbct"):
    np.testing.assert_array_equal(read(moved / f"{name}_aligned.nii.gz"), read(plain / f"{name}.nii.gz"))
    assert not np.array_equal(read(moved / f"{name}.nii.gz"), read(plain / f"{name}.nii.gz"))
  for name in (*phantom.MR_SEQUENCES, "mask"):  # one MR session: untouched
    np.testing.assert_array_equal(read(moved / f"{name}.nii.gz"), read(plain / f"{name}.nii.gz"))
  assert cli.main(["medjax", "phantom", "--output-dir", str(tmp_path / "x"), *common,
                   "--misalign", "-1"]) == 2


def test_evaluation_scores_against_the_misaligned_target_and_the_truth():
  """A misaligned run's evaluation: `mae` against the target it trained on, `aligned_mae`
  against the truth — each equal to `metrics.score` of the same prediction on that volume,
  and a perfect translation of the truth scores perfectly only against the truth."""
  from medjax import evaluate, metrics
  from medjax.data import intensity
  from medjax.run import Run
  from conftest import tiny_config
  config = tiny_config("regression", "ct")
  config.unlock()
  config.data.phantom.misalign = 4.0
  run = Run.fresh(config)
  volumes = pipeline.eval_volumes(config, "val")
  summary, rows, predictions = evaluate.evaluate(run, volumes)
  volume, row, prediction = volumes[0], rows[0], predictions[0]
  hu = lambda unit: intensity.to_output_units(unit[..., 0], volume.target_params, "ct")
  mask = volume.mask[..., 0]
  for key, target in (("model_", volume.target), ("model_aligned_", volume.target_aligned)):
    expected = metrics.score(hu(prediction.mean), hu(target), mask, protocol="synthrad2023")
    assert all(np.isclose(row[key + k], v) for k, v in expected.items())
  assert {"aligned_mae", "aligned_psnr", "aligned_ssim"} <= set(summary["baseline"])
  truth = metrics.score(hu(volume.target_aligned), hu(volume.target_aligned), mask,
                        protocol="synthrad2023")
  seen = metrics.score(hu(volume.target_aligned), hu(volume.target), mask,
                       protocol="synthrad2023")
  assert truth["mae"] == 0 and seen["mae"] > 5  # 4 mm costs HU at every edge
