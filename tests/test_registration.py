"""Registration-aware training: the warp, the smoothness penalty, R, and the translators
that train with it (docs/design.md, "Registration-aware training")."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import scipy.ndimage

from medjax import config as config_lib
from medjax import translators, warp
from medjax.data import pipeline
from medjax.errors import ConfigError
from medjax.models.registration import RegistrationNet
from medjax.run import Run
from medjax.translators import registration as registration_lib

from conftest import tiny_config

RNG = np.random.default_rng(0)
IMAGES = {2: RNG.normal(size=(2, 12, 14, 3)).astype(np.float32),
          3: RNG.normal(size=(2, 8, 10, 12, 2)).astype(np.float32)}


def constant_field(image, shift):
  return jnp.broadcast_to(jnp.asarray(shift, jnp.float32), (*image.shape[:-1], len(shift)))


def interior(array, margin=3):
  spatial = array.ndim - 2
  return array[(slice(None),) + (slice(margin, -margin),) * spatial]


# -- warp ------------------------------------------------------------------------

@pytest.mark.parametrize("ndim", [2, 3])
def test_zero_displacement_is_the_identity(ndim):
  image = IMAGES[ndim]
  out = warp.warp(jnp.asarray(image), constant_field(image, (0.0,) * ndim))
  np.testing.assert_array_equal(np.asarray(out), image)


@pytest.mark.parametrize("ndim,shift", [(2, (1, -2)), (3, (2, -1, 1))])
def test_integer_displacement_is_a_roll_in_the_interior(ndim, shift):
  # out[p] = image[p + u]: a roll by -u.
  image = IMAGES[ndim]
  out = warp.warp(jnp.asarray(image), constant_field(image, shift))
  expected = np.roll(image, tuple(-s for s in shift), axis=tuple(range(1, ndim + 1)))
  np.testing.assert_array_equal(interior(np.asarray(out)), interior(expected))


@pytest.mark.parametrize("ndim,shift", [(2, (0.3, -1.6)), (3, (0.25, -0.7, 1.4))])
def test_fractional_displacement_is_linear_interpolation(ndim, shift):
  image = IMAGES[ndim]
  out = warp.warp(jnp.asarray(image), constant_field(image, shift))
  # scipy.ndimage.shift(x, s)[p] = x[p - s]; its 'nearest' mode is our border clamp.
  expected = scipy.ndimage.shift(image, (0, *(-s for s in shift), 0), order=1, mode="nearest")
  np.testing.assert_allclose(interior(np.asarray(out)), interior(expected), atol=1e-5)


def test_warp_gradients_reach_image_and_field_and_match_finite_differences():
  image = jnp.asarray(IMAGES[2])
  field = constant_field(image, (0.3, -0.4)) + 0.2 * jnp.asarray(
      RNG.normal(size=(*image.shape[:-1], 2)), jnp.float32)
  weights = jnp.asarray(RNG.normal(size=image.shape), jnp.float32)
  f = lambda img, u: jnp.sum(weights * warp.warp(img, u))
  g_image, g_field = jax.grad(f, argnums=(0, 1))(image, field)
  assert np.abs(np.asarray(g_image)).max() > 0 and np.abs(np.asarray(g_field)).max() > 0
  index, eps = (1, 5, 6, 1), 1e-2  # the interpolation is linear between voxels: exact FD
  fd = (f(image, field.at[index].add(eps)) - f(image, field.at[index].add(-eps))) / (2 * eps)
  np.testing.assert_allclose(float(g_field[index]), float(fd), rtol=1e-3, atol=1e-4)
  index = (0, 6, 7, 2)
  fd = (f(image.at[index].add(eps), field) - f(image.at[index].add(-eps), field)) / (2 * eps)
  np.testing.assert_allclose(float(g_image[index]), float(fd), rtol=1e-3, atol=1e-4)


# -- smoothness ------------------------------------------------------------------

@pytest.mark.parametrize("ndim", [2, 3])
def test_smoothness_of_constant_and_linear_fields(ndim):
  image = IMAGES[ndim]
  assert float(warp.smoothness(constant_field(image, (1.5,) * ndim))) == 0.0
  # u_0 = a·x along the last axis: the only non-zero difference is a, in 1 of ndim
  # components along 1 of ndim axes → a² / ndim², averaged as VoxelMorph's.
  a = 0.7
  ramp = a * jnp.arange(image.shape[-2], dtype=jnp.float32)
  field = jnp.zeros((*image.shape[:-1], ndim)).at[..., 0].set(ramp)
  assert float(warp.smoothness(field)) == pytest.approx(a * a / ndim ** 2, rel=1e-6)


# -- R ---------------------------------------------------------------------------

@pytest.mark.parametrize("ndim", [2, 3])
def test_registration_network_is_the_identity_at_init(ndim):
  image = jnp.asarray(IMAGES[ndim][..., :1])
  net = RegistrationNet(features=(4, 8))
  # jitted: one compile, not one per eager op
  params = jax.jit(net.init)(jax.random.key(0), image, image)
  field = jax.jit(net.apply)(params, image, 2 * image)
  assert field.shape == (*image.shape[:-1], ndim)
  np.testing.assert_array_equal(np.asarray(field), 0.0)
  np.testing.assert_array_equal(np.asarray(warp.warp(image, field)), np.asarray(image))


@pytest.fixture(scope="module")
def batch():
  data = iter(pipeline.train_dataset(tiny_config("regression")))
  return jax.tree.map(jnp.asarray, next(data))


def foreground_mean(field, target):
  """The field's mean over voxels where the target has an edge (elsewhere any shift of a
  flat region fits, and the field is free)."""
  edges = np.abs(np.diff(np.asarray(target), axis=2, append=np.asarray(target)[:, :, -1:]))
  weights = (edges > 0.02)[..., 0]
  return float((np.asarray(field) * weights).sum() / weights.sum())


def test_registration_loss_recovers_a_known_shift(batch):
  # The prediction is the aligned image; the target the same rolled by 2 voxels along W:
  # target[x] = image[x - 2], so warp(image, u)[x] = image[x + u] fits it at u_x = -2.
  image = batch["target"]
  target = jnp.roll(image, 2, axis=2)
  registration = registration_lib.Registration(smoothness=10.0)
  params = registration.init(jax.random.key(0), image)
  tx = optax.adam(3e-3)

  def loss(params):
    warped, penalty, _ = registration.correct(params, image, target)
    return jnp.mean(jnp.abs(warped - target)) + penalty

  @jax.jit
  def step(params, opt_state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, value

  opt_state, first = tx.init(params), float(loss(params))
  for _ in range(40):
    params, opt_state, value = step(params, opt_state)
  assert float(value) < 0.5 * first, (first, float(value))
  field = registration.displacement(params, image, target)
  assert foreground_mean(field[..., 1], target) == pytest.approx(-2.0, rel=0.5)
  assert abs(foreground_mean(field[..., 0], target)) < 0.5


# -- translators -----------------------------------------------------------------

def deformable(method="regression", **train):
  config = tiny_config(method)
  config.train.update({"registration": "deformable", "total_steps": 30, "learning_rate": 3e-3,
                       **train})
  return config


def test_none_is_bit_identical_to_no_key_and_to_a_plain_l1(batch):
  # An older config without the keys trains the same; and the loss is the plain L1.
  with_key = tiny_config("regression")
  without = ml_collections.ConfigDict(with_key.to_dict())
  for key in ("registration", "registration_smoothness", "registration_lr_scale"):
    del without.train[key]
  states, losses = [], []
  for config in (with_key, without):
    translator = translators.build(config)
    state = jax.jit(translator.init)(jax.random.key(0), batch)
    step = jax.jit(translator.train_step)
    run = []
    for _ in range(3):
      state, metrics = step(state, batch, jax.random.key(1))
      run.append(np.asarray(metrics["loss"]))
    states.append(state), losses.append(run)
  np.testing.assert_array_equal(losses[0], losses[1])
  jax.tree.map(np.testing.assert_array_equal, states[0], states[1])
  translator = translators.build(with_key)
  params = states[0].params
  assert jax.tree.structure(params) == jax.tree.structure(states[0].ema_params)
  pred = translator.model.apply({"params": params}, None, None, batch["source"], train=True)
  loss, aux = translator.loss(params, batch, jax.random.key(2))
  assert aux == {} and float(loss) == float(jnp.mean(jnp.abs(pred - batch["target"])))


@pytest.mark.parametrize("value,message", [
    ({"registration": "rigid"}, "train.registration='rigid'"),
    ({"registration_smoothness": -1.0}, "registration_smoothness"),
    ({"registration_lr_scale": 0.0}, "registration_lr_scale")])
def test_bad_registration_keys_are_config_errors(value, message):
  config = deformable(**value)
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config)
  with pytest.raises(ConfigError, match=message):
    translators.build(config)


def test_deformable_is_refused_for_methods_without_it():
  config = tiny_config("diffusion")
  config.train.registration = "deformable"
  with pytest.raises(ConfigError, match="not implemented for translator 'diffusion'"):
    config_lib.validate(config)


def test_deformable_regression_trains_on_shifted_targets(batch):
  # Targets misaligned by 2 voxels: the registration-corrected loss falls, R's params
  # move off zero, and the EMA (inference) holds the generator alone.
  batch = {**batch, "target": jnp.roll(batch["target"], 2, axis=2)}
  config = deformable()
  translator = translators.build(config)
  state = jax.jit(translator.init)(jax.random.key(0), batch)
  assert set(state.params) == {"generator", "registration"}
  assert jax.tree.structure(state.ema_params) == jax.tree.structure(state.params["generator"])
  step = jax.jit(translator.train_step, donate_argnums=0)
  losses = []
  for _ in range(config.train.total_steps):
    state, metrics = step(state, batch, jax.random.key(1))
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    losses.append(float(metrics["loss"]))
  assert {"l1", "reg_smoothness", "reg_displacement"} <= set(metrics)
  assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses
  assert float(metrics["reg_displacement"]) > 0.0
  pred, _ = translator.translate(translator.inference_params(state), batch["source"])
  assert pred.shape == batch["target"].shape


@pytest.mark.parametrize("method", ["flow", "pix2pix"])
def test_deformable_flow_and_pix2pix_step(method, batch):
  # R at init is the identity: the first step's image term is the plain one.
  config = deformable(method, total_steps=4)
  translator = translators.build(config)
  plain = translators.build(tiny_config(method))
  state = jax.jit(translator.init)(jax.random.key(0), batch)
  reference = jax.jit(plain.init)(jax.random.key(0), batch)
  jax.tree.map(np.testing.assert_array_equal, state.params["generator"], reference.params)
  step = jax.jit(translator.train_step)
  for _ in range(config.train.total_steps):
    state, metrics = step(state, batch, jax.random.key(1))
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  assert int(state.step) == config.train.total_steps
  assert jax.tree.structure(state.ema_params) == jax.tree.structure(reference.ema_params)


def test_deformable_run_loads_and_translates_with_the_generator_alone(tmp_path):
  from medjax import train
  config = deformable(total_steps=6)
  train.train_and_evaluate(config, str(tmp_path))
  run = Run.load(tmp_path)
  plain = translators.build(tiny_config("regression"))
  example = jax.tree.map(jnp.asarray, next(iter(pipeline.train_dataset(tiny_config("regression")))))
  expected = jax.eval_shape(plain.init, jax.random.key(0), example).ema_params
  assert jax.tree.structure(run.params) == jax.tree.structure(expected)
  source = example["source"][:4]
  mean, std = run.translate_fn()(run.params, source, jax.random.key(0))
  assert mean.shape == (4, *source.shape[1:3], 1) and np.all(np.isfinite(np.asarray(mean)))
  np.testing.assert_array_equal(np.asarray(std), 0.0)
