"""The automatic body mask against truths made apart from it: the phantom's own head mask
(its head fraction ≥ 0.5) and a pelvis drawn here with numpy, whose body, gas and couch
are known voxel by voxel."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medjax.data import intensity, phantom
from medjax.data.mask import body_mask

SHAPE, SPACING = (48, 48, 32), (160 / 48, 160 / 48, 3.0)
LARGE_SHAPE, LARGE_SPACING = (96, 96, 48), (160 / 96, 160 / 96, 2.0)
SUBJECTS = ((0, 0), (0, 1), (0, 2), (1, 3))  # (seed, subject)
MIN_DICE = 0.95


def dice(a, b) -> float:
  a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
  return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def otsu_mask(volume):
  """The method this module replaces (Otsu, largest component, then fill), kept here
  to show that the tests below catch what it got wrong."""
  from skimage.filters import threshold_otsu
  foreground = volume > threshold_otsu(volume)
  labels, count = ndimage.label(foreground)
  if count > 1:
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    foreground = labels == np.argmax(sizes)
  foreground = ndimage.binary_fill_holes(foreground)
  for z in range(foreground.shape[2]):
    foreground[:, :, z] = ndimage.binary_fill_holes(foreground[:, :, z])
  return foreground


@pytest.fixture(scope="module")
def heads():
  return {key: phantom.generate(*key, shape=SHAPE, spacing=SPACING) for key in SUBJECTS}


# --- the head phantom ------------------------------------------------------------------


@pytest.mark.parametrize("modality", phantom.MODALITIES)
def test_phantom_head_matches_the_true_mask(heads, modality):
  for key, head in heads.items():
    mask = body_mask(head[modality])
    truth = head["mask"]
    if modality == "cbct":  # the scan saw the head only inside its field of view
      truth = truth * (phantom.cbct_field_of_view(phantom.draw_cbct(*key),
                                                  phantom.Grid.make(SHAPE, SPACING)) >= 0.5)
    assert mask.dtype == bool and mask.shape == head[modality].shape
    assert dice(mask, truth) >= MIN_DICE, (key, modality, dice(mask, truth))


@pytest.mark.parametrize("modality", ["t1w", "ct"])
def test_phantom_head_on_a_finer_grid(modality):
  head = phantom.generate(0, 1, shape=LARGE_SHAPE, spacing=LARGE_SPACING)
  assert dice(body_mask(head[modality]), head["mask"]) >= MIN_DICE


def test_the_scalp_is_kept(heads):
  # T1w scalp fat is the brightest tissue and is cut off from the brain by dark skull and
  # CSF: the old mask's largest component dropped it. Outermost true-head voxels are scalp.
  for head in heads.values():
    true = head["mask"] > 0.5
    rim = true & ~ndimage.binary_erosion(true, iterations=2)
    assert body_mask(head["t1w"])[rim].mean() >= 0.95
    assert otsu_mask(head["t1w"])[rim].mean() < 0.5  # the bug, documented


@pytest.mark.parametrize("axes", [(2, 0, 1), (1, 2, 0), (0, 2, 1)])
def test_any_slice_axis(heads, axes):
  # Volumes do not always come with the cut through the neck across the last axis: a
  # cavity open at the volume's end must be filled whichever axis that end is on.
  for head in heads.values():
    assert dice(body_mask(head["t1w"].transpose(axes)), head["mask"].transpose(axes)) >= MIN_DICE


def test_a_thin_slab_and_a_single_slice(heads):
  slab = phantom.generate(0, 1, shape=(48, 48, 3), spacing=SPACING)
  for modality in ("t1w", "ct"):
    assert dice(body_mask(slab[modality]), slab["mask"]) >= MIN_DICE
    assert dice(body_mask(slab[modality][:, :, 1]), slab["mask"][:, :, 1]) >= MIN_DICE


def test_mr_normalisation_matches_the_true_mask(heads):
  # What the mask is for: the robust range of `intensity.fit` inside it. The old Otsu
  # mask lost the scalp and shifted it by ~15-60 % of the range on T1w.
  tolerance = 0.02
  for key, head in heads.items():
    volume = head["t1w"]
    true = intensity.fit(volume, "t1w", head["mask"])
    span = true["hi"] - true["lo"]

    def error(mask):
      fitted = intensity.fit(volume, "t1w", mask)
      return max(abs(fitted["lo"] - true["lo"]), abs(fitted["hi"] - true["hi"])) / span

    assert error(body_mask(volume)) <= tolerance, key
    assert error(otsu_mask(volume)) > tolerance, key  # the test has teeth: old method fails


# --- a synthetic pelvis: CT with a couch, MR with Rician noise -----------------------------

PELVIS_SHAPE = (64, 56, 24)  # (x: right-left, y: anterior-posterior, z: inferior-superior)
CT_HU = {"air": -1000.0, "fat": -100.0, "muscle": 40.0, "bone": 700.0, "couch": 150.0}
# Fast spin echo T2w-like: fat bright, muscle dark (a threshold much above BET's 10 % of
# the range cuts the muscle where the body leaves the field of view), cortical bone darker.
MR_SIGNAL = {"air": 0.0, "fat": 1.0, "muscle": 0.2, "bone": 0.08}


def pelvis(modality: str, rng, half_width: float = 26.0):
  """(volume, body, gas, couch): an elliptical pelvis with a subcutaneous fat ring,
  muscle, two femoral heads, rectal gas that runs through every slice (open to the
  volume's ends) and an enclosed bowel gas bubble; on CT a couch below an air gap."""
  x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in PELVIS_SHAPE), indexing="ij")
  cx, cy, half_height = 32.0, 24.0, 16.0
  radius = np.hypot((x - cx) / half_width, (y - cy) / half_height)
  body = radius <= 1.0
  fat = body & (radius > 0.85)
  bone = (np.hypot(x - (cx - 14), y - cy) <= 4) | (np.hypot(x - (cx + 14), y - cy) <= 4)
  rectum = np.hypot(x - cx, y - (cy + 8)) <= 3
  bubble = (np.hypot(x - cx, y - (cy - 7)) <= 2.5) & (np.abs(z - 12) <= 3)
  gas = rectum | bubble
  couch = (y >= cy + half_height + 4) & (y < cy + half_height + 7)  # 3 voxels of air gap

  if modality == "ct":
    table = CT_HU
    volume = np.full(PELVIS_SHAPE, table["air"], np.float32)
    volume[couch] = table["couch"]
  else:
    table = MR_SIGNAL
    volume = np.zeros(PELVIS_SHAPE, np.float32)  # the couch gives no MR signal
  volume[body] = table["muscle"]
  volume[fat] = table["fat"]
  volume[bone] = table["bone"]
  volume[gas] = table["air"]
  if modality == "ct":
    volume += rng.normal(0.0, 20.0, PELVIS_SHAPE).astype(np.float32)
  else:  # magnitude image: Rician in the body, Rayleigh in the air; a smooth coil bias
    volume *= (1.0 + 0.2 * np.sin(x / 20.0) * np.cos(y / 25.0)).astype(np.float32)
    sigma = 0.03
    real = volume + rng.normal(0.0, sigma, PELVIS_SHAPE)
    imaginary = rng.normal(0.0, sigma, PELVIS_SHAPE)
    volume = np.hypot(real, imaginary).astype(np.float32)
  return volume, body, gas, couch


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_pelvis_body_with_its_gas_and_without_the_couch(modality):
  volume, body, gas, couch = pelvis(modality, np.random.default_rng(0))
  mask = body_mask(volume)
  assert dice(mask, body) >= MIN_DICE
  assert mask[gas].all()  # enclosed air is body: rectum open at the ends, bubble closed
  assert not mask[couch].any()


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_pelvis_wider_than_the_field_of_view(modality):
  # A large patient: the body runs out of the volume at both x borders.
  volume, body, gas, couch = pelvis(modality, np.random.default_rng(1), half_width=40.0)
  assert body[0].any() and body[-1].any()
  mask = body_mask(volume)
  assert dice(mask, body) >= MIN_DICE
  assert mask[gas].all() and not mask[couch].any()


# --- edge cases ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, 7.5, -1000.0])
def test_constant_volume_has_no_body(value):
  mask = body_mask(np.full((16, 16, 8), value, np.float32))
  assert mask.dtype == bool and not mask.any()


def test_body_filling_the_whole_volume():
  # No air anywhere: the mask is (nearly) everything, not a noise-level slice of it.
  volume = np.random.default_rng(2).normal(40.0, 20.0, (40, 40, 16)).astype(np.float32)
  assert body_mask(volume).mean() >= 0.98


def test_small_body_in_zero_background():
  # Under 2 % of the voxels: the 2nd and 98th percentiles are both background.
  volume = np.zeros((64, 64, 32), np.float32)
  volume[20:30, 30:40, 10:20] = 1.0
  np.testing.assert_array_equal(body_mask(volume), volume > 0)


def test_non_finite_voxels_in_the_air(heads):
  head = heads[SUBJECTS[0]]
  volume = head["t1w"].copy()
  volume[:4, :4, :] = np.nan
  assert dice(body_mask(volume), head["mask"]) >= MIN_DICE
