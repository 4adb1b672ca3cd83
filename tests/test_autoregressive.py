"""The autoregressive translator: KV-cached sampling, causality, top-k and temperature, the
teacher-forced loss, learning and sampling on the phantom, bad configs."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import compare
from medjax import config as config_lib
from medjax import models
from medjax import run as run_lib
from medjax import train
from medjax.data import pipeline
from medjax.errors import ConfigError
from medjax.translators import autoregressive as ar
from medjax.translators import base

from conftest import ROOT
from test_translators import counting, jiggle

EXPERIMENT = ROOT / "experiments" / "phantom_ar.py"

pytestmark = pytest.mark.xdist_group("two_stage")  # one worker trains the first stages


class PoolTokenizer:
  """A stand-in VQ tokenizer with the vqvae translator's interface: the code of a
  factor×factor cell is the nearest of `codebook_size` intensity levels to its mean; its
  image is that level. Its one parameter (the levels) is what the AR run must carry
  frozen."""
  name = "vqvae"

  def __init__(self, codebook_size=8, factor=4, dims=2):
    self.codebook_size, self.factor = codebook_size, factor
    self.config = config_lib.ml_collections.ConfigDict({"model": {"dims": dims}})

  def init(self, rng, batch):
    levels = jnp.linspace(-1.0, 1.0, self.codebook_size)
    return base.TrainState(step=jnp.zeros((), jnp.int32), params=None,
                           ema_params={"levels": levels}, opt_state=None)

  def inference_params(self, state):
    return state.ema_params

  def tokens(self, params, images):
    b, h, w, _ = images.shape
    f = self.factor
    cells = images.reshape(b, h // f, f, w // f, f).mean((2, 4))
    return jnp.argmin(jnp.abs(cells[..., None] - params["levels"]), -1).astype(jnp.int32)

  def decode_tokens(self, params, tokens):
    cells = params["levels"][tokens]
    return jnp.repeat(jnp.repeat(cells, self.factor, 1), self.factor, 2)[..., None]


def ar_config(**translator):
  config = config_lib.load(f"{EXPERIMENT}:size=tiny,tokenizer=unused")
  config.unlock()
  config.translator.update(translator)
  config.train.total_steps = 12
  config.train.learning_rate = 3e-3
  return config


def build(dropout=None, **translator):
  """The tiny translator on the stand-in tokenizer; `dropout`: model.dropout if given
  (the experiment's own otherwise)."""
  config = ar_config(**translator)
  if dropout is not None:
    config.model.dropout = dropout
  return ar.Autoregressive(config, tokenizer=PoolTokenizer())


@pytest.fixture(scope="module")
def batch():
  config = ar_config()
  return jax.tree.map(jnp.asarray, next(iter(pipeline.train_dataset(config))))


@pytest.fixture(scope="module")
def jiggled(batch):
  """A tiny translator and its parameters moved off their init (a fresh decoder's
  zero-initialised branches would hide the prefix)."""
  translator = build()
  state = jax.jit(translator.init)(jax.random.key(0), batch)
  return translator, jiggle(state.params, scale=0.3)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 3)])
def test_kv_cached_sampler_equals_the_uncached_one(temperature, top_k, jiggled, batch):
  translator, params = jiggled
  translator.temperature, translator.top_k = temperature, top_k
  source = batch["source"][:2]
  cached = jax.jit(translator.sample_tokens)(params, source, jax.random.key(4))
  uncached = jax.jit(translator.sample_tokens_uncached)(params, source, jax.random.key(4))
  assert cached.shape == (2, 8, 8)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
  assert len(np.unique(np.asarray(cached))) > 1  # drawn, not a constant


def test_decoder_is_causal(jiggled, batch):
  translator, params = jiggled
  source = batch["source"][:1]
  tokens = jax.random.randint(jax.random.key(1), (1, 64), 0, 8)
  logits = jax.jit(translator.apply)(params, source, tokens)
  i = 20
  changed = jax.jit(translator.apply)(params, source, tokens.at[0, i].set((tokens[0, i] + 1) % 8))
  diff = np.abs(np.asarray(changed - logits))[0].max(-1)
  # Position j predicts token j from tokens < j: token i reaches positions > i only.
  np.testing.assert_array_equal(diff[:i + 1], 0.0)
  assert np.all(diff[i + 1:] > 0)


