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
  assert "exit status" in out and "2 the request cannot run" in " ".join(out.split())
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
