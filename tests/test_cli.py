"""The `medjax` command line: one grammar, one error format, every command run in-process."""

import json
import re

import nibabel as nib
import numpy as np
import pytest

from medjax import cli
from medjax.commands import COMMANDS

from conftest import ROOT, tiny_spec


def run(capsys, *argv):
  code = cli.main(["medjax", *map(str, argv)])
  out, err = capsys.readouterr()
  return code, out, err.strip()


def test_usage_lists_the_commands_and_exit_statuses(capsys):
  code, out, _ = run(capsys, "--help")
  assert code == 0
  for command in COMMANDS:
    assert f"\n  {command} " in out
  assert "exit status" in out and "2 the request cannot run" in out
  assert cli.main(["medjax"]) == 2  # no command: usage, and a usage error


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_only_hyphenated_flags(command, capsys):
  code, out, _ = run(capsys, command, "--help")
  assert code == 0 and f"usage: medjax {command}" in out
  flags = set(re.findall(r"(?<![\w-])--[A-Za-z][\w.-]*", out))
  assert flags, out
  assert not [f for f in flags if "_" in f and not f.startswith("--config.")], flags


def test_underscore_spellings_and_old_names_still_work(tmp_path, capsys):
  out = tmp_path / "p"
  code, _, err = run(capsys, "phantom", "--out", out, "--subjects", "3", "--shape", "8,8,4",
                     "--seed", "2")
  assert code == 0, err
  first = nib.load(out / "phantom_001" / "t1w.nii.gz").get_fdata()
  code, _, err = run(capsys, "phantom", "--output_dir", tmp_path / "q", "--subjects", "3",
                     "--shape", "8x8x4", "--seed", "2")
  assert code == 0, err
  np.testing.assert_array_equal(nib.load(tmp_path / "q" / "phantom_001" / "t1w.nii.gz")
                                .get_fdata(), first)


