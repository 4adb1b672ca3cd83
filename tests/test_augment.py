"""Augmentation: one geometry for source, target and mask; jitter on the source only."""

import grain
import numpy as np
import pytest
from scipy import ndimage

from medjax.data import augment


def record(height=40, width=36, source_channels=2):
  rng = np.random.default_rng(0)
  mask = np.zeros((height, width, 1), np.float32)
  mask[8:30, 5:20] = 1.0
  mask[12:16, 20:31] = 1.0  # an asymmetric L, so flips and rotations show
  texture = ndimage.gaussian_filter(rng.uniform(-1, 1, (height, width, source_channels)), 1)
  return {"source": np.where(mask > 0, texture, -1.0).astype(np.float32),
          "target": (2 * mask - 1).astype(np.float32),
          "mask": mask, "subject": np.int32(3), "slice": np.int32(7)}


@pytest.mark.parametrize("order", [0, 1])
def test_warp_matches_scipy_affine_transform(order):
  rng = np.random.default_rng(1)
  image = ndimage.gaussian_filter(rng.normal(size=(50, 44, 3)), (2, 2, 0)).astype(np.float32)
  for _ in range(5):
    matrix = augment.random_matrix(rng, flip=True, rotate_deg=15, scale=0.2)
    centre = (np.array(image.shape[:2]) - 1) / 2
    expected = np.stack([ndimage.affine_transform(
        image[..., k].astype(np.float64), matrix, offset=centre - matrix @ centre, order=order,
        mode="grid-constant", cval=-1.0) for k in range(3)], -1)
    (warped,) = augment.warp([image], matrix, [-1.0], order=order)
    if order:
      np.testing.assert_allclose(warped, expected, atol=1e-4)
    else:  # float32 vs float64 coordinates may round an exact tie the other way
      assert np.mean(np.abs(warped - expected) > 1e-6) < 1e-3


def test_identity_when_everything_is_off():
  r = record()
  out = augment.augment_record(r, np.random.default_rng(0), flip=False, rotate_deg=0,
                               scale=0, jitter=0)
  for key in ("source", "target", "mask", "subject", "slice"):
    np.testing.assert_array_equal(out[key], r[key])


def test_geometry_is_shared_by_source_target_and_mask():
  r = record()
  rng = np.random.default_rng(5)
  moved = 0
  for _ in range(20):
    out = augment.augment_record(r, rng, rotate_deg=20, scale=0.15, jitter=0, p_affine=1.0)
    mask = out["mask"][..., 0] > 0.5
    # target = 2·mask − 1 and both use fill ≙ background: the same warp keeps them equal.
    target_inside = out["target"][..., 0] >= 0
    assert np.mean(mask != target_inside) < 0.002
    source_inside = (out["source"] > -1 + 1e-3).all(-1)
    # The source is textured: compare supports, up to the one-pixel bilinear blur.
    near = np.ones((3, 3), bool)
    assert not np.any(mask & ~ndimage.binary_dilation(source_inside, near))
    assert not np.any(source_inside & ~ndimage.binary_dilation(mask, near))
    moved += not np.array_equal(mask, r["mask"][..., 0] > 0.5)
  assert moved >= 18
  assert set(np.unique(out["mask"])) <= {0.0, 1.0}


def test_flip_only_mirrors_the_left_right_axis():
  r = record()
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(20):
    out = augment.augment_record(r, rng, rotate_deg=0, scale=0, jitter=0)
    flipped = np.array_equal(out["source"], r["source"][::-1])
    assert flipped or np.array_equal(out["source"], r["source"])
    np.testing.assert_array_equal(out["target"], r["target"][::-1] if flipped else r["target"])
    np.testing.assert_array_equal(out["mask"], r["mask"][::-1] if flipped else r["mask"])
    seen.add(flipped)
  assert seen == {True, False}


def test_jitter_changes_the_source_only():
  r = record()
  out = augment.augment_record(r, np.random.default_rng(2), flip=False, rotate_deg=0, scale=0,
                               jitter=0.3)
  np.testing.assert_array_equal(out["target"], r["target"])
  np.testing.assert_array_equal(out["mask"], r["mask"])
  inside = r["mask"][..., 0] > 0
  assert not np.allclose(out["source"][inside], r["source"][inside], atol=1e-3)
  np.testing.assert_array_equal(out["source"][~inside], -1.0)  # background stays background
  assert out["source"].min() >= -1 and out["source"].max() <= 1
  # One gain and bias for all channels (the default group): an affine map in common.
  for channel in range(2):
    fit = np.polyfit(r["source"][inside][:, channel], out["source"][inside][:, channel], 1)
    if channel == 0:
      first = fit
    np.testing.assert_allclose(fit, first, atol=1e-3)


def test_jitter_groups_share_one_gain_and_bias():
  """2.5D: each modality's neighbouring slices (one group) move together, modalities apart."""
  r = record(source_channels=6)
  # Room for the gain: nothing inside clips; the background stays -1.
  r["source"] = np.where(r["mask"] > 0, r["source"] * 0.5, -1.0).astype(np.float32)
  out = augment.augment_record(r, np.random.default_rng(3), flip=False, rotate_deg=0,
                               scale=0, jitter=0.3, jitter_group=3)
  inside = r["mask"][..., 0] > 0
  fits = [np.polyfit(r["source"][inside][:, c], out["source"][inside][:, c], 1)
          for c in range(6)]
  for c in (1, 2):
    np.testing.assert_allclose(fits[c], fits[0], atol=1e-4)
    np.testing.assert_allclose(fits[c + 3], fits[3], atol=1e-4)
  assert np.abs(fits[0] - fits[3]).max() > 1e-3
  np.testing.assert_array_equal(out["source"][~inside], -1.0)


def test_deterministic_under_grain_random_map():
  items = [record() for _ in range(4)]
  ds = grain.MapDataset.source(items).random_map(augment.augment_record, seed=7)
  a, b = list(ds), list(ds)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["source"], y["source"])
  assert any(not np.array_equal(x["source"], items[0]["source"]) for x in a)
