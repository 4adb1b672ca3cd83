"""Which accelerators a sweep can pin its points to, found without importing jax.

Importing jax in the sweep's parent process would claim every accelerator; the points
each get their own through the environment instead (`slot_env`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess


def accelerators() -> tuple[str, list[str]]:
  """('gpu' | 'tpu' | 'cpu', the ids a slot can be pinned to), without importing jax
  (which would claim every accelerator in this parent process)."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None and visible.strip() not in ("", "-1"):
    return "gpu", [d.strip() for d in visible.split(",") if d.strip()]
  if visible is None and shutil.which("nvidia-smi"):
    try:
      out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30).stdout
      ids = [line.strip() for line in out.splitlines() if line.strip().isdigit()]
      if ids:
        return "gpu", ids
    except (OSError, subprocess.SubprocessError):
      pass
  chips = sorted(p for p in os.listdir("/dev") if re.fullmatch(r"accel\d+", p)) \
      if os.path.isdir("/dev") else []
  if chips:
    return "tpu", [c[len("accel"):] for c in chips]
  return "cpu", []


_TPU_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}


def slot_env(kind: str, ids: list[str], slot: int, devices_per_run: int,
             slots: int = 1) -> dict[str, str]:
  """Environment that gives slot `slot` its own `devices_per_run` accelerators. On a CPU
  with one device per run asked for, each of the `slots` points at once gets its share of
  the cores as CPU devices (medjax/host.py): two points on 2 cores, one device each,
  rather than two devices each fighting over both cores."""
  env = {}
  if kind == "cpu":
    if devices_per_run == 1 and "MEDJAX_CPU_DEVICES" not in os.environ:
      from medjax import host
      env["MEDJAX_CPU_DEVICES"] = str(max(1, host.cores() // max(slots, 1)))
    if devices_per_run > 1:
      flags = os.environ.get("XLA_FLAGS", "")
      flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
      env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_run}".strip()
    return env
  mine = ids[slot * devices_per_run:(slot + 1) * devices_per_run]
  if kind == "gpu":
    env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
  else:
    # Several independent jax processes on one TPU host: each sees only its chips, as a
    # one-process slice of its own, with its own port (jax-ml/jax#8809).
    env.update({"TPU_VISIBLE_CHIPS": ",".join(mine), "TPU_PROCESS_BOUNDS": "1,1,1",
                "TPU_CHIPS_PER_PROCESS_BOUNDS": _TPU_BOUNDS.get(devices_per_run, "1,1,1"),
                "TPU_PROCESS_PORT": str(8476 + slot),
                "TPU_MESH_CONTROLLER_PORT": str(8476 + slot),
                "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{8476 + slot}"})
  return env
