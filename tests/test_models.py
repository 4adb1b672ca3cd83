"""Backbones: shapes, closed-form properties at init, conditioning, receptive field, registry."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax.models import MODELS, PatchGAN, ResNetGenerator, UNet, build
from medjax.models.patchgan import receptive_field

TINY_UNET = dict(out_channels=1, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_levels=(1,), num_heads=2)
BATCH, SIZE = 2, 16


def _inputs(seed=0, size=SIZE):
  k_x, k_s, k_t = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k_x, (BATCH, size, size, 1))
  source = jax.random.normal(k_s, (BATCH, size, size, 2))
  t = jax.random.uniform(k_t, (BATCH,))
  return x, t, source


def _key(seed):
  # threefry's unrolled hashing dominates compile time of these small nets on CPU.
  return jax.random.key(seed, impl="unsafe_rbg")


def _jiggle(params, seed=1, scale=0.1):
  """Params with every leaf moved off its init, so zero-init branches stop hiding inputs."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: p + scale * rng.standard_normal(p.shape, dtype=np.float32), params)


@pytest.fixture(scope="module")
def unet():
  model = UNet(**TINY_UNET)
  x, t, source = _inputs()
  params = jax.jit(model.init, static_argnames="train")(
      _key(0), x, t, source, train=False)["params"]
  apply = jax.jit(lambda p, x, t, source: model.apply({"params": p}, x, t, source, train=False))
  return model, params, apply


def test_unet_shape_and_zero_output_at_init(unet):
  _, params, apply = unet
  x, t, source = _inputs()
  out = apply(params, x, t, source)
  assert out.shape == (BATCH, SIZE, SIZE, 1) and out.dtype == jnp.float32
  # the last conv is zero-initialised, so the output is exactly zero whatever the input.
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_unet_sgd_step_moves_output_off_zero(unet):
  _, params, apply = unet
  x, t, source = _inputs()
  target = source[..., :1]
  loss = lambda p: jnp.mean((apply(p, x, t, source) - target) ** 2)
  optimizer = optax.sgd(0.1)
  loss_before, grads = jax.jit(jax.value_and_grad(loss))(params)
  updates, _ = optimizer.update(grads, optimizer.init(params))
  stepped = optax.apply_updates(params, updates)
  out = apply(stepped, x, t, source)
  assert np.all(np.isfinite(out)) and np.abs(out).max() > 1e-4
  assert jnp.mean((out - target) ** 2) < loss_before


def test_unet_depends_on_t_source_and_state(unet):
  _, params, apply = unet
  params = _jiggle(params)
  x, t, source = _inputs()
  base = apply(params, x, t, source)
  assert np.abs(apply(params, x, t + 0.3, source) - base).max() > 1e-4
  assert np.abs(apply(params, x, t, source + 0.5) - base).max() > 1e-4
  assert np.abs(apply(params, x + 0.5, t, source) - base).max() > 1e-4
  # samples in a batch stay independent: changing sample 0 leaves sample 1 alone.
  moved = apply(params, x, t.at[0].add(0.3), source)
  np.testing.assert_allclose(moved[1], base[1], atol=1e-5)


def test_unet_regression_mode_without_state_or_time():
  model = UNet(**TINY_UNET)
  _, _, source = _inputs()
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), None, None, source, train=False))
  out = jax.eval_shape(lambda v: model.apply(v, None, None, source, train=False), variables)
  assert out.shape == (BATCH, SIZE, SIZE, 1)
  # the first conv sees the source channels only.
  assert variables["params"]["Conv_0"]["kernel"].shape[2] == source.shape[-1]


def test_unet_dropout_uses_rng_in_training_only(unet):
  model = UNet(**{**TINY_UNET, "dropout": 0.5})
  _, params, _ = unet  # dropout adds no parameters
  params = _jiggle(params)
  x, t, source = _inputs()

  @functools.partial(jax.jit, static_argnames="train")
  def run(seed, train):
    return model.apply({"params": params}, x, t, source, train=train,
                       rngs={"dropout": _key(seed)})

  assert np.abs(run(0, train=True) - run(1, train=True)).max() > 1e-4
  np.testing.assert_array_equal(run(0, train=False), run(1, train=False))


