"""Experiment configs: the base config, what every key means, loading and overriding.

An experiment is a file with `get_config(arg)` (big_vision's habit): `arg` is a short
string of named choices, `experiments/phantom.py:method=flow,target=ct,size=small`,
parsed by `parse_arg`. `load` reads `FILE.py[:ARG]` and applies `KEY=VALUE` overrides
with the type of the key they replace; a mistyped key is a `ConfigError` naming it and
the keys that exist there. Every key has a one-line meaning (`describe`, printed by
`medjax config`); a translator's and a backbone's own keys are declared beside their
code (`Translator.options`, `models.OPTIONS`).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import runpy

import ml_collections

from medjax import metrics, models, modalities, translators
from medjax.errors import ConfigError
from medjax.translators import registration as registration_lib

# Keys that may change between a run and its resumption without making it another
# experiment: train longer, evaluate or sample differently, log differently, trade
# memory for compute (model.remat: the same parameters and, to rounding, the same steps).
RESUMABLE_KEYS = ("train.total_steps", "train.log_every", "train.profile_steps", "eval",
                  "checkpoint", "logging", "translator.sample_steps", "translator.samples",
                  "data.workers", "mesh", "model.remat")

HELP = {
    "seed": "seed of initialisation, data order, augmentation and sampling",
    "data.kind": "'phantom' (rendered on the fly, no files) | 'shards' (a `medjax prepare` folder)",
    "data.dir": "the `medjax prepare` output folder (data.kind='shards')",
    "data.source": "source modalities, in channel order (the first sets the grid)",
    "data.target": "target modality (CT/CBCT scored in HU, MR on [0, 1])",
    "data.augment": "flips, small rotations/scalings, source intensity jitter while training",
    "data.unpaired": "draw sources and targets independently (CycleGAN)",
    "data.workers": "grain worker processes (0: threads in the trainer process)",
    "data.patch": "() : 2D models train on whole axial slices | (D, H, W): 3D models "
                  "(model.dims=3) train on random patches of D slices × H × W voxels and "
                  "infer with a sliding window of that size",
    "data.foreground": "share of 3D patches forced to contain a body-mask voxel (nnU-Net's "
                       "1/3); the rest are placed uniformly",
    "data.phantom.subjects": "phantom subjects, split 80/10/10 into train/val/test",
    "data.phantom.seed": "seed of the phantom anatomy (subject i of seed s is always the same)",
    "data.phantom.shape": "phantom grid in voxels (x, y, z); slices are axial (x, y)",
    "data.phantom.spacing": "phantom voxel size in mm (x, y, z)",
    "data.phantom.misalign": "mm: warp each phantom target by a per-subject rigid motion and "
                             "smooth deformation of this size (imperfect pairs; "
                             "Volume.target_aligned keeps the truth); 0: perfect pairs",
    "model.name": "backbone: " + " | ".join(repr(m) for m in sorted(models.MODELS)),
    "train.total_steps": "training steps (optimiser updates)",
    "train.batch_size": "global batch (slices), split over the mesh's devices",
    "train.learning_rate": "peak AdamW learning rate (linear warm-up, cosine decay to 1 %)",
    "train.warmup_steps": "steps of linear learning-rate warm-up",
    "train.weight_decay": "AdamW decoupled weight decay",
    "train.grad_clip": "global gradient-norm clip",
    "train.ema_decay": "EMA decay of the parameters evaluation and translation use",
    "train.masked_loss": "average every pixel loss over batch['mask'] voxels only (body mask)",
    "train.registration": "'none' | 'deformable' (regression, flow, pix2pix): a network R "
                          "warps the prediction onto the imperfectly aligned target before "
                          "the loss (RegGAN); R is discarded at inference",
    "train.registration_smoothness": "weight of R's displacement smoothness penalty against "
                                     "the registered image term ('deformable')",
    "train.registration_lr_scale": "R's learning rate (and weight decay) relative to "
                                   "train.learning_rate ('deformable')",
    "train.log_every": "steps between fetching, checking and logging the training metrics "
                       "(the host runs ahead of the device in between)",
    "train.profile_steps": "(START, COUNT): write a jax.profiler trace of COUNT steps from "
                           "step START into WORKDIR/profile (TensorBoard / XProf); () off",
    "mesh.data": "devices along the mesh's data axis (-1: the devices fsdp leaves)",
    "mesh.fsdp": "devices along the fsdp axis: parameters and optimiser state sharded over "
                 "them (1: replicated, plain data parallelism; -1: the devices data leaves)",
    "data.any2any": "one model for every direction: the input is all data.modalities with "
                    "an availability mask (missing ones zeroed) and the target's learned "
                    "embedding; training draws a target and a non-empty available set of "
                    "the others per example (regression, flow, diffusion, bridge)",
    "data.modalities": "any-to-any: the MR modalities, in channel order (() : data.source "
                       "then data.target, the prepared channels)",
    "eval.directions": "any-to-any evaluation: 'standard' (each modality missing given the "
                       "others, and every one-input direction) | 'missing_one'",
    "eval.segmentation": "also score each evaluated direction by the Dice of a segmentation "
                         "U-Net (trained once on the real training images, cached in "
                         "WORKDIR/segmenter/) with the real, the synthesised and a blank "
                         "target modality (phantom runs, and shards prepared from "
                         "a dataset with seg files: BraTS's tumour labels)",
    "eval.every": "steps between held-out evaluations (and the last step)",
    "eval.batch_size": "slices per evaluation / translation batch",
    "eval.image_slices": "axial slices in each evaluation picture",
    "eval.overlap": "3D sliding-window inference: overlap of neighbouring windows (fraction "
                    "of the window, in [0, 1)); also `medjax translate`'s default",
    "eval.tta": "'none' | 'flip': also predict on the input mirrored along the axes training "
                "mirrors and average (mixture law); also `medjax translate`'s default",
    "checkpoint.every": "steps between checkpoints (and the last step)",
    "checkpoint.max_to_keep": "checkpoints kept on disk",
    "logging.progress": "show a progress bar",
}

# Presets of grid and width: `tiny` trains in seconds (tests, notebooks in CI), `small` in
# minutes on a 2-core CPU (the default), `base` is the accelerator size.
SIZES = {
    "tiny": {"shape": (32, 32, 12), "spacing": (5.0, 5.0, 8.0), "subjects": 5,
             "unet": {"channels": 8, "channel_mult": (1, 2), "attention_levels": ()},
             "resnet": {"channels": 4, "num_blocks": 1}, "discriminator": 8,
             "uvit": {"width": 32, "depth": 3, "num_heads": 4, "patch_size": 2},
             "mamba": {"channels": 8, "channel_mult": (1, 2), "d_state": 4, "expand": 1},
             "ar_transformer": {"width": 32, "depth": 2, "heads": 4, "context": 64},
             "autoencoder": {"channels": (8, 16, 16)},
             "batch_size": 8, "total_steps": 6},
    "small": {"shape": (48, 48, 32), "spacing": (160 / 48, 160 / 48, 3.0), "subjects": 20,
              "unet": {"channels": 32, "channel_mult": (1, 2, 2), "attention_levels": (2,)},
              "resnet": {"channels": 16, "num_blocks": 9}, "discriminator": 32,
              "uvit": {"width": 128, "depth": 7, "num_heads": 4, "patch_size": 4},
              "mamba": {"channels": 32, "channel_mult": (1, 2, 2), "d_state": 4, "expand": 1},
              "ar_transformer": {"width": 128, "depth": 4, "heads": 4, "context": 256},
              "autoencoder": {"channels": (32, 64, 64)},
              "batch_size": 16, "total_steps": 1000},
    "base": {"shape": (160, 160, 96), "spacing": (1.0, 1.0, 1.0), "subjects": 200,
             "unet": {"channels": 64, "channel_mult": (1, 2, 2, 4), "attention_levels": (3,),
                      "num_res_blocks": 2},
             "resnet": {"channels": 64, "num_blocks": 9}, "discriminator": 64,
             "uvit": {"width": 512, "depth": 13, "num_heads": 8, "patch_size": 4},
             "mamba": {"channels": 64, "channel_mult": (1, 2, 2, 4), "d_state": 16,
                       "num_res_blocks": 2},
             "ar_transformer": {"width": 512, "depth": 8, "heads": 8, "context": 1600},
             "autoencoder": {"channels": (64, 128, 256), "num_res_blocks": 2},
             "batch_size": 32, "total_steps": 100_000},
}


def base_config() -> ml_collections.ConfigDict:
  """Phantom T1w → T2w with flow matching at the `small` size."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict({
      "kind": "phantom", "dir": "", "source": ("t1w",), "target": "t2w", "augment": True,
      "unpaired": False, "workers": 0, "patch": (), "foreground": 1 / 3,
      "any2any": False, "modalities": (),
      "phantom": {"subjects": 20, "seed": 0, "shape": (48, 48, 32),
                  "spacing": (160 / 48, 160 / 48, 3.0), "misalign": 0.0}})
  config.model = model_config("unet")
  config.translator = translator_config("flow")
  config.train = ml_collections.ConfigDict({
      "total_steps": 1000, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 100,
      "weight_decay": 1e-4, "grad_clip": 1.0, "ema_decay": 0.999, "log_every": 25,
      "profile_steps": (), "registration": "none", "registration_smoothness": 10.0,
      "registration_lr_scale": 1.0, "masked_loss": False})
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  config.eval = ml_collections.ConfigDict({"every": 500, "batch_size": 32, "image_slices": 4,
                                           "overlap": 0.5, "tta": "none",
                                           "directions": "standard", "segmentation": False})
  config.checkpoint = ml_collections.ConfigDict({"every": 250, "max_to_keep": 2})
  config.logging = ml_collections.ConfigDict({"progress": True})
  return config


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """`model.*` for backbone `name`: its declared defaults, then `overrides`."""
  if name not in models.OPTIONS:
    raise ConfigError(f"model.name={name!r}; known: {', '.join(sorted(models.OPTIONS))}")
  values = {key: default for key, (default, _) in models.OPTIONS[name].items()}
  return _group({"name": name, **values}, overrides, f"model {name!r}")


