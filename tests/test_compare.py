"""`medjax compare`: experiment specs, the table beside the baseline, the steps sweep, caching."""

import csv
import json

import pytest

from medjax import compare
from medjax import config as config_lib

from conftest import ROOT


def fake_result(run, method, task, psnr, sweep=(), workdir=""):
  scores = {"mae": 0.05, "psnr": psnr, "ssim": 0.8, "through_plane_mae": 0.01}
  return {"run": run, "workdir": workdir, "config": "", "method": method, "task": task,
          "translator": method, "stochastic": bool(sweep),
          "protocol": "mri" if task == "t2w" else "synthrad2023",
          "subjects": 2, "train_steps": 10, "batch_size": 8, "steps": 8, "samples": 1,
          "nfe": 8, "nfe_per_sample": 8, "train_s": 12.0, "sample_ms_per_slice": 3.0,
          "model": scores, "baseline": {**scores, "psnr": 20.0}, "sweep": list(sweep)}


def test_every_default_experiment_loads(monkeypatch):
  monkeypatch.chdir(ROOT)  # the default specs are relative to the repository
  runs = {compare.run_name(spec): config_lib.load(spec) for spec in compare.DEFAULT_EXPERIMENTS}
  assert len(runs) == len(compare.DEFAULT_EXPERIMENTS)  # one workdir per experiment
  assert {c.data.target for c in runs.values()} == {"t2w", "ct"}
  i2sb = runs["phantom-i2sb-ct"]
  assert (i2sb.translator.name, i2sb.translator.bridge, i2sb.data.target) == ("bridge", "i2sb", "ct")
  with pytest.raises(config_lib.ConfigError, match="nope.py"):
    config_lib.load("experiments/nope.py")


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
  assert "through-plane MAE (HU)" in markdown
  compare.write_sweep(str(tmp_path), results)
  with open(tmp_path / "steps.csv") as f:
    assert len(list(csv.DictReader(f))) == 4
  assert (tmp_path / "steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_cached_result_is_reused_only_at_its_own_budget(tmp_path, monkeypatch):
  """compare.json answers a rerun at the same budget; another budget trains anew."""
  monkeypatch.chdir(ROOT)
  spec = "experiments/phantom.py:method=pix2pix,size=tiny"
  budget = compare.Budget(train_steps=4, sweep_steps=())
  config = compare.budget_config(spec, budget)
  workdir = tmp_path / compare.run_name(spec) / budget.workdir_name(config)
  workdir.mkdir(parents=True)
  cached = fake_result("phantom-pix2pix-tiny", "pix2pix", "t2w", 30.0)
  cached["budget"] = {**json.loads(json.dumps(budget.__dict__, default=list)),
                      "batch_size": config.train.batch_size,
                      "samples": config.translator.samples}
  (workdir / "compare.json").write_text(json.dumps(cached))
  assert compare.run_one(spec, str(tmp_path), budget)["model"]["psnr"] == 30.0

  trained = []
  monkeypatch.setattr(compare.train, "train_and_evaluate",
                      lambda config, workdir, mesh=None: trained.append((config, workdir))
                      or (_ for _ in ()).throw(RuntimeError("trained")))
  for other in (compare.Budget(train_steps=5, sweep_steps=()),
                compare.Budget(train_steps=4, sweep_steps=(1, 2))):
    with pytest.raises(RuntimeError, match="trained"):
      compare.run_one(spec, str(tmp_path), other)
  assert [c.train.total_steps for c, _ in trained] == [5, 4]
  assert trained[0][1] != str(workdir)  # another budget: another workdir, never the old run


def test_a_time_budget_becomes_steps_once_and_charges_the_first_stage(tmp_path, monkeypatch):
  """--train-seconds: steps = seconds × this machine's measured rate, planned once per
  workdir (a rerun reads budget.json, never re-measures); a two-stage run's budget is
  what its first stage's logged training time left."""
  monkeypatch.chdir(ROOT)
  spec = "experiments/phantom.py:method=regression,size=tiny"
  config = compare.budget_config(spec, compare.Budget(train_steps=4))
  rate = compare.step_rate(config, min_seconds=0.1, max_steps=4)  # the real, jitted step
  assert 0 < rate < float("inf")

  budget = compare.Budget(train_seconds=30, sweep_steps=())
  monkeypatch.setattr(compare, "step_rate", lambda config, mesh=None: 2.5)
  workdir = tmp_path / "run"
  plan = compare.timed_steps(spec, budget, str(workdir), log=lambda line: None)
  assert plan["steps"] == 75 and plan["first_stage_s"] == 0.0
  monkeypatch.setattr(compare, "step_rate", lambda config, mesh=None: 1 / 0)
  assert compare.timed_steps(spec, budget, str(workdir), log=lambda line: None) == plan
  assert budget.workdir_name(config) == f"seconds30_bs{config.train.batch_size}"

  # a first stage that trained 20 s (two log points: 10 steps at 1 step/s, 20 at 2)
  stage = tmp_path / "vae"
  stage.mkdir()
  (stage / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
      {"split": "train", "step": 10, "steps_per_s": 1.0},
      {"split": "train", "step": 30, "steps_per_s": 2.0})))
  staged = compare.budget_config(spec, budget)
  with staged.unlocked():
    staged.translator.latent_vae = str(stage)
  monkeypatch.setattr(compare, "budget_config", lambda spec, budget, steps=None: staged)
  monkeypatch.setattr(compare, "step_rate", lambda config, mesh=None: 2.5)
  plan = compare.timed_steps(spec, budget, str(tmp_path / "latent"), log=lambda line: None)
  assert plan["first_stage_s"] == 20.0 and plan["steps"] == 25
  with pytest.raises(ValueError, match="first stage alone trained 20 s"):
    compare.timed_steps(spec, compare.Budget(train_seconds=15), str(tmp_path / "x"),
                        log=lambda line: None)


@pytest.mark.slow
def test_a_3d_run_is_timed_on_its_scored_path_over_a_whole_volume(tmp_path, monkeypatch):
  """A 3D run's sampling time is its sliding window over the first held-out volume (the
  scored path), per slice: not a batch of axial slices, which a 3D model cannot take."""
  monkeypatch.chdir(ROOT)
  seen, real = [], compare.evaluate.predict_volume

  def spy(run, source, *args, **kwargs):
    seen.append(source.shape)
    return real(run, source, *args, **kwargs)

  def stop(*args, **kwargs):
    raise RuntimeError("scoring")
  real_train = compare.train.train_and_evaluate

  def train_then_spy(*args, **kwargs):  # the run's own evaluations are not spied on
    result = real_train(*args, **kwargs)
    monkeypatch.setattr(compare.evaluate, "predict_volume", spy)
    monkeypatch.setattr(compare.evaluate, "evaluate", stop)  # timing is all this test needs
    return result
  monkeypatch.setattr(compare.train, "train_and_evaluate", train_then_spy)
  spec = "experiments/phantom_mr_ct_3d.py:size=tiny"
  with pytest.raises(RuntimeError, match="scoring"):
    compare.run_one(spec, str(tmp_path), compare.Budget(train_steps=2, sweep_steps=()))
  from medjax.run import Run
  volume = Run.load(str(next(tmp_path.glob("*/*")))).eval_volumes("test")[0].source
  assert seen == [volume.shape] * 2  # the whole volume, twice (the second run is timed)
