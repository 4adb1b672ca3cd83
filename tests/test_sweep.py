"""`medjax sweep`: grids as data, point names, a killed sweep resumes only what is missing."""

import csv
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from medjax import cli, sweep
from medjax.sweep import devices, grid, runner

from conftest import XLA_TEST_FLAGS, ROOT, tiny_config
from test_train import write_experiment


def test_product_and_zip_build_the_grid():
  grid = sweep.product(sweep.sweep("train.learning_rate", [1e-3, 3e-3]),
                       sweep.zipped(sweep.sweep("seed", [0, 1]),
                                    sweep.sweep("data.phantom.seed", [5, 6])))
  assert grid == [
      {"train.learning_rate": 1e-3, "seed": 0, "data.phantom.seed": 5},
      {"train.learning_rate": 1e-3, "seed": 1, "data.phantom.seed": 6},
      {"train.learning_rate": 3e-3, "seed": 0, "data.phantom.seed": 5},
      {"train.learning_rate": 3e-3, "seed": 1, "data.phantom.seed": 6}]
  with pytest.raises(sweep.SweepError):
    sweep.zipped(sweep.sweep("seed", [0, 1]), sweep.sweep("train.total_steps", [1]))
  with pytest.raises(sweep.SweepError):
    sweep.product(sweep.sweep("seed", [0]), sweep.sweep("seed", [1]))


def test_point_names_are_readable_unique_and_safe():
  assert grid.point_names([{"train.learning_rate": 0.001, "seed": 1}]) == ["lr0.001_seed1"]
  assert grid.point_names([{"data.phantom.shape": (32, 32, 12), "translator.name": "flow"}]) \
      == ["shape32x32x12_nameflow"]
  # Two keys with the same last part: the whole dotted keys keep the points apart.
  clash = [{"seed": 0, "data.phantom.seed": 1}, {"seed": 1, "data.phantom.seed": 0}]
  names = grid.point_names(clash)
  assert names == ["seed0_data-phantom-seed1", "seed1_data-phantom-seed0"]
  assert all(re.fullmatch(r"[A-Za-z0-9._+=-]+", n) for n in grid.point_names(
      [{"translator.name": "a/b c"}]))


def test_overrides_are_what_the_trainer_parses():
  """The flags the sweep passes turn the experiment file into the swept config."""
  from medjax import config as config_lib
  point = {"train.learning_rate": 3e-4, "data.phantom.shape": (16, 16, 8),
           "translator.name": "regression", "data.augment": False,
           "train.weight_decay": 1.2345678901234e-5}
  overrides = [flag[len("--config."):] for flag in grid.override_flags(point)]
  config = config_lib.load(str(ROOT / "experiments/phantom.py"), overrides)
  assert config.train.learning_rate == 3e-4 and config.translator.name == "regression"
  assert tuple(config.data.phantom.shape) == (16, 16, 8) and config.data.augment is False
  assert config.train.weight_decay == 1.2345678901234e-5  # every digit survives


def test_unknown_key_and_bad_sweep_files(tmp_path, capsys):
  bad = tmp_path / "bad.py"
  bad.write_text("from medjax.sweep import sweep\n"
                 "def get_sweep():\n  return sweep('train.lerning_rate', [1e-3])\n")
  code = cli.main(["medjax", "sweep", "--config", str(ROOT / "experiments/phantom.py"),
                   "--sweep", str(bad), "--workdir", str(tmp_path / "w")])
  err = capsys.readouterr().err
  assert code == 2 and "lerning_rate" in err and err.startswith("medjax sweep: error:")
  uneven = tmp_path / "uneven.py"
  uneven.write_text("def get_sweep():\n  return [{'seed': 0}, {'train.total_steps': 3}]\n")
  with pytest.raises(sweep.SweepError, match="different keys"):
    grid.load_sweep(str(uneven))


