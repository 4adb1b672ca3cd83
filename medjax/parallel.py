"""The device mesh and the shardings the trainer uses.

One `data` axis spans every device of every process: the batch is split along it and
the train state is replicated (an `fsdp` axis can be added later without touching the
translators, which see shardings only where CycleGAN's history pool must be replicated).
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from medjax.errors import UserError

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over the first `num_devices` devices (all of them by default)."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise UserError(f"asked for {num_devices} devices, only {len(devices)} are visible")
    devices = devices[:num_devices]
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh) -> dict:
  """Host-local numpy batch → global jax arrays sharded on `data`.

  Each process holds only its own rows; jax assembles the global array from them,
  which is what makes the same code run on one CPU and on a multi-host pod.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Start jax.distributed when asked for, or when a cluster environment says so."""
  if coordinator:
    if num_processes is None or process_id is None:
      raise UserError("--coordinator needs --num-processes and --process-id")
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=num_processes, process_id=process_id)
    return
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ:
    jax.distributed.initialize()  # reads SLURM / TPU metadata itself


def enable_compilation_cache() -> None:
  """JAX's persistent compilation cache (MEDJAX_COMPILATION_CACHE; '0' turns it off), so a
  command run again starts without recompiling."""
  cache = os.environ.get("MEDJAX_COMPILATION_CACHE",
                         os.path.join(os.path.expanduser("~"), ".cache", "medjax", "jax"))
  if cache and cache != "0":
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def put_global(array: np.ndarray, sharding) -> jax.Array:
  """An array every process holds in full (e.g. an evaluation batch) → a global jax array."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(array: jax.Array) -> np.ndarray:
  """A global array back to numpy on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(array)


def balanced_batch(depth: int, batch_size: int, devices: int) -> int:
  """At most `batch_size` slices per batch, as few batches as that allows, evened out so
  the last one is not mostly padding (67 slices: 3 × 24, not 3 × 32). Sizes are rounded
  to a multiple of 8 (and of the devices) so volumes of many depths share compilations."""
  multiple = math.lcm(8, devices)
  if batch_size < multiple:  # a small batch asked for (memory): keep to it
    multiple = devices
  batches = -(-depth // max(batch_size, 1))
  return -(-(-(-depth // batches)) // multiple) * multiple
