"""3D patch records: placement, cutting and padding, the shard reader, 3D augmentation."""

import numpy as np
import pytest

from medjax.data import augment, patches, pipeline
from medjax.data.preprocess import Volume


class ArrayStore:
  """A volume store over in-memory arrays: what PatchSource needs, nothing else."""

  def __init__(self, volumes):
    self.volumes = volumes

  def __len__(self):
    return len(self.volumes)

  def subject(self, position):
    return position

  def shape(self, position):
    return self.volumes[position].source.shape[:3]

  def window(self, position, z0, z1):
    v = self.volumes[position]
    return {"source": v.source[z0:z1], "target": v.target[z0:z1], "mask": v.mask[z0:z1]}

  def foreground(self, position):
    return np.argwhere(self.volumes[position].mask[..., 0] > 0)


def volume(shape, blob=None, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.zeros((*shape, 1), np.float32)
  if blob is not None:
    mask[blob] = 1
  return Volume("v", rng.uniform(-1, 1, (*shape, 2)).astype(np.float32),
                rng.uniform(-1, 1, (*shape, 1)).astype(np.float32), mask, {})


def test_patch_is_the_volume_at_its_start_and_padded_beyond_it():
  v = volume((6, 20, 9))  # deeper and wider than the patch along H only
  source = patches.PatchSource(ArrayStore([v]), (8, 16, 12), seed=0, foreground=0.0)
  for index in range(20):
    record = source[index]
    z0 = int(record["slice"])
    assert z0 == 0  # no room along D: the patch starts at 0 and is padded
    # find y0 from the data itself: the patch's first row is one of the volume's rows
    rows = [y for y in range(20 - 16 + 1)
            if np.array_equal(record["source"][:6, :, :9], v.source[:, y:y + 16])]
    assert len(rows) == 1
    y0 = rows[0]
    np.testing.assert_array_equal(record["target"][:6, :, :9], v.target[:, y0:y0 + 16])
    assert (record["source"][6:] == -1).all() and (record["source"][:, :, 9:] == -1).all()
    assert (record["target"][:, :, 9:] == -1).all() and (record["mask"][6:] == 0).all()
    assert record["source"].shape == (8, 16, 12, 2) and record["mask"].shape == (8, 16, 12, 1)


def test_uniform_placement_reaches_every_position_and_stays_inside():
  v = volume((10, 12, 12))
  source = patches.PatchSource(ArrayStore([v]), (4, 8, 8), seed=1, foreground=0.0)
  starts = set()
  for index in range(3000):  # 175 positions: the coupon collector needs ≈ 1000 draws
    start = patches.place(v.source.shape[:3], (4, 8, 8),
                          np.random.default_rng([1, index]), None)
    starts.add(start)
    assert all(0 <= s <= n - p for s, n, p in zip(start, (10, 12, 12), (4, 8, 8)))
  assert len(starts) == 7 * 5 * 5  # every position inside the volume
  assert {int(source[i]["slice"]) for i in range(200)} == set(range(7))


def test_foreground_share_of_patches_contains_the_mask():
  blob = (slice(20, 22), slice(2, 4), slice(40, 42))  # a small lesion far from the centre
  v = volume((24, 16, 48), blob)
  draws = 600
  hits = lambda share: np.mean([patches.PatchSource(ArrayStore([v]), (4, 8, 8), seed=2,
                                                    foreground=share)[i]["mask"].any()
                                for i in range(draws)])
  assert hits(1.0) == 1.0  # every forced patch holds the lesion
  # uniform patches hit it rarely (≈ 3 % of positions); forced ones add ≈ the share
  base = hits(0.0)
  assert base < 0.1
  assert abs(hits(1 / 3) - (1 / 3 + (2 / 3) * base)) < 0.07


def test_phantom_patches_are_cut_from_the_rendered_volume(make_config):
  config = make_config("regression", "ct")
  config.unlock()
  config.model.dims, config.data.patch = 3, (8, 16, 16)
  store = pipeline.volume_store(config)
  source = pipeline.patch_source(config, store)
  subjects = pipeline.phantom_split(config)["train"]
  for index in (0, 1, 5):
    record = source[index]
    v = pipeline.phantom_volume(config, int(record["subject"]))
    assert int(record["subject"]) == subjects[index % len(subjects)]
    z0 = int(record["slice"])
    # locate the in-plane corner independently, by matching the mask and source
    match = [(y, x) for y in range(32 - 16 + 1) for x in range(32 - 16 + 1)
             if np.array_equal(record["source"], v.source[z0:z0 + 8, y:y + 16, x:x + 16])]
    assert match
    y, x = match[0]
    np.testing.assert_array_equal(record["target"], v.target[z0:z0 + 8, y:y + 16, x:x + 16])
    np.testing.assert_array_equal(record["mask"], v.mask[z0:z0 + 8, y:y + 16, x:x + 16])
  # a pure function of the index: what an exact resume relies on
  for key in ("source", "target", "mask"):
    np.testing.assert_array_equal(source[3][key], pipeline.patch_source(config, store)[3][key])


@pytest.mark.parametrize("order", [0, 1])
def test_3d_augmentation_is_the_same_in_plane_warp_on_every_slice(order):
  rng = np.random.default_rng(5)
  record = {"source": rng.uniform(-1, 1, (3, 12, 10, 2)).astype(np.float32),
            "target": rng.uniform(-1, 1, (3, 12, 10, 1)).astype(np.float32),
            "mask": (rng.random((3, 12, 10, 1)) > 0.5).astype(np.float32)}
  out = augment.augment_record(record, np.random.default_rng(9), p_affine=1.0, jitter=0.0,
                               order=order)
  replay = np.random.default_rng(9)
  replay.random()  # augment_record's p_affine draw
  matrix = augment.random_matrix(replay, flip=True, rotate_deg=10.0, scale=0.1)
  for z in range(3):
    source, target, mask = augment.warp(
        [record["source"][z], record["target"][z], record["mask"][z]], matrix,
        [augment.IMAGE_FILL, augment.IMAGE_FILL, augment.MASK_FILL], order)
    np.testing.assert_allclose(out["source"][z], source, atol=1e-6)
    np.testing.assert_allclose(out["target"][z], target, atol=1e-6)
    np.testing.assert_array_equal(out["mask"][z], (mask >= 0.5).astype(np.float32))


def test_3d_flip_mirrors_left_right_on_every_slice():
  rng = np.random.default_rng(1)
  record = {"source": rng.uniform(-1, 1, (2, 6, 5, 1)).astype(np.float32),
            "target": rng.uniform(-1, 1, (2, 6, 5, 1)).astype(np.float32),
            "mask": np.ones((2, 6, 5, 1), np.float32)}
  flipped = None
  for seed in range(20):  # some seed flips (p 0.5)
    out = augment.augment_record(record, np.random.default_rng(seed), p_affine=0.0, jitter=0.0)
    if not np.array_equal(out["source"], record["source"]):
      flipped = out
      break
  assert flipped is not None
  np.testing.assert_array_equal(flipped["source"], record["source"][:, ::-1])
  np.testing.assert_array_equal(flipped["target"], record["target"][:, ::-1])
