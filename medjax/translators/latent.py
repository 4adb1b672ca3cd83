"""Latent translators: flow, diffusion or a bridge trained and sampled in a VAE's latent space.

`translator.latent_vae=RUN_DIR` (a `vae` run of the target modality) makes
`translators.build` wrap the pixel method (`wrap`): its loss and sampler run unchanged on
the frozen VAE's latents (Rombach et al. 2022's latent diffusion), on a grid `factor`
times smaller per axis, and `translate` decodes each draw (docs/design.md, "Autoencoders
and latent translators"):

  target  encode(target): the VAE's posterior mean over its running latent std, so
          unit-variance latents (the VAE's `encode`);
  source  brought to the latent grid by space-to-depth (C · factor^dims channels: all of
          its information, no second network); the bridge, which starts from the source,
          also gets the VAE's encoding of the source as its first channels, the bridge's
          start (BBDM encodes both domains with one autoencoder).

The VAE's parameters sit frozen in the state's `ema_params["first_stage"]`, beside the EMA
of the trained network in `ema_params["net"]` (docs/design.md, "Two-stage runs"); the
optimiser never sees them and the train step carries them through unchanged. `nfe` is
the pixel method's: the decoder runs once per draw after sampling and is not an
evaluation of the sampler's network. `reference` is decode(encode(target)), the VAE's
reconstruction ceiling the evaluation scores beside the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medjax import any2any, modalities
from medjax.translators import autoencoder, base

NET = base.NET
OPTIONS = {"latent_vae": ("", "a `vae` run directory: train and sample in its latent space, "
                              "decoding at the end ('' : pixel space)"),
           **base.FIRST_STAGE_OPTION}


def space_to_depth(x, factor: int):
  """(B, *S, C) → (B, *(S / factor), C · factor^dims): each factor^dims block of voxels
  becomes the channels of one latent position (pixel-unshuffle)."""
  batch, spatial, channels = x.shape[0], x.shape[1:-1], x.shape[-1]
  dims = len(spatial)
  shape = [batch]
  for n in spatial:
    shape += [n // factor, factor]
  x = x.reshape(*shape, channels)
  # (B, n1, f, n2, f, …, C) → (B, n1, n2, …, f, f, …, C)
  order = [0] + [1 + 2 * i for i in range(dims)] + [2 + 2 * i for i in range(dims)]
  x = x.transpose(*order, 1 + 2 * dims)
  return x.reshape(batch, *(n // factor for n in spatial), channels * factor ** dims)


class Latent:
  """Put before a pixel translator class in the MRO (`wrap`); see the module docstring."""

  first_stage_key = "latent_vae"
  clip_x0 = False  # latents are not in [-1, 1]: the samplers' x̂0 clip is for images
  has_ceiling = True

  def __init__(self, config):
    where = f"translator.latent_vae={config.translator.latent_vae}"
    if not config.translator.get(base.FIRST_STAGE):
      raise ValueError(f"{where}: its run has not been read (medjax train does it; in code, "
                       "call medjax.first_stage.embed(config) first)")
    stage = base.first_stage_config(config)
    if stage.translator.name != "vae":
      raise ValueError(f"{where}: a {stage.translator.name!r} run, not a 'vae' run")
    if any2any.enabled(config):
      raise ValueError(f"{where} with data.any2any: latent translators run one direction")
    if config.train.get("registration", "none") != "none":
      raise ValueError(f"{where} with train.registration: R would warp latents, not images")
    self.vae = autoencoder.VAE(stage)
    self.factor, self.out_channels = self.vae.factor, self.vae.latent_channels
    if self.name == "bridge":  # the bridge starts from the encoded source
      self.start_channels = self.out_channels
    super().__init__(config)

  def pixel_start(self, source):
    """The first source modality's own slice (2.5D context aside): what the VAE encodes
    as the bridge's start."""
    per_modality = source.shape[-1] // len(modalities.as_tuple(self.config.data.source))
    centre = per_modality // 2
    return source[..., centre:centre + 1]

  def condition(self, vae_params, source):
    """The source on the latent grid: space-to-depth, after the VAE's encoding of it for
    the bridge."""
    cond = space_to_depth(source, self.factor)
    if self.name == "bridge":
      cond = jnp.concatenate([self.vae.encode(vae_params, self.pixel_start(source)), cond], -1)
    return cond

  def latent_batch(self, vae_params, batch):
    """A batch as the pixel method sees it in latent space (no gradient into the VAE)."""
    out = {"target": self.vae.encode(vae_params, batch["target"]),
           "source": self.condition(vae_params, batch["source"])}
    if "mask" in batch:  # a latent position counts if any voxel of its block does
      out["mask"] = space_to_depth(batch["mask"], self.factor).max(-1, keepdims=True)
    return jax.lax.stop_gradient(out)

  def init(self, rng, batch):
    rng_vae, rng = jax.random.split(rng)
    # A random VAE of the right shapes; the trained one replaces it (attach_first_stage).
    vae_state = self.vae.init(rng_vae, {"source": batch["target"], "target": batch["target"]})
    vae_params = self.vae.inference_params(vae_state)
    params = self.init_params(rng, self.latent_batch(vae_params, batch))
    return base.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           ema_params={NET: params, base.FIRST_STAGE: vae_params},
                           opt_state=self.tx.init(params))

  def step_update(self, state, batch, rng):
    latent = self.latent_batch(state.ema_params[base.FIRST_STAGE], batch)
    return self.staged_step(state, self.loss, latent, rng)

  def translate(self, params, source, rng, *, steps=None, samples=1):
    """Mean and std of `samples` decoded latent draws, clipped to the image range."""
    steps = steps or self.config.translator.sample_steps
    vae_params = params[base.FIRST_STAGE]
    cond = self.condition(vae_params, source)

    def draw(key):
      latent = self.sample(params[NET], cond, key, steps)
      return jnp.clip(self.vae.decode(vae_params, latent), -1.0, 1.0)

    draws = jax.lax.map(draw, jax.random.split(rng, samples))
    return draws.mean(0), draws.std(0)

  def reference(self, params, target, rng=None, *, steps=None, samples=1):
    """decode(encode(target)): the best any sampler in this latent space can do."""
    vae_params = params[base.FIRST_STAGE]
    out = jnp.clip(self.vae.decode(vae_params, self.vae.encode(vae_params, target)), -1.0, 1.0)
    return out, jnp.zeros_like(out)


_WRAPPED: dict = {}


def wrap(cls):
  """The latent version of pixel translator class `cls` (flow, diffusion, bridge)."""
  if "latent_vae" not in cls.options:
    raise ValueError(f"translator.latent_vae with translator {cls.name!r}: latent "
                     "translators are flow, diffusion and bridge")
  if cls not in _WRAPPED:
    _WRAPPED[cls] = type(f"Latent{cls.__name__}", (Latent, cls), {})
  return _WRAPPED[cls]


__all__ = ["Latent", "OPTIONS", "space_to_depth", "wrap"]
