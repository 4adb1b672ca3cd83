"""Sliding-window inference, mirror TTA and the mixture law (medjax/sliding.py), and the
3D branch of evaluate.predict_volume, against independent numpy references."""

import itertools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medjax import evaluate, parallel, sliding

SHAPE = (11, 13, 9)  # no axis a multiple of the window
WINDOW = (4, 6, 4)


def positions(shape):
  """A (*shape, 1) volume linear in position: 0.1 z − 0.05 y + 0.02 x + 0.3."""
  z, y, x = np.meshgrid(*map(np.arange, shape), indexing="ij")
  return (0.1 * z - 0.05 * y + 0.02 * x + 0.3)[..., None].astype(np.float32)


def test_window_starts_follow_nnunets_rule():
  assert sliding.window_starts(10, 4, 0.5) == [0, 2, 4, 6]
  assert sliding.window_starts(3, 4, 0.5) == [0]
  for size, window, overlap in itertools.product((5, 11, 13, 64), (4, 6), (0.0, 0.25, 0.5)):
    if size < window:
      continue
    starts = sliding.window_starts(size, window, overlap)
    step = max(1, int(window * (1 - overlap)))
    assert starts[0] == 0 and starts[-1] == size - window  # flush with both ends
    assert len(starts) == int(np.ceil((size - window) / step)) + 1
    assert all(0 < b - a <= step for a, b in zip(starts, starts[1:]))


def test_gaussian_importance_is_centred_normalised_and_positive():
  weights = sliding.gaussian_importance((5, 8, 4))
  reference = np.ones(())
  for n in (5, 8, 4):  # σ = n / 8 about the window's centre
    reference = np.multiply.outer(reference, np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2)
                                                             / (n / 8)) ** 2))
  reference = np.maximum(reference / reference.max(), sliding.WEIGHT_FLOOR)
  np.testing.assert_allclose(weights, reference, rtol=1e-6)
  assert weights.max() == 1.0 and weights.min() > 0
  np.testing.assert_array_equal(weights, weights[::-1, ::-1, ::-1])


