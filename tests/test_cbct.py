"""The phantom's CBCT against the CT of the same subject: each cone-beam fault is there,
measured, and nothing else of the phantom moved."""

import numpy as np
import pytest

from medjax.data import phantom

SHAPE, SPACING = (80, 80, 48), (2.0, 2.0, 2.0)
SEED, SUBJECT = 0, 1
GRID = phantom.Grid.make(SHAPE, SPACING)
T = phantom.TISSUES
BRAIN = [T["csf"], T["gm"], T["wm"]]


@pytest.fixture(scope="module")
def subject():
  return phantom.generate(SEED, SUBJECT, SHAPE, SPACING)


def scan_of(subject_id=SUBJECT):
  scan = phantom.draw_cbct(SEED, subject_id)
  return scan, phantom.cbct_field_of_view(scan, GRID)


def test_cbct_is_float32_hu_and_deterministic(subject):
  assert subject["cbct"].shape == SHAPE and subject["cbct"].dtype == np.float32
  again = phantom.generate(SEED, SUBJECT, SHAPE, SPACING)
  np.testing.assert_array_equal(again["cbct"], subject["cbct"])
  other = phantom.generate(SEED, SUBJECT + 1, SHAPE, SPACING)
  assert not np.array_equal(other["cbct"], subject["cbct"])


def test_mr_and_ct_keep_their_random_streams(subject):
  # The CBCT draws from its own streams, after everything else: the MR noise and the CT
  # noise are what the noise stream alone gives (the signal equations are pinned by
  # tests/test_phantom.py), so the default experiment's images did not change.
  clean = phantom.generate(SEED, SUBJECT, SHAPE, SPACING, noise=False)
  rng = np.random.default_rng([SEED, SUBJECT, phantom.NOISE_STREAM])
  for _ in phantom.MR_SEQUENCES:
    phantom._gaussian_pair(rng, SHAPE)
  ct_noise = phantom._gaussian_pair(rng, SHAPE)[0] * np.float32(phantom.CT_NOISE_HU)
  np.testing.assert_array_equal(subject["ct"], clean["ct"] + ct_noise)


def test_truncated_outside_the_field_of_view(subject):
  _, fov = scan_of()
  outside = fov == 0
  assert (outside & (subject["mask"] > 0)).sum() > 1000  # the head is wider than the FOV
  assert np.all(subject["cbct"][outside] == -1000.0)
  assert subject["ct"][outside & (subject["labels"] == T["bone"])].mean() > 500
  # A cylinder about S: whole axial slices beyond the cone's z coverage are air.
  assert np.all(subject["cbct"][:, :, 0] == -1000.0)


def test_cupping_depresses_the_centre(subject):
  _, fov = scan_of()
  radius = phantom.ellipsoid_radius(phantom.draw_head(SEED, SUBJECT), GRID)
  wm = (subject["labels"] == T["wm"]) & (fov == 1)
  difference = subject["cbct"] - subject["ct"]
  centre, edge = difference[wm & (radius < 0.4)], difference[wm & (radius > 0.7)]
  assert centre.size > 500 and edge.size > 500
  assert -110 < centre.mean() - edge.mean() < -15


def test_noise_is_higher_than_ct(subject):
  _, fov = scan_of()
  clean = phantom.generate(SEED, SUBJECT, SHAPE, SPACING, noise=False)
  inside = fov == 1
  ct_noise = (subject["ct"] - clean["ct"])[inside].std()
  cbct_noise = (subject["cbct"] - clean["cbct"])[inside].std()
  assert ct_noise == pytest.approx(phantom.CT_NOISE_HU, rel=0.05)
  lo, hi = phantom.CBCT_NOISE_HU
  assert lo * phantom.CBCT_GAIN[0] * 0.9 < cbct_noise < hi * 1.1 and cbct_noise > 2 * ct_noise


@pytest.mark.parametrize("subject_id", [1, 2, 3])
def test_gain_and_offset_recovered_by_a_linear_fit(subject_id):
  volumes = phantom.generate(SEED, subject_id, SHAPE, SPACING)
  scan, fov = scan_of(subject_id)
  # Where the cupping is small: the skull, scalp and air inside the field of view.
  radius = phantom.ellipsoid_radius(phantom.draw_head(SEED, subject_id), GRID)
  region = (fov == 1) & (radius > 0.9)
  gain, offset = np.polyfit(volumes["ct"][region], volumes["cbct"][region], 1)
  assert gain == pytest.approx(scan.gain, abs=0.02)
  assert offset == pytest.approx(scan.offset, abs=20)


def _angular_spread(image, region, x, y, bins=36):
  """Standard deviation over angle (about the head's axis) of the mean in each sector."""
  sector = ((np.arctan2(y, x)[region] + np.pi) / (2 * np.pi) * bins).astype(int) % bins
  means = np.bincount(sector, image[region], bins) / np.maximum(np.bincount(sector, None, bins), 1)
  return means.std()


def test_streaks_vary_the_brain_with_angle():
  ratios = []
  for subject_id in range(8):
    volumes = phantom.generate(SEED, subject_id, SHAPE, SPACING)
    scan, fov = scan_of(subject_id)
    head = phantom.draw_head(SEED, subject_id)
    x = GRID.axes[0][:, None] - head.centre[0]
    y = GRID.axes[1][None, :] - head.centre[1]
    ring = np.isin(volumes["labels"], BRAIN) & (np.hypot(x, y) > 25)[:, :, None] & (fov == 1)
    strength = sum(abs(s.hu) * np.exp(-(((GRID.axes[2] - s.z) / s.reach) ** 2))
                   for s in scan.streaks)
    z = int(np.argmax(np.where(ring.sum((0, 1)) > 300, strength, -1)))
    ratios.append(_angular_spread(volumes["cbct"][:, :, z], ring[:, :, z], x, y)
                  / _angular_spread(volumes["ct"][:, :, z], ring[:, :, z], x, y))
  assert min(ratios) > 1.0 and np.mean(ratios) > 1.5, ratios


def test_streaks_are_smooth_along_z():
  scan, _ = scan_of()
  streaks = phantom.cbct_streaks(scan, phantom.draw_head(SEED, SUBJECT), GRID)
  assert np.abs(streaks).max() > 50
  step = np.abs(np.diff(streaks, axis=2)).max()
  assert step < 0.35 * np.abs(streaks).max()  # a 2 mm step of a ≥ 8 mm Gaussian slab
