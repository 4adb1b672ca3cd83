"""Mamba backbone (`model.name='mamba'`): the selective scan against a step-by-step numpy
recurrence (whole and chunked), the cross-scan against a loop over the grid, linear cost,
the U-Net's shapes, zero output at init and conditioning in 2D and 3D, and training
through the translators."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import config as config_lib
from medjax import models, translators
from medjax.models.mamba import (CausalDepthwiseConv, MambaUNet, cross_merge, cross_scan,
                                 scan_orders, selective_scan)

from conftest import ROOT, tiny_config

TINY = dict(out_channels=1, channels=8, channel_mult=(1, 2), d_state=4, expand=1)


def key(seed=0):
  return jax.random.key(seed, impl="rbg")  # cheaper initialisers to compile (test_uvit.py)


def scan_inputs(shape, din=5, n=3, seed=0):
  """Random (u, Δ > 0, A < 0, B, C, D) for sequences of `shape` = (..., L)."""
  rng = np.random.default_rng(seed)
  u = rng.standard_normal((*shape, din))
  delta = np.log1p(np.exp(rng.standard_normal((*shape, din))))  # softplus: Δ > 0
  A = -np.exp(rng.standard_normal((din, n)))
  B, C = rng.standard_normal((2, *shape, n))
  D = rng.standard_normal(din)
  return [a.astype(np.float32) for a in (u, delta, A, B, C, D)]


def sequential(u, delta, A, B, C, D):
  """The recurrence step by step in float64: h ← exp(Δ_t A) h + Δ_t B_t u_t."""
  u, delta, A, B, C, D = (np.asarray(a, np.float64) for a in (u, delta, A, B, C, D))
  h = np.zeros((*u.shape[:-2], *A.shape))
  y = np.zeros_like(u)
  for t in range(u.shape[-2]):
    h = np.exp(delta[..., t, :, None] * A) * h + (delta[..., t, :] * u[..., t, :])[
        ..., None] * B[..., t, None, :]
    y[..., t, :] = np.einsum("...dn,...n->...d", h, C[..., t, :]) + D * u[..., t, :]
  return y


@pytest.mark.parametrize("chunk", [None, 8])  # 8 divides no length here: padding runs too
def test_selective_scan_is_the_sequential_recurrence(chunk):
  args = scan_inputs((2, 37))
  y = jax.jit(lambda *a: selective_scan(*a, chunk=chunk))(*args)
  assert y.dtype == jnp.float32 and y.shape == (2, 37, 5)
  np.testing.assert_allclose(y, sequential(*args), rtol=1e-5, atol=1e-5)
  # bfloat16 inputs are scanned in float32 (the output says so)
  half = [jnp.asarray(a, jnp.bfloat16) for a in args]
  assert jax.eval_shape(lambda: selective_scan(*half, chunk=chunk)).dtype == jnp.float32


def test_selective_scan_gradient_is_the_same_whole_or_chunked():
  u, delta, A, B, C, D = scan_inputs((1, 21))
  grads = [jax.jit(jax.grad(lambda u, d, B, C, c=chunk: jnp.sum(
      jnp.sin(selective_scan(u, d, A, B, C, D, chunk=c))), argnums=(0, 1, 2, 3)))(
          u, delta, B, C) for chunk in (None, 4)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *grads)


def grid_walks(grid):
  """Every cross-scan direction as a list of grid positions, written as nested loops:
  the axes of each order from outermost to innermost, then the same walk reversed."""
  walks = []
  for order in scan_orders(len(grid)):
    walk = []
    for index in np.ndindex(*(grid[a] for a in order)):  # the last axis fastest
      position = [0] * len(grid)
      for a, i in zip(order, index):
        position[a] = i
      walk.append(tuple(position))
    walks += [walk, walk[::-1]]
  return walks


@pytest.mark.parametrize("grid", [(3, 4), (2, 3, 4)])
def test_cross_scan_walks_the_grid_and_merge_inverts_it(grid):
  rng = np.random.default_rng(0)
  x = rng.integers(-50, 50, (2, *grid, 3)).astype(np.float32)  # exact sums and means
  assert scan_orders(2) == [(0, 1), (1, 0)]  # rows (W fastest), then columns (H fastest)
  sequences = np.asarray(cross_scan(jnp.asarray(x)))
  walks = grid_walks(grid)
  assert sequences.shape == (len(walks), 2, int(np.prod(grid)), 3) == (2 * len(grid), 2,
                                                                      np.prod(grid), 3)
  for k, walk in enumerate(walks):
    np.testing.assert_array_equal(sequences[k],
                                  np.stack([x[(slice(None), *p)] for p in walk], axis=1))
  np.testing.assert_array_equal(cross_merge(jnp.asarray(sequences), grid), x)
  # A directional scan is the 1-D scan of the voxels in its walk's order: scanning every
  # direction and merging equals the mean over walks of a step-by-step scan along each.
  u, delta, A, B, C, D = scan_inputs((2, *grid))
  flat = cross_scan
  y = jax.jit(lambda u, delta, B, C: cross_merge(
      selective_scan(flat(u), flat(delta), A, flat(B), flat(C), D), grid))(u, delta, B, C)
  expected = np.zeros_like(u, np.float64)
  for walk in walks:
    along = lambda a: np.stack([a[(slice(None), *p)] for p in walk], axis=1)
    scanned = sequential(along(u), along(delta), A, along(B), along(C), D)
    for t, p in enumerate(walk):
      expected[(slice(None), *p)] += scanned[:, t] / len(walks)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_causal_conv_sees_only_the_past():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 9, 3)), jnp.float32)
  conv = CausalDepthwiseConv(4)
  params = conv.init(key(), x)
  w, b = (np.asarray(params["params"][k]) for k in ("kernel", "bias"))
  expected = np.stack([sum(w[3 - j] * np.asarray(x)[:, t - j] for j in range(4) if t >= j)
                       for t in range(9)], axis=1) + b
  np.testing.assert_allclose(conv.apply(params, x), expected, rtol=1e-5, atol=1e-6)


def best_time(f, *args, repeats=3):
  jax.block_until_ready(f(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - start)
  return min(times)


@pytest.mark.parametrize("chunk", [0, 16])
def test_scan_cost_grows_linearly_with_the_sequence(chunk):
  # Linear work predicts a ratio of 4 for 4× the steps, quadratic 16 (attention's). The
  # bound 8 is their geometric mean: a 2× margin for timer noise on shared cores and for
  # the larger arrays falling out of cache, and still 2× below quadratic.
  scan = jax.jit(lambda *a: selective_scan(*a, chunk=chunk))
  short, long = scan_inputs((4, 2048), din=16, n=8), scan_inputs((4, 8192), din=16, n=8)
  ratio = best_time(scan, *long) / best_time(scan, *short)
  assert ratio < 8, ratio


def inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(-1, 1, (*shape, 1)), jnp.float32)
  source = jnp.asarray(rng.uniform(-1, 1, (*shape, 2)), jnp.float32)
  return x, jnp.asarray(rng.uniform(0, 1, shape[:1]), jnp.float32), source


def test_3d_shapes_and_one_scan_per_axis_and_direction():
  model = models.build("mamba", **TINY, dims=3, ssm_levels=(0, 1))
  x, t, source = inputs((2, 4, 8, 8))
  params = jax.eval_shape(lambda: model.init(key(), x, t, source, train=False))["params"]
  # 2·dims directions, each with its own parameters (stacked on the leading axis)
  assert params["VSSBlock_0"]["directions"]["A_log"].shape == (6, 8, 4)
  out = jax.eval_shape(lambda p: model.apply({"params": p}, x, t, source, train=False), params)
  assert out.shape == (2, 4, 8, 8, 1) and out.dtype == jnp.float32


def test_remat_keeps_the_parameter_tree_and_differentiates():
  x, t, source = inputs((2, 16, 16))
  plain, rematted = (models.build("mamba", **TINY, remat=r) for r in (False, True))
  trees = [jax.eval_shape(lambda m=m: m.init(key(), x, t, source, train=False))
           for m in (plain, rematted)]
  assert jax.tree.structure(trees[0]) == jax.tree.structure(trees[1])
  grads = jax.eval_shape(jax.grad(lambda p: rematted.apply(p, x, t, source, train=True).sum()),
                         trees[1])
  assert jax.tree.structure(grads) == jax.tree.structure(trees[1])


def test_zero_output_at_init_and_conditioning():
  model = models.build("mamba", **TINY)
  x, t, source = inputs((2, 16, 16))
  cond = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
  params = jax.jit(lambda k: model.init(k, x, t, source, train=False, cond=cond))(key())
  assert params["params"]["VSSBlock_0"]["directions"]["A_log"].shape == (4, 16, 4)
  run = jax.jit(lambda p, x, t, s, c: model.apply(p, x, t, s, train=False, cond=c))
  out = run(params, x, t, source, cond)
  assert out.shape == (2, 16, 16, 1) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)  # as the U-Net: a fresh network outputs 0
  rng = np.random.default_rng(1)
  moved = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32), params)
  out = np.asarray(run(moved, x, t, source, cond))
  assert np.abs(out).max() > 1e-3
  for other in [(x, t + 0.3, source, cond), (x, t, source.at[:, 1].add(1.0), cond),
                (-x, t, source, cond), (x, t, source, cond[::-1])]:
    assert np.abs(np.asarray(run(moved, *other)) - out).max() > 1e-4
  # another example's inputs leave this one's output alone (no mixing across the batch)
  np.testing.assert_allclose(run(moved, x, t, source.at[1].add(0.5), cond)[0], out[0],
                             atol=1e-5)
  # regression / GANs: the source alone, no time, no cond (and no cond_embed)
  plain = jax.eval_shape(lambda: model.init(key(), None, None, source, train=False))
  assert "cond_embed" not in plain["params"]


def test_clear_errors():
  _, t, source = inputs((2, 16, 10))
  init = lambda model, s=source: jax.eval_shape(
      lambda: model.init(key(), None, t, s, train=False))
  with pytest.raises(ValueError, match="H and W divisible by 4, got 16x10"):
    init(MambaUNet(**{**TINY, "channel_mult": (1, 2, 2)}))
  with pytest.raises(ValueError, match=r"model.dims=3 expects \(B, D, H, W, C\)"):
    init(MambaUNet(**TINY, dims=3))
  with pytest.raises(ValueError, match="ssm_levels: level 2 outside 0..1"):
    init(MambaUNet(**TINY, ssm_levels=(2,)))
  with pytest.raises(ValueError, match="model.d_state=0: expected an int ≥ 1"):
    init(MambaUNet(**{**TINY, "d_state": 0}))
  with pytest.raises(ValueError, match="model.scan_chunk=-1: expected an int ≥ 0"):
    init(MambaUNet(**TINY, scan_chunk=-1))
  with pytest.raises(ValueError, match=r"cond must be \(B, K\)"):
    jax.eval_shape(lambda: MambaUNet(**TINY).init(key(), None, t, source, train=False,
                                                  cond=jnp.ones((3, 2))))


def mamba_config(method):
  """experiments/phantom.py's `method` at size=tiny with model=mamba (its tiny preset)."""
  config = tiny_config(method)
  config.model = config_lib.model_config("mamba", **config_lib.SIZES["tiny"]["mamba"])
  return config