def test_unet_rejects_indivisible_size():
  model = UNet(**{**TINY_UNET, "channel_mult": (1, 2, 2)})  # needs H, W divisible by 4
  x, t, source = _inputs(size=18)
  with pytest.raises(ValueError, match="divisible by 4"):
    model.init(jax.random.key(0), x, t, source, train=False)


def test_resnet_generator_shape_and_tanh_range():
  model = ResNetGenerator(out_channels=1, channels=8, num_blocks=2)
  _, _, source = _inputs()
  # inputs far outside [-1, 1] would drive a missing tanh well past the bound.
  params = _jiggle(jax.jit(model.init, static_argnames="train")(_key(0), source, train=False))
  out = jax.jit(lambda p: model.apply(p, 50.0 * source, train=False))(params)
  assert out.shape == (BATCH, SIZE, SIZE, 1)
  assert np.all(np.abs(out) <= 1.0) and np.abs(out).max() > 0.5


def test_resnet_generator_rejects_indivisible_size():
  _, _, source = _inputs(size=18)
  with pytest.raises(ValueError, match="divisible by 4"):
    ResNetGenerator(out_channels=1, channels=8, num_blocks=1).init(
        jax.random.key(0), source, train=False)


def test_patchgan_output_shape():
  # pix2pix's 256x256 input gives a 30x30 logit map.
  image = jnp.zeros((1, 256, 256, 2))
  model = PatchGAN()
  out = jax.eval_shape(
      lambda: model.apply(model.init(jax.random.key(0), image, train=False), image, train=False))
  assert out.shape == (1, 30, 30, 1)


@pytest.mark.parametrize("num_layers, published", [(1, 16), (2, 34), (3, 70)])
def test_patchgan_receptive_field_formula(num_layers, published):
  # the 16x16, 34x34 and 70x70 PatchGANs of Isola et al. 2017.
  assert receptive_field(num_layers) == published


def test_patchgan_logits_see_exactly_their_70x70_patch():
  # without instance norm, whose statistics span the whole image, a logit depends on its
  # patch alone: an input pixel must move exactly the logits whose patch contains it.
  size, pixel = 128, (61, 40)
  model = PatchGAN(channels=4, num_layers=3, norm="none")
  image = jax.random.normal(jax.random.key(0), (1, size, size, 1))
  params = jax.jit(model.init, static_argnames="train")(_key(1), image, train=False)
  logits = jax.jit(lambda im: model.apply(params, im, train=False)[0, :, :, 0])
  changed = np.abs(logits(image.at[0, pixel[0], pixel[1], 0].add(10.0)) - logits(image)) > 0

  # five 4x4 convs, padding 1, strides 2,2,2,1,1: logit i covers input rows
  # [jump*i - offset, jump*i - offset + field - 1].
  field, jump, offset = 70, 8, 1 * (1 + 2 + 4 + 8 + 8)
  rows = np.arange(changed.shape[0])
  covers = lambda p: (jump * rows - offset <= p) & (p <= jump * rows - offset + field - 1)
  expected = covers(pixel[0])[:, None] & covers(pixel[1])[None, :]
  assert changed.shape == (14, 14) and 0 < expected.sum() < expected.size
  np.testing.assert_array_equal(changed, expected)


def test_registry_builds_every_model():
  assert set(MODELS) == {"unet", "resnet", "patchgan", "uvit"}
  assert isinstance(build("unet", **TINY_UNET), UNet)
  assert isinstance(build("resnet", out_channels=1), ResNetGenerator)
  assert isinstance(build("patchgan", num_layers=2), PatchGAN)


def test_registry_unknown_name_lists_known_models():
  with pytest.raises(ValueError, match="patchgan, resnet, unet"):
    build("vit")


def test_registry_unknown_argument_is_named():
  with pytest.raises(ValueError, match="chanels"):
    build("unet", out_channels=1, chanels=32)
  with pytest.raises(ValueError, match="out_channels"):
    build("resnet")
