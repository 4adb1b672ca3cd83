"""`medjax compare`: config specs, the table beside the baseline, the steps sweep, resuming."""

import argparse
import csv
import json
import pathlib

import pytest

from medjax import compare

ROOT = pathlib.Path(__file__).resolve().parent.parent


def fake_result(run, method, task, psnr, sweep=()):
  scores = {"mae": 0.05, "psnr": psnr, "ssim": 0.8}
  return {"run": run, "config": "", "method": method, "task": task, "translator": method,
          "stochastic": bool(sweep), "protocol": "mri" if task == "t2w" else "synthrad2023",
          "subjects": 2, "train_steps": 10, "batch_size": 8, "steps": 8, "samples": 1,
          "nfe": 8, "nfe_per_sample": 8, "train_s": 12.0, "sample_ms_per_slice": 3.0,
          "model": scores, "baseline": {**scores, "psnr": 20.0}, "sweep": list(sweep)}


def test_every_default_config_loads_with_its_variant(monkeypatch):
  monkeypatch.chdir(ROOT)  # the default specs are relative to the repository
  runs = [compare.load_config(spec) for spec in compare.DEFAULT_CONFIGS]
  assert len({run for run, _ in runs}) == len(runs)  # one workdir per config
  targets = {config.data.target for _, config in runs}
  assert targets == {"t2w", "ct"}
  i2sb = dict(runs)["phantom_bridge_ct-i2sb"]
  assert (i2sb.translator.bridge, i2sb.data.target) == ("i2sb", "ct")
  with pytest.raises(FileNotFoundError):
    compare.load_config("experiments/nope.py")


def test_table_and_sweep_files(tmp_path):
  sweep = [{"steps": s, "nfe": s, "mae": 0.1 / s, "psnr": 20 + s, "ssim": 0.5} for s in (1, 2)]
  results = [fake_result("a", "flow", "t2w", 25.0, sweep), fake_result("b", "pix2pix", "t2w", 24.0),
             fake_result("c", "flow", "ct", 26.0, sweep)]
  rows = compare.write_table(str(tmp_path), results)
  with open(tmp_path / "compare.csv") as f:
    written = list(csv.DictReader(f))
  assert [r["method"] for r in written] == [r["method"] for r in rows] == [
      "intensity map (baseline)", "flow", "pix2pix", "intensity map (baseline)", "flow"]
  assert float(written[0]["psnr"]) == 20.0 and float(written[1]["psnr"]) == 25.0
  markdown = (tmp_path / "compare.md").read_text()
  assert "T1w → T2w" in markdown and "T1w → CT" in markdown and "MAE (HU)" in markdown
  compare.write_sweep(str(tmp_path), results)
  with open(tmp_path / "steps.csv") as f:
    assert len(list(csv.DictReader(f))) == 4
  assert (tmp_path / "steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_run_is_not_retrained(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  parser = argparse.ArgumentParser()
  compare.add_compare_args(parser)
  args = parser.parse_args(["--workdir", str(tmp_path), "--configs",
                            "experiments/phantom_pix2pix.py"])
  done = tmp_path / "phantom_pix2pix" / "compare.json"
  done.parent.mkdir()
  done.write_text(json.dumps(fake_result("phantom_pix2pix", "pix2pix", "t2w", 30.0)))
  assert compare.run_one(args.configs[0], args, mesh=None)["model"]["psnr"] == 30.0