def toy_batch(n=4, side=16):
  rng = np.random.default_rng(0)
  source = rng.uniform(-1, 1, (n, side, side, 1)).astype(np.float32)
  return {"source": jnp.asarray(source), "target": jnp.asarray(0.8 * source - 0.1),
          "mask": jnp.ones((n, side, side, 1), jnp.float32)}


def test_tiny_experiment_config_builds_mamba():
  config = config_lib.load(f"{ROOT}/experiments/phantom.py:method=regression,model=mamba,"
                           "size=tiny")
  assert config.model.name == "mamba" and config.model.expand == 1
  assert isinstance(translators.build(config).model, MambaUNet)


@pytest.mark.parametrize("method", ["regression", "flow"])
def test_training_lowers_the_loss_and_sampling_is_deterministic(method):
  config = mamba_config(method)
  # One level (ResBlock, VSSBlock, ResBlock between stem and head): compiling the train
  # step is what this test spends; the two-level preset runs in the experiment tests.
  config.model.channel_mult = (1,)
  config.train.update(total_steps=20, learning_rate=3e-3, warmup_steps=3)
  translator = translators.build(config)
  batch = toy_batch()
  state = jax.jit(translator.init)(key(), batch)
  step = jax.jit(translator.train_step)
  if translator.stochastic:  # flow draws t and noise each step: the loss on fixed draws
    keys = jax.random.split(jax.random.key(9), 4)
    fixed = jax.jit(lambda params: jnp.mean(jax.vmap(
        lambda k: translator.loss(params, batch, k)[0])(keys)))
    before = float(fixed(state.params))
  losses = []
  for i in range(config.train.total_steps):
    state, metrics = step(state, batch, key(i))
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all()
  # The fresh network outputs 0 and stays there if no gradient passes its zero-initialised
  # head and the zero-initialised out-projections of its Mamba blocks.
  before, after = ((before, float(fixed(state.params))) if translator.stochastic
                   else (losses[0], np.mean(losses[-3:])))
  assert after < 0.75 * before, (before, after)
  translate = jax.jit(translator.translate, static_argnames=("steps", "samples"))
  params = translator.inference_params(state)
  first, again, other = (translate(params, batch["source"], jax.random.key(k), steps=2,
                                   samples=1)[0] for k in (2, 2, 3))
  np.testing.assert_array_equal(first, again)
  assert first.shape == (4, 16, 16, 1) and np.isfinite(first).all()
  if translator.stochastic:
    assert not np.array_equal(first, other)
