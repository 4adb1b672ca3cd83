"""pix2pix (Isola et al. 2017): a U-Net generator G against a conditional PatchGAN D.

D judges (source, image) pairs patch by patch; G is trained to fool it while staying
close to the paired target:

    L_G = L_adv,G(D(source, G(source))) + λ_L1 · |G(source) - target|₁
    L_D = L_adv,D(D(source, target), D(source, G(source)))

with the least-squares loss (Mao et al. 2017; L_G = (D(fake) - 1)², L_D = ½[(D(real) - 1)²
+ D(fake)²]) or the hinge loss (L_G = -D(fake), L_D = relu(1 - D(real)) + relu(1 + D(fake))).
Both networks step together from the same forward pass, each with its own optimiser; the
generator keeps an EMA, which is what evaluation uses. One network evaluation per image.
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
  if kind == "lsgan":
    return jnp.mean((fake_logits - 1.0) ** 2)
  return -jnp.mean(fake_logits)


def discriminator_loss(kind: str, real_logits, fake_logits):
  if kind == "lsgan":
    return 0.5 * (jnp.mean((real_logits - 1.0) ** 2) + jnp.mean(fake_logits ** 2))
  return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


def build_discriminator(config):
  return models.build("patchgan", **config.translator.discriminator.to_dict())


class Pix2Pix(base.Translator):
  name = "pix2pix"

  def __init__(self, config):
    super().__init__(config)
    if config.translator.gan_loss not in GAN_LOSSES:
      raise ValueError(f"translator.gan_loss={config.translator.gan_loss!r}; known: {GAN_LOSSES}")
    self.gan_loss = config.translator.gan_loss
    self.lambda_l1 = float(config.translator.lambda_l1)
    self.discriminator = build_discriminator(config)
    self.disc_tx = base.make_optimizer(config.train)

  def generate(self, params, source, rng=None, *, train):
    # Like regression, the U-Net sees the source alone: no noisy state, no time.
    return self.apply(params, None, None, source, rng, train=train)

  def judge(self, disc_params, source, image):
    return self.discriminator.apply({"params": disc_params},
                                    jnp.concatenate([source, image], -1), train=True)

  def init(self, rng, batch) -> GANState:
    rng_g, rng_d = jax.random.split(rng)
    source, target = batch["source"], batch["target"]
    params = self.model.init(rng_g, None, None, source, train=False)["params"]
    disc_params = self.discriminator.init(
        rng_d, jnp.concatenate([source, target], -1), train=False)["params"]
    return GANState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=self.tx.init(params), disc_params=disc_params,
                    disc_opt_state=self.disc_tx.init(disc_params))

  def train_step(self, state: GANState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    source, target = batch["source"], batch["target"]

    def g_loss(params):
      fake = self.generate(params, source, rng, train=True)
      adv = generator_loss(self.gan_loss, self.judge(state.disc_params, source, fake))
      l1 = jnp.mean(jnp.abs(fake - target))
      return adv + self.lambda_l1 * l1, (fake, adv, l1)

    def d_loss(disc_params, fake):
      return discriminator_loss(self.gan_loss, self.judge(disc_params, source, target),
                                self.judge(disc_params, source, fake))

    (loss, (fake, adv, l1)), g_grads = jax.value_and_grad(g_loss, has_aux=True)(state.params)
    # D sees the generator's output as data: no gradient flows back into G from its loss.
    disc_loss, d_grads = jax.value_and_grad(d_loss)(state.disc_params,
                                                     jax.lax.stop_gradient(fake))
    updates, opt_state = self.tx.update(g_grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d_updates, disc_opt_state = self.disc_tx.update(d_grads, state.disc_opt_state,
                                                     state.disc_params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm((g_grads, d_grads)),
               "g_adv": adv, "l1": l1, "d_loss": disc_loss}
    return state.replace(
        step=state.step + 1, params=params,
        ema_params=base.ema_update(state.ema_params, params, self.config.train.ema_decay,
                                   state.step),
        opt_state=opt_state, disc_params=optax.apply_updates(state.disc_params, d_updates),
        disc_opt_state=disc_opt_state), metrics

  def translate(self, params, source, rng=None, *, steps=None, samples=1):
    pred = jnp.clip(self.generate(params, source, train=False), -1.0, 1.0)
    return pred, jnp.zeros_like(pred)
