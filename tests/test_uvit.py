"""U-ViT backbone (`model.name='uvit'`): shapes in 2D and 3D, the position embedding against
a loop-by-loop numpy construction, conditioning on source and time, long-skip wiring seen
through flax's method interceptor, remat, precision, and training through translators."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import config as config_lib
from medjax import models, translators
from medjax.models.uvit import TransformerBlock, UViT, sincos_position_embedding

from conftest import tiny_config

TINY = dict(out_channels=1, width=32, depth=3, num_heads=4, patch_size=2)


def inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(-1, 1, (*shape, 1)), jnp.float32)
  source = jnp.asarray(rng.uniform(-1, 1, (*shape, 2)), jnp.float32)
  return x, jnp.asarray(rng.uniform(0, 1, shape[:1]), jnp.float32), source


def key(seed=0):
  # rbg: its initialisers compile in a quarter of threefry's time (as test_precision.py)
  return jax.random.key(seed, impl="rbg")


def init(model, *args):
  # jitted: one compilation instead of op-by-op dispatch of every initialiser
  return jax.jit(lambda k, *a: model.init(k, *a, train=False))(key(), *args)


def params_of(model, *args):
  return model.init(key(), *args, train=False)


def jiggled(model, args, seed=1, scale=0.05):
  """Initial params moved off their init: the zero-initialised last layer hides the input."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape, np.float32),
                      init(model, *args)["params"])


@pytest.mark.parametrize("dims,shape", [(2, (2, 16, 16)), (3, (2, 8, 16, 16))])
def test_shapes_and_zero_output_at_init(dims, shape):
  model = models.build("uvit", **TINY, dims=dims)
  x, t, source = inputs(shape)
  params = init(model, x, t, source)
  out = jax.jit(lambda p: model.apply(p, x, t, source, train=False))(params)
  assert out.shape == (*shape, 1) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)  # as the U-Net: a fresh network outputs 0
  # regression / GANs: the source alone (here three channels), no time
  out = jax.eval_shape(lambda: model.apply(params, None, None, source[..., :1].repeat(3, -1),
                                           train=False))
  assert out.shape == (*shape, 1)
  if dims == 3:  # one patch side per axis: anisotropic tokens for thick slices
    model = models.build("uvit", **{**TINY, "patch_size": (1, 4, 4)}, dims=3)
    out = jax.eval_shape(lambda: model.apply(params_of(model, x, t, source), x, t, source,
                                             train=False))
    assert out.shape == (*shape, 1)


def reference_embedding(grid, width):
  """N-D sin-cos written out position by position: axis a owns channels [2aF, 2(a+1)F),
  sin(c·ω_k) at 2aF + k and cos(c·ω_k) at 2aF + F + k, ω_k = 10000^(−k/F); the rest 0."""
  dims = len(grid)
  freqs = width // (2 * dims)
  table = np.zeros((int(np.prod(grid)), width))
  for n in range(table.shape[0]):
    coords = np.unravel_index(n, grid)  # row-major, as a reshape of (B, *grid, C)
    for a, c in enumerate(coords):
      for k in range(freqs):
        omega = 1.0 / 10000 ** (k / freqs)
        table[n, 2 * a * freqs + k] = np.sin(c * omega)
        table[n, 2 * a * freqs + freqs + k] = np.cos(c * omega)
  return table


@pytest.mark.parametrize("grid,width", [((4, 6), 16), ((2, 3, 5), 32), ((5,), 8)])
def test_position_embedding_is_nd_sincos(grid, width):
  np.testing.assert_allclose(sincos_position_embedding(grid, width),
                             reference_embedding(grid, width), atol=1e-6)