def translator_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """`translator.*` for method `name`: its declared defaults, then `overrides`."""
  if name not in translators.TRANSLATORS:
    raise ConfigError(f"translator.name={name!r}; known: "
                      f"{', '.join(sorted(translators.TRANSLATORS))}")
  options = translators.TRANSLATORS[name].all_options()
  values = {key: default for key, (default, _) in options.items()}
  return _group({"name": name, **values}, overrides, f"translator {name!r}")


def _group(values: dict, overrides: dict, what: str) -> ml_collections.ConfigDict:
  unknown = sorted(set(overrides) - set(values))
  if unknown:
    raise ConfigError(f"{what} has no option(s) {unknown}; it takes {sorted(values)}")
  return ml_collections.ConfigDict({**values, **overrides})


def shards_config(source, target: str, method: str = "flow") -> ml_collections.ConfigDict:
  """Real data from `medjax prepare` shards, sized for one accelerator (256² slices)."""
  config = base_config()
  config.data.kind = "shards"
  config.data.source = tuple(source)
  config.data.target = target
  config.data.workers = 2
  config.model = model_config("unet", channels=64, channel_mult=(1, 2, 2, 4),
                              num_res_blocks=2, attention_levels=(3,))
  apply_method(config, method)
  if config.translator.samples > 1:
    config.translator.sample_steps = 16
  config.train.update(total_steps=100_000, batch_size=32, learning_rate=2e-4,
                      warmup_steps=1000)
  config.eval.every = 5000
  config.checkpoint.every = 2500
  return config