def test_constant_prediction_covers_every_voxel_once_weighted():
  volume = np.random.default_rng(0).uniform(-1, 1, (*SHAPE, 2)).astype(np.float32)
  seen, indices = [], []

  def predict(batch, index):
    seen.append(batch.shape)
    indices.append(index)
    return np.full((*batch.shape[:-1], 1), 0.25), np.full((*batch.shape[:-1], 1), 0.1)
  mean, std = sliding.sliding_window(predict, volume, WINDOW, overlap=0.5, batch_size=4)
  assert mean.shape == std.shape == (*SHAPE, 1)
  np.testing.assert_allclose(mean, 0.25, rtol=1e-6)
  np.testing.assert_allclose(std, 0.1, rtol=1e-5)  # a mixture of equal components
  corners = sliding.window_grid(SHAPE, WINDOW, 0.5)
  assert seen == [(4, *WINDOW, 2)] * -(-len(corners) // 4) and indices == list(range(len(seen)))
  coverage = np.zeros(SHAPE, int)
  for corner in corners:
    coverage[tuple(slice(c, c + w) for c, w in zip(corner, WINDOW))] += 1
  assert coverage.min() >= 1


def test_windows_combine_by_the_weighted_mixture_law():
  """Each window predicts its own constant (mean k, std k/10): the result is the numpy
  loop's Gaussian-weighted mixture of them, voxel by voxel."""
  volume = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(*SHAPE, 1)  # voxel ids
  corners = sliding.window_grid(SHAPE, WINDOW, 0.5)
  order = {corner: k for k, corner in enumerate(corners)}

  def predict(batch, index):
    # the window's number, from the id of its first voxel
    k = np.array([order[np.unravel_index(int(w[0, 0, 0, 0]), SHAPE)] for w in batch],
                 np.float64)[:, None, None, None, None]
    k = np.broadcast_to(k, (len(batch), *WINDOW, 1))
    return k, k / 10
  mean, std = sliding.sliding_window(predict, volume, WINDOW, overlap=0.5, batch_size=3)
  g = sliding.gaussian_importance(WINDOW).astype(np.float64)
  w, wm, wq = (np.zeros(SHAPE) for _ in range(3))
  for k, corner in enumerate(corners):
    region = tuple(slice(c, c + n) for c, n in zip(corner, WINDOW))
    w[region] += g
    wm[region] += g * k
    wq[region] += g * ((k / 10) ** 2 + k ** 2)
  np.testing.assert_allclose(mean[..., 0], wm / w, rtol=1e-5)
  np.testing.assert_allclose(std[..., 0], np.sqrt(wq / w - (wm / w) ** 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape,window", [(SHAPE, WINDOW), ((3, 13, 9), (4, 6, 4))])
def test_linear_in_position_prediction_is_reconstructed(shape, window):
  """Padding (an axis shorter than the window), cutting and cropping lose nothing."""
  volume = positions(shape)
  mean, std = sliding.sliding_window(
      lambda batch, index: (2 * batch - 1, np.zeros_like(batch)), volume, window,
      overlap=0.5, batch_size=5)
  np.testing.assert_allclose(mean, 2 * volume - 1, atol=1e-6)
  assert np.abs(std).max() < 1e-6


class TinyConv(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(1, (3, 3, 3))(nn.relu(nn.Conv(4, (3, 3, 3))(x)))


@pytest.mark.parametrize("shape", [(8, 8, 8), (6, 8, 7)])
def test_one_window_equals_a_direct_prediction(shape):
  """A window covering the (padded) volume: the real model's own output, cropped."""
  model, window = TinyConv(), (8, 8, 8)
  volume = np.random.default_rng(1).uniform(-1, 1, (*shape, 2)).astype(np.float32)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *window, 2)))
  apply = jax.jit(model.apply)
  mean, _ = sliding.sliding_window(
      lambda batch, index: (np.asarray(apply(params, batch)), np.zeros(batch.shape[:-1] + (1,))),
      volume, window, batch_size=1)
  widths = [((w - s) // 2, w - s - (w - s) // 2) for s, w in zip(shape, window)]
  padded = np.pad(volume, widths + [(0, 0)], constant_values=-1.0)
  direct = np.asarray(apply(params, padded[None]))[0]
  crop = tuple(slice(a, a + s) for (a, _), s in zip(widths, shape))
  np.testing.assert_allclose(mean, direct[crop], atol=1e-5)


def test_combine_equals_the_pooled_moments():
  """Members' (mean, std) of their own draws → the mean and std of all draws pooled."""
  rng = np.random.default_rng(2)
  draws = [rng.normal(loc, scale, (50, 3, 4)) for loc, scale in ((0, 1), (2, 0.5), (-1, 3))]
  mean, std = sliding.combine([d.mean(0) for d in draws], [d.std(0) for d in draws])
  pooled = np.concatenate(draws)
  np.testing.assert_allclose(mean, pooled.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(std, pooled.std(0), rtol=1e-5)
  one = sliding.combine([draws[0].mean(0)], [draws[0].std(0)])
  np.testing.assert_array_equal(one[0], draws[0].mean(0))


def test_mirror_tta():
  volume = np.random.default_rng(3).uniform(-1, 1, (5, 6, 7, 1)).astype(np.float32)
  axes = (1, 2)
  equivariant = lambda v, member: (np.tanh(v), 0.1 * np.abs(v))
  mean, std = sliding.mirror_tta(equivariant, volume, axes)
  np.testing.assert_allclose(mean, np.tanh(volume), rtol=1e-6)
  np.testing.assert_allclose(std, 0.1 * np.abs(volume), rtol=1e-5, atol=1e-7)
  # Not mirror-equivariant: a ramp along W, a member-dependent std.
  ramp = np.arange(7, dtype=np.float32)[None, None, :, None]
  members = []

  def skewed(v, member):
    members.append(member)
    return v + ramp, np.full_like(v, 0.1 * (member + 1))
  mean, std = sliding.mirror_tta(skewed, volume, axes)
  assert members == [0, 1, 2, 3]
  by_hand = [volume + ramp,                                   # as is
             np.flip(np.flip(volume, 1) + ramp, 1),           # H mirrored
             np.flip(np.flip(volume, 2) + ramp, 2),           # W mirrored
             np.flip(np.flip(volume, (1, 2)) + ramp, (1, 2))]
  stds = [0.1, 0.2, 0.3, 0.4]
  np.testing.assert_allclose(mean, np.mean(by_hand, 0), rtol=1e-6, atol=1e-6)
  variance = np.mean([s ** 2 + m ** 2 for s, m in zip(stds, by_hand)], 0) - np.mean(by_hand, 0) ** 2
  np.testing.assert_allclose(std, np.sqrt(variance), rtol=1e-5)


def fake_3d_run(window=(8, 8, 8)):
  """A Run-shaped object whose translator is a tiny conv net on (B, D, H, W, C) windows."""
  model = TinyConv()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *window, 1)))
  calls = []

  def translate(params, batch, rng):
    calls.append(batch.shape)
    mean = model.apply(params, batch)
    return mean, jnp.zeros_like(mean) + 0.0 * jax.random.uniform(rng)
  config = ml_collections.ConfigDict({
      "model": {"dims": 3}, "data": {"patch": window},
      "eval": {"batch_size": 2, "overlap": 0.5, "tta": "none"},
      "translator": {"sample_steps": 1, "samples": 1}})
  mesh = parallel.make_mesh()
  fn = jax.jit(translate)
  return types.SimpleNamespace(config=config, params=params, mesh=mesh,
                               translate_fn=lambda steps=None, samples=None: fn), model, calls


def test_predict_volume_3d_is_the_sliding_window_of_the_model():
  run, model, calls = fake_3d_run()
  source = np.random.default_rng(4).uniform(-1, 1, (10, 12, 9, 1)).astype(np.float32)
  counted = []
  prediction = evaluate.predict_volume(run, source, jax.random.PRNGKey(0),
                                       on_batch=counted.append)
  apply = jax.jit(model.apply)
  mean, _ = sliding.sliding_window(
      lambda b, i: (np.asarray(apply(run.params, b)), np.zeros(b.shape[:-1] + (1,))),
      source, (8, 8, 8), overlap=0.5, batch_size=8)
  np.testing.assert_allclose(prediction.mean, mean, atol=1e-5)
  assert sum(counted) == evaluate.work_units(run, source.shape) == 8  # 2 × 2 × 2 windows
  assert all(shape[0] % run.mesh.size == 0 for shape in calls)
  # flip TTA: the same as mirroring by hand along the axes training mirrors (H)
  flipped = evaluate.predict_volume(run, source, jax.random.PRNGKey(0), tta="flip")
  mirrored = evaluate.predict_volume(run, np.flip(source, 1).copy(), jax.random.PRNGKey(0))
  np.testing.assert_allclose(flipped.mean, (mean + np.flip(mirrored.mean, 1)) / 2, atol=1e-5)
  with pytest.raises(ValueError, match="eval.tta"):
    evaluate.predict_volume(run, source, jax.random.PRNGKey(0), tta="rotate")
