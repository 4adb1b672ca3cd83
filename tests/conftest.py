"""Shared test set-up: JAX's persistent compilation cache and tiny configs.

The cache directory is exported through the environment too, so the subprocesses the
end-to-end tests start (CLI runs, the 8-device run, kill-and-resume) reuse compilations.
"""

import os
import pathlib

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("MEDJAX_COMPILATION_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"])

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def tiny_config(translator: str = "flow", target: str = "t2w"):
  """A config that trains in seconds on a CPU: 32×32 slices, an 8-channel U-Net."""
  from medjax import config as config_lib
  config = config_lib.base_config()
  config.seed = 0
  config.data.target = target
  config.data.augment = False
  config.data.phantom.subjects = 5
  config.data.phantom.shape = (32, 32, 12)
  config.data.phantom.spacing = (5.0, 5.0, 8.0)
  config.model.channels = 8
  config.model.channel_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attention_levels = ()
  config.translator.name = translator
  config.translator.steps = 2
  config.train.steps = 6
  config.train.batch_size = 8
  config.train.warmup_steps = 2
  config.train.log_every = 2
  config.eval.every = 6
  config.eval.steps = 2
  config.eval.samples = 2
  config.eval.batch_size = 8
  config.eval.image_slices = 2
  config.checkpoint.every = 3
  config.logging.progress = False
  return config


@pytest.fixture
def make_config():
  return tiny_config