def apply_volumetric(config, patch=(96, 96, 96)) -> None:
  """The 3D version of a shards experiment (docs/design.md, "3D patches"): a 3D U-Net with
  a residual encoder (nnU-Net ResEnc), bfloat16 compute and remat so a 96³ patch fits one
  accelerator, masked L1/MSE, Gaussian sliding-window evaluation over the volume."""
  config.data.patch = tuple(patch)
  config.train.masked_loss = True
  if config.model.name == "unet":
    config.model.update(channels=32, channel_mult=(1, 2, 4, 8), num_res_blocks=2,
                        decoder_blocks=1, attention_levels=(), remat=True, dtype="bfloat16")
  else:
    config.model.update(remat=True, dtype="bfloat16")
  config.model.dims = 3
  config.train.batch_size = 2
  config.eval.batch_size = 2
  if "discriminator" in config.translator:
    config.translator.discriminator.num_layers = 3


# --- experiment arguments (FILE.py:ARG) -------------------------------------------------

def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`"method=flow,size=tiny"` → {method: 'flow', size: 'tiny', …the other defaults}.

  Values take the type of their default (int, float, bool, str); a name that has no
  default is an error listing the names there are.
  """
  values = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    name, sep, text = item.partition("=")
    name = name.strip()
    if not sep:
      raise ConfigError(f"experiment argument {item!r} is not NAME=VALUE; "
                        f"names: {', '.join(sorted(defaults))}")
    if name not in defaults:
      raise ConfigError(f"unknown experiment argument {name!r}; known: "
                        f"{', '.join(f'{k}={v}' for k, v in defaults.items())}")
    values[name] = _parse_value(text.strip(), defaults[name], name)
  return ml_collections.ConfigDict(values)


def choose(name: str, value, choices) -> None:
  """Refuse an experiment argument outside `choices`, listing them."""
  if value not in choices:
    raise ConfigError(f"{name}={value!r}; choose one of: {', '.join(map(str, choices))}")


METHODS = ("flow", "regression", "diffusion", "bridge", "i2sb", "pix2pix", "cyclegan")
# Peak variance at mid-bridge: BBDM's s = 1; I2SB's β_max = 0.3 over 1000 steps (σ²_1 ≈ 0.137).
BRIDGE_VARIANCE = {"brownian": 0.5, "i2sb": 0.034}


def apply_method(config, method: str) -> None:
  """The translator of a published method, with what it needs besides (backbone, lr, data).

  `bridge` is BBDM's Brownian bridge and `i2sb` I2SB's Schrödinger bridge, one translator;
  `cyclegan` trains two ResNet generators on unpaired slices."""
  choose("method", method, METHODS)
  if method in ("bridge", "i2sb"):
    bridge = "brownian" if method == "bridge" else "i2sb"
    config.translator = translator_config("bridge", bridge=bridge,
                                          bridge_variance=BRIDGE_VARIANCE[bridge])
  else:
    config.translator = translator_config(method)
  if method == "pix2pix":
    config.train.learning_rate = 5e-4
  if method == "cyclegan":
    config.data.unpaired = True
    config.model = model_config("resnet", channels=config.model.get("channels", 64))
    config.train.learning_rate = 2e-4


def apply_size(config, size: str) -> None:
  """Set the phantom grid, backbone width and batch of a `SIZES` preset."""
  choose("size", size, SIZES)
  preset = SIZES[size]
  config.data.phantom.update(shape=preset["shape"], spacing=preset["spacing"],
                             subjects=preset["subjects"])
  config.model.update(**preset.get(config.model.name, {}))
  if "discriminator" in config.translator:
    config.translator.discriminator.channels = preset["discriminator"]
  config.train.batch_size = preset["batch_size"]
  config.train.total_steps = preset["total_steps"]
  if size == "tiny":
    config.train.update(warmup_steps=2, log_every=2)
    config.eval.update(every=6, batch_size=8, image_slices=2)
    config.checkpoint.every = 3
    config.data.augment = False
    config.logging.progress = False
    if translators.TRANSLATORS[config.translator.name].stochastic:
      config.translator.update(sample_steps=2, samples=2)


# --- loading and overriding -------------------------------------------------------------

def load(spec: str, overrides=()) -> ml_collections.ConfigDict:
  """`FILE.py[:ARG]` → its config with `KEY=VALUE` overrides applied, locked."""
  path, _, arg = str(spec).partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} does not exist")
  try:
    module = runpy.run_path(path)
  except SyntaxError as error:
    raise ConfigError(f"{path}: line {error.lineno}: {error.msg}") from None
  if "get_config" not in module:
    raise ConfigError(f"{path} defines no get_config()")
  config = module["get_config"](arg) if arg else module["get_config"]()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict")
  config = ml_collections.ConfigDict(config.to_dict())  # a copy: overrides stay ours
  override(config, overrides)
  config.lock()
  return config


def override(config, overrides) -> None:
  """Apply `KEY=VALUE` strings (or a {key: value} dict) in place."""
  items = overrides.items() if isinstance(overrides, dict) else (
      _split_override(o) for o in overrides)
  for key, value in items:
    parent, leaf = _locate(config, key)
    current = parent[leaf]
    if isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(f"{key} is a group; set one of its keys: "
                        f"{', '.join(f'{key}.{k}' for k in sorted(current.keys()))}")
    if isinstance(value, str):
      value = _parse_value(value, current, key)
    with parent.unlocked():
      parent[leaf] = value


def _split_override(text: str):
  key, sep, value = str(text).partition("=")
  if not sep:
    raise ConfigError(f"override {text!r} is not KEY=VALUE")
  return key.strip(), value


def _locate(config, key: str):
  node, parts = config, key.split(".")
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      here = ".".join(parts[:depth]) or "the config"
      known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
      raise ConfigError(f"unknown config key {part!r} in {key}"
                        + (f" (keys of {here}: {known})" if known else ""))
    if depth == len(parts) - 1:
      return node, part
    node = node[part]


def _parse_value(text: str, current, key: str):
  """`text` read as the type of `current`, the value it replaces."""
  try:
    if isinstance(current, bool):
      lowered = text.lower()
      if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError("expected true or false")
      return lowered in ("true", "1", "yes")
    if isinstance(current, int):
      number = float(text.replace("_", ""))
      if number != int(number):
        raise ValueError("expected an integer")
      return int(number)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, (tuple, list)):
      return _parse_sequence(text, current)
    if current is None:
      return _literal(text)
    return text.strip("'\"") if isinstance(current, str) else _literal(text)
  except (ValueError, SyntaxError) as error:
    raise ConfigError(f"{key}={text!r}: {error} (its value now is {current!r})") from None


def _parse_sequence(text: str, current):
  """`(1, 2)`, `[1, 2]`, `1,2` or `48x48x32` (numbers), `t1w,t2w` (names) → a tuple whose
  elements take the type of `current`'s."""
  text = text.strip()
  if text[:1] in "([":
    values = ast.literal_eval(text)
    values = list(values) if isinstance(values, (tuple, list)) else [values]
  else:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) == 1 and re.fullmatch(r"[\d.eE+-]+(x[\d.eE+-]+)+", parts[0]):
      parts = parts[0].split("x")
    values = [_literal(p) for p in parts]
  kind = type(current[0]) if len(current) else None
  if kind is int:
    values = [int(v) if float(v) == int(float(v)) else _not_int(v) for v in values]
  elif kind in (float, str):
    values = [kind(v) for v in values]
  return tuple(values)