def test_slot_environment_pins_each_point(monkeypatch):
  assert devices.slot_env("gpu", ["0", "1", "2", "3"], 1, 2) == {"CUDA_VISIBLE_DEVICES": "2,3"}
  tpu = devices.slot_env("tpu", ["0", "1", "2", "3"], 3, 1)
  assert tpu["TPU_VISIBLE_CHIPS"] == "3" and tpu["TPU_PROCESS_BOUNDS"] == "1,1,1"
  assert "--xla_force_host_platform_device_count=4" in devices.slot_env("cpu", [], 0, 4)["XLA_FLAGS"]
  # one device per run on a CPU: the points running at once share the cores
  from medjax import host
  monkeypatch.delenv("MEDJAX_CPU_DEVICES")
  monkeypatch.setattr(host, "cores", lambda: 8)
  shares = [devices.slot_env("cpu", [], 0, 1, slots=n)["MEDJAX_CPU_DEVICES"]
            for n in (1, 2, 3, 8, 16)]
  assert shares == ["8", "4", "2", "1", "1"]
  monkeypatch.setenv("MEDJAX_CPU_DEVICES", "3")  # the user's own count is kept
  assert devices.slot_env("cpu", [], 0, 1, slots=2) == {}


SWEEP_FILE = """
from medjax.sweep import product, sweep
def get_sweep():
  return product(sweep("train.learning_rate", [1e-3, 3e-3]), sweep("seed", [0, 1]))
"""


@pytest.mark.slow
def test_killed_sweep_resumes_only_unfinished_points(tmp_path):
  config = tiny_config("regression")  # deterministic and cheap to evaluate
  config.train.total_steps = config.checkpoint.every = config.eval.every = 2
  experiment = write_experiment(tmp_path, config)
  sweep_file = tmp_path / "grid.py"
  sweep_file.write_text(SWEEP_FILE)
  root = tmp_path / "sweep"
  command = [sys.executable, "-m", "medjax.cli", "sweep", "--config", experiment,
             "--sweep", str(sweep_file), "--workdir", str(root), "--parallel", "2"]
  # No device-count flag from this process; the tests' compile flags (conftest.TEST_FLAGS) kept.
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
         "XLA_FLAGS": XLA_TEST_FLAGS}
  names = ["lr0.001_seed0", "lr0.001_seed1", "lr0.003_seed0", "lr0.003_seed1"]

  # Emitting a SLURM array runs nothing.
  subprocess.run(command + ["--emit", "slurm"], cwd=ROOT, env=env, check=True,
                 capture_output=True)
  script = (root / "sweep.slurm").read_text()
  assert "#SBATCH --array=0-3%2" in script and all(n in script for n in names)
  assert not any((root / n).exists() for n in names)

  # Kill the sweep (SIGKILL, no clean-up) once a point has finished and others are running.
  process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  done = lambda: [n for n in names if runner.is_finished(str(root / n), 2)]
  deadline = time.time() + 240
  while not done() and process.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  first = done()
  assert 1 <= len(first) < 4, f"the sweep was not interrupted mid-way (finished: {first})"
  time.sleep(0.5)  # the trainers die with the sweep (PR_SET_PDEATHSIG)
  untouched = {p: p.stat().st_mtime_ns for n in first for p in (root / n).rglob("*")
               if p.is_file()}

  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  print(result.stdout)
  assert f"{len(first)} finished, {4 - len(first)} to run" in result.stdout
  assert all(runner.is_finished(str(root / n), 2) for n in names)
  assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
  for name in first:  # started once, never again
    assert (root / "logs" / f"{name}.log").read_text().count("$ ") == 1

  rows = list(csv.DictReader(open(root / "sweep.csv")))
  assert sorted(r["point"] for r in rows) == names
  psnr = [float(r["model_psnr"]) for r in rows]
  assert psnr == sorted(psnr, reverse=True)  # best first
  assert {"train.learning_rate", "seed", "model_mae", "model_ssim", "baseline_psnr"} <= set(rows[0])
  lines = [line.split() for line in result.stdout.splitlines() if line.strip()]
  header = next(i for i, words in enumerate(lines) if words[0] == "point")
  assert [words[0] for words in lines[header + 1:header + 5]] == [r["point"] for r in rows]
  assert (root / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
