"""Two-stage runs: a second stage trained on top of a frozen first-stage run.

A latent flow/diffusion/bridge (`translator.latent_vae=RUN_DIR`) works in the latent space
of a `vae` run; the autoregressive translator (`translator.tokenizer=RUN_DIR`) predicts the
tokens of a `vqvae` run. `embed` checks the first-stage run once, when training starts, and
copies its config into the second stage's (`translator.first_stage`), so the saved
config.json describes both networks; the first stage's parameters are copied into the
second stage's state at its first step (`run.first_stage_params`). From then on the second
stage's run directory, or the model folder `medjax export` makes of it, is all that
evaluation and translation read (docs/design.md, "Two-stage runs").
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from medjax import files
from medjax.data import pipeline
from medjax.data.preprocess import Recipe
from medjax.errors import ConfigError
from medjax.translators import base

KEY = base.FIRST_STAGE  # in the config's translator group, and in the state's ema_params
# The translator.* key naming the first-stage run → the translator.name(s) it may be.
PATH_KEYS = {"latent_vae": ("vae",), "tokenizer": ("vqvae",)}
TRAIN_HINT = {"vae": "experiments/phantom_vae.py", "vqvae": "experiments/phantom_vae.py:kind=vq"}


def path_key(config) -> str | None:
  """The translator.* key of this config that names a first-stage run, or None."""
  for key in PATH_KEYS:
    if config.translator.get(key):
      return key
  return None


def embedded(config) -> bool:
  return bool(config.translator.get(KEY))


def stage_config(config) -> ml_collections.ConfigDict:
  """The first-stage run's config, as `embed` copied it."""
  if not embedded(config):
    raise ConfigError(f"translator.{path_key(config) or 'latent_vae'} names no checked "
                      "first-stage run yet (first_stage.embed(config) reads it)")
  return base.first_stage_config(config)


def embed(config) -> None:
  """Check the first-stage run `config` names and copy its config into
  `config.translator.first_stage`; nothing to do without one, or once done (a resumed or
  loaded run carries it). A one-line ConfigError names the key, the folder and what is
  wrong: missing, not a run, the wrong kind, another target, grid or dimensionality."""
  key = path_key(config)
  if key is None or embedded(config):
    return
  where = f"translator.{key}={config.translator[key]}"
  folder = Path(config.translator[key]).expanduser()
  kinds = PATH_KEYS[key]
  hint = f"train one with medjax train --config {TRAIN_HINT[kinds[0]]} --workdir {folder}"
  if not folder.is_dir():
    raise ConfigError(f"{where}: no such run directory ({hint})")
  if not (folder / "config.json").is_file():
    raise ConfigError(f"{where}: not a medjax run directory (no config.json)")
  try:
    stage = ml_collections.ConfigDict(files.read_json(folder / "config.json", dict))
    name = stage.translator.name
  except (AttributeError, KeyError, ValueError) as error:
    raise ConfigError(f"{where}: its config.json is not a medjax config ({error})") from None
  if name not in kinds:
    raise ConfigError(f"{where}: a {name!r} run, not a {' or '.join(kinds)} run ({hint})")
  if stage.data.target != config.data.target:
    raise ConfigError(f"{where}: it encodes {stage.data.target} images, this run's target "
                      f"is {config.data.target}")
  dims, stage_dims = config.model.get("dims", 2), stage.model.get("dims", 2)
  if dims != stage_dims:
    raise ConfigError(f"{where}: a {stage_dims}D first stage under a {dims}D model "
                      "(model.dims must match)")
  recipe_path = folder / "preprocessing.json"
  if not recipe_path.is_file():
    raise ConfigError(f"{where}: it has no preprocessing.json (its training never started)")
  try:
    theirs = Recipe.from_dict(files.read_json(recipe_path, dict))
  except (KeyError, TypeError, ValueError) as error:
    raise ConfigError(f"{where}: {recipe_path} is damaged ({error})") from None
  ours = pipeline.recipe(config)
  for field in ("spacing", "size", "mask"):
    if getattr(theirs, field) != getattr(ours, field):
      raise ConfigError(f"{where}: its images were made with {field} "
                        f"{getattr(theirs, field)}, this run's with {getattr(ours, field)} "
                        "(the same data preprocessing is needed)")
  checkpoints = folder / "checkpoints"
  if not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
    raise ConfigError(f"{where}: it has no checkpoint yet (train it first)")
  config.translator[KEY] = stage.to_dict()
