"""Two processes with a coordinator on localhost train the model one process trains.

`medjax train --coordinator localhost:PORT --num-processes 2 --process-id {0,1}` runs as two
CPU processes of one CPU device each (jax.distributed over gloo); each reads only its half
of every global batch. The reference is one process holding two virtual CPU devices: the
same 2-way SPMD program over the same global batches, with no jax.distributed.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import XLA_TEST_FLAGS, ROOT, tiny_config
from test_train import write_experiment

STEPS = 3


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def restored_params(workdir: str, step: int):
  """Params of a checkpoint onto this process's one device, whatever topology saved it."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  metadata = getattr(metadata, "item_metadata", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        metadata)
  return checkpointer.restore(path, target)["params"]


@pytest.mark.slow
def test_two_processes_train_the_same_model_as_one(tmp_path):
  config = tiny_config("regression")
  config.data.augment = True  # augmentation is seeded per record: it must not depend on P
  config.train.total_steps = config.checkpoint.every = config.eval.every = STEPS
  config.train.log_every = 1
  experiment = write_experiment(tmp_path, config)
  # Every process compiles as the tests do (conftest.TEST_FLAGS): the runs compared bitwise
  # share their flags; only the device count differs.
  env = {**{k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SLURM_NTASKS")},
         "XLA_FLAGS": XLA_TEST_FLAGS}
  env["JAX_PLATFORMS"] = "cpu"

  def train(workdir, *extra, xla_flags=None):
    return subprocess.Popen(
        [sys.executable, "-m", "medjax.cli", "train", "--config", experiment,
         "--workdir", str(tmp_path / workdir), *extra],
        cwd=ROOT,
        env={**env, **({"XLA_FLAGS": f"{XLA_TEST_FLAGS} {xla_flags}"} if xla_flags else {})},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

  coordinator = f"localhost:{free_port()}"
  # The old underscore spellings of the flags, which must keep working.
  processes = [train("multi", "--coordinator", coordinator, "--num_processes", "2",
                     "--process_id", str(i)) for i in range(2)]
  processes.append(train("one", xla_flags="--xla_force_host_platform_device_count=2"))
  try:
    errors = [p.communicate(timeout=240)[1] for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  for p, error in zip(processes, errors):
    assert p.returncode == 0, error[-3000:]

  multi, one = (jax.tree.leaves(restored_params(str(tmp_path / w), STEPS))
                for w in ("multi", "one"))
  assert len(multi) == len(one) > 0
  # Both runs execute the same per-device program on the same rows; the one cross-device
  # reduction, a sum of two partial gradients, is exact in either order: bit for bit.
  for x, y in zip(multi, one):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # Only process 0 wrote logs, images and evaluation files: one line per logged step.
  workdir = tmp_path / "multi"
  logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in logged if r["split"] == "train"] == list(range(1, STEPS + 1))
  losses = [r["loss"] for r in logged if r["split"] == "train"]
  assert len(set(losses)) == STEPS  # three distinct batches and updates: the runs trained
  assert [r["step"] for r in logged if r["split"] == "val"] == [STEPS]
  assert os.listdir(workdir / "images") == [f"val_{STEPS:06d}.png"]
  assert len(os.listdir(workdir / "tensorboard")) == 1
  summary = json.load(open(workdir / "eval" / str(STEPS) / "summary.json"))
  reference = json.load(open(tmp_path / "one" / "eval" / str(STEPS) / "summary.json"))
  np.testing.assert_allclose(summary["model"]["psnr"], reference["model"]["psnr"], rtol=1e-5)
  # Orbax wrote the checkpoint collectively: both processes' data-iterator positions.
  assert sorted(os.listdir(workdir / "checkpoints" / str(STEPS) / "iter")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
