"""pix2pix (Isola et al. 2017): a U-Net generator G against a conditional PatchGAN D.

D judges (source, image) pairs patch by patch; G is trained to fool it while staying
close to the paired target:

    L_G = L_adv,G(D(source, G(source))) + λ_L1 · |G(source) - target|₁
    L_D = L_adv,D(D(source, target), D(source, G(source)))

with the losses of `gan.py`. Both networks step together from the same forward pass.
With `train.registration = 'deformable'` the L1 term compares warp(G(source), R(G(source),
target)) with the target and adds λ_smooth · smooth(R) inside it (weighted by λ_L1 as the
L1 is); D still judges the unwarped G(source), as in RegGAN (docs/design.md,
"Registration-aware training").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medjax.translators import gan, registration


class Pix2Pix(gan.GANTranslator):
  name = "pix2pix"
  options = {**gan.GANTranslator.options,
             "lambda_l1": (100.0, "weight of the L1 term against the adversarial one")}

  def __init__(self, config):
    super().__init__(config)
    self.lambda_l1 = float(config.translator.lambda_l1)

  def generate(self, params, source, rng=None, *, train=False):
    # Like regression, the U-Net sees the source alone: no noisy state, no time.
    return self.apply(params, None, None, source, rng, train=train)

  def judge(self, disc_params, source, image):
    return self.discriminator.apply({"params": disc_params},
                                    jnp.concatenate([source, image], -1), train=True)

  def init(self, rng, batch) -> gan.GANState:
    rng_g, rng_d = jax.random.split(rng)
    source, target = batch["source"], batch["target"]
    params = self.model.init(rng_g, None, None, source, train=False)["params"]
    params = registration.init_params(self.registration, rng_g, params, batch)
    disc_params = self.discriminator.init(
        rng_d, jnp.concatenate([source, target], -1), train=False)["params"]
    return self.new_state(params, disc_params)

  def step_update(self, state: gan.GANState, batch, rng):
    source, target = batch["source"], batch["target"]

    def g_loss(params):
      fake = self.generate(self.generator_params(params), source, rng, train=True)
      adv = gan.generator_loss(self.gan_loss, self.judge(state.disc_params, source, fake))
      if self.registration is None:
        l1 = self.pixel_mean(jnp.abs(fake - target), batch)
        return adv + self.lambda_l1 * l1, (fake, adv, l1, {})
      warped, penalty, extra = self.registration.correct(
          params[registration.REGISTRATION], fake, target)
      l1 = self.pixel_mean(jnp.abs(warped - target), batch)
      return adv + self.lambda_l1 * (l1 + penalty), (fake, adv, l1, extra)

    def d_loss(disc_params, fake):
      return gan.discriminator_loss(self.gan_loss, self.judge(disc_params, source, target),
                                    self.judge(disc_params, source, fake))

    (loss, (fake, adv, l1, extra)), g_grads = jax.value_and_grad(g_loss, has_aux=True)(
        state.params)
    # D sees the generator's output as data: no gradient flows back into G from its loss.
    disc_loss, d_grads = jax.value_and_grad(d_loss)(state.disc_params,
                                                     jax.lax.stop_gradient(fake))
    metrics = {"loss": loss, "grad_norm": optax.tree.norm((g_grads, d_grads)),
               "g_adv": adv, "l1": l1, "d_loss": disc_loss, **extra}
    return self.update(state, g_grads, d_grads), metrics