@pytest.mark.parametrize("stem", [0, 4])
def test_source_embedding_cells_disjoint_without_stem_overlapping_with_it(stem):
  """The patch embedding reads each token's factor×factor square alone. The stem's two
  3×3 stride-2 convolutions ('SAME': padded after) give token q the pixels 4q … 4q+6, so
  the pixel at (4, 4), the corner of cell (1, 1), reaches cells {0, 1}² (closed form)."""
  model = models.build("ar_transformer", codebook_size=8, factor=4, width=8, depth=1,
                       heads=2, stem=stem)
  source = jax.random.normal(jax.random.key(0), (1, 16, 16, 1))
  params = model.init(jax.random.key(1), source, jnp.zeros((1, 16), jnp.int32))
  embed = jax.jit(lambda s: model.apply(params, s, method="embed_source"))
  changed = np.abs(np.asarray(embed(source.at[0, 4, 4].add(1.0)) - embed(source)))
  reached = {divmod(i, 4) for i in np.flatnonzero(changed[0].max(-1) > 0)}
  assert reached == ({(1, 1)} if stem == 0 else {(0, 0), (0, 1), (1, 0), (1, 1)})
  if stem:
    with pytest.raises(ValueError, match="model.stem=4 needs .* factor that is a power of 2"):
      models.build("ar_transformer", codebook_size=8, factor=3, stem=4).init(
          jax.random.key(1), source[:, :15, :15], jnp.zeros((1, 25), jnp.int32))


def test_top_k_samples_only_the_k_best_and_temperature_zero_is_argmax():
  logits = jax.random.normal(jax.random.key(0), (6, 16)) * 2.0
  best = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  draw = jax.jit(jax.vmap(lambda key: ar.sample_token(logits, key, 5.0, 3)))
  draws = np.asarray(draw(jax.random.split(jax.random.key(1), 400)))  # (400, 6)
  for row in range(6):
    assert set(draws[:, row]) == set(best[row])  # all k reached at a high temperature
  argmax = np.asarray(logits).argmax(-1)
  np.testing.assert_array_equal(ar.sample_token(logits, jax.random.key(2), 0.0, 0), argmax)
  np.testing.assert_array_equal(ar.sample_token(logits, jax.random.key(2), 1e-6, 0), argmax)
  np.testing.assert_array_equal(ar.sample_token(logits, jax.random.key(2), 0.0, 1), argmax)


def test_teacher_forced_loss_is_the_cross_entropy_of_the_logits(jiggled, batch):
  translator, params = jiggled
  source, tokens = batch["source"][:2], jax.random.randint(jax.random.key(3), (2, 64), 0, 8)
  loss, metrics = translator.token_loss(params, source, tokens)
  logits = np.asarray(translator.apply(params, source, tokens), np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  picked = np.take_along_axis(logits, np.asarray(tokens)[..., None], -1)[..., 0]
  expected = np.mean(log_z - picked)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["perplexity"]), np.exp(expected), rtol=1e-5)
  accuracy = np.mean(logits.argmax(-1) == np.asarray(tokens))
  np.testing.assert_allclose(float(metrics["token_accuracy"]), accuracy)


