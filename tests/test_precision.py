"""Mixed precision (`model.dtype`) and activation checkpointing (`model.remat`).

The references are independent of the code under test: the float32 forward of the same
parameters, the jaxpr JAX traces (which dtype each convolution, exp and reduction really
runs in; whether a remat primitive is there) and the network without remat.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import config as config_lib
from medjax import models, train, translators
from medjax.errors import ConfigError

from conftest import tiny_spec

BATCH, SIZE = 2, 16
# Tiny backbones that still have every kind of block: attention (unet), residual blocks,
# transposed convolutions (resnet), instance norm (resnet, patchgan).
SPECS = {
    "unet": dict(out_channels=1, channels=8, channel_mult=(1, 2), attention_levels=(1,),
                 num_heads=2),
    "resnet": dict(out_channels=1, channels=4, num_blocks=2),
    "patchgan": dict(channels=8, num_layers=2),
    # selective scans (float32 inside), LayerNorm, Dense projections, the causal conv
    "mamba": dict(out_channels=1, channels=8, channel_mult=(1, 2), d_state=4, expand=1,
                  num_groups=4),
}
REMAT_PRIMITIVES = {"checkpoint", "remat", "remat2"}  # jax.checkpoint's name across versions
# XLA:CPU would otherwise undo remat (see the remat test); GPUs and TPUs keep its barriers.
KEEP_REMAT = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(-1, 1, (BATCH, SIZE, SIZE, 1)), jnp.float32)
  source = jnp.asarray(rng.uniform(-1, 1, (BATCH, SIZE, SIZE, 1)), jnp.float32)
  return x, jnp.asarray([0.3, 0.7], jnp.float32), source


def _args(name):
  x, t, source = _inputs()
  if name in ("unet", "mamba"):
    return (x, t, source)
  if name == "patchgan":
    return (jnp.concatenate([x, source], -1),)
  return (source,)


def _random_params(shapes, seed=1):
  """Parameters of the tree `shapes` drawn in numpy: kernels LeCun-normal, norm scales
  near 1, biases near 0. Not flax's init: that zero-initialises the last projection of
  every block (a fresh network is the identity or zero), and compiling its initialisers
  costs more than these tests."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = jax.tree_util.keystr(path[-1:]), leaf.shape
    noise = rng.standard_normal(shape).astype(np.float32)
    if "kernel" in name:
      return (noise / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
    return ((1.0 if "scale" in name else 0.0) + 0.1 * noise).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _params(name, **kwargs):
  model = models.build(name, **{**SPECS[name], **kwargs})
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *_args(name), train=False))
  return model, _random_params(shapes["params"])


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it (remat, scan, while, pjit)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _eqns(sub)


def _dtypes(jaxpr, primitive):
  """Dtype of the first operand of each `primitive` equation."""
  return [eqn.invars[0].aval.dtype for eqn in _eqns(jaxpr.jaxpr)
          if eqn.primitive.name == primitive]


def _floats(tree):
  return [leaf.dtype for leaf in jax.tree.leaves(tree)
          if jnp.issubdtype(leaf.dtype, jnp.floating)]


# --- backbones ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SPECS))
def test_bfloat16_forward_is_float32_forward_to_bf16_rounding(name):
  model32, params = _params(name)
  model16 = models.build(name, **SPECS[name], dtype="bfloat16")
  args = _args(name)
  run = jax.jit(lambda p: (model32.apply({"params": p}, *args, train=False),
                           model16.apply({"params": p}, *args, train=False)))
  out32, out16 = run(params)
  assert out16.dtype == jnp.float32 and out16.shape == out32.shape
  out32, out16 = np.asarray(out32), np.asarray(out16)
  error = float(np.linalg.norm(out16 - out32) / np.linalg.norm(out32))
  # bfloat16 keeps 8 significant bits: each rounding errs by up to u = 2^-8 ≈ 0.4 %. The
  # ~20-40 roundings (every layer's input, weights and output) along a path add roughly in
  # quadrature, a few u to ~10 u (measured 0.8-1.5 %); 5 % allows for that, while a
  # float32 computation would differ by ~1e-7, so the lower bound shows bf16 really ran.
  assert 1e-4 < error < 0.05, error


