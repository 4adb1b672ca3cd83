"""The translator protocol (docs/design.md, "Translator protocol").

A translator is a handful of pure functions around one TrainState pytree:

  init(rng, example_batch)                      -> state
  train_step(state, batch, rng)                 -> (state, metrics)
  translate(params, source, rng, *, steps, samples) -> (mean, std)

The config is bound when the translator is built (`translators.build(config)`), so these
are plain functions of arrays the trainer can jit, shard and donate without knowing which
method it runs. `translate` always returns the mean and per-voxel standard deviation over
`samples` draws; a deterministic method returns a zero std.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from medjax import any2any, models
from medjax.models.conditioned import ModalityConditioned
from medjax.translators import registration as registration_lib


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  ema_params: Any  # what evaluation and sampling use (vdm, big_vision)
  opt_state: Any


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warm-up, cosine decay to 1 % and global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate,
      warmup_steps=min(train.warmup_steps, max(train.total_steps - 1, 0)),
      decay_steps=max(train.total_steps, 1), end_value=0.01 * train.learning_rate)
  return optax.chain(
      optax.clip_by_global_norm(train.grad_clip),
      optax.adamw(schedule, weight_decay=train.weight_decay))


def ema_update(ema, params, decay: float, step):
  """EMA with the usual warm-up: decay min(decay, (1+step)/(10+step)).

  Without it a 0.999 average would still hold 0.999^1500 ≈ 22 % of the (zero-output)
  initial network after a 1500-step CPU run.
  """
  decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return optax.incremental_update(params, ema, step_size=1.0 - decay)


class Translator:
  """Shared machinery: one network, one optimiser, EMA. Methods supply `loss` and `translate`."""

  name = "base"
  stochastic = False  # True: `translate` draws samples and its std is meaningful
  # The method's own `translator.*` keys: {key: (default, one-line meaning)}.
  options: dict = {}
  # Where the inference parameters sit in the train state: what a trained run restores.
  inference_path: tuple[str, ...] = ("ema_params",)
  # Two-stage runs (docs/design.md, "Two-stage runs"): the translator.* key naming the
  # frozen first-stage run, or None. Its parameters sit in ema_params[FIRST_STAGE].
  first_stage_key: str | None = None
  out_channels = 1  # the backbone's output channels (a latent translator: the latent's)
  clip_x0 = True  # samplers clip their clean estimate to the image range [-1, 1]
  # True: `reference` gives an image of the target the evaluation scores as `ceiling`
  # beside model and baseline (a latent translator: its VAE's reconstruction).
  has_ceiling = False

  @classmethod
  def all_options(cls) -> dict:
    """`translator.*` keys of this method, the sampling ones every method shares first."""
    if cls.stochastic:
      common = {"sample_steps": (8, "sampling steps per draw, used by evaluation and "
                                    "`medjax translate` unless told otherwise"),
                "samples": (4, "draws averaged per slice; their std is the uncertainty map")}
    else:
      common = {"sample_steps": (1, "one network evaluation per image (kept for a uniform "
                                    "interface)"),
                "samples": (1, "a deterministic method: one draw, zero std")}
    return {**common, **cls.options}

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model = self.build_model(config)
    self.tx = make_optimizer(config.train)
    # R of registration-aware training, or None (docs/design.md, "Registration-aware
    # training"); with None every step is exactly what it was before R existed.
    self.registration = registration_lib.build(config, self.name)
    if self.registration is not None:
      self.tx = registration_lib.optimizer(self.tx, config)

  def pixel_mean(self, values, batch):
    """The mean of a per-voxel loss term: over every voxel, or with `train.masked_loss`
    over the voxels of `batch['mask']` only (docs/design.md, "Translator protocol")."""
    masked = self.config.train.get("masked_loss", False)
    return masked_mean(values, batch["mask"] if masked else None)

  def build_model(self, config):
    model = config.model.to_dict()
    backbone = models.build(model.pop("name"), out_channels=self.out_channels, **model)
    count = len(any2any.modalities(config))
    # Any-to-any: the direction travels in the input channels (docs/design.md,
    # "Any-to-any synthesis"); a one-direction run's backbone is used as it is.
    return ModalityConditioned(backbone, count) if count else backbone

  # -- what a method supplies -------------------------------------------------
  def loss(self, params, batch, rng) -> tuple[jax.Array, dict]:
    raise NotImplementedError

  def sample(self, params, source, rng, steps: int):
    """One draw of the target given the source (stochastic methods)."""
    raise NotImplementedError

  def translate(self, params, source, rng, *, steps=None, samples=1):
    """Mean and per-voxel standard deviation of `samples` draws of `sample`.

    `lax.map` keeps one draw's activations in memory at a time, whatever K is.
    """
    steps = steps or self.config.translator.sample_steps
    draws = jax.lax.map(lambda key: self.sample(params, source, key, steps),
                        jax.random.split(rng, samples))
    draws = jnp.clip(draws, -1.0, 1.0)
    return draws.mean(0), draws.std(0)

  def reference(self, params, target, rng=None, *, steps=None, samples=1):
    """(mean, std) of what bounds the method from above, computed from the real target
    (`has_ceiling`; docs/design.md, "Evaluation protocols")."""
    raise NotImplementedError(f"{self.name} has no ceiling")

  def nfe(self, steps: int | None) -> int:
    """Network evaluations per sample for `steps` sampling steps."""
    return 1

  # -- shared ----------------------------------------------------------------
  def init_params(self, rng, batch):
    source, target = batch["source"], batch["target"]
    t = jnp.zeros(source.shape[:1], jnp.float32)
    return self.model.init(rng, target, t, source, train=False)["params"]

  def init(self, rng, batch) -> TrainState:
    params = registration_lib.init_params(self.registration, rng,
                                          self.init_params(rng, batch), batch)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=self.generator_params(params),
                      opt_state=self.tx.init(params))

  def generator_params(self, params):
    """The generator's part of the trained `params`: all of them, unless R trains beside it.
    The EMA, hence inference, holds this part only."""
    return params if self.registration is None else params[registration_lib.GENERATOR]

  def train_step(self, state: TrainState, batch, rng):
    """One optimisation step. `rng` is the run's key; this step's key is it folded with
    `state.step`, here and nowhere else, so a step's randomness depends on seed and step
    alone (docs/design.md, "The training loop", Randomness). Methods override
    `step_update`, not this."""
    return self.step_update(state, batch, jax.random.fold_in(rng, state.step))

  def step_update(self, state: TrainState, batch, rng):
    """The step proper, on this step's key: differentiate `loss`, update, EMA."""
    (loss, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(state.params, batch, rng)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, self.generator_params(params),
                     self.config.train.ema_decay, state.step)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    return state.replace(step=state.step + 1, params=params, ema_params=ema,
                         opt_state=opt_state), metrics

  def attach_first_stage(self, state, params):
    """`state` with the trained first stage's inference `params` in place of the random
    init `init` gave it: done once, when a two-stage run starts training."""
    if not self.first_stage_key:
      raise NotImplementedError(f"{self.name} has no first stage")
    return state.replace(ema_params={**state.ema_params, FIRST_STAGE: params})

  def staged_step(self, state, loss_fn, *args):
    """One step of a two-stage translator (docs/design.md, "Two-stage runs"):
    `loss_fn(params, *args) -> (loss, aux)` differentiated with respect to the trained
    network only, its EMA kept in ema_params['net'], the frozen first stage carried
    through bit for bit."""
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, *args)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params[NET], params, self.config.train.ema_decay, state.step)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params={NET: ema, FIRST_STAGE: state.ema_params[FIRST_STAGE]}
                         ), metrics

  def inference_params(self, state):
    for key in self.inference_path:
      state = getattr(state, key) if hasattr(state, key) else state[key]
    return state

  def apply(self, params, x, t, source, rng=None, *, train: bool):
    """The backbone's output, float32 whatever `model.dtype` computes in: losses and
    sampler states are float32 (docs/design.md, "Translator protocol")."""
    rngs = {"dropout": rng} if (train and rng is not None) else None
    out = self.model.apply({"params": params}, x, t, source, train=train, rngs=rngs)
    return out.astype(jnp.float32)


