"""SIGKILL in the middle of every stage that writes, then the same command again.

Each stage is killed while writing one of its files (tests/kill_at.py: the content is in
the temporary, the rename has not happened — what `kill -9` or a power cut leaves). The
rerun must finish the work, nothing half-written may be left where a reader looks, and the
outputs must equal, byte for byte, those of an uninterrupted run. Training killed mid-run
is tests/test_train.py's resume test; a killed sweep is tests/test_sweep.py's.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from medjax import cli, files, train

from conftest import XLA_TEST_FLAGS, ROOT, tiny_config
from test_train import write_experiment

pytestmark = pytest.mark.slow
KILL = str(ROOT / "tests" / "kill_at.py")
SUBJECTS = 5


def medjax(*argv) -> int:
  return cli.main(["medjax", *map(str, argv)])


def killed(pattern: str, count: int, *argv):
  """Run `medjax argv` in a subprocess that dies writing the count-th file like pattern."""
  # one device, and the same XLA options as this process (its results are compared bitwise)
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
         "XLA_FLAGS": XLA_TEST_FLAGS}
  process = subprocess.run([sys.executable, KILL, pattern, str(count), "medjax",
                            *map(str, argv)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
  assert process.returncode == -9, process.stderr[-2000:]  # it died where it was meant to


def contents(folder) -> dict:
  """Every file under `folder` (temporaries included) → its bytes."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file()}


def temporaries(folder) -> list:
  return sorted(str(p) for p in folder.rglob(files.TMP_PREFIX + "*"))


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
  data = tmp_path_factory.mktemp("phantom")
  assert medjax("phantom", "--output-dir", data, "--subjects", SUBJECTS,
                "--shape", "32x32x12") == 0
  return data


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(tiny_config("regression"), str(workdir))
  return workdir


def test_prepare_killed_writing_its_manifest(phantom_files, tmp_path):
  args = ["prepare", "--layout", "phantom", "--input-dir", phantom_files, "--source", "t1w",
          "--target", "t2w", "--spacing", "5x5x8", "--size", "32x32"]
  assert medjax(*args, "--output-dir", tmp_path / "straight") == 0
  out = tmp_path / "killed"
  killed("manifest.json", 2, *args, "--output-dir", out)  # the final manifest, half done
  assert temporaries(out) and not json.loads((out / "manifest.json").read_text())["complete"]
  assert medjax(*args, "--output-dir", out) == 0
  assert not temporaries(out)
  straight, again = contents(tmp_path / "straight"), contents(out)
  manifest = lambda c: json.loads(c["manifest.json"].decode().replace(str(out), "OUT").replace(
      str(tmp_path / "straight"), "OUT"))
  assert manifest(again) == manifest(straight)
  del straight["manifest.json"], again["manifest.json"]
  assert again == straight  # every shard and its json, byte for byte


def test_translate_directory_killed_between_subjects(run, phantom_files, tmp_path):
  args = ["translate", "--workdir", run, "--input-dir", phantom_files, "--layout", "phantom"]
  assert medjax(*args, "--output-dir", tmp_path / "straight") == 0
  out = tmp_path / "killed"
  killed("*.nii.gz", 3, *args, "--output-dir", out)
  assert temporaries(out) and not (out / "translations.json").exists()
  assert medjax(*args, "--output-dir", out) == 0
  assert not temporaries(out)
  straight, again = contents(tmp_path / "straight"), contents(out)
  del straight["translations.json"], again["translations.json"]  # it holds timings
  assert len(again) == SUBJECTS and again == straight


def test_score_killed_writing_its_table(phantom_files, tmp_path):
  preds = tmp_path / "preds"
  preds.mkdir()
  for i in range(SUBJECTS):  # the PD image as a "prediction" of T2w: any fixed file will do
    os.link(phantom_files / f"phantom_{i:03d}" / "pd.nii.gz", preds / f"phantom_{i:03d}.nii.gz")
  args = ["score", "--pred-dir", preds, "--target-dir", phantom_files, "--layout", "phantom",
          "--protocol", "mri", "--target", "t2w"]
  assert medjax(*args, "--output", tmp_path / "straight" / "scores.csv") == 0
  out = tmp_path / "killed"
  killed("scores.json", 1, *args, "--output", out / "scores.csv")
  assert temporaries(out) and not (out / "scores.json").exists()
  assert medjax(*args, "--output", out / "scores.csv") == 0
  assert not temporaries(out)
  assert contents(out) == contents(tmp_path / "straight")


def test_training_killed_while_a_checkpoint_is_being_written(tmp_path):
  config = tiny_config("regression")
  config.checkpoint.every = 2
  straight = tmp_path / "straight"
  train.train_and_evaluate(config, str(straight))
  workdir = tmp_path / "killed"
  experiment = write_experiment(tmp_path, config)
  killed("checkpoint", 2, "train", "--config", experiment, "--workdir", workdir)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] < config.train.total_steps
  assert medjax("train", "--config", experiment, "--workdir", workdir) == 0

  def params(w):
    path = w / "checkpoints" / str(config.train.total_steps) / "state"
    return jax.tree.leaves(ocp.StandardCheckpointer().restore(path)["params"])
  for x, y in zip(params(straight), params(workdir), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
