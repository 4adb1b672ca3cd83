"""Diffusion, bridge, pix2pix and CycleGAN: learning, samplers, schedules, network evaluations;
every translator on volumes (model.dims=3); the masked loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import translators
from medjax.data import pipeline
from medjax.translators import bridge as bridge_lib
from medjax.translators import cyclegan as cyclegan_lib
from medjax.translators import diffusion as diffusion_lib

from conftest import tiny_config


def method_config(method: str, **translator):
  """experiments/phantom.py's `method` at size=tiny (its translator keys, tiny networks),
  trained 16 steps at a higher learning rate."""
  config = tiny_config(method)
  config.translator.sample_steps = 2
  config.translator.update(translator)
  config.train.total_steps = 16  # the test's steps: the learning rate decays over them
  config.train.learning_rate = 3e-3
  return config


@pytest.fixture(scope="module")
def batch():
  data = iter(pipeline.train_dataset(tiny_config("flow")))
  return jax.tree.map(jnp.asarray, next(data))


def jiggle(params, seed=1, scale=0.05):
  """Params moved off their init, so zero-initialised output layers stop hiding the input."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def counting(translator):
  """Counts the network evaluations `translate` makes, at run time.

  The callback runs each time the compiled network does (inside scan / fori_loop / cond),
  so this counts evaluations, not traces."""
  calls = []
  name = "generate" if translator.name == "cyclegan" else "apply"
  network = getattr(translator, name)

  def counted(*args, **kwargs):
    out = network(*args, **kwargs)
    jax.debug.callback(lambda: calls.append(1))
    return out

  setattr(translator, name, counted)
  translate = jax.jit(translator.translate, static_argnames=("steps", "samples"))

  def run(*args, **kwargs):
    calls.clear()
    out = jax.block_until_ready(translate(*args, **kwargs))
    jax.effects_barrier()
    return out, len(calls)

  return run


@pytest.mark.parametrize("method", ["diffusion", "i2sb", "pix2pix", "cyclegan"])
def test_real_train_steps_lower_the_loss_then_sample(method, batch):
  config = method_config(method)
  translator = translators.build(config)
  state = jax.jit(translator.init)(jax.random.key(0), batch)
  step = jax.jit(translator.train_step, donate_argnums=0)
  # The denoising losses draw t and the noise afresh each step: compare them on fixed draws.
  keys = jax.random.split(jax.random.key(9), 4)
  fixed = jax.jit(lambda params: jnp.mean(jax.vmap(
      lambda key: translator.loss(params, batch, key)[0])(keys)))
  gan = hasattr(state, "disc_params")
  before = None if gan else float(fixed(state.params))
  losses = []
  for _ in range(config.train.total_steps):
    state, metrics = step(state, batch, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    losses.append(float(metrics["loss"]))
  assert int(state.step) == config.train.total_steps
  if gan:  # the generator's total loss, dominated by its L1 / cycle term
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4]), losses
  else:
    assert float(fixed(state.params)) < 0.75 * before, (before, float(fixed(state.params)))

  # Its sampler, on what it learned: deterministic for a key, exactly nfe(steps) network
  # evaluations per sample, finite, in range.
  translate = counting(translator)
  params = translator.inference_params(state)
  source = batch["source"][:4]
  samples = 2 if translator.stochastic else 1
  (mean, std), calls = translate(params, source, jax.random.key(2), steps=3, samples=samples)
  (again, _), _ = translate(params, source, jax.random.key(2), steps=3, samples=samples)
  assert calls == samples * translator.nfe(3) == samples * (3 if translator.stochastic else 1)
  np.testing.assert_array_equal(np.asarray(mean), np.asarray(again))
  assert mean.shape == std.shape == (4, *source.shape[1:3], 1)
  assert np.all(np.isfinite(mean)) and np.all(np.abs(np.asarray(mean)) <= 1.0)
  assert np.all(np.asarray(std) >= 0.0)
  if translator.stochastic:
    other, _ = translate(params, source, jax.random.key(3), steps=3, samples=samples)
    assert not np.array_equal(np.asarray(other[0]), np.asarray(mean))
  else:
    np.testing.assert_array_equal(np.asarray(std), 0.0)


@pytest.mark.parametrize("method,keys", [
    ("flow", {"sampler": "euler"}), ("flow", {"sampler": "heun"}),
    ("diffusion", {"sampler": "ddpm"}), ("bridge", {})])