def test_token_noise_corrupts_only_the_inputs_and_dropout_only_training(jiggled, batch):
  """translator.token_noise replaces about that fraction of the decoder's input tokens by
  random codes while the loss still scores the real tokens; model.dropout changes the
  training pass only; with neither, a training pass is the plain one."""
  _, params = jiggled
  plain = build(dropout=0.0)
  source = batch["source"][:2]
  tokens = jax.random.randint(jax.random.key(3), (2, 64), 0, 8)
  clean = plain.token_loss(params, source, tokens)[0]
  # neither regulariser: a keyed (training) pass is the unkeyed one, bit for bit
  assert plain.token_loss(params, source, tokens, jax.random.key(5))[0] == clean
  noisy = build(dropout=0.0, token_noise=0.5)
  seen = []
  original = noisy.apply
  noisy.apply = lambda p, s, inputs, *args, **kw: (seen.append(inputs),
                                                   original(p, s, inputs, *args, **kw))[1]
  loss = noisy.token_loss(params, source, tokens, jax.random.key(5))[0]
  inputs = np.asarray(seen[-1])
  changed = np.mean(inputs != np.asarray(tokens))  # a random code may draw the real one
  assert abs(changed - 0.5 * 7 / 8) < 4 * np.sqrt(0.44 * 0.56 / tokens.size)
  logits = np.asarray(original(params, source, jnp.asarray(inputs)), np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  picked = np.take_along_axis(logits, np.asarray(tokens)[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), np.mean(log_z - picked), rtol=1e-5)
  with pytest.raises(ValueError, match="token_noise"):
    build(token_noise=1.0)
  # dropout: the training pass depends on its key, the evaluation pass is the plain model's
  dropped = build(dropout=0.5)
  train_a = dropped.token_loss(params, source, tokens, jax.random.key(1))[0]
  train_b = dropped.token_loss(params, source, tokens, jax.random.key(2))[0]
  assert train_a != train_b and train_a != clean
  assert dropped.token_loss(params, source, tokens)[0] == clean
  # the train step draws its dropout (and noise) from the run's key folded with the step
  state = dropped.init(jax.random.key(0), batch).replace(params=params)
  losses = [float(dropped.train_step(state.replace(step=jnp.int32(step)), batch,
                                     jax.random.key(1))[1]["loss"]) for step in (0, 0, 1)]
  assert losses[0] == losses[1] != losses[2]
  cached = dropped.sample_tokens(params, source, jax.random.key(4))
  np.testing.assert_array_equal(cached, plain.sample_tokens(params, source,
                                                             jax.random.key(4)))


def test_train_steps_lower_the_loss_then_sample(batch):
  translator = build()
  state = jax.jit(translator.init)(jax.random.key(0), batch)
  frozen = jax.tree.map(np.asarray, state.ema_params[ar.FIRST_STAGE])
  loss = jax.jit(lambda params: translator.loss(params, batch, None)[0])
  before = float(loss(translator.inference_params(state) | {ar.NET: state.params}))
  step = jax.jit(translator.train_step, donate_argnums=0)
  for _ in range(translator.config.train.total_steps):
    state, metrics = step(state, batch, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"]))
  after = float(loss(translator.inference_params(state) | {ar.NET: state.params}))
  assert after < 0.75 * before, (before, after)
  # The tokenizer's part of the inference parameters is carried bit for bit.
  jax.tree.map(np.testing.assert_array_equal, frozen,
               jax.tree.map(np.asarray, state.ema_params[ar.FIRST_STAGE]))

  translate = counting(translator)
  params, source = translator.inference_params(state), batch["source"][:2]
  (mean, std), calls = translate(params, source, jax.random.key(2), steps=3, samples=2)
  (again, _), _ = translate(params, source, jax.random.key(2), steps=3, samples=2)
  assert calls == 2 * translator.nfe(3) == 2 * (64 + 1)  # 8×8 tokens + one encoder pass
  np.testing.assert_array_equal(np.asarray(mean), np.asarray(again))
  assert mean.shape == std.shape == (2, 32, 32, 1)
  assert np.all(np.abs(np.asarray(mean)) <= 1.0) and np.all(np.asarray(std) >= 0.0)
  other, _ = translate(params, source, jax.random.key(3), steps=3, samples=2)
  assert not np.array_equal(np.asarray(other[0]), np.asarray(mean))


def test_bad_options_are_one_line_errors():
  with pytest.raises(ValueError, match="model.context=16"):
    config = ar_config()
    config.model.context = 16
    ar.Autoregressive(config, tokenizer=PoolTokenizer())
  with pytest.raises(ValueError, match="translator.top_k=9"):
    build(top_k=9)
  with pytest.raises(ValueError, match="translator.temperature"):
    build(temperature=-1.0)
  with pytest.raises(ValueError, match="model.dims=2 but the tokenizer .* works on dims=3"):
    ar.Autoregressive(ar_config(), tokenizer=PoolTokenizer(dims=3))


@pytest.fixture(scope="module")
def vq_run(tiny_vq_run):
  """A tiny trained vqvae run (tests/conftest.py): the tokenizer of the two-stage tests."""
  return tiny_vq_run[0]


def test_a_tiny_run_on_a_trained_tokenizer_keeps_it_frozen(vq_run, tiny_ar_run):
  workdir, summary = tiny_ar_run  # experiments/phantom_ar.py:size=tiny on vq_run
  assert np.isfinite(summary["model"]["psnr"]) and summary["nfe_per_sample"] == 64 + 1
  trained, tokenizer = run_lib.Run.load(workdir), run_lib.Run.load(vq_run)
  # The first stage sits in the run's inference parameters, bit for bit its own run's.
  jax.tree.map(np.testing.assert_array_equal,
               jax.tree.map(np.asarray, trained.params[ar.FIRST_STAGE]),
               jax.tree.map(np.asarray, tokenizer.params))
  assert trained.config.translator.first_stage.translator.name == "vqvae"


def test_bad_tokenizers_are_one_line_config_errors(vq_run, tmp_path):
  def error(tokenizer, **model):
    config = config_lib.load(f"{EXPERIMENT}:size=tiny,tokenizer={tokenizer}")
    config_lib.override(config, {f"model.{k}": v for k, v in model.items()})
    with pytest.raises(ConfigError) as caught:
      train.train_and_evaluate(config, str(tmp_path / "run"))
    assert "\n" not in str(caught.value)
    return str(caught.value)

  assert "translator.tokenizer=" in error(tmp_path / "missing") and "no such run" in error(
      tmp_path / "missing")
  flow = tmp_path / "flow_run"
  flow.mkdir()
  saved = json.loads((vq_run / "config.json").read_text())
  saved["translator"] = {"name": "flow"}
  (flow / "config.json").write_text(json.dumps(saved))
  assert "a 'flow' run, not a vqvae run" in error(flow)
  assert "(64 tokens) is longer than model.context=16" in error(vq_run, context=16)
  assert "translator.tokenizer is empty" in error("")


def test_compare_times_the_scored_path_both_orders_included(tiny_ar_run, tmp_path,
                                                            monkeypatch):
  """The experiment scores with mirror TTA, so `medjax compare`'s sampling time must cover
  both orders: each of its two timed passes translates the chunk and its mirror (H)."""
  workdir, _ = tiny_ar_run
  seen, real = [], compare.evaluate.translate_volume

  def spy(fn, params, volume, *args, **kwargs):
    seen.append(np.asarray(volume))
    return real(fn, params, volume, *args, **kwargs)

  def stop(*args, **kwargs):
    raise RuntimeError("scoring")
  monkeypatch.setattr(compare.evaluate, "translate_volume", spy)
  monkeypatch.setattr(compare.evaluate, "evaluate", stop)  # timing is all this test needs
  monkeypatch.setattr(compare.train, "train_and_evaluate", lambda config, target, mesh=None:
                      shutil.copytree(workdir, target, dirs_exist_ok=True))
  tokenizer = run_lib.Run.load(workdir).config.translator.tokenizer
  spec = f"{EXPERIMENT}:size=tiny,tokenizer={tokenizer}"
  with pytest.raises(RuntimeError, match="scoring"):
    compare.run_one(spec, str(tmp_path), compare.Budget(train_steps=6, sweep_steps=()))
  assert len(seen) == 4
  for plain, mirrored in (seen[:2], seen[2:]):
    np.testing.assert_array_equal(mirrored, np.flip(plain, 1))