@pytest.mark.parametrize("name", sorted(SPECS))
def test_bfloat16_convolutions_run_in_bfloat16_norms_softmax_and_head_in_float32(name):
  model, params = _params(name, dtype="bfloat16")
  assert set(_floats(params)) == {jnp.dtype(jnp.float32)}  # parameters stay float32
  jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, *_args(name), train=False))(params)
  convs = _dtypes(jaxpr, "conv_general_dilated")
  # Every convolution computes in bf16 except the output layer (one float32 conv).
  assert convs.count(jnp.dtype(jnp.bfloat16)) == len(convs) - 1 >= 3, convs
  assert convs[-1] == jnp.float32
  # Norm statistics and the attention softmax: every reduction and exp in float32.
  reductions = _dtypes(jaxpr, "reduce_sum") + _dtypes(jaxpr, "reduce_max")
  assert reductions and set(reductions) == {jnp.dtype(jnp.float32)}, reductions
  if name == "unet":
    assert set(_dtypes(jaxpr, "exp")) == {jnp.dtype(jnp.float32)}  # softmax, time embedding
    # the attention's projections (dot_general) do run in bf16
    assert jnp.dtype(jnp.bfloat16) in _dtypes(jaxpr, "dot_general")
  assert jaxpr.out_avals[0].dtype == jnp.float32


def test_unknown_dtype_is_a_config_error():
  config = config_lib.load(tiny_spec("flow"), ["model.dtype=float64"])
  with pytest.raises(ConfigError, match="float64.*bfloat16"):
    translators.build(config)
  config = config_lib.load(tiny_spec("flow"), ["model.dtype=bfloat16", "model.remat=true"])
  config_lib.validate(config)  # declared in models.OPTIONS: accepted, and described
  assert "compute dtype" in config_lib.meaning(config, "model.dtype")
  assert "backward" in config_lib.meaning(config, "model.remat")


# --- remat -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["unet", "resnet"])
def test_remat_same_loss_and_gradients_and_a_remat_primitive(name):
  # One level keeps the two compilations short; it still has residual blocks (with dropout:
  # remat must replay the same mask) and attention blocks.
  kwargs = ({"dropout": 0.1, "channel_mult": (1,), "attention_levels": (0,)}
            if name == "unet" else {})
  plain, params = _params(name, **kwargs)
  rematted = models.build(name, **{**SPECS[name], **kwargs, "remat": True})
  args = _args(name)
  target = np.linspace(-1, 1, BATCH * SIZE * SIZE, dtype=np.float32).reshape(
      BATCH, SIZE, SIZE, 1)

  def loss(model):
    def f(p):
      out = model.apply({"params": p}, *args, train=True, rngs={"dropout": jax.random.key(3)})
      return jnp.mean((out - target) ** 2)
    return jax.value_and_grad(f)

  # The same parameter tree: a checkpoint moves between remat and no remat.
  shapes = jax.eval_shape(lambda: rematted.init(jax.random.key(0), *args, train=False))
  assert jax.tree.map(lambda a: a.shape, shapes["params"]) == jax.tree.map(np.shape, params)
  kinds = {model.remat: {e.primitive.name for e in _eqns(jax.make_jaxpr(loss(model))(params).jaxpr)}
           for model in (plain, rematted)}
  assert kinds[True] & REMAT_PRIMITIVES and not kinds[False] & REMAT_PRIMITIVES

  # XLA:CPU expands remat's optimisation barriers before its CSE, which then merges the
  # recomputation back into the forward pass (remat undone); keeping the pass off compiles
  # what GPUs and TPUs run: a real recomputation, and less memory.
  plain_c = jax.jit(loss(plain)).lower(params).compile()
  remat_c = jax.jit(loss(rematted)).lower(params).compile(compiler_options=KEEP_REMAT)
  (value, grads), (value_r, grads_r) = plain_c(params), remat_c(params)
  assert float(value) > 0
  # The recomputed forward is the same arithmetic; only XLA's fusion order may differ.
  np.testing.assert_allclose(value_r, value, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale),
               grads, grads_r)
  memory = [c.memory_analysis() for c in (plain_c, remat_c)]
  if all(m is not None for m in memory):
    assert memory[1].temp_size_in_bytes < 0.8 * memory[0].temp_size_in_bytes, [
        m.temp_size_in_bytes for m in memory]