def test_sampler_evaluates_the_network_nfe_times(method, keys, batch):
  config = method_config(method, **keys)
  translator = translators.build(config)
  params = translator.inference_params(jax.jit(translator.init)(jax.random.key(0), batch))
  translate = counting(translator)
  for steps, nfe in ((1, 1), (4, 7 if keys.get("sampler") == "heun" else 4)):
    _, calls = translate(params, batch["source"][:2], jax.random.key(0), steps=steps, samples=2)
    assert calls == 2 * translator.nfe(steps) == 2 * nfe


# -- diffusion ------------------------------------------------------------------

def test_cosine_schedule_matches_its_closed_form():
  T = 1000
  schedule = diffusion_lib.make_schedule("cosine", T)
  f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
  t = np.arange(1, T + 1)
  unclipped = schedule["betas"] < 0.999  # only the last few steps hit the cap
  assert unclipped[: T - 20].all()
  np.testing.assert_allclose(schedule["alpha_bar"][: T - 20], (f(t) / f(0))[: T - 20], rtol=1e-9)


def test_linear_schedule_matches_its_continuous_limit():
  # ∏(1 - β_s) ≈ exp(-Σβ_s) and Σβ over a linear ramp is β_0 n + (β_1 - β_0) n(n-1)/(2(T-1)).
  T = 1000
  schedule = diffusion_lib.make_schedule("linear", T)
  n = np.arange(1, T + 1)
  total = 1e-4 * n + (0.02 - 1e-4) * n * (n - 1) / (2 * (T - 1))
  np.testing.assert_allclose(schedule["betas"][[0, -1]], [1e-4, 0.02])
  np.testing.assert_allclose(np.log(schedule["alpha_bar"]), -total, rtol=0.02)
  assert 1e-5 < schedule["alpha_bar"][-1] < 1e-4  # Ho et al.: x_T is nearly pure noise


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_variance_is_gaussian_conditioning(name):
  # (x_{t-1}, x_t) given x0 are jointly Gaussian: Var x_{t-1} = 1 - ᾱ_{t-1},
  # Var x_t = 1 - ᾱ_t, Cov = √α_t (1 - ᾱ_{t-1}); condition x_{t-1} on x_t.
  s = diffusion_lib.make_schedule(name, 1000)
  alpha = 1.0 - s["betas"]
  var_prev, var_t = 1.0 - s["alpha_bar_prev"], 1.0 - s["alpha_bar"]
  conditional = var_prev - alpha * var_prev ** 2 / var_t
  np.testing.assert_allclose(s["posterior_variance"], conditional, rtol=1e-6, atol=1e-12)
  assert s["posterior_variance"][0] == 0.0


@pytest.fixture(scope="module")
def diffusion_setup(batch):
  made = {}

  def make(**keys):
    # one translator and one compiled sampler per setting, shared by the tests below
    key = tuple(sorted(keys.items()))
    if key not in made:
      translator = translators.build(method_config("diffusion", **keys))
      params = jiggle(jax.jit(translator.init)(jax.random.key(0), batch).params)
      made[key] = translator, jax.jit(translator.sample, static_argnums=3), params
    return made[key]
  return make


def test_ddim_with_eta_zero_is_deterministic(diffusion_setup, batch):
  source = batch["source"][:2]
  x_T = jax.random.normal(jax.random.key(7), (*source.shape[:-1], 1))
  for eta, same in ((0.0, True), (1.0, False)):
    _, sample, params = diffusion_setup(sampler="ddim", eta=eta)
    draws = [sample(params, source, jax.random.key(k), 5, x_T=x_T) for k in (1, 2)]
    assert np.array_equal(np.asarray(draws[0]), np.asarray(draws[1])) == same


def test_ddim_with_eta_one_is_ddpm(diffusion_setup, batch):
  # Two code paths: the DDPM posterior mean/variance and DDIM's generalised step.
  source = batch["source"][:2]
  _, ddpm, params = diffusion_setup(sampler="ddpm")
  _, ddim, _ = diffusion_setup(sampler="ddim", eta=1.0)
  x_T = jax.random.normal(jax.random.key(7), (*source.shape[:-1], 1))
  a = ddpm(params, source, jax.random.key(3), 5, x_T=x_T)
  b = ddim(params, source, jax.random.key(3), 5, x_T=x_T)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_predictions_recover_x0_and_eps(prediction, diffusion_setup, batch):
  # A network that returns the exact target of its parameterisation gives back x0 and ε.
  translator, _, params = diffusion_setup(prediction=prediction)
  target = batch["target"][:2]
  noise = jax.random.normal(jax.random.key(4), target.shape)
  t = 600
  a = float(translator.schedule["alpha_bar"][t])
  x_t = np.sqrt(a) * target + np.sqrt(1 - a) * noise
  exact = {"eps": noise, "x0": target, "v": np.sqrt(a) * noise - np.sqrt(1 - a) * target}
  translator._network = lambda *args, **kwargs: exact[prediction]
  x0, eps = translator.predict_x0_eps(params, x_t, t, batch["source"][:2])
  np.testing.assert_allclose(np.asarray(x0), np.asarray(target), atol=1e-4)
  np.testing.assert_allclose(np.asarray(eps), np.asarray(noise), atol=1e-3)


