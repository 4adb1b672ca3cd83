"""Conditional flow matching (rectified flow) from Gaussian noise to the target.

With x0 ~ N(0, I) and x1 the target, the path is x_t = (1 - t) x0 + t x1 and its velocity
x1 - x0. The network v(x_t, t | source) regresses that velocity:

    loss = E || v(x_t, t | source) - (x1 - x0) ||²,   t ~ logit-normal(0, 1)

(logit-normal t puts the effort in mid-path, where the velocity is hardest to predict;
Esser et al. 2024). Sampling integrates dx/dt = v from t=0 to 1 with Euler or Heun steps;
the number of steps is chosen at sampling time.

With `train.registration = 'deformable'` (docs/design.md, "Registration-aware training")
the same loss is written in the clean prediction x̂1 = x_t + (1 - t) v, since
|v - (x1 - x0)|² = |x̂1 - x1|² / (1 - t)², and x̂1 is warped onto the target first:

    loss = E |warp(x̂1, R(x̂1, x1)) - x1|² / max(1 - t, 0.05)² + λ_smooth · smooth(R)

(the clamp keeps t → 1, where x̂1 ≈ x_t already, from blowing up R's gradient; with a
zero field it is the plain velocity loss for t ≤ 0.95.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medjax.translators import base, latent, registration

SAMPLERS = ("euler", "heun")
MIN_REMAINING = 0.05  # the floor of 1 - t in the registration-corrected loss


class Flow(base.Translator):
  name = "flow"
  stochastic = True
  options = {"sampler": ("euler", "ODE solver: 'euler' | 'heun' (2 NFE per step, last "
                                  "step Euler)"),
             **latent.OPTIONS}

  def __init__(self, config):
    super().__init__(config)
    if config.translator.sampler not in SAMPLERS:
      raise ValueError(f"translator.sampler={config.translator.sampler!r}; known: {SAMPLERS}")
    self.sampler = config.translator.sampler

  def loss(self, params, batch, rng):
    target, source = batch["target"], batch["source"]
    rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
    t = jax.nn.sigmoid(jax.random.normal(rng_t, target.shape[:1]))
    noise = jax.random.normal(rng_noise, target.shape)
    tb = base.per_example(t, target)
    x_t = (1.0 - tb) * noise + tb * target
    velocity = self.apply(self.generator_params(params), x_t, t, source, rng_drop, train=True)
    if self.registration is None:
      return self.pixel_mean((velocity - (target - noise)) ** 2, batch), {}
    clean = x_t + (1.0 - tb) * velocity
    warped, penalty, metrics = self.registration.correct(
        params[registration.REGISTRATION], clean, target)
    mse = self.pixel_mean((warped - target) ** 2 / jnp.maximum(1.0 - tb, MIN_REMAINING) ** 2,
                          batch)
    return mse + penalty, {"velocity_mse": mse, **metrics}

  def nfe(self, steps=None):
    steps = steps or self.config.translator.sample_steps
    return steps if self.sampler == "euler" else 2 * steps - 1

  def sample(self, params, source, rng, steps: int):
    """One draw: integrate the learned ODE from noise (t=0) to the target (t=1)."""
    # The state stays float32 between steps whatever model.dtype the network computes in.
    x = jax.random.normal(rng, (*source.shape[:-1], self.out_channels), jnp.float32)
    dt = 1.0 / steps
    velocity = lambda x, t: self.apply(
        params, x, jnp.full(source.shape[:1], t, jnp.float32), source, train=False)

    def euler(i, x):
      return x + dt * velocity(x, i * dt)

    def heun(i, x):
      t = i * dt
      v0 = velocity(x, t)
      x_euler = x + dt * v0
      # The last step stays Euler: Heun's corrector would need v at t=1, one extra NFE
      # for little gain (Karras et al. 2022).
      v1 = jax.lax.cond(i < steps - 1, lambda: velocity(x_euler, t + dt), lambda: v0)
      return x + 0.5 * dt * (v0 + v1)

    return jax.lax.fori_loop(0, steps, euler if self.sampler == "euler" else heun, x)