def _not_int(value):
  raise ValueError(f"{value!r} is not a whole number")


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text.strip("'\"")


# --- checking ---------------------------------------------------------------------------

def validate(config, num_devices: int = 1) -> None:
  """Raise ConfigError for a config that would fail later, less clearly."""
  data, train = config.data, config.train
  if data.kind not in ("phantom", "shards"):
    raise ConfigError(f"data.kind={data.kind!r}: expected 'phantom' or 'shards'")
  if data.kind == "shards" and not data.dir:
    raise ConfigError("data.kind='shards' needs data.dir (the `medjax prepare` output folder)")
  for modality in (*modalities.as_tuple(data.source), data.target):
    if modality not in modalities.IMAGES:
      raise ConfigError(f"unknown modality {modality!r}; known: {', '.join(modalities.IMAGES)}")
  for key in ("total_steps", "batch_size", "log_every"):
    if train[key] <= 0:
      raise ConfigError(f"train.{key}={train[key]} must be positive")
  if not train.learning_rate > 0:
    raise ConfigError(f"train.learning_rate={train.learning_rate} must be positive")
  if train.batch_size % num_devices:
    raise ConfigError(f"train.batch_size={train.batch_size} is not divisible by the "
                      f"{num_devices} devices of the mesh")
  for key in ("eval.every", "checkpoint.every", "eval.batch_size", "translator.sample_steps",
              "translator.samples"):
    group, name = key.split(".")
    if config[group][name] <= 0:
      raise ConfigError(f"{key}={config[group][name]} must be positive")
  mesh = config.get("mesh")
  if mesh is not None:
    for key in ("data", "fsdp"):
      if mesh[key] != -1 and mesh[key] < 1:
        raise ConfigError(f"mesh.{key}={mesh[key]} must be a positive number of devices or -1")
  profile = tuple(train.get("profile_steps", ()))
  if profile and (len(profile) != 2 or min(profile) < 1):
    raise ConfigError(f"train.profile_steps={profile}: expected (START, COUNT), both ≥ 1, "
                      "or () for no trace")
  if not 0.0 <= train.ema_decay < 1.0:
    raise ConfigError(f"train.ema_decay={train.ema_decay} must lie in [0, 1)")
  try:  # the translators' own check (translators/registration.py), as a ConfigError
    registration_lib.build(config, config.translator.name)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  if data.kind == "phantom" and min(data.phantom.shape) < metrics.MIN_SIDE:
    raise ConfigError(f"data.phantom.shape={tuple(data.phantom.shape)}: the evaluation's SSIM "
                      f"window needs at least {metrics.MIN_SIDE} voxels along every axis")
  misalign = data.phantom.get("misalign", 0.0)
  if not (isinstance(misalign, (int, float)) and math.isfinite(misalign) and misalign >= 0):
    raise ConfigError(f"data.phantom.misalign={misalign!r}: expected a finite number of mm ≥ 0")
  dims, patch = config.model.get("dims", 2), tuple(data.get("patch", ()))
  if dims not in (2, 3):
    raise ConfigError(f"model.dims={dims!r}: expected 2 (slices) or 3 (volumes)")
  if dims == 2 and patch:
    raise ConfigError(f"data.patch={patch}: patches are for 3D models (model.dims=3); a 2D "
                      "model trains on whole axial slices (set data.patch=())")
  if dims == 3 and (len(patch) != 3 or not all(
      isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in patch)):
    raise ConfigError(f"data.patch={patch}: a 3D model (model.dims=3) trains on patches of "
                      "(D, H, W) voxels: three whole numbers > 0, e.g. (16, 32, 32)")
  overlap, tta = config.eval.get("overlap", 0.5), config.eval.get("tta", "none")
  if not (isinstance(overlap, (int, float)) and 0.0 <= overlap < 1.0):
    raise ConfigError(f"eval.overlap={overlap!r}: expected a fraction in [0, 1)")
  if tta not in ("none", "flip"):
    raise ConfigError(f"eval.tta={tta!r}: expected 'none' or 'flip'")
  foreground = data.get("foreground", 1 / 3)
  if not (isinstance(foreground, (int, float)) and 0.0 <= foreground <= 1.0):
    raise ConfigError(f"data.foreground={foreground!r}: expected a share in [0, 1]")
  _validate_any2any(config)
  if data.kind == "phantom" and data.phantom.subjects < 3:
    raise ConfigError(f"data.phantom.subjects={data.phantom.subjects}: the train, val and test "
                      "splits need at least 3 subjects")
  for group, declared in (("model", models.OPTIONS.get(config.model.name)),
                          ("translator", _translator_options(config))):
    if declared is None:
      continue
    unknown = sorted(set(config[group].keys()) - set(declared) - {"name"})
    if unknown:
      raise ConfigError(f"{group} {config[group].name!r} has no option(s) {unknown}; "
                        f"it takes {sorted(declared)}")


