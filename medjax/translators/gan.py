"""What pix2pix and CycleGAN share: adversarial losses, the discriminator, one update.

Generator(s) and discriminator(s) each have their own optax optimiser in one state
(magvit's habit); both gradients come from the same forward pass; the generator keeps an
EMA, which is what evaluation and translation use.

    lsgan  (Mao et al. 2017)  L_G = (D(fake) - 1)²,  L_D = ½[(D(real) - 1)² + D(fake)²]
    hinge                     L_G = -D(fake),        L_D = relu(1 - D(real)) + relu(1 + D(fake))
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from medjax import models
from medjax.translators import base

GAN_LOSSES = ("lsgan", "hinge")


class GANState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any  # generator(s)
  ema_params: Any
  opt_state: Any
  disc_params: Any  # discriminator(s)
  disc_opt_state: Any


def generator_loss(kind: str, fake_logits):
  fake_logits = jnp.asarray(fake_logits, jnp.float32)  # float32 under any model.dtype
  if kind == "lsgan":
    return jnp.mean((fake_logits - 1.0) ** 2)
  return -jnp.mean(fake_logits)


def discriminator_loss(kind: str, real_logits, fake_logits):
  real_logits = jnp.asarray(real_logits, jnp.float32)
  fake_logits = jnp.asarray(fake_logits, jnp.float32)
  if kind == "lsgan":
    return 0.5 * (jnp.mean((real_logits - 1.0) ** 2) + jnp.mean(fake_logits ** 2))
  return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


class GANTranslator(base.Translator):
  """A generator network against PatchGAN discriminator(s); one network evaluation per image."""

  options = {
      "gan_loss": ("lsgan", "adversarial loss: 'lsgan' | 'hinge'"),
      "discriminator": ({"channels": 32, "num_layers": 3, "norm": "instance"},
                        "the PatchGAN (keys as model 'patchgan')"),
  }

  def __init__(self, config):
    super().__init__(config)
    if config.translator.gan_loss not in GAN_LOSSES:
      raise ValueError(f"translator.gan_loss={config.translator.gan_loss!r}; known: {GAN_LOSSES}")
    self.gan_loss = config.translator.gan_loss
    # The discriminator computes in the generator's dtype and judges images of its rank:
    # one knob each, `model.dtype` and `model.dims`.
    self.discriminator = models.build("patchgan", dtype=config.model.get("dtype", "float32"),
                                      dims=config.model.get("dims", 2),
                                      **config.translator.discriminator.to_dict())
    self.disc_tx = base.make_optimizer(config.train)

  def new_state(self, params, disc_params, **extra) -> GANState:
    cls = extra.pop("state_class", GANState)
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               ema_params=self.generator_params(params),
               opt_state=self.tx.init(params), disc_params=disc_params,
               disc_opt_state=self.disc_tx.init(disc_params), **extra)

  def update(self, state, g_grads, d_grads, **changes):
    """Both optimisers' steps and the generator's EMA: the state after one train step."""
    updates, opt_state = self.tx.update(g_grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d_updates, disc_opt_state = self.disc_tx.update(d_grads, state.disc_opt_state,
                                                     state.disc_params)
    return state.replace(
        step=state.step + 1, params=params,
        ema_params=base.ema_update(state.ema_params, self.generator_params(params),
                                   self.config.train.ema_decay, state.step),
        opt_state=opt_state, disc_params=optax.apply_updates(state.disc_params, d_updates),
        disc_opt_state=disc_opt_state, **changes)

  def translate(self, params, source, rng=None, *, steps=None, samples=1):
    pred = jnp.clip(self.generate(params, source), -1.0, 1.0)
    return pred, jnp.zeros_like(pred)

  def generate(self, params, source):
    raise NotImplementedError
