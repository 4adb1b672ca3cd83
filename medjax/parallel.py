"""The device mesh and the shardings the trainer uses (docs/design.md, "Mesh").

Two axes span every device of every process: `data` and `fsdp` (`mesh.data`,
`mesh.fsdp`; -1 = the rest). The batch is split along both. Parameters and optimiser
state are sharded along `fsdp` by one rule (`fsdp_spec`: the largest dimension the axis
divides, as big_vision's and MaxText's FSDP rules) and replicated along `data`; with
`fsdp = 1` (the default) that is plain data parallelism with the state replicated. The
translators never see shardings (except CycleGAN's history pool, made replicated there).
"""

from __future__ import annotations

import collections
import json
import math
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from medjax.errors import ConfigError, UserError

DATA_AXIS, FSDP_AXIS = "data", "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Arrays smaller than this stay replicated under FSDP: gathering them costs more in
# latency than their memory is worth (biases, norms, the step counter).
FSDP_MIN_SIZE = 2 ** 12


def make_mesh(num_devices: int | None = None, *, data: int = -1, fsdp: int = 1):
  """A (data, fsdp) mesh over the first `num_devices` devices (all by default); one of
  `data`, `fsdp` may be -1: the devices the other leaves."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise UserError(f"asked for {num_devices} devices, only {len(devices)} are visible")
    devices = devices[:num_devices]
  count = len(devices)
  if data == -1 and fsdp == -1:
    raise ConfigError("mesh.data and mesh.fsdp cannot both be -1")
  if data == -1:
    data = count // fsdp if fsdp > 0 and count % fsdp == 0 else 0
  elif fsdp == -1:
    fsdp = count // data if data > 0 and count % data == 0 else 0
  if data < 1 or fsdp < 1 or data * fsdp != count:
    raise ConfigError(f"mesh.data={data} × mesh.fsdp={fsdp} does not match the {count} "
                      "devices (use -1 for the rest)")
  # Auto axes: jit's in/out shardings fix the state's and the batch's layout and XLA
  # propagates the rest (GSPMD-style FSDP, as big_vision and MaxText), so the backbones
  # need no sharding annotations of their own.
  return jax.make_mesh((data, fsdp), BATCH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def mesh_for(config, num_devices: int | None = None, *, fallback: bool = False):
  """The mesh a config asks for (`mesh.data`, `mesh.fsdp`). With `fallback` (loading a
  trained run on another machine), plain data parallelism over the devices there when
  the config's shape does not fit them."""
  mesh = config.get("mesh") if hasattr(config, "get") else None
  if num_devices is None:
    num_devices = _cpu_share(config, mesh)
  if mesh is None:
    return make_mesh(num_devices)
  try:
    return make_mesh(num_devices, data=int(mesh.data), fsdp=int(mesh.fsdp))
  except ConfigError:
    if not fallback:
      raise
    return make_mesh(num_devices)


def _cpu_share(config, mesh) -> int | None:
  """On one host's CPU devices (one per core, medjax/host.py) with the default mesh: the
  most devices that divide the training batch, so a batch of 12 on 8 cores runs on 6
  rather than failing. None elsewhere: all devices, and a batch they do not divide is an
  error naming them."""
  devices = jax.devices()
  if (len(devices) == 1 or devices[0].platform != "cpu" or jax.process_count() > 1
      or (mesh is not None and (int(mesh.data), int(mesh.fsdp)) != (-1, 1))):
    return None
  batch = config.get("train", {}).get("batch_size") if hasattr(config, "get") else None
  if not batch:
    return None
  return max(d for d in range(1, len(devices) + 1) if batch % d == 0)


def describe(mesh) -> str:
  """'2 cpu', '8 gpu': what a run's batch was split over (logs, evaluation summaries)."""
  return f"{mesh.size} {mesh.devices.flat[0].platform}"


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp: int) -> P:
  """Shard the largest dimension `fsdp` divides along the fsdp axis (ties: the last);
  replicate arrays too small to be worth it, or that no dimension divides."""
  if fsdp <= 1 or math.prod(shape) < FSDP_MIN_SIZE:
    return P()
  candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  return P(*([None] * axis + [FSDP_AXIS]))


def state_shardings(abstract_state, mesh):
  """Each leaf of a (train) state's sharding: `fsdp_spec` along fsdp, replicated along data."""
  fsdp = mesh.shape[FSDP_AXIS]
  return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(leaf.shape, fsdp)),
                      abstract_state)


def global_batch(local_batch: dict, mesh) -> dict:
  """Host-local numpy batch → global jax arrays sharded along the batch axes.

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
  if cluster_environment():
    jax.distributed.initialize()  # reads SLURM / TPU metadata itself


def cluster_environment() -> bool:
  """SLURM or a TPU pod says this process is one of several."""
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ


def enable_compilation_cache() -> None:
  """JAX's persistent compilation cache (MEDJAX_COMPILATION_CACHE; '0' turns it off), so a
  command run again starts without recompiling."""
  cache = os.environ.get("MEDJAX_COMPILATION_CACHE",
                         os.path.join(os.path.expanduser("~"), ".cache", "medjax", "jax"))
  if cache and cache != "0":
    jax.config.update("jax_compilation_cache_dir", cache)
    # Compilations under a second are redone rather than stored, unless JAX's own variable
    # says otherwise (the tests store every one: their many processes share them).
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 1.0)))


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


class DevicePrefetch:
  """Batches placed on the mesh `depth` steps ahead of the step that uses them, so the
  host-to-device copy of the next batch overlaps the current step.

  The grain iterator under it runs `depth` batches ahead of training; `get_state` gives
  the position of the next batch *to be used*, which is what a checkpoint must store for
  a restart to continue on exactly that batch (grain's `CheckpointSave` calls it).
  """

  def __init__(self, iterator, mesh, depth: int = 2):
    self.iterator, self.mesh, self.depth = iterator, mesh, depth
    self.queue = collections.deque()

  def _fill(self):
    while len(self.queue) < self.depth:
      position = self.iterator.get_state()
      self.queue.append((position, global_batch(next(self.iterator), self.mesh)))

  def __iter__(self):
    return self

  def __next__(self):
    self._fill()
    _, batch = self.queue.popleft()
    self._fill()
    return batch

  # grain's CheckpointSave/Restore take any object with these: state as JSON bytes.
  def get_state(self) -> bytes:
    position = self.queue[0][0] if self.queue else self.iterator.get_state()
    return json.dumps(position).encode()

  def set_state(self, state: bytes) -> None:
    self.queue.clear()
    self.iterator.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    """Nothing to start: batches are placed when asked for."""
