"""The process's settings for XLA's CPU backend, applied by the commands before jax starts.

Two measured costs of a CPU run that medjax's own code does not cause (docs/design.md,
"CPU host settings"; docs/cpu_profile.md has the figures):

- glibc's malloc serves XLA:CPU's per-execution temporary buffer (≈ 450 MB at the default
  config) with a fresh mmap and returns it with munmap after every step, so every page is
  faulted in and zeroed again (≈ 110 000 page faults a step). One arena, no mmap and no
  trimming keep the pages mapped and reused. Nothing computed changes.
- XLA:CPU runs one device's program about one thunk at a time, with threads only inside
  the large ones: at 48² one core of two is busy. One CPU device per core lets the mesh
  split the batch across them, each device's program on its own thread — data parallelism
  within the host, the same code path as on several accelerators.

Both are process-wide and must come before jax creates its CPU client, which is why the
commands call them and the library does not (a notebook keeps jax's defaults).
`MEDJAX_CPU_DEVICES=N` fixes the count (1: jax's default); `MEDJAX_MALLOC=system` keeps
glibc's defaults. An explicit `--xla_force_host_platform_device_count` in `XLA_FLAGS`
(as `medjax sweep` sets per point) wins over both the rule and the variable.
"""

from __future__ import annotations

import ctypes
import os
import sys

# Above this, an in-host data-parallel split is unmeasured (the project's CPU box has 2
# cores); 8 is what the test suite's virtual-device meshes exercise.
MAX_CPU_DEVICES = 8


def cores() -> int:
  """CPU cores this process may run on (its affinity mask, not the machine's count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def tune_malloc() -> bool:
  """glibc: one arena, no mmap, no trimming (see the module docstring). True if applied;
  a no-op elsewhere (musl, macOS) or under `MEDJAX_MALLOC=system`. Threads pick their
  arena at their first allocation, so this runs before jax starts any."""
  if os.environ.get("MEDJAX_MALLOC", "") == "system" or not sys.platform.startswith("linux"):
    return False
  if accelerator_installed():  # the step's temporaries live on the device there, and one
    return False               # arena would only slow the host's data-loading threads
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's <malloc.h>
  return all(mallopt(option, value) == 1 for option, value in (
      (m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, -1)))  # -1: never trim


def accelerator_installed() -> bool:
  """A GPU or TPU backend jax would pick over the CPU (its plugin or libtpu installed, and
  JAX_PLATFORMS not restricting jax to the CPU), found without starting any backend."""
  platforms = os.environ.get("JAX_PLATFORMS", "") or os.environ.get("JAX_PLATFORM_NAME", "")
  if platforms:
    return platforms.split(",")[0].strip().lower() != "cpu"
  import importlib.util
  import pkgutil
  try:  # jax's PJRT plugins (CUDA, ROCm, …) register under this namespace package
    import jax_plugins
    plugins = list(pkgutil.iter_modules(jax_plugins.__path__))
  except ImportError:
    plugins = []
  return bool(plugins) or importlib.util.find_spec("libtpu") is not None


def cpu_devices(*, multi_process: bool = False) -> int | None:
  """How many CPU devices to ask jax for: `MEDJAX_CPU_DEVICES`, else one per core up to
  MAX_CPU_DEVICES. None: leave jax's default (XLA_FLAGS already fixes it, or a multi-host
  run, where each process is one device and the hosts' counts must agree)."""
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return None
  value = os.environ.get("MEDJAX_CPU_DEVICES", "").strip()
  if value:
    try:
      count = int(value)
    except ValueError:
      count = 0
    if count < 1:
      from medjax.errors import UserError
      raise UserError(f"MEDJAX_CPU_DEVICES={value!r}: expected a positive number of devices")
    return count
  if multi_process:
    return None
  return min(cores(), MAX_CPU_DEVICES)


def configure(*, multi_process: bool = False) -> None:
  """Apply both settings, once, before jax's backends start (a later call changes
  nothing: the CPU client exists by then)."""
  tune_malloc()
  count = cpu_devices(multi_process=multi_process)
  if count is None:
    return
  import jax
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    return
  jax.config.update("jax_num_cpu_devices", count)
