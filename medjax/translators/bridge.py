"""Diffusion bridges from the source image to the target: sampling starts from the source.

Both bridges here are a Brownian bridge pinned at the target x0 (t = 0) and the source y
(t = 1), run on a clock m(t) rising from 0 to 1, with peak variance v_max at m = 1/2:

    x_t = (1 - m_t) x0 + m_t y + √(4 v_max m_t (1 - m_t)) · ε

  brownian  BBDM (Li et al. 2023): m_t = t, v_max = 1/2 (their s = 1); the network predicts
            the residual x_t - x0 under an L1 loss.
  i2sb      I2SB (Liu et al. 2023): m_t = σ²_t / σ²_1, the normalised cumulative of their
            symmetric β(t), small v_max; the network predicts (x_t - x0) / σ_t, σ²_t = 4 v_max m_t,
            under an L2 loss.

Either prediction gives x̂0. By the Markov property of the bridge, x_s given x_t and x0
(s < t) is the bridge from x0 to x_t, whatever y was:

    q(x_s | x_t, x0) = N(x0 + (m_s/m_t)(x_t - x0),  4 v_max m_s (m_t - m_s)/m_t)

which is both BBDM's and I2SB's posterior. The sampler takes S steps evenly spaced in t,
from x_1 = y down to x̂0, with the DDIM-style generalisation (η = 1 draws from the posterior
above, as BBDM and I2SB do; η = 0 is deterministic):

    x_s = (1 - m_s) x̂0 + m_s y + √(var_s - σ²) ε̂ + σ z,   σ² = η² · posterior variance,

ε̂ being the noise that x_t implies. One network evaluation per step: NFE = S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medjax import any2any, modalities
from medjax.translators import base, latent

BRIDGES = ("brownian", "i2sb")
T_MIN = 1e-3  # I2SB's prediction divides by σ_t, which vanishes at t = 0


def i2sb_clock(t, beta_min: float = 1e-4, beta_max: float = 3e-4):
  """m(t) = ∫_0^t β / ∫_0^1 β for I2SB's symmetric β: √β rises linearly to the middle, then
  mirrors. Only the ratio β_max/β_min shapes the clock; `bridge_variance` sets the scale."""
  # I2SB ramps √β from √β_min to √β_max over all steps but keeps only the first half, so
  # the peak, at t = 1/2, is halfway up the ramp.
  a, b = np.sqrt(beta_min), (np.sqrt(beta_max) - np.sqrt(beta_min)) / 2
  # ∫_0^u (a + b r)² dr over the rising half, in that half's own time u = 2t, expanded:
  # ((a + bu)³ - a³)/3b would cancel catastrophically in float32.
  rising = lambda u: a * a * u + a * b * u ** 2 + b * b * u ** 3 / 3
  half = rising(1.0)
  t = jnp.asarray(t, jnp.float32)
  up = rising(jnp.minimum(2 * t, 1.0))
  down = half - rising(jnp.clip(2 - 2 * t, 0.0, 1.0))
  return jnp.clip(jnp.where(t <= 0.5, up, half + down) / (2 * half), 0.0, 1.0)


class Bridge(base.Translator):
  name = "bridge"
  stochastic = True
  start_channels = 0
  options = {
      "bridge": ("brownian", "'brownian' (BBDM: m_t = t, L1 on the residual) | 'i2sb' "
                             "(I2SB's Schrödinger bridge clock, L2)"),
      "bridge_variance": (0.5, "peak variance v_max of the bridge at mid-way (BBDM: 0.5, "
                               "I2SB: about 0.034)"),
      "eta": (1.0, "posterior noise: 1 samples the bridge posterior (BBDM, I2SB), 0 is "
                   "deterministic"),
      **latent.OPTIONS,
  }

  def __init__(self, config):
    super().__init__(config)
    cfg = config.translator
    if cfg.bridge not in BRIDGES:
      raise ValueError(f"translator.bridge={cfg.bridge!r}; known: {BRIDGES}")
    if not 0.0 <= cfg.eta <= 1.0:
      raise ValueError(f"translator.eta={cfg.eta} must lie in [0, 1]")
    if not cfg.bridge_variance > 0:
      raise ValueError(f"translator.bridge_variance={cfg.bridge_variance} must be positive")
    self.bridge, self.eta = cfg.bridge, float(cfg.eta)
    self.v_max = float(cfg.bridge_variance)

  def clock(self, t):
    return jnp.asarray(t, jnp.float32) if self.bridge == "brownian" else i2sb_clock(t)

  def variance(self, m):
    return 4.0 * self.v_max * jnp.maximum(m * (1.0 - m), 0.0)

  def marginal(self, target, source, t, noise):
    """x_t of the bridge: the target at t = 0, the source at t = 1."""
    m = base.per_example(self.clock(t), target)
    return (1.0 - m) * target + m * source + jnp.sqrt(self.variance(m)) * noise

  def _start(self, source):
    if self.start_channels:  # a latent bridge: its conditioning starts with the start
      return source[..., :self.start_channels]
    count = len(any2any.modalities(self.config))
    if count:
      # Any-to-any: the bridge ends on the mean of the available modalities (the source
      # image of every direction at once; docs/design.md, "Any-to-any synthesis").
      images, available, _ = any2any.split(source, count)
      return (images.sum(-1, keepdims=True)
              / base.per_example(jnp.maximum(available.sum(-1), 1.0), images))
    # The bridge ends on the first modality's centre slice (with 2.5D context each modality
    # brings 2k+1 channels, z-k … z+k); all channels still condition the network.
    per_modality = source.shape[-1] // len(modalities.as_tuple(self.config.data.source))
    centre = per_modality // 2
    return source[..., centre:centre + 1]

  def _scale(self, m):
    """x_t - x0 = scale · prediction."""
    return 1.0 if self.bridge == "brownian" else jnp.sqrt(4.0 * self.v_max * m)

  def loss(self, params, batch, rng):
    target, source = batch["target"], batch["source"]
    rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
    t = jax.random.uniform(rng_t, target.shape[:1], minval=T_MIN, maxval=1.0)
    noise = jax.random.normal(rng_noise, target.shape)
    x_t = self.marginal(target, self._start(source), t, noise)
    goal = (x_t - target) / self._scale(base.per_example(self.clock(t), target))
    pred = self.apply(params, x_t, t, source, rng_drop, train=True)
    error = pred - goal
    return self.pixel_mean(jnp.abs(error) if self.bridge == "brownian" else error ** 2,
                           batch), {}

  def nfe(self, steps=None):
    return steps or self.config.translator.sample_steps

  def sample(self, params, source, rng, steps: int):
    """One draw: from x_1 = source down the S-step grid of t to x̂0."""
    ts = np.linspace(1.0, 0.0, steps + 1)
    start = self._start(source).astype(jnp.float32)  # the state x_t stays float32

    def step(x_t, inputs):
      t, s, key = inputs
      m_t, m_s = self.clock(t), self.clock(s)
      pred = self.apply(params, x_t, jnp.full(source.shape[:1], t), source, train=False)
      x0 = x_t - self._scale(m_t) * pred
      x0 = jnp.clip(x0, -1.0, 1.0) if self.clip_x0 else x0
      var_t, var_s = self.variance(m_t), self.variance(m_s)
      # At t = 1 the bridge is pinned (var_t = 0): no noise is implied and ε̂ = 0.
      eps = jnp.where(var_t > 0, (x_t - (1 - m_t) * x0 - m_t * start)
                      / jnp.sqrt(jnp.maximum(var_t, 1e-12)), 0.0)
      sigma2 = self.eta ** 2 * 4.0 * self.v_max * m_s * (m_t - m_s) / m_t
      x_s = (1 - m_s) * x0 + m_s * start + jnp.sqrt(jnp.maximum(var_s - sigma2, 0.0)) * eps
      return x_s + jnp.sqrt(sigma2) * jax.random.normal(key, x_t.shape, x_t.dtype), None

    x_0, _ = jax.lax.scan(step, start, (jnp.asarray(ts[:-1], jnp.float32),
                                        jnp.asarray(ts[1:], jnp.float32),
                                        jax.random.split(rng, steps)))
    return x_0
