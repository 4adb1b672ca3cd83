"""Registration-aware training (RegGAN, Kong et al. 2021): docs/design.md,
"Registration-aware training".

With `train.registration = 'deformable'` a registration network R(prediction, target)
trains beside the generator: the prediction is warped onto the (misaligned) target before
the method's image term, and R's field pays a smoothness penalty. The trained parameters
are then `{"generator": …, "registration": …}`; the EMA, and so everything that restores
or uses a run's inference parameters, holds the generator's alone. R is discarded at
inference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medjax import warp
from medjax.models.registration import RegistrationNet

MODES = ("none", "deformable")
GENERATOR, REGISTRATION = "generator", "registration"
# Methods whose loss has a clean image prediction to warp (docs/design.md).
METHODS = ("regression", "flow", "pix2pix")


def mode(config) -> str:
  # An older run's config.json has no such key: it trained without registration.
  return config.train.get("registration", "none")


class Registration:
  """R, its initialisation and the registration-corrected prediction."""

  def __init__(self, smoothness: float):
    self.network = RegistrationNet()
    self.smoothness = smoothness

  def init(self, rng, target):
    return self.network.init(rng, target, target)["params"]

  def displacement(self, params, prediction, target):
    """The field (voxels, one component per spatial axis) taking `prediction` onto `target`."""
    return self.network.apply({"params": params}, prediction, target)

  def correct(self, params, prediction, target):
    """(the prediction warped onto the target, the weighted smoothness penalty, metrics)."""
    field = self.displacement(params, prediction, target)
    smooth = warp.smoothness(field)
    metrics = {"reg_smoothness": smooth,
               "reg_displacement": jnp.mean(jnp.linalg.norm(field, axis=-1))}
    return warp.warp(prediction, field), self.smoothness * smooth, metrics


def build(config, method: str) -> Registration | None:
  """The config's registration, None for 'none'; a ValueError for what cannot be."""
  kind = mode(config)
  if kind not in MODES:
    raise ValueError(f"train.registration={kind!r}; known: {', '.join(map(repr, MODES))}")
  if kind == "none":
    return None
  if method not in METHODS:
    raise ValueError(f"train.registration={kind!r} is not implemented for translator "
                     f"{method!r}; it is for: {', '.join(METHODS)}")
  weight = float(config.train.get("registration_smoothness", 10.0))
  if not weight >= 0.0:
    raise ValueError(f"train.registration_smoothness={weight} must be ≥ 0")
  if not lr_scale(config) > 0.0:
    raise ValueError(f"train.registration_lr_scale={lr_scale(config)} must be positive")
  return Registration(weight)


def lr_scale(config) -> float:
  return float(config.train.get("registration_lr_scale", 1.0))


def optimizer(tx, config) -> optax.GradientTransformation:
  """`tx` over {generator, registration} with R's updates (its learning rate and weight
  decay) scaled by `train.registration_lr_scale`: Adam moves each weight by about the
  learning rate per step, and R's output is in voxels, so a shift of a few voxels takes
  many steps at a generator's learning rate."""
  scale = lr_scale(config)
  if scale == 1.0:
    return tx
  return optax.chain(tx, optax.masked(optax.scale(scale), {GENERATOR: False, REGISTRATION: True}))


def join(generator, registration):
  return {GENERATOR: generator, REGISTRATION: registration}


def init_params(registration: Registration | None, rng, generator, batch):
  """What the optimiser trains: the generator's params, and R's beside them if any."""
  if registration is None:
    return generator
  # A key of its own, so the generator's initialisation is the same with and without R.
  return join(generator, registration.init(jax.random.fold_in(rng, 0x5E6), batch["target"]))