@pytest.mark.parametrize("argv,hint", [
    (["translate", "--workdir", "w", "--steps", "4"], "--sample-steps"),
    (["compare", "--workdir", "w", "--steps", "4"], "--train-steps"),
    (["prepare", "--split", "0.8,0.1,0.1"], "--fractions"),
    (["phantom", "--output-dir", "x", "--subjects", "2", "--shape", "64by64"], "64by64"),
    (["phantom", "--output-dir", "x", "--subjects", "0"], "--subjects"),
    (["train", "--workdir", "w"], "--config"),
    (["score", "--pred-dir", "a", "--target-dir", "b"], "--protocol"),
    (["nonsense"], "unknown command"),
])
def test_a_mistake_is_one_line_with_status_2(argv, hint, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  code, out, err = run(capsys, *argv)
  assert code == 2 and hint in err and len(err.splitlines()) == 1, err
  assert err.startswith(f"medjax {argv[0]}: error:" if argv[0] in COMMANDS else "medjax: error:")
  assert not (tmp_path / "x").exists() and not (tmp_path / "w").exists()


def test_config_prints_every_key_with_its_meaning_and_overrides(capsys):
  code, out, err = run(capsys, "config", f"{ROOT}/experiments/phantom.py:method=diffusion",
                       "--config.train.total_steps=123", "--config.data.phantom.shape",
                       "64x64x16", "--config.translator.eta=0.5")
  assert code == 0, err
  lines = out.strip().splitlines()
  assert all("  # " in line and not line.endswith("(no description)") for line in lines)
  values = dict(line.split("  #")[0].split(" = ", 1) for line in lines)
  values = {k.strip(): v.strip() for k, v in values.items()}
  assert values["train.total_steps"] == "123" and values["translator.eta"] == "0.5"
  assert values["data.phantom.shape"] == "[64, 64, 16]"
  assert values["translator.name"] == "'diffusion'"
  code, out, _ = run(capsys, "config", f"{ROOT}/experiments/phantom.py", "--json")
  assert json.loads(out)["translator"]["name"] == "flow"


@pytest.mark.slow
def test_every_command_runs_in_process(tmp_path, capsys, monkeypatch):
  """phantom → prepare → train (with overrides, in this process) → evaluate → translate →
  score → config → sweep → compare, each through `cli.main` as a user types it."""
  monkeypatch.chdir(ROOT)
  data, shards, workdir = tmp_path / "data", tmp_path / "shards", tmp_path / "run"
  assert run(capsys, "phantom", "--output-dir", data, "--subjects", "5",
             "--shape", "32x32x12")[0] == 0
  assert run(capsys, "prepare", "--layout", "phantom", "--input-dir", data,
             "--output-dir", shards, "--source", "t1w", "--target", "t2w", "--spacing", "5x5x8",
             "--size", "32x32", "--fractions", "0.6,0.2,0.2")[0] == 0
  code, out, err = run(capsys, "train", "--config", "experiments/brats_t1_t2.py:method=regression",
                       "--workdir", workdir, f"--config.data.dir={shards}",
                       "--config.train.total_steps=3", "--config.train.batch_size", "4",
                       "--config.model.channels=8", "--config.model.channel_mult=1,2",
                       "--config.model.num_res_blocks=1", "--config.model.attention_levels=()",
                       "--config.data.workers=0", "--config.logging.progress=false",
                       "--config.eval.every=3", "--config.checkpoint.every=3")
  assert code == 0, err
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["train"]["total_steps"] == 3 and saved["data"]["dir"] == str(shards)
  assert saved["model"]["channel_mult"] == [1, 2] and saved["model"]["attention_levels"] == []
  assert "results:" in out

  code, out, err = run(capsys, "evaluate", "--workdir", workdir, "--split", "test")
  assert code == 0 and "held-out test" in out, err
  test_subject = json.loads((shards / "manifest.json").read_text())["splits"]["test"][0]
  prediction = tmp_path / "out" / f"{test_subject}.nii.gz"
  code, out, err = run(capsys, "translate", "--workdir", workdir, "--input",
                       data / test_subject / "t1w.nii.gz", "--output", prediction)
  assert code == 0 and prediction.exists(), err
  code, out, err = run(capsys, "score", "--pred-dir", tmp_path / "out", "--target-dir", data,
                       "--layout", "phantom", "--target", "t2w", "--protocol", "mri")
  # the other four subjects have no prediction: scored one, the rest reported (status 1)
  assert code == 1 and f"{test_subject}" in out and "1 subject(s) scored" in out
  assert run(capsys, "config", tiny_spec("bridge"), "--config.seed=3")[0] == 0

  grid = tmp_path / "grid.py"
  grid.write_text("from medjax.sweep import sweep\n"
                  "def get_sweep():\n  return sweep('train.learning_rate', [1e-3, 2e-3])\n")
  code, out, err = run(capsys, "sweep", "--config", tiny_spec("regression"), "--sweep", grid,
                       "--workdir", tmp_path / "sweep", "--dry-run")
  assert code == 0 and out.count("to run") == 2, err
  code, out, err = run(capsys, "compare", "--experiments", tiny_spec("regression"),
                       "--workdir", tmp_path / "compare", "--train-steps", "2",
                       "--sweep-steps", "", "--image-slices", "1")
  assert code == 0 and "intensity map (baseline)" in out, err
  assert (tmp_path / "compare" / "compare.md").exists()


def test_an_empty_split_is_said_before_any_training(tmp_path, capsys):
  """Two subjects leave no validation or test subject: `phantom` warns, `prepare` warns,
  and `train` refuses before it creates anything (it used to train, then crash)."""
  data = tmp_path / "two"
  code, _, err = run(capsys, "phantom", "--output-dir", data, "--subjects", "2",
                     "--shape", "16x16x12")
  assert code == 0 and "warning" in err and "val and test split(s) empty" in err
  code, _, err = run(capsys, "prepare", "--layout", "phantom", "--input-dir", data,
                     "--output-dir", tmp_path / "shards", "--source", "t1w", "--target", "t2w",
                     "--spacing", "10x10x8", "--size", "16x16")
  assert code == 0 and "no subject in the val and test split(s)" in err
  for overrides, said in ((["--config.data.phantom.subjects=2"], "data.phantom.subjects=2"),
                          (["--config.data.kind=shards", f"--config.data.dir={tmp_path / 'shards'}"],
                           "the val split")):
    code, _, err = run(capsys, "train", "--config", tiny_spec(), "--workdir",
                       tmp_path / "run", *overrides)
    assert code == 2 and len(err.splitlines()) == 1 and not (tmp_path / "run").exists(), err
    assert said in err