def test_output_depends_on_source_time_and_state_and_any_size_runs():
  model = models.build("uvit", **TINY)
  x, t, source = inputs((2, 16, 16))
  params = {"params": jiggled(model, (x, t, source))}
  run = jax.jit(lambda x, t, s: model.apply(params, x, t, s, train=False))
  out = np.asarray(run(x, t, source))
  assert np.abs(out).max() > 1e-3
  # t enters only through the time token: a change of output means the token is used.
  assert np.abs(np.asarray(run(x, t + 0.3, source)) - out).max() > 1e-4
  assert np.abs(np.asarray(run(x, t, source.at[:, 3, 5].add(1.0))) - out).max() > 1e-4
  assert np.abs(np.asarray(run(-x, t, source)) - out).max() > 1e-4
  # Position is known: with the last conv a delta (so each output patch comes from its
  # token only), moving two 2×2 patches of the input does not just move the output's, as it
  # would without a position embedding (attention is permutation-equivariant).
  delta = np.zeros((3, 3, 1, 1), np.float32)
  delta[1, 1] = 1.0
  local = {"params": {**params["params"], "out_conv": {"kernel": jnp.asarray(delta),
                                                       "bias": jnp.zeros(1)}}}
  patchwise = jax.jit(lambda x, s: model.apply(local, x, t, s, train=False))

  def swap(a):
    a = np.array(a)
    a[:, 0:2, 0:2], a[:, 6:8, 10:12] = a[:, 6:8, 10:12].copy(), a[:, 0:2, 0:2].copy()
    return jnp.asarray(a)
  moved = swap(patchwise(swap(x), swap(source)))
  assert np.abs(moved - patchwise(x, source)).max() > 1e-3
  # another example's inputs leave this one's output alone (no mixing across the batch)
  np.testing.assert_allclose(run(x, t, source.at[1].add(0.5))[0], out[0], atol=1e-5)
  # other sizes than the one initialised with (sliding windows): same params, 8×24
  wide = run(x[:, :8, :12].repeat(2, 2), t, source[:, :8, :12].repeat(2, 2))
  assert wide.shape == (2, 8, 24, 1) and np.isfinite(wide).all()


def test_long_skips_join_in_block_outputs_in_reverse():
  model = models.build("uvit", **{**TINY, "depth": 5})
  x, t, source = inputs((1, 8, 8))
  # jiggled: at init every block is the identity, and all their outputs are equal
  params = {"params": jiggled(model, (x, t, source))}

  def blocks(params):
    seen = {}

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, TransformerBlock) and context.method_name == "__call__":
        seen[context.module.name] = (args[1], out)  # (skip, output)
      return out

    with nn.intercept_methods(record):
      model.apply(params, x, t, source, train=False)
    return seen

  seen = jax.jit(blocks)(params)
  assert [seen[f"Block_{i}"][0] is None for i in range(5)] == [True] * 3 + [False] * 2
  # out-block i takes in-block depth//2 − 1 − i: Block_3 ← Block_1, Block_4 ← Block_0
  np.testing.assert_array_equal(seen["Block_3"][0], seen["Block_1"][1])
  np.testing.assert_array_equal(seen["Block_4"][0], seen["Block_0"][1])


def test_remat_same_parameters_and_output():
  x, t, source = inputs((2, 16, 16))
  plain, rematted = (models.build("uvit", **TINY, dropout=0.1, remat=r) for r in (False, True))
  p_plain, p_remat = (init(m, x, t, source)["params"] for m in (plain, rematted))
  assert jax.tree.structure(p_plain) == jax.tree.structure(p_remat)
  jax.tree.map(np.testing.assert_array_equal, p_plain, p_remat)
  params = {"params": jiggled(plain, (x, t, source))}
  outs = [jax.jit(lambda p, m=m: m.apply(p, x, t, source, train=True,
                                          rngs={"dropout": key(2)}))(params)
          for m in (plain, rematted)]
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_bfloat16_blocks_float32_params_softmax_and_output():
  x, t, source = inputs((2, 16, 16))
  model32 = models.build("uvit", **TINY)
  model16 = models.build("uvit", **TINY, dtype="bfloat16")
  params = jiggled(model32, (x, t, source))
  out32, out16 = jax.jit(lambda p: [m.apply({"params": p}, x, t, source, train=False)
                                    for m in (model32, model16)])(params)
  assert out16.dtype == jnp.float32
  error = float(np.linalg.norm(out16 - out32) / np.linalg.norm(out32))
  assert 1e-4 < error < 0.05, error  # bf16 really ran, and only rounded
  jaxpr = jax.make_jaxpr(lambda p: model16.apply({"params": p}, x, t, source, train=False))(
      params)
  eqns = list(jaxpr.jaxpr.eqns)
  for eqn in eqns:  # blocks are inlined without remat: the top level holds every equation
    if eqn.primitive.name in ("exp", "reduce_max", "reduce_sum"):  # softmax, norms, time
      assert eqn.invars[0].aval.dtype == jnp.float32, eqn
  assert any(e.primitive.name == "dot_general" and e.invars[0].aval.dtype == jnp.bfloat16
             for e in eqns)


