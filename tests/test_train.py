"""End-to-end training: run directory, exact resume after SIGKILL, 1 vs 8 devices, bad input."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from medjax import cli, parallel, train

from conftest import ROOT, tiny_config, tiny_spec

IMAGE_NAME = re.compile(r"(val|test)_\d{6}\.png")  # images/<split>_<step, 6 digits>.png


def write_experiment(tmp_path, config) -> str:
  """A config file on disk holding `config` exactly (what a user's experiment file is)."""
  path = tmp_path / "experiment.py"
  path.write_text(textwrap.dedent(f"""
      import json
      import ml_collections
      def get_config():
        return ml_collections.ConfigDict(json.loads({json.dumps(json.dumps(config.to_dict(), default=list))}))
      """))
  return str(path)


def saved_params(workdir, step):
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return state["params"], state["ema_params"]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("flow_run"))
  summary = train.train_and_evaluate(tiny_config("flow"), workdir)
  return workdir, summary


def test_run_directory(flow_run):
  workdir, summary = flow_run
  files = set(os.listdir(workdir))
  assert {"config.json", "preprocessing.json", "baseline.json", "checkpoints", "metrics.jsonl",
          "tensorboard", "images", "eval"} <= files
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  written = json.load(open(os.path.join(workdir, "eval", "6", "summary.json")))
  assert written == json.loads(json.dumps(summary))
  for name in ("model", "baseline"):
    assert {"mae", "psnr", "ssim"} <= set(written[name])
    assert all(np.isfinite(v) for v in written[name].values())
  rows = open(os.path.join(workdir, "eval", "6", "subjects.csv")).read().splitlines()
  assert len(rows) == 1 + written["subjects"]
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in logged if r["split"] == "train"] == [2, 3, 4, 6]
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  png = os.path.join(workdir, "images", "val_000006.png")
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  report = os.path.join(workdir, "eval", "6", "report")
  assert "report.md" in os.listdir(report) and any(f.endswith(".png") for f in os.listdir(report))
  # Nothing half-written survives: every temporary was renamed or removed.
  assert not [p for p in pathlib.Path(workdir).rglob(".tmp-*")]


def test_evaluate_command_scores_test_subjects(flow_run, capsys):
  workdir, _ = flow_run
  assert cli.main(["medjax", "evaluate", "--workdir", workdir]) == 0
  summary = json.load(open(os.path.join(workdir, "eval", "6", "test_summary.json")))
  assert summary["split"] == "test" and summary["step"] == 6
  assert "held-out test" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(tmp_path, monkeypatch):
  """Run on the 3D experiment: its patch source is a pure function of the restored grain
  index, as the 2D slice source is (test_pipeline.py restores a 2D iterator exactly), and
  the loop, state and checkpoint are the same code for both. The straight run (in this
  process) skips its evaluations, the killed and resumed one (a subprocess) makes them:
  evaluation leaves the training state alone, or the two would differ."""
  from medjax import config as config_lib
  config = config_lib.load(f"{ROOT}/experiments/phantom_mr_ct_3d.py:size=tiny,method=flow")
  config.train.total_steps = 6
  config.checkpoint.every = 2
  config.eval.every = 2  # evaluation after each checkpoint gives the kill a window mid-run
  straight = str(tmp_path / "straight")
  with monkeypatch.context() as patch:
    patch.setattr(train.evaluate_lib, "evaluate_run",
                  lambda run, split, **kwargs: {"step": run.step})
    patch.setattr(train.evaluate_lib, "format_summary", lambda summary: "")
    train.train_and_evaluate(config, straight)

  killed = str(tmp_path / "killed")
  command = [sys.executable, "-m", "medjax.cli", "train", "--config",
             write_experiment(tmp_path, config), "--workdir", killed]
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  first = os.path.join(killed, "checkpoints", "2")
  deadline = time.time() + 240
  while not os.path.isdir(first) and time.time() < deadline and process.poll() is None:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  done = sorted(int(s) for s in os.listdir(os.path.join(killed, "checkpoints")) if s.isdigit())
  assert done and done[-1] < 6, f"the run was not interrupted mid-way (checkpoints {done})"

  subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
  leaves = [jax.tree.leaves(saved_params(w, 6)) for w in (straight, killed)]
  assert len(leaves[0]) == len(leaves[1]) > 0
  for x, y in zip(*leaves):
    assert np.array_equal(np.asarray(x), np.asarray(y))


