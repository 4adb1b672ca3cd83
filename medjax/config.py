"""The base experiment config and the checks every user config goes through.

Experiment files (`experiments/*.py`) start from `base_config()` and override what they
need; `validate` turns a mistyped or inconsistent config into one clear message before
anything is compiled.
"""

from __future__ import annotations

import json

import ml_collections

from medjax.data import intensity

MR_MODALITIES = ("t1w", "t1c", "t2w", "pd", "flair", "mr")
MODALITIES = MR_MODALITIES + intensity.CT_MODALITIES

# Keys that may change between a run and its resumption without making it another
# experiment (extend training, evaluate more or less often, log differently).
RESUMABLE_KEYS = ("train.steps", "train.log_every", "eval", "checkpoint", "logging")


class ConfigError(ValueError):
  """A user config that cannot run; the message says which key and why."""


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.kind = "phantom"  # 'phantom' | 'shards'
  config.data.dir = ""  # the `medjax prepare` output folder, for kind='shards'
  config.data.source = ("t1w",)
  config.data.target = "t2w"
  config.data.augment = True
  config.data.unpaired = False  # draw sources and targets independently (CycleGAN)
  config.data.workers = 0  # grain worker processes; 0 = threads in the trainer process
  config.data.phantom = ml_collections.ConfigDict()
  config.data.phantom.subjects = 20
  config.data.phantom.seed = 0
  # 48×48×32 voxels over the phantom's 160×160×96 mm field of view: small enough to
  # train on a laptop CPU in minutes; raise it (and the model) on an accelerator.
  config.data.phantom.shape = (48, 48, 32)
  config.data.phantom.spacing = (160 / 48, 160 / 48, 3.0)

  config.model = ml_collections.ConfigDict()
  config.model.name = "unet"
  config.model.channels = 32
  config.model.channel_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attention_levels = (2,)
  config.model.dropout = 0.0

  config.translator = ml_collections.ConfigDict()
  config.translator.name = "flow"
  config.translator.sampler = "euler"  # flow: 'euler' | 'heun'
  config.translator.steps = 8  # sampling steps when none are asked for

  config.train = ml_collections.ConfigDict()
  config.train.steps = 1000
  config.train.batch_size = 16
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 100
  config.train.weight_decay = 1e-4
  config.train.grad_clip = 1.0
  config.train.ema_decay = 0.999
  config.train.log_every = 25

  config.eval = ml_collections.ConfigDict()
  config.eval.every = 500
  config.eval.steps = 8
  config.eval.samples = 4
  config.eval.batch_size = 32
  config.eval.image_slices = 4

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 250
  config.checkpoint.max_to_keep = 2

  config.logging = ml_collections.ConfigDict()
  config.logging.progress = True
  return config


def shards_config(source: tuple[str, ...], target: str) -> ml_collections.ConfigDict:
  """Real data from `medjax prepare` shards, sized for one accelerator (256² slices)."""
  config = base_config()
  config.data.kind = "shards"
  config.data.source = tuple(source)
  config.data.target = target
  config.data.workers = 2
  config.model.channels = 64
  config.model.channel_mult = (1, 2, 2, 4)
  config.model.num_res_blocks = 2
  config.model.attention_levels = (3,)
  config.train.steps = 100_000
  config.train.batch_size = 32
  config.train.learning_rate = 2e-4
  config.train.warmup_steps = 1000
  config.eval.every = 5000
  config.eval.steps = 16
  config.checkpoint.every = 2500
  return config


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raise ConfigError for a config that would fail later, less clearly."""
  data, train = config.data, config.train
  if data.kind not in ("phantom", "shards"):
    raise ConfigError(f"data.kind={data.kind!r}: expected 'phantom' or 'shards'")
  if data.kind == "shards" and not data.dir:
    raise ConfigError("data.kind='shards' needs data.dir (the `medjax prepare` output folder)")
  sources = (data.source,) if isinstance(data.source, str) else tuple(data.source)
  for modality in (*sources, data.target):
    if modality not in MODALITIES:
      raise ConfigError(f"unknown modality {modality!r}; known: {', '.join(MODALITIES)}")
  for key in ("steps", "batch_size", "log_every"):
    if train[key] <= 0:
      raise ConfigError(f"train.{key}={train[key]} must be positive")
  if not train.learning_rate > 0:
    raise ConfigError(f"train.learning_rate={train.learning_rate} must be positive")
  if train.batch_size % num_devices:
    raise ConfigError(
        f"train.batch_size={train.batch_size} is not divisible by the {num_devices} devices of the mesh")
  if config.eval.every <= 0 or config.checkpoint.every <= 0:
    raise ConfigError("eval.every and checkpoint.every must be positive")
  if not 0.0 <= train.ema_decay < 1.0:
    raise ConfigError(f"train.ema_decay={train.ema_decay} must lie in [0, 1)")


def source_modalities(config) -> tuple[str, ...]:
  source = config.data.source
  return (source,) if isinstance(source, str) else tuple(source)


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def experiment_differences(saved: dict, current: dict) -> list[str]:
  """Dotted keys whose values differ, ignoring those a resumed run may change."""
  def flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
      name = f"{prefix}{key}"
      if isinstance(value, dict):
        flat.update(flatten(value, name + "."))
      else:
        flat[name] = list(value) if isinstance(value, tuple) else value
    return flat

  def resumable(key):
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)

  old, new = flatten(saved), flatten(json.loads(json.dumps(current, default=list)))
  return sorted(k for k in old.keys() | new.keys() if not resumable(k) and old.get(k) != new.get(k))