def test_clear_errors():
  _, t, source = inputs((2, 16, 12))
  with pytest.raises(ValueError, match="multiples of model.patch_size=8x8"):
    UViT(**{**TINY, "patch_size": 8}).init(jax.random.key(0), None, t, source, train=False)
  with pytest.raises(ValueError, match="width=30 not divisible by model.num_heads=4"):
    UViT(**{**TINY, "width": 30}).init(jax.random.key(0), None, t, source, train=False)
  with pytest.raises(ValueError, match="depth=4 must be odd"):
    UViT(**{**TINY, "depth": 4}).init(jax.random.key(0), None, t, source, train=False)
  with pytest.raises(ValueError, match=r"model.dims=3 expects \(B, D, H, W, C\)"):
    UViT(**TINY, dims=3).init(jax.random.key(0), None, t, source, train=False)


def uvit_config(method, **model):
  """experiments/phantom.py's `method` at size=tiny, on a tiny U-ViT."""
  config = tiny_config(method)
  sizes = {k: v for k, v in TINY.items() if k != "out_channels"}
  config.model = config_lib.model_config("uvit", **{**sizes, **model})
  return config


def test_regression_on_uvit_lowers_its_loss():
  config = uvit_config("regression")
  config.train.update(total_steps=30, learning_rate=3e-3, warmup_steps=3)
  translator = translators.build(config)
  rng = np.random.default_rng(0)
  source = rng.uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32)
  batch = {"source": jnp.asarray(source), "target": jnp.asarray(0.8 * source - 0.1),
           "mask": jnp.ones((4, 16, 16, 1), jnp.float32)}
  state = jax.jit(translator.init)(key(), batch)
  step = jax.jit(translator.train_step)
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch, key(1))
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all()
  # The fresh network outputs 0 (L1 = mean|0.8 s − 0.1| ≈ 0.40) and stays there if no
  # gradient reaches past its zero-initialised last layer; measured 0.40 → 0.26.
  assert np.mean(losses[-3:]) < 0.75 * losses[0], losses


def test_one_3d_flow_step_on_uvit():
  config = uvit_config("flow", dims=3)
  translator = translators.build(config)
  rng = np.random.default_rng(0)
  # batch 1: flow's per-example time broadcast becomes N-D on the ndmodels branch
  shape = (1, 8, 16, 16, 1)
  batch = {k: jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
           for k in ("source", "target")}
  batch["mask"] = jnp.ones(shape, jnp.float32)
  state = jax.jit(translator.init)(key(), batch)
  state, metrics = jax.jit(translator.train_step)(state, batch, key(1))
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1


def test_cyclegan_initialises_and_generates_with_uvit_generators():
  # CycleGAN calls a ResNet generator with the image alone and the U-ViT (as the U-Net)
  # with (None, None, image); both of its generators, G and F, are U-ViTs here.
  config = uvit_config("cyclegan")
  config.translator.discriminator.num_layers = 2  # 16×16 leaves no logit for three strides
  translator = translators.build(config)
  rng = np.random.default_rng(0)
  batch = {"source": jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 2)), jnp.float32),
           "target": jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 1)), jnp.float32)}
  state = jax.jit(translator.init)(key(), batch)
  assert isinstance(translator.model, UViT) and set(state.params) == {"g", "f"}
  assert state.params["f"]["unpatch"]["kernel"].shape == (32, 4 * 2)  # F: back to 2 channels
  # G through CycleGAN's own call equals the U-ViT called as regression calls it
  params = jax.tree.map(lambda p: p + 0.05, state.params["g"])
  fake, direct, back = jax.jit(lambda g, f: (
      translator.generate(g, batch["source"]),
      translator.model.apply({"params": g}, None, None, batch["source"], train=True),
      translator.generate(f, batch["target"], channels=2)))(params, state.params["f"])
  assert np.abs(fake).max() > 0 and back.shape == (2, 16, 16, 2)
  np.testing.assert_array_equal(fake, direct)
