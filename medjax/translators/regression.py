"""Direct regression: the U-Net maps source to target under an L1 loss.

The baseline every generative method has to beat: one network evaluation, no sampling,
and the conditional median as its answer. With `train.registration = 'deformable'` the
L1 is taken after warping the prediction onto the target (docs/design.md,
"Registration-aware training"):

    loss = |warp(pred, R(pred, target)) - target|₁ + λ_smooth · smooth(R(pred, target))
"""

from __future__ import annotations

import jax.numpy as jnp

from medjax.translators import base, registration


class Regression(base.Translator):
  name = "regression"

  def init_params(self, rng, batch):
    return self.model.init(rng, None, None, batch["source"], train=False)["params"]

  def _predict(self, params, source, rng=None, *, train):
    # No noisy state and no time: the U-Net sees the source alone.
    return self.apply(params, None, None, source, rng, train=train)

  def loss(self, params, batch, rng):
    pred = self._predict(self.generator_params(params), batch["source"], rng, train=True)
    if self.registration is None:
      return self.pixel_mean(jnp.abs(pred - batch["target"]), batch), {}
    warped, penalty, metrics = self.registration.correct(
        params[registration.REGISTRATION], pred, batch["target"])
    l1 = self.pixel_mean(jnp.abs(warped - batch["target"]), batch)
    return l1 + penalty, {"l1": l1, **metrics}

  def translate(self, params, source, rng=None, *, steps=None, samples=1):
    pred = jnp.clip(self._predict(params, source, train=False), -1.0, 1.0)
    return pred, jnp.zeros_like(pred)