ANY2ANY_METHODS = ("regression", "flow", "diffusion", "bridge")


def _validate_any2any(config) -> None:
  """Any-to-any's requirements (docs/design.md, "Any-to-any synthesis")."""
  data = config.data
  named = tuple(data.get("modalities", ()) or ())
  which = config.eval.get("directions", "standard")
  if which not in ("standard", "missing_one"):
    raise ConfigError(f"eval.directions={which!r}: expected 'standard' or 'missing_one'")
  if not data.get("any2any", False):
    if named:
      raise ConfigError(f"data.modalities={list(named)} is any-to-any's set: set "
                        "data.any2any=true, or leave it () for a one-direction run")
    return
  channels = (*modalities.as_tuple(data.source), data.target)
  names = named or tuple(dict.fromkeys(channels))
  if len(set(names)) != len(names) or len(names) < 2:
    raise ConfigError(f"data.modalities={list(names)}: any-to-any needs two or more "
                      "different modalities")
  missing = [m for m in names if m not in channels]
  if missing:
    raise ConfigError(f"data.modalities names {', '.join(missing)}, which the data does not "
                      f"carry: the records hold data.source + data.target = {list(channels)}")
  ct = [m for m in names if modalities.is_ct(m)]
  if ct:
    raise ConfigError(f"data.modalities holds {', '.join(ct)}: any-to-any covers MR "
                      "contrasts, all scored on [0, 1] (train CT as a one-direction run)")
  if config.translator.name not in ANY2ANY_METHODS:
    raise ConfigError(f"data.any2any with translator {config.translator.name!r}: any-to-any "
                      f"runs with {', '.join(ANY2ANY_METHODS)}")
  if config.model.name not in ("unet", "uvit", "mamba"):
    raise ConfigError(f"data.any2any with model {config.model.name!r}: the target embedding "
                      "is built into unet, uvit and mamba")
  if data.unpaired:
    raise ConfigError("data.any2any needs paired data (data.unpaired=false)")
  if data.phantom.get("misalign", 0.0):
    raise ConfigError("data.any2any with data.phantom.misalign: the misaligned session is "
                      "data.target's alone, while any-to-any targets every modality")