def test_the_step_refuses_implicit_transfers(tmp_path, monkeypatch):
  """The loop runs the step under jax.transfer_guard('disallow'): a batch left on the host
  (here: global_batch skipped) is an error, not a silent copy every step."""
  monkeypatch.setattr(parallel, "global_batch", lambda local, mesh: local)
  with pytest.raises(Exception, match="(?i)disallowed host-to-device transfer"):
    train.train_and_evaluate(tiny_config("regression"), str(tmp_path / "guarded"))


def run_cli(args, capsys):
  code = cli.main(["medjax", *args])
  err = capsys.readouterr().err.strip()
  return code, err


def test_unknown_config_key_is_one_clear_line(tmp_path, capsys):
  code, err = run_cli(["train", "--config", str(ROOT / "experiments/phantom.py"),
                       "--workdir", str(tmp_path / "w"), "--config.train.stepz=3"], capsys)
  assert code == 2 and err.startswith("medjax train: error:") and "stepz" in err
  assert len(err.splitlines()) == 1
  assert not (tmp_path / "w").exists()


def test_missing_config_file(tmp_path, capsys):
  code, err = run_cli(["train", "--config", str(tmp_path / "nope.py"),
                       "--workdir", str(tmp_path / "w")], capsys)
  assert code == 2 and "nope.py" in err and len(err.splitlines()) == 1
  assert not (tmp_path / "w").exists()


def test_workdir_of_another_experiment_is_refused(flow_run, tmp_path, capsys):
  workdir, _ = flow_run
  before = {p: p.stat().st_mtime_ns for p in pathlib.Path(workdir).rglob("*") if p.is_file()}
  config = tiny_config("regression")
  code, err = run_cli(["train", "--config", write_experiment(tmp_path, config),
                       "--workdir", workdir], capsys)
  assert code == 2 and "another experiment" in err and "translator.name" in err
  after = {p: p.stat().st_mtime_ns for p in pathlib.Path(workdir).rglob("*") if p.is_file()}
  assert after == before


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, capsys):
  workdir = tmp_path / "nan"
  code, err = run_cli(["train", "--config", tiny_spec("regression"), "--workdir", str(workdir),
                       "--config.train.learning_rate=1e38", "--config.train.grad_clip=1e38"],
                      capsys)
  assert code == 1 and "non-finite" in err and len(err.splitlines()) == 1
  assert err.startswith("medjax train: error:")
  # Nothing from the diverged steps was checkpointed.
  checkpoints = workdir / "checkpoints"
  assert not checkpoints.exists() or not [p for p in checkpoints.iterdir() if p.name.isdigit()]


def test_the_readme_describes_the_run_directory_as_written(flow_run):
  workdir, _ = flow_run
  text = (ROOT / "README.md").read_text()
  block = text[text.index("runs/phantom_flow/\n"):]
  block = block[:block.index("```")]
  listed = {line.split()[0].split("/")[0] for line in block.splitlines()[1:]
            if line.startswith("  ") and not line.startswith("   ")}
  assert listed == set(os.listdir(workdir)), listed
  example = IMAGE_NAME.search(block).group(0)  # the README's example picture name
  written = os.listdir(os.path.join(workdir, "images"))
  assert written and all(IMAGE_NAME.fullmatch(name) for name in written), written
  assert IMAGE_NAME.fullmatch(example)



def test_a_run_saved_before_a_key_existed_resumes_only_at_its_default():
  """config.json of an older medjax lacks later keys (model.dtype, mesh): they held their
  defaults then, so resuming is the same experiment unless the new value differs."""
  from medjax import config as config_lib
  config = tiny_config("flow")
  saved = json.loads(config_lib.to_json(config))
  del saved["model"]["dtype"], saved["mesh"], saved["translator"]["sampler"]
  assert config_lib.experiment_differences(saved, config.to_dict()) == []
  config.model.dtype = "bfloat16"
  config.translator.sampler = "heun"
  assert config_lib.experiment_differences(saved, config.to_dict()) == [
      "model.dtype", "translator.sampler"]
