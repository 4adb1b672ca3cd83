"""Conditional denoising diffusion (DDPM, Ho et al. 2020) with the source concatenated.

A discrete chain of T steps with noise levels β_0..β_{T-1} and ᾱ_t = ∏_{s≤t} (1 - β_s):

    x_t = √ᾱ_t · target + √(1 - ᾱ_t) · ε,       ε ~ N(0, I),   t ~ U{0, …, T-1}

The network sees (x_t, t/T, source) and predicts ε, the target x0, or the velocity
v = √ᾱ_t ε - √(1 - ᾱ_t) x0 (Salimans & Ho 2022); the loss is the mean squared error of that
prediction. Any one of the three gives back both x̂0 and ε̂, which is all the samplers need.

Sampling runs S ≤ T steps on an evenly spaced sub-chain τ_S > … > τ_1 (chosen at sampling
time) and starts from pure noise. From t to the previous level p (ᾱ_p = 1 after the last):
  ddpm  ancestral: x_p ~ q(x_p | x_t, x̂0), the Gaussian posterior with mean
        (√ᾱ_p β'/(1-ᾱ_t)) x̂0 + (√(1-β') (1-ᾱ_p)/(1-ᾱ_t)) x_t and variance β'(1-ᾱ_p)/(1-ᾱ_t),
        where β' = 1 - ᾱ_t/ᾱ_p is the sub-chain's noise level;
  ddim  x_p = √ᾱ_p x̂0 + √(1 - ᾱ_p - σ²) ε̂ + σ z, σ = η √((1-ᾱ_p)/(1-ᾱ_t)) √β' (Song et al.
        2021): η = 0 is a deterministic ODE solver, η = 1 is the ancestral sampler again.
Each step is one network evaluation, so NFE = S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medjax.translators import base, latent

PREDICTIONS = ("eps", "x0", "v")
SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim")


def make_schedule(name: str, timesteps: int) -> dict[str, np.ndarray]:
  """β_t, ᾱ_t, ᾱ_{t-1} and the posterior variance β̃_t, float64 arrays of length T."""
  if name == "linear":
    # Ho et al.'s β from 1e-4 to 0.02 at T = 1000, rescaled so other T keep the same ᾱ path.
    scale = 1000.0 / timesteps
    betas = np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)
  elif name == "cosine":
    # Nichol & Dhariwal 2021: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2); β capped
    # at 0.999 so the last step does not divide by zero.
    f = lambda t: np.cos((t / timesteps + 0.008) / 1.008 * np.pi / 2) ** 2
    t = np.arange(timesteps + 1, dtype=np.float64)
    betas = np.minimum(1.0 - f(t[1:]) / f(t[:-1]), 0.999)
  else:
    raise ValueError(f"translator.schedule={name!r}; known: {SCHEDULES}")
  alpha_bar = np.cumprod(1.0 - betas)
  alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
  return {"betas": betas, "alpha_bar": alpha_bar, "alpha_bar_prev": alpha_bar_prev,
          "posterior_variance": betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)}


def sampling_timesteps(timesteps: int, steps: int) -> np.ndarray:
  """S evenly spaced chain indices from T-1 down to 0 (the sub-chain a sampler walks)."""
  if not 1 <= steps <= timesteps:
    raise ValueError(f"sampling steps must lie in 1..{timesteps}, got {steps}")
  return np.round(np.linspace(timesteps - 1, 0, steps)).astype(np.int32)


class Diffusion(base.Translator):
  name = "diffusion"
  stochastic = True
  options = {
      "prediction": ("v", "what the network predicts: 'eps' | 'x0' | 'v' (Salimans & Ho)"),
      "schedule": ("cosine", "noise schedule: 'linear' (Ho et al.) | 'cosine' (Nichol & "
                             "Dhariwal)"),
      "timesteps": (1000, "length T of the training chain"),
      "sampler": ("ddim", "'ddpm' (ancestral) | 'ddim'"),
      "eta": (0.0, "DDIM noise: 0 deterministic, 1 ancestral"),
      **latent.OPTIONS,
  }

  def __init__(self, config):
    super().__init__(config)
    cfg = config.translator
    for key, known in (("prediction", PREDICTIONS), ("schedule", SCHEDULES),
                       ("sampler", SAMPLERS)):
      if cfg[key] not in known:
        raise ValueError(f"translator.{key}={cfg[key]!r}; known: {known}")
    if not 0.0 <= cfg.eta <= 1.0:
      raise ValueError(f"translator.eta={cfg.eta} must lie in [0, 1]")
    self.prediction, self.sampler, self.eta = cfg.prediction, cfg.sampler, float(cfg.eta)
    self.timesteps = int(cfg.timesteps)
    self.schedule = make_schedule(cfg.schedule, self.timesteps)
    self.alpha_bar = jnp.asarray(self.schedule["alpha_bar"], jnp.float32)

  def _network(self, params, x_t, t, source, rng=None, *, train):
    # The U-Net's time embedding expects t in [0, 1] (it scales by 1000 itself).
    return self.apply(params, x_t, t.astype(jnp.float32) / self.timesteps, source, rng,
                      train=train)

  def loss(self, params, batch, rng):
    target, source = batch["target"], batch["source"]
    rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
    t = jax.random.randint(rng_t, target.shape[:1], 0, self.timesteps)
    noise = jax.random.normal(rng_noise, target.shape)
    a = base.per_example(self.alpha_bar[t], target)
    x_t = jnp.sqrt(a) * target + jnp.sqrt(1.0 - a) * noise
    goal = {"eps": noise, "x0": target,
            "v": jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * target}[self.prediction]
    pred = self._network(params, x_t, t, source, rng_drop, train=True)
    return self.pixel_mean((pred - goal) ** 2, batch), {}

  def predict_x0_eps(self, params, x_t, t, source):
    """(x̂0, ε̂) from one network evaluation; x̂0 clipped to the data range [-1, 1]
    (images, not latents: `clip_x0`)."""
    pred = self._network(params, x_t, jnp.full(source.shape[:1], t), source, train=False)
    a = self.alpha_bar[t]
    if self.prediction == "eps":
      x0 = (x_t - jnp.sqrt(1.0 - a) * pred) / jnp.sqrt(a)
    elif self.prediction == "x0":
      x0 = pred
    else:
      x0 = jnp.sqrt(a) * x_t - jnp.sqrt(1.0 - a) * pred
    if self.clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
    # ε̂ recomputed from the clipped x̂0 keeps the two consistent with x_t (as guided diffusion).
    eps = (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
    return x0, eps

  def nfe(self, steps=None):
    return steps or self.config.translator.sample_steps

  def sample(self, params, source, rng, steps: int, x_T=None):
    """One draw: walk the S-step sub-chain from noise (`x_T`, or drawn from `rng`) to x̂0."""
    ts = sampling_timesteps(self.timesteps, steps)
    t_prev = np.concatenate([ts[1:], [-1]])  # -1: past the end, where ᾱ = 1
    shape = (*source.shape[:-1], self.out_channels)
    rng_start, rng_steps = jax.random.split(rng)

    def step(x_t, inputs):
      t, p, key = inputs
      x0, eps = self.predict_x0_eps(params, x_t, t, source)
      a_t = self.alpha_bar[t]
      a_p = jnp.where(p >= 0, self.alpha_bar[jnp.maximum(p, 0)], 1.0)
      beta = 1.0 - a_t / a_p
      variance = beta * (1.0 - a_p) / (1.0 - a_t)  # zero on the last step, as a_p = 1
      z = jax.random.normal(key, shape, x_t.dtype)
      if self.sampler == "ddpm":
        mean = (jnp.sqrt(a_p) * beta / (1.0 - a_t)) * x0 \
            + (jnp.sqrt(1.0 - beta) * (1.0 - a_p) / (1.0 - a_t)) * x_t
        return mean + jnp.sqrt(variance) * z, None
      sigma2 = self.eta ** 2 * variance
      x_p = jnp.sqrt(a_p) * x0 + jnp.sqrt(jnp.maximum(1.0 - a_p - sigma2, 0.0)) * eps
      return x_p + jnp.sqrt(sigma2) * z, None

    if x_T is None:
      x_T = jax.random.normal(rng_start, shape, jnp.float32)  # float32 whatever model.dtype
    x_T = x_T.astype(jnp.float32)
    x_0, _ = jax.lax.scan(step, x_T, (jnp.asarray(ts), jnp.asarray(t_prev, jnp.int32),
                                      jax.random.split(rng_steps, steps)))
    return x_0