def _translator_options(config):
  cls = translators.TRANSLATORS.get(config.translator.name)
  if cls is None:
    raise ConfigError(f"translator.name={config.translator.name!r}; known: "
                      f"{', '.join(sorted(translators.TRANSLATORS))}")
  return cls.all_options()


# --- describing -------------------------------------------------------------------------

def flatten(tree, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      flat.update(flatten(value, name + "."))
    else:
      flat[name] = list(value) if isinstance(value, tuple) else value
  return flat


def meaning(config, key: str) -> str | None:
  """The one-line meaning of dotted `key` in `config`."""
  if key in HELP:
    return HELP[key]
  group, _, rest = key.partition(".")
  if group == "model":
    return models.OPTIONS.get(config.model.name, {}).get(rest, (None, None))[1]
  if group == "translator":
    options = translators.TRANSLATORS[config.translator.name].all_options()
    if rest == "name":
      return "method: " + " | ".join(repr(t) for t in sorted(translators.TRANSLATORS))
    if rest.startswith("discriminator."):
      return models.OPTIONS["patchgan"].get(rest.split(".", 1)[1], (None, None))[1]
    if rest.startswith("first_stage."):  # a two-stage run's copy of its first stage's config
      inner = meaning(config.translator.first_stage, rest.split(".", 1)[1])
      return inner and f"(first stage) {inner}"
    return options.get(rest, (None, None))[1]
  return None


def describe(config) -> str:
  """Every key with its value and meaning: what `medjax config` prints."""
  flat = flatten(config.to_dict())
  width = max(len(f"{k} = {v!r}") for k, v in flat.items())
  lines = []
  for key, value in flat.items():
    text = f"{key} = {value!r}"
    lines.append(f"{text:{width}s}  # {meaning(config, key) or '(no description)'}")
  return "\n".join(lines)


def to_json(config) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def experiment_differences(saved: dict, current: dict) -> list[str]:
  """Dotted keys whose values differ, ignoring those a resumed run may change."""
  def resumable(key):
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)

  old, new = flatten(saved), flatten(json.loads(json.dumps(current, default=list)))
  # A key added to medjax after the run was saved holds, in that run, its default.
  for key in new.keys() - old.keys():
    default = _default(current, key)
    if default is not _MISSING:
      old[key] = default
  return sorted(k for k in old.keys() | new.keys() if not resumable(k) and old.get(k) != new.get(k))


_MISSING = object()


def _default(config: dict, key: str):
  """The value `key` takes when nobody set it (base config, backbone, translator)."""
  group, _, rest = key.partition(".")
  if group == "model":
    options = models.OPTIONS.get(config.get("model", {}).get("name"), {})
    value = options[rest][0] if rest in options else _MISSING
  elif group == "translator":
    cls = translators.TRANSLATORS.get(config.get("translator", {}).get("name"))
    options = cls.all_options() if cls else {}
    value = options[rest][0] if rest in options else _MISSING
  else:
    value = flatten(base_config().to_dict()).get(key, _MISSING)
  return list(value) if isinstance(value, tuple) else value