# -- bridges --------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bridge", "i2sb"])
def test_bridge_marginals_at_the_ends_are_target_and_source(kind, batch):
  translator = translators.build(method_config(kind))
  target, source = batch["target"], batch["source"]
  noise = jax.random.normal(jax.random.key(5), target.shape)
  ones = jnp.ones(target.shape[:1])
  np.testing.assert_array_equal(translator.marginal(target, source, 0 * ones, noise), target)
  np.testing.assert_allclose(translator.marginal(target, source, ones, noise), source, atol=1e-6)
  middle = translator.marginal(target, source, 0.5 * ones, noise)
  np.testing.assert_allclose(np.var(np.asarray(middle - (target + source) / 2)),
                             translator.v_max, rtol=0.1)


@pytest.mark.parametrize("kind", ["bridge", "i2sb"])
def test_bridge_sampling_starts_from_the_source(kind, batch):
  # The U-Net's last layer is zero at init: it predicts x̂0 = x_t, so the deterministic
  # sampler never leaves its starting point, which must be the source.
  config = method_config(kind, eta=0.0)
  translator = translators.build(config)
  params = jax.jit(translator.init)(jax.random.key(0), batch).params
  source = batch["source"][:2]
  mean, std = jax.jit(translator.translate, static_argnames=("steps", "samples"))(
      params, source, jax.random.key(0), steps=4, samples=2)
  np.testing.assert_allclose(np.asarray(mean), np.clip(np.asarray(source), -1, 1), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(std), 0.0)


def test_i2sb_clock_is_the_cumulative_of_its_discrete_betas():
  # I2SB's make_beta_schedule: √β linear from √1e-4 to √3e-4 over 1000 steps, first half
  # mirrored; m_n = Σ_{k<n} β_k / Σ β.
  betas = np.linspace(1e-2, np.sqrt(3e-4), 1000) ** 2
  betas = np.concatenate([betas[:500], betas[:500][::-1]])
  cumulative = np.concatenate([[0.0], np.cumsum(betas)]) / betas.sum()
  t = np.linspace(0, 1, 1001)
  np.testing.assert_allclose(np.asarray(bridge_lib.i2sb_clock(t)), cumulative, atol=2e-3)


# -- GANs -----------------------------------------------------------------------

def test_history_pool_fills_then_swaps():
  size = 4
  pool = jnp.zeros((size, 2, 2, 1))
  stack = lambda values: jnp.broadcast_to(
      jnp.asarray(values, jnp.float32)[:, None, None, None], (len(values), 2, 2, 1))
  images = stack([1, 2, 3])
  shown, pool, count = cyclegan_lib.query_pool(pool, jnp.int32(0), images, jax.random.key(0))
  np.testing.assert_array_equal(shown, images)  # while filling, D sees the new images
  assert int(count) == 3 and sorted(np.asarray(pool)[:, 0, 0, 0]) == [0, 1, 2, 3]
  fresh = stack(range(10, 74))
  shown, pool, count = cyclegan_lib.query_pool(pool, count, fresh, jax.random.key(1))
  assert int(count) == size
  shown = np.asarray(shown)[:, 0, 0, 0]
  assert shown[0] == 10 and np.asarray(pool)[3, 0, 0, 0] == 10  # the last free slot filled
  swapped = shown != np.arange(10, 74)
  assert 16 < swapped.sum() < 48  # about half are shown an older image instead
  assert set(shown[swapped].tolist()) <= {1.0, 2.0, 3.0}  # from before this batch, never empty
  assert set(np.asarray(pool)[:, 0, 0, 0].tolist()) <= {1.0, 2.0, 3.0} | set(range(10, 74))


