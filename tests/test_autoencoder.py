"""Autoencoders (vae, vqvae) and latent translators: the VQ bottleneck against numpy, the KL
term against a Monte Carlo estimate, training steps, 3D shapes, a latent flow run on a
trained VAE (frozen first stage, ceiling, nfe, determinism) and its bad configs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from medjax import config as config_lib
from medjax import first_stage, models, translators
from medjax.data import pipeline
from medjax.errors import ConfigError
from medjax.models import autoencoder as ae
from medjax.run import Run
from medjax.translators import autoencoder as ae_translators
from medjax.translators import latent as latent_lib

from conftest import ROOT
from test_translators import counting

VAE = ROOT / "experiments" / "phantom_vae.py"
LATENT = ROOT / "experiments" / "phantom_latent.py"
ONE_SAVE = {"checkpoint.every": 6}  # the tiny runs' 6 steps, one checkpoint

pytestmark = pytest.mark.xdist_group("two_stage")  # one worker trains the first stages


# -- the VQ bottleneck ---------------------------------------------------------

@pytest.mark.parametrize("normalize", [False, True])
def test_vq_indices_are_the_nearest_codes(normalize):
  rng = np.random.default_rng(0)
  z, codebook = rng.normal(size=(2, 3, 5, 4)), rng.normal(size=(7, 4))
  z_q, indices, _ = ae.vector_quantize(jnp.asarray(z), jnp.asarray(codebook),
                                       normalize=normalize)
  if normalize:
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    codebook = codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)
  distance = np.linalg.norm(z[..., None, :] - codebook, axis=-1)  # (2, 3, 5, 7)
  np.testing.assert_array_equal(np.asarray(indices), distance.argmin(-1))
  np.testing.assert_allclose(np.asarray(z_q), codebook[distance.argmin(-1)], atol=1e-6)
  np.testing.assert_allclose(np.asarray(ae.lookup(jnp.asarray(codebook), indices,
                                                  normalize=normalize)), np.asarray(z_q),
                             atol=1e-6)


def test_vq_straight_through_gradient_is_the_identity():
  rng = np.random.default_rng(1)
  z, codebook = jnp.asarray(rng.normal(size=(6, 3))), jnp.asarray(rng.normal(size=(4, 3)))
  weights = jnp.asarray(rng.normal(size=(6, 3)))
  through = lambda f: jax.grad(lambda z: jnp.sum(weights * f(z)))(z)
  plain = through(lambda z: ae.vector_quantize(z, codebook, normalize=False)[0])
  np.testing.assert_allclose(np.asarray(plain), np.asarray(weights), rtol=1e-6)
  normalized = through(lambda z: ae.vector_quantize(z, codebook)[0])
  np.testing.assert_allclose(np.asarray(normalized),
                             np.asarray(through(ae.l2_normalize)), rtol=1e-5, atol=1e-7)


def test_vq_losses_perplexity_and_dead_codes():
  codebook = np.eye(5, dtype=np.float32)
  chosen = np.array([0, 0, 1, 2, 2, 2])  # counts 2, 1, 3, 0, 0
  z = codebook[chosen] + 0.1 * np.eye(5, dtype=np.float32)[(chosen + 1) % 5]
  _, indices, terms = ae.vector_quantize(jnp.asarray(z), jnp.asarray(codebook),
                                         beta=0.25, normalize=False)
  np.testing.assert_array_equal(np.asarray(indices), chosen)
  p = np.array([2, 1, 3]) / 6
  np.testing.assert_allclose(float(terms["perplexity"]), np.exp(-np.sum(p * np.log(p))),
                             rtol=1e-6)
  assert float(terms["dead_codes"]) == 2
  # each vector is 0.1 off its code along one axis: mean squared error 0.01 / 5
  np.testing.assert_allclose(float(terms["commitment_loss"]), 0.002, rtol=1e-5)
  np.testing.assert_allclose(float(terms["loss"]), 1.25 * 0.002, rtol=1e-5)


def test_kl_term_matches_a_monte_carlo_estimate():
  rng = np.random.default_rng(2)
  mean, logvar = rng.normal(size=(2, 3)), rng.normal(size=(2, 3)) * 0.5
  got = float(ae_translators.kl_divergence(jnp.asarray(mean), jnp.asarray(logvar), voxels=10))
  # E_q[log q(z) - log p(z)], z ~ N(mean, e^logvar), per element, by sampling
  sd = np.exp(0.5 * logvar)
  z = mean + sd * rng.normal(size=(400_000, *mean.shape))
  per = np.mean(stats.norm.logpdf(z, mean, sd) - stats.norm.logpdf(z), axis=0)
  np.testing.assert_allclose(got, per.sum(-1).mean() / 10, rtol=0.02)


def test_3d_autoencoder_shapes():
  # shapes only (jax.eval_shape): nothing is compiled
  for channels, factor, codebook_size in (((8, 8, 8), 4, 16), ((8, 8, 8, 8), 8, 0)):
    model = models.build("autoencoder", out_channels=1, channels=channels,
                         latent_channels=3, codebook_size=codebook_size, dims=3)
    x = jax.ShapeDtypeStruct((2, 16, 16, 32, 1), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    encoded = jax.eval_shape(lambda p, x: model.apply(p, x, method="encode"), params, x)
    latent = (2, 16 // factor, 16 // factor, 32 // factor, 3)
    for part in (encoded if not codebook_size else (encoded,)):
      assert part.shape == latent
    assert jax.eval_shape(model.apply, params, x).shape == x.shape
  with pytest.raises(ValueError, match="divisible by 8"):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 12, 16, 16, 1),
                                                                       jnp.float32))


# -- autoencoders as translators ----------------------------------------------

@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_autoencoder_train_steps_lower_the_loss_and_translate_deterministically(kind):
  config = config_lib.load(f"{VAE}:kind={kind},size=tiny",
                           {"train.total_steps": 8, "train.learning_rate": 3e-3})
  translator = translators.build(config)
  batch = jax.tree.map(jnp.asarray, next(iter(pipeline.train_dataset(config))))
  state = jax.jit(translator.init)(jax.random.key(0), batch)
  step = jax.jit(translator.train_step)
  fixed = jax.jit(lambda params: translator.objective(params, batch, jax.random.key(5))[1])
  before = float(fixed(state.params))
  for _ in range(8):
    state, metrics = step(state, batch, jax.random.key(1))
  assert float(fixed(state.params)) < 0.6 * before, (before, float(fixed(state.params)))
  if kind == "vq":
    assert 1.0 <= float(metrics["perplexity"]) <= translator.codebook_size
    assert 0 <= float(metrics["dead_codes"]) < translator.codebook_size
  params = translator.inference_params(state)
  translate = jax.jit(translator.translate)
  mean, std = translate(params, batch["source"], jax.random.key(0))
  again, _ = translate(params, batch["source"], jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(mean), np.asarray(again))
  np.testing.assert_array_equal(np.asarray(std), 0.0)
  # translate is decode(encode(·)) through the public first-stage methods
  def first_stage(params, images):
    latents = translator.encode(params, images)
    out = {"latents": latents, "decoded": translator.decode(params, latents)}
    if kind == "vq":
      out["tokens"] = translator.tokens(params, images)
      out["from_tokens"] = translator.decode_tokens(params, out["tokens"])
    return out
  out = jax.jit(first_stage)(params, batch["target"])
  assert out["latents"].shape == (8, 8, 8, translator.latent_channels)
  np.testing.assert_allclose(np.asarray(mean), np.clip(np.asarray(out["decoded"]), -1, 1),
                             atol=1e-5)
  if kind == "kl":  # the running std, estimated from the posterior means of the batch
    assert 0.0 < float(params["latent_std"]) != 1.0
  else:
    assert out["tokens"].dtype == jnp.int32 and out["tokens"].shape == (8, 8, 8)
    np.testing.assert_allclose(np.asarray(out["from_tokens"]), np.asarray(out["decoded"]),
                               atol=1e-5)


def test_space_to_depth_keeps_every_voxel():
  x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  y = np.asarray(latent_lib.space_to_depth(jnp.asarray(x), 2))
  assert y.shape == (2, 2, 3, 12)
  # block (i, j) holds x[:, 2i + a, 2j + b, c] at channel (a·2 + b)·3 + c
  np.testing.assert_array_equal(y[:, 1, 2, (1 * 2 + 0) * 3 + 2], x[:, 3, 4, 2])
  np.testing.assert_array_equal(np.sort(y.ravel()), np.sort(x.ravel()))


# -- a latent flow run on a trained VAE -----------------------------------------

@pytest.fixture(scope="module")
def vae_run(tiny_vae_run):
  return tiny_vae_run


@pytest.fixture(scope="module")
def latent_run(tiny_latent_run):
  return tiny_latent_run


def test_latent_flow_trains_on_its_frozen_vae_and_reports_the_ceiling(vae_run, latent_run):
  (vae_dir, vae_summary), (workdir, summary) = vae_run, latent_run
  vae, run = Run.load(vae_dir), Run.load(workdir)
  assert run.config.translator.first_stage.translator.name == "vae"
  assert "(no description)" not in config_lib.describe(run.config)
  # the frozen first stage is the VAE run's, bit for bit, after training
  jax.tree.map(np.testing.assert_array_equal, run.params["first_stage"], vae.params)
  assert run.step == 6 and set(run.params) == {"net", "first_stage"}
  # the ceiling is the VAE's reconstruction of the same subjects' real target: the VAE
  # run's own evaluation (source = target) through another code path
  assert summary["nfe_per_sample"] == 2 and summary["samples"] == 2
  for key in ("mae", "psnr", "ssim"):
    np.testing.assert_allclose(summary["ceiling"][key], vae_summary["model"][key], rtol=1e-4)
    assert np.isfinite(summary["model"][key])
  with open(workdir / "eval" / "6" / "summary.json") as f:
    assert "ceiling" in json.load(f)
  with open(workdir / "eval" / "6" / "subjects.csv") as f:
    assert "ceiling_psnr" in f.readline()

  # its sampler: nfe counted at run time, deterministic for a key, 2D latents decoded
  translator = translators.build(run.config)
  translate = counting(translator)
  source = np.asarray(run.eval_volumes("val")[0].source[:4])
  (mean, std), calls = translate(run.params, source, jax.random.key(2), steps=3, samples=2)
  (again, _), _ = translate(run.params, source, jax.random.key(2), steps=3, samples=2)
  assert calls == 2 * translator.nfe(3) == 6
  np.testing.assert_array_equal(np.asarray(mean), np.asarray(again))
  assert mean.shape == std.shape == (4, *source.shape[1:3], 1)
  assert np.all(np.abs(np.asarray(mean)) <= 1.0) and np.all(np.asarray(std) >= 0)


def test_bad_latent_configs_are_one_line_errors(tmp_path):
  def refused(folder, match, target="t2w"):
    config = config_lib.load(f"{LATENT}:size=tiny,vae={folder},target={target}")
    with pytest.raises(ConfigError, match=match) as error:
      first_stage.embed(config)
    assert "translator.latent_vae=" in str(error.value) and "\n" not in str(error.value)

  refused(tmp_path / "missing", "no such run directory")
  for name, spec, match in (
      ("flow", f"{ROOT / 'experiments' / 'phantom.py'}:size=tiny", "a 'flow' run, not a vae"),
      ("vae_ct", f"{VAE}:size=tiny,target=ct", "it encodes ct images")):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(config_lib.to_json(config_lib.load(spec)))
    refused(tmp_path / name, match)
  # an autoencoder translator on another backbone
  config = config_lib.load(f"{VAE}:size=tiny")
  with config.unlocked():
    config.model = config_lib.model_config("unet")
  with pytest.raises(ConfigError, match="model.name='autoencoder'"):
    translators.build(config)
  with pytest.raises(ConfigError, match="data.source must be data.target"):
    translators.build(config_lib.load(f"{VAE}:size=tiny", ["data.source=t1w"]))
