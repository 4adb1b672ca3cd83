"""The commands' CPU host settings (medjax/host.py): glibc malloc kept from remapping a
freed buffer, one CPU device per core, and the mesh taking the devices the batch divides."""

import json
import os
import subprocess
import sys
import types

import nibabel as nib
import numpy as np
import pytest

from medjax import cli, host, parallel
from medjax.errors import UserError

from conftest import ROOT, XLA_TEST_FLAGS, tiny_spec

PAGE = os.sysconf("SC_PAGE_SIZE")
BUFFER = 256 * 2**20  # bytes: as large as XLA's per-step temporaries at the default size

# Allocates, touches and frees a buffer twice with libc's malloc, as XLA:CPU does (numpy
# would advise huge pages); prints the minor page faults of the second round. A buffer
# glibc maps afresh faults in every page again; one kept mapped, none.
TOUCH_TWICE = f"""
import ctypes, json, resource
from medjax import host
applied = host.tune_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def faults():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  buffer = libc.malloc({BUFFER})
  ctypes.memset(buffer, 1, {BUFFER})
  libc.free(buffer)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(json.dumps({{"applied": applied, "faults": faults()}}))
"""


def touch_twice(malloc: str) -> dict:
  env = {**os.environ, "MEDJAX_MALLOC": malloc}
  result = subprocess.run([sys.executable, "-c", TOUCH_TWICE], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
  return json.loads(result.stdout.splitlines()[-1])


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_malloc_reuses_a_freed_buffer_without_faulting_its_pages_again():
  pages = BUFFER // PAGE
  system, tuned = touch_twice("system"), touch_twice("")
  assert not system["applied"] and tuned["applied"]
  # glibc's default maps a buffer this size afresh: every page faults again (a kernel
  # with transparent huge pages always on faults once per 2 MiB instead)
  if "[always]" in _read("/sys/kernel/mm/transparent_hugepage/enabled"):
    pages = BUFFER // 2**21
  assert system["faults"] >= pages * 0.9
  assert tuned["faults"] < pages * 0.02 and tuned["faults"] * 10 <= system["faults"]


def test_malloc_is_left_alone_where_an_accelerator_runs_the_step(monkeypatch):
  monkeypatch.delenv("MEDJAX_MALLOC", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert host.accelerator_installed() and not host.tune_malloc()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert not host.accelerator_installed()


def test_cpu_device_count_rule(monkeypatch):
  monkeypatch.delenv("MEDJAX_CPU_DEVICES", raising=False)
  monkeypatch.setenv("XLA_FLAGS", XLA_TEST_FLAGS)
  for cores, expected in ((1, 1), (2, 2), (6, 6), (32, host.MAX_CPU_DEVICES)):
    monkeypatch.setattr(host, "cores", lambda cores=cores: cores)
    assert host.cpu_devices() == expected
  assert host.cpu_devices(multi_process=True) is None  # every process: jax's one device
  monkeypatch.setenv("MEDJAX_CPU_DEVICES", "3")
  assert host.cpu_devices() == 3 and host.cpu_devices(multi_process=True) == 3
  for bad in ("0", "two", "-1"):
    monkeypatch.setenv("MEDJAX_CPU_DEVICES", bad)
    with pytest.raises(UserError, match="MEDJAX_CPU_DEVICES"):
      host.cpu_devices()
  # an explicit count in XLA_FLAGS (what `medjax sweep` gives each point) wins
  monkeypatch.setenv("XLA_FLAGS", f"{XLA_TEST_FLAGS} --xla_force_host_platform_device_count=4")
  assert host.cpu_devices() is None


def test_default_mesh_takes_the_most_cpu_devices_that_divide_the_batch(monkeypatch):
  def devices(count, platform="cpu"):
    monkeypatch.setattr(parallel.jax, "devices",
                        lambda: [types.SimpleNamespace(platform=platform)] * count)

  def share(batch, data=-1, fsdp=1):
    config = {"train": {"batch_size": batch}, "mesh": types.SimpleNamespace(data=data,
                                                                            fsdp=fsdp)}
    return parallel._cpu_share(config, config["mesh"])

  devices(8)
  # the largest divisor of the batch that is at most the device count, by hand
  assert [share(b) for b in (16, 12, 10, 7, 1)] == [8, 6, 5, 7, 1]
  assert share(12, data=2) is None and share(12, fsdp=4) is None  # a mesh asked for: as is
  devices(8, "gpu")
  assert share(12) is None  # accelerators: all of them, or an error naming them
  devices(1)
  assert share(12) is None


@pytest.mark.slow
def test_train_command_splits_the_batch_over_one_cpu_device_per_core(tmp_path):
  """`medjax train` in a clean environment (no MEDJAX_CPU_DEVICES, no device count in
  XLA_FLAGS) runs on one CPU device per core, up to what the batch divides, and says so in
  its summary."""
  env = {k: v for k, v in os.environ.items() if k not in ("MEDJAX_CPU_DEVICES", "XLA_FLAGS")}
  env["XLA_FLAGS"] = XLA_TEST_FLAGS

  def medjax(*argv, **extra_env):
    subprocess.run([sys.executable, "-m", "medjax.cli", *map(str, argv)], cwd=ROOT,
                   env={**env, **extra_env}, check=True, capture_output=True)

  workdir = tmp_path / "run"
  medjax("train", "--config", tiny_spec(), "--workdir", workdir)
  summary = json.loads((workdir / "eval" / "6" / "summary.json").read_text())
  batch = 8  # experiments/phantom.py at size=tiny
  cores = min(host.cores(), host.MAX_CPU_DEVICES)
  expected = max(d for d in range(1, cores + 1) if batch % d == 0)
  assert summary["devices"] == f"{expected} cpu"
  # A file translated on those devices is the one device's translation: each slice's
  # draws are its own, whichever device holds it.
  assert cli.main(["medjax", "phantom", "--output-dir", str(tmp_path / "data"),
                   "--subjects", "1", "--shape", "32x32x12"]) == 0
  source = next((tmp_path / "data").glob("*/t1w.nii.gz"))
  medjax("translate", "--workdir", workdir, "--input", source, "--output", tmp_path / "a.nii.gz")
  medjax("translate", "--workdir", workdir, "--input", source, "--output",
         tmp_path / "one.nii.gz", MEDJAX_CPU_DEVICES="1")
  split, one = (np.asarray(nib.load(tmp_path / name).dataobj) for name in ("a.nii.gz",
                                                                           "one.nii.gz"))
  np.testing.assert_allclose(split, one, rtol=0, atol=1e-6)