# --- translators -------------------------------------------------------------------------

def _bf16_config(method):
  return config_lib.load(tiny_spec(method), ["model.dtype=bfloat16"])


def _tiny_batch(seed=0):
  rng = np.random.default_rng(seed)
  shape = (4, 32, 32, 1)  # the tiny phantom's slices, fewer of them
  return {"source": jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32),
          "target": jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)}


@pytest.mark.parametrize("method", config_lib.METHODS)
def test_every_translator_train_step_computes_in_bfloat16_with_float32_params_and_loss(method):
  # Traced, not compiled: the jaxpr says which dtype each convolution runs in.
  translator = translators.build(_bf16_config(method))
  batch, key = _tiny_batch(), jax.random.key(1)
  state = jax.eval_shape(translator.init, jax.random.key(0), batch)
  assert set(_floats(state)) == {jnp.dtype(jnp.float32)}  # params, EMA, Adam moments, pools
  convs = _dtypes(jax.make_jaxpr(translator.train_step)(state, batch, key),
                  "conv_general_dilated")
  # Generators and discriminators alike compute in bf16; only their output layers (in the
  # forward and the backward pass) run in float32: a small fraction of the convolutions
  # (4-16 % at the tiny sizes; a float32 discriminator would make it 37-44 %).
  bf16 = convs.count(jnp.dtype(jnp.bfloat16))
  assert bf16 > 0.75 * len(convs), (bf16, len(convs))
  new_state, metrics = jax.eval_shape(translator.train_step, state, batch, key)
  assert set(_floats(new_state)) == {jnp.dtype(jnp.float32)}
  assert {m.dtype for m in jax.tree.leaves(metrics)} == {jnp.dtype(jnp.float32)}  # the losses


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pix2pix", "cyclegan"])
def test_bfloat16_gan_train_steps_run_and_stay_finite(method):
  # The methods with their own train_step and a discriminator. flow runs the shared
  # train_step in test_tiny_experiment_trains_in_bfloat16; regression, diffusion and the
  # bridges share it and its network, and differ only in float32 loss arithmetic.
  translator = translators.build(_bf16_config(method))
  batch = _tiny_batch()
  # an rbg key: its initialisers compile in a quarter of threefry's time
  state = jax.jit(translator.init)(jax.random.key(0, impl="rbg"), batch)
  step = jax.jit(translator.train_step)
  for i in range(2):
    state, metrics = step(state, batch, jax.random.key(i))
  assert all(math.isfinite(float(v)) for v in metrics.values())
  assert set(_floats(state)) == {jnp.dtype(jnp.float32)} and int(state.step) == 2


@pytest.mark.parametrize("method", ["flow", "diffusion", "bridge"])
def test_samplers_keep_their_state_in_float32(method):
  translator = translators.build(_bf16_config(method))
  batch = _tiny_batch()
  params = jax.eval_shape(translator.init_params, jax.random.key(0), batch)
  jaxpr = jax.make_jaxpr(lambda p: translator.sample(p, batch["source"], jax.random.key(1), 3))(
      params)
  loops = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name in ("scan", "while")]
  carried = [v.aval.dtype for e in loops for v in e.outvars
             if jnp.issubdtype(v.aval.dtype, jnp.floating)]
  assert carried and set(carried) == {jnp.dtype(jnp.float32)}, carried
  # ...while the network inside the loop does run in bf16
  assert jnp.dtype(jnp.bfloat16) in _dtypes(jaxpr, "conv_general_dilated")


@pytest.mark.slow
def test_tiny_experiment_trains_in_bfloat16(tmp_path):
  config = _bf16_config("flow")  # what --config.model.dtype=bfloat16 gives
  summary = train.train_and_evaluate(config, str(tmp_path))
  logged = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
  losses = [row["loss"] for row in logged if row["split"] == "train"]
  assert losses and all(math.isfinite(v) for v in losses)
  assert max(r["step"] for r in logged if r["split"] == "train") == 6
  assert all(math.isfinite(v) for v in summary["model"].values())
  saved = json.load(open(os.path.join(tmp_path, "config.json")))
  assert saved["model"]["dtype"] == "bfloat16"