# The config key a two-stage translator declares beside its path key: `medjax train`
# copies the first-stage run's config into it (medjax/first_stage.py), and the same name
# holds the first stage's frozen parameters in the state's ema_params.
FIRST_STAGE = "first_stage"
NET = "net"  # beside it in ema_params: the EMA of the trained second-stage network
FIRST_STAGE_OPTION = {FIRST_STAGE: ({}, "the first-stage run's config, copied by medjax train "
                                        "(leave empty)")}


def first_stage_config(config) -> ml_collections.ConfigDict:
  """The first-stage run's config a two-stage config carries (to build its translator)."""
  return ml_collections.ConfigDict(config.translator[FIRST_STAGE].to_dict())


def per_example(values, like):
  """(B,) per-example scalars shaped to broadcast against `like`: (B, 1, 1, 1) for NHWC
  slices, (B, 1, 1, 1, 1) for NDHWC volumes."""
  return jnp.reshape(values, (values.shape[0],) + (1,) * (like.ndim - 1))


def masked_mean(values, mask=None):
  """The mean of `values`, or its mean over the voxels where `mask` (0/1, broadcast to
  `values`) is 1; an empty mask gives 0."""
  if mask is None:
    return jnp.mean(values)
  weights = jnp.broadcast_to(mask, values.shape)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)