def test_adversarial_losses_at_known_logits():
  from medjax.translators.gan import discriminator_loss, generator_loss
  real, fake = jnp.array([1.0, 0.5]), jnp.array([0.0, -2.0])
  # LSGAN: D ½[mean (r-1)² + mean f²] = ½[0.125 + 2]; G mean (f-1)² = (1 + 9)/2.
  assert float(discriminator_loss("lsgan", real, fake)) == pytest.approx(1.0625)
  assert float(generator_loss("lsgan", fake)) == pytest.approx(5.0)
  # hinge: D mean relu(1-r) + mean relu(1+f) = 0.25 + 0.5; G -mean f = 1.
  assert float(discriminator_loss("hinge", real, fake)) == pytest.approx(0.75)
  assert float(generator_loss("hinge", fake)) == pytest.approx(1.0)


# -- volumes (model.dims=3) and the masked loss ------------------------------------------

def volume_config(method: str, **train):
  """`method` at size=tiny on 3D patches: (B, D, H, W, C) = (2, 8, 16, 16, 1)."""
  config = tiny_config(method)
  config.model.dims = 3
  config.translator.update(sample_steps=1, samples=1)
  if "discriminator" in config.translator:
    config.translator.discriminator.num_layers = 1  # 3 layers need sides ≥ 24
  config.train.update(total_steps=3, **train)
  return config


def rbg_key(seed):
  # threefry's unrolled hashing is most of these tiny 3D nets' compile time on CPU.
  return jax.random.key(seed, impl="unsafe_rbg")


def volume_batch(seed=0):
  rng = np.random.default_rng(seed)
  shape = (2, 8, 16, 16, 1)
  return {"source": jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32),
          "target": jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32),
          "mask": jnp.asarray(rng.uniform(size=shape) < 0.4, jnp.float32)}


@pytest.mark.parametrize("method,registration", [
    ("regression", "deformable"), ("flow", "none"), ("diffusion", "none"),
    ("bridge", "none"), ("pix2pix", "none"), ("cyclegan", "none")])
def test_every_translator_trains_and_translates_volumes(method, registration):
  # Regression runs with R (3D registration-aware training); without it, in the masked
  # loss test.
  config = volume_config(method, registration=registration)
  translator = translators.build(config)
  batch = volume_batch()
  state = jax.jit(translator.init)(rbg_key(0), batch)
  step = jax.jit(translator.train_step, donate_argnums=0)
  for i in range(3):
    state, metrics = step(state, batch, rbg_key(i))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert int(state.step) == 3
  mean, std = jax.jit(translator.translate, static_argnames=("steps", "samples"))(
      translator.inference_params(state), batch["source"], rbg_key(5), steps=1,
      samples=1)
  assert mean.shape == std.shape == (2, 8, 16, 16, 1)
  assert np.all(np.isfinite(mean)) and np.all(np.abs(np.asarray(mean)) <= 1.0)


def random_params(translator, batch, seed=0):
  """Parameters of the translator's shapes drawn in numpy: no init to compile, and no
  zero-initialised layer hiding the input."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(translator.init, rbg_key(0), batch).params
  return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
                      shapes)


def test_masked_loss_is_the_mean_over_mask_voxels():
  batch = volume_batch(1)
  mask = np.asarray(batch["mask"], bool)
  # background at -1 outside the mask, as in real slices: the mask changes the mean.
  batch["target"] = jnp.where(batch["mask"] > 0, batch["target"], -1.0)
  target = np.asarray(batch["target"])
  # regression: the L1 over the mask's voxels, from the prediction by hand.
  translator = translators.build(volume_config("regression", masked_loss=True))
  params = random_params(translator, batch)
  loss = float(jax.jit(translator.loss)(params, batch, rbg_key(1))[0])
  pred = np.asarray(jax.jit(lambda p: translator._predict(p, batch["source"], train=True))(params))
  np.testing.assert_allclose(loss, np.abs(pred - target)[mask].mean(), rtol=1e-5)
  assert abs(loss - np.abs(pred - target).mean()) > 0.1  # the mask matters here
  # flow: the velocity MSE over the mask's voxels, at the loss's own draws of t and noise.
  translator = translators.build(volume_config("flow", masked_loss=True))
  params = random_params(translator, batch)
  rng = rbg_key(2)
  loss = float(jax.jit(translator.loss)(params, batch, rng)[0])
  rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
  t = np.asarray(jax.nn.sigmoid(jax.random.normal(rng_t, (2,))))
  noise = np.asarray(jax.random.normal(rng_noise, target.shape))
  x_t = (1 - t[:, None, None, None, None]) * noise + t[:, None, None, None, None] * target
  velocity = np.asarray(jax.jit(lambda p: translator.apply(
      p, x_t, t, batch["source"], rng_drop, train=True))(params))
  np.testing.assert_allclose(loss, ((velocity - (target - noise)) ** 2)[mask].mean(), rtol=1e-5)
