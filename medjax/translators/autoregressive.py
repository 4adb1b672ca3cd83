"""Autoregressive translation over VQ tokens (docs/design.md, "Autoregressive translator").

A frozen VQ autoencoder (a `vqvae` run, `translator.tokenizer`) turns the target image into
a grid of codebook indices; an encoder–decoder transformer (`models/ar_transformer.py`)
predicts them in raster order given the source:

    loss = −(1/N) Σ_i log p(t_i | t_<i, source)     (teacher forcing: all i in one pass)

Sampling draws t_0, t_1, … one at a time under `lax.scan`: each step runs the decoder on
the previous token alone, with an explicit self-attention KV cache (the source's
cross-attention keys/values computed once per draw), and draws from softmax(logits / T)
restricted to the `top_k` most likely codes; the tokenizer's decoder then turns the grid
into an image. K draws give the mean and std (`base.Translator.translate`).

Parameters (docs/design.md, "Two-stage runs"):
`TrainState.params` is the transformer alone; `ema_params` = {"net": its EMA,
"first_stage": the tokenizer's frozen inference parameters}, the inference parameters,
carried through every step bit for bit and never differentiated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from medjax import models
from medjax.models import ar_transformer
from medjax.translators import base

NET, FIRST_STAGE = base.NET, base.FIRST_STAGE


def sample_token(logits, key, temperature: float, top_k: int):
  """One code per row of `logits` (B, V): softmax(logits / temperature) over the top_k
  largest logits (0: all); temperature 0 takes the argmax."""
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def cross_entropy(logits, tokens):
  """Per-token −log softmax(logits)[token]: logits (…, V) float32, tokens (…) int."""
  return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[..., None],
                              axis=-1)[..., 0]


def image_sides(config) -> tuple[int, ...] | None:
  """The sides of the images the model sees, from the config alone: a 3D run's patch, a
  phantom's slice; None for 2D shards (their recipe's grid: known once sampled, and
  checked against model.context when the trainer first builds the state)."""
  patch = tuple(config.data.get("patch", ()))
  if patch:
    return patch
  if config.data.kind == "phantom":
    return tuple(config.data.phantom.shape)[:2]
  return None


class Autoregressive(base.Translator):
  name = "autoregressive"
  stochastic = True
  first_stage_key = "tokenizer"
  options = {
      "tokenizer": ("", "the `vqvae` run directory (experiments/phantom_vae.py:kind=vq) "
                        "whose frozen encoder tokenises the target and whose decoder turns "
                        "sampled tokens into the image; copied into this run's parameters"),
      "temperature": (1.0, "sampling temperature of the token softmax (0: argmax)"),
      "top_k": (0, "sample among the k most likely codes only (0: all codes)"),
      "token_noise": (0.0, "fraction of the teacher-forced input tokens replaced by uniform "
                           "random codes while training (the predicted tokens stay the "
                           "real ones): the decoder learns to go on after a wrong draw"),
      **base.FIRST_STAGE_OPTION,
  }

  @classmethod
  def all_options(cls) -> dict:
    options = super().all_options()
    options["sample_steps"] = (1, "not used: a draw takes one decoder step per token (the "
                                  "image sides over the tokenizer's factor, multiplied)")
    return options

  def __init__(self, config, tokenizer=None):
    # `tokenizer`: the first-stage translator, for tests; else the config's frozen vqvae.
    self.tokenizer = tokenizer if tokenizer is not None else self.build_tokenizer(config)
    super().__init__(config)
    options = config.translator
    self.temperature, self.top_k = float(options.temperature), int(options.top_k)
    self.token_noise = float(options.token_noise)
    if not 0 <= self.token_noise < 1:
      raise ValueError(f"translator.token_noise={options.token_noise} must lie in [0, 1)")
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"translator.temperature={options.temperature} must be ≥ 0")
    if not 0 <= self.top_k <= self.tokenizer.codebook_size:
      raise ValueError(f"translator.top_k={self.top_k} must lie in [0, the codebook size "
                       f"{self.tokenizer.codebook_size}]")
    self.sides = image_sides(config)
    if self.sides is not None:  # else checked when the model first sees an image
      self.model.grid((1, *self.sides, 1))

  def build_tokenizer(self, config):
    from medjax import translators  # the registry (this package's __init__)
    if not config.translator.get("tokenizer", ""):
      raise ValueError("translator.tokenizer is empty: set it to a vqvae run directory "
                       "(train one with experiments/phantom_vae.py:kind=vq)")
    if not config.translator.get(FIRST_STAGE):
      raise ValueError(f"translator.tokenizer={config.translator.tokenizer} is not read yet "
                       "(first_stage.embed(config) checks and copies it)")
    return translators.build(base.first_stage_config(config))

  def build_model(self, config):
    model = config.model.to_dict()
    name = model.pop("name")
    if name != "ar_transformer":
      raise ValueError(f"translator 'autoregressive' needs model.name='ar_transformer', "
                       f"got {name!r}")
    dims = self.tokenizer.config.model.get("dims", 2)
    if model.get("dims", 2) != dims:
      raise ValueError(f"model.dims={model.get('dims', 2)} but the tokenizer "
                       f"(translator.tokenizer) works on dims={dims}")
    return models.build(name, codebook_size=self.tokenizer.codebook_size,
                        factor=self.tokenizer.factor, **model)

  # -- the network, one entry point (tests count its calls) ----------------------------------
  def apply(self, params, *args, method: str = "__call__", rngs=None):
    """The transformer's `method` on `params` (float32 logits); `rngs`: {"dropout": key}
    while training."""
    return self.model.apply({"params": params}, *args, method=method, rngs=rngs)

  def nfe(self, steps=None) -> int:
    """Network evaluations per draw: one encoder pass (the source's cross-attention keys
    and values) and one decoder step per token; `steps` does not apply (the token count
    is fixed by the image and the tokenizer's factor). The tokenizer's decoder, run once
    at the end, is not counted."""
    if self.sides is None:
      raise ValueError("the network evaluations of an autoregressive run on 2D shards are "
                       "known once it has sampled an image")
    return int(math.prod(self.model.grid((1, *self.sides, 1)))) + 1

  # -- training ------------------------------------------------------------------------------
  def init(self, rng, batch):
    rng_net, rng_tokenizer = jax.random.split(rng)
    # The tokenizer's random init here gives `jax.eval_shape` its shapes; the trainer
    # replaces it with the real run's parameters (attach_first_stage).
    frozen = self.tokenizer_init(rng_tokenizer, batch)
    tokens = self.target_tokens(frozen, batch["target"])
    params = self.model.init(rng_net, batch["source"], tokens)["params"]
    return base.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           ema_params={NET: params, FIRST_STAGE: frozen},
                           opt_state=self.tx.init(params))

  def tokenizer_init(self, rng, batch):
    """A random init of the tokenizer's inference parameters (an autoencoder's data is
    target → target)."""
    own = {**batch, "source": batch["target"]}
    return self.tokenizer.inference_params(self.tokenizer.init(rng, own))

  def target_tokens(self, first_stage, target):
    """The target's codes in raster order, (B, N) int32, from the frozen tokenizer."""
    return flat(jax.lax.stop_gradient(self.tokenizer.tokens(first_stage, target)))

  def token_loss(self, params, source, tokens, rng=None):
    """Teacher-forced mean cross-entropy of `tokens` (B, N); metrics: token accuracy and
    the perplexity exp(loss). With `rng` (training): model.dropout, and
    translator.token_noise of the decoder's input tokens replaced by random codes."""
    inputs, rngs = tokens, None
    if rng is not None:
      rng_noise, rng_dropout = jax.random.split(rng)
      rngs = {"dropout": rng_dropout}
      if self.token_noise:
        rng_where, rng_code = jax.random.split(rng_noise)
        noisy = jax.random.bernoulli(rng_where, self.token_noise, tokens.shape)
        codes = jax.random.randint(rng_code, tokens.shape, 0, self.tokenizer.codebook_size,
                                   tokens.dtype)
        inputs = jnp.where(noisy, codes, tokens)
    logits = self.apply(params, source, inputs, rng is not None, rngs=rngs)
    loss = jnp.mean(cross_entropy(logits, tokens))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == tokens)
    return loss, {"token_accuracy": accuracy, "perplexity": jnp.exp(loss)}

  def loss(self, params, batch, rng):
    """`params`: {"net", "first_stage"}, as the inference parameters."""
    tokens = self.target_tokens(params[FIRST_STAGE], batch["target"])
    return self.token_loss(params[NET], batch["source"], tokens)

  def step_update(self, state, batch, rng):
    tokens = self.target_tokens(state.ema_params[FIRST_STAGE], batch["target"])
    return self.staged_step(state, self.token_loss, batch["source"], tokens, rng)

  # -- sampling ------------------------------------------------------------------------------
  def sample_tokens(self, params, source, rng):
    """One draw of the token grid (B, *grid), raster order, KV-cached under `lax.scan`.
    Position i draws with key fold_in(rng, i), as `sample_tokens_uncached`."""
    grid = self.model.grid(source.shape)
    self.sides = tuple(source.shape[1:-1])
    batch, n = source.shape[0], math.prod(grid)
    context = self.apply(params, source, method="encode")  # memory, cross-attention k/v

    def step(carry, position):
      cache, previous = carry
      logits, cache = self.apply(params, previous, position, cache, context,
                                 method="decode_step")
      token = sample_token(logits, jax.random.fold_in(rng, position), self.temperature,
                           self.top_k)
      return (cache, token), token

    start = (ar_transformer.empty_cache(self.model, batch, n),
             jnp.full((batch,), self.tokenizer.codebook_size, jnp.int32))  # BOS
    _, tokens = jax.lax.scan(step, start, jnp.arange(n))
    return tokens.T.reshape(batch, *grid)

  def sample_tokens_uncached(self, params, source, rng):
    """The reference sampler (tests): the teacher-forced network on the whole prefix at
    every position, no cache; same keys, same draws."""
    grid = self.model.grid(source.shape)
    batch, n = source.shape[0], math.prod(grid)

    def step(position, tokens):
      logits = self.apply(params, source, tokens)[:, position]
      token = sample_token(logits, jax.random.fold_in(rng, position), self.temperature,
                           self.top_k)
      return tokens.at[:, position].set(token)

    tokens = jax.lax.fori_loop(0, n, step, jnp.zeros((batch, n), jnp.int32))
    return tokens.reshape(batch, *grid)

  def sample(self, params, source, rng, steps=None):
    """One draw of the target image: tokens (`sample_tokens`), then the tokenizer's
    decoder. `steps` does not apply."""
    tokens = self.sample_tokens(params[NET], source, rng)
    return self.tokenizer.decode_tokens(params[FIRST_STAGE], tokens).astype(jnp.float32)


def flat(tokens):
  """(B, *grid) → (B, N), raster (row-major) order."""
  return tokens.reshape(tokens.shape[0], -1)
