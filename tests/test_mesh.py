"""The data × fsdp mesh, FSDP sharding, checkpoints across mesh shapes, the async loop."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from medjax import config as config_lib
from medjax import parallel, train
from medjax.errors import ConfigError

from conftest import ROOT, family_specs, tiny_config


@pytest.mark.parametrize("shape,fsdp,spec", [
    ((3, 3, 64, 128), 4, (None, None, None, "fsdp")),  # the largest divisible: 128
    ((3, 3, 128, 64), 4, (None, None, "fsdp")),
    ((4096, 6), 4, ("fsdp",)),
    ((3, 3, 30, 66), 4, ()),  # no dimension divides: replicated
    ((64,), 4, ()),  # too small to be worth gathering
    ((3, 3, 64, 128), 1, ()),  # fsdp 1: plain data parallelism
])
def test_fsdp_rule_shards_the_largest_divisible_dimension(shape, fsdp, spec):
  assert tuple(parallel.fsdp_spec(shape, fsdp)) == spec


def test_mesh_shape_from_the_config_keys():
  devices = len(jax.devices())
  mesh = parallel.make_mesh(data=-1, fsdp=1)
  assert dict(mesh.shape) == {"data": devices, "fsdp": 1}
  with pytest.raises(ConfigError, match="does not match"):
    parallel.make_mesh(data=devices + 1, fsdp=1)
  with pytest.raises(ConfigError, match="both be -1"):
    parallel.make_mesh(data=-1, fsdp=-1)
  config = tiny_config()
  config.mesh.fsdp = 3
  with pytest.raises(ConfigError, match="mesh.data"):
    parallel.mesh_for(config, 2) if devices >= 2 else parallel.make_mesh(data=2, fsdp=3)
  config_lib.override(config, ["mesh.fsdp=1", "train.profile_steps=2,3"])
  assert tuple(config.train.profile_steps) == (2, 3)


def test_the_loop_fetches_metrics_only_at_log_points(tmp_path, monkeypatch):
  """Between log points the host never waits for the device: the metrics of every step
  stay on the device and are fetched (and checked) together, once per `log_every`."""
  config = tiny_config("regression")
  config.train.total_steps = 12
  config.train.log_every = 4
  config.checkpoint.every = config.eval.every = 12
  fetched = []
  original = train.fetch
  monkeypatch.setattr(train, "fetch", lambda tree: fetched.append(len(tree)) or original(tree))
  monkeypatch.setattr(train, "check_finite", lambda step, metrics: fetched.append(-step))
  train.train_and_evaluate(config, str(tmp_path / "run"))
  assert [n for n in fetched if n > 0] == [4, 4, 4]  # three fetches of four steps each
  assert sorted(-n for n in fetched if n < 0) == list(range(1, 13))  # every step checked
  logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in logged if r["split"] == "train"] == [4, 8, 12]


def test_a_profile_trace_is_written(tmp_path):
  config = tiny_config("regression")
  config.train.profile_steps = (2, 2)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
  assert traces and traces[0].stat().st_size > 0


@pytest.mark.slow
@pytest.mark.xdist_group("two_stage")  # the worker that holds the first-stage runs
def test_fsdp_on_eight_devices_trains_as_one_device_and_moves_between_meshes(
    tmp_path, tiny_vae_run, tiny_vq_run):
  """mesh.fsdp=4 × mesh.data=2 gives one device's losses for 20 steps (and, on 8 devices
  along data, for 6 steps of the 3D experiment's patches; for 3 steps of each family
  with sharding of its own, `family_specs`: mamba's scan parameters, the latent and
  autoregressive runs' frozen first stages); its checkpoint restores on one device and
  scores the same, and training resumes on a 4-device mesh. One subprocess, one JAX
  start, for all of it."""
  script = textwrap.dedent("""
      import json, sys
      import jax, numpy as np
      sys.path.insert(0, "tests")
      from conftest import tiny_config
      from medjax import evaluate, first_stage, parallel, translators
      from medjax.data import pipeline
      from medjax.run import Run, create_state
      from medjax.train import make_train_step, train_and_evaluate
      assert jax.device_count() == 8
      def train_steps(config, mesh, count):
        translator = translators.build(config)
        data = iter(pipeline.train_dataset(config))
        abstract, init = create_state(translator, config, mesh, pipeline.recipe(config))
        state, step = init(), make_train_step(translator, mesh, abstract)
        rng = jax.device_put(jax.random.PRNGKey(1), parallel.replicated(mesh))
        losses = []
        for _ in range(count):
          state, metrics = step(state, parallel.global_batch(next(data), mesh), rng)
          losses.append(float(metrics["loss"]))
        return state, losses
      config = tiny_config("flow")
      out = {"losses": {}}
      for name, mesh in (("one", parallel.make_mesh(1)),
                         ("fsdp", parallel.make_mesh(data=2, fsdp=4))):
        state, out["losses"][name] = train_steps(config, mesh, 20)
        if name == "fsdp":  # the state really is sharded: a kernel split 4 ways
          kernels = [x for x in jax.tree.leaves(state.params) if x.ndim == 4]
          big = max(kernels, key=lambda x: x.size)
          out["sharded"] = [str(big.sharding.spec), list(big.addressable_shards[0].data.shape),
                            list(big.shape)]
      # 3D: patches of the tiny volumetric experiment, 1 device against 8 along data
      from medjax import config as config_lib
      volumetric = config_lib.load("experiments/phantom_mr_ct_3d.py:size=tiny")
      for name, mesh in (("one", parallel.make_mesh(1)), ("eight", parallel.make_mesh(8))):
        out["losses"]["3d_" + name] = train_steps(volumetric, mesh, 6)[1]
      for family, spec in json.loads(sys.argv[2]).items():
        config_family = config_lib.load(spec)
        first_stage.embed(config_family)
        for name, mesh in (("one", parallel.make_mesh(1)),
                           ("eight", parallel.make_mesh(data=2, fsdp=4))):
          out["losses"][f"{family}_{name}"] = train_steps(config_family, mesh, 3)[1]
      workdir = sys.argv[1]
      config.train.total_steps = 4
      config.checkpoint.every = config.eval.every = 4
      with config.unlocked():
        config.mesh.data, config.mesh.fsdp = 2, 4
      out["trained"] = train_and_evaluate(config, workdir)["model"]
      one = Run.load(workdir, mesh=parallel.make_mesh(1))
      out["on_one"] = evaluate.evaluate_run(one, "val", prefix="one_")["model"]
      config.train.total_steps = 6
      config.checkpoint.every = config.eval.every = 6
      config.mesh.data, config.mesh.fsdp = 2, 2
      # what is checked here is that the state restores and trains on 4; evaluation on
      # another mesh was checked above, so the resumed loop's is stubbed out
      evaluate.evaluate_run = lambda run, split, **kwargs: {"step": run.step}
      evaluate.format_summary = lambda summary: ""
      out["resumed"] = train_and_evaluate(config, workdir, mesh=parallel.make_mesh(4))["step"]
      print(json.dumps(out))
      """)
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
         + " --xla_force_host_platform_device_count=8"}
  families = family_specs(tiny_vae_run[0], tiny_vq_run[0])
  result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run"),
                           json.dumps(families)], cwd=ROOT, env=env, capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  one, fsdp = np.array(out["losses"]["one"]), np.array(out["losses"]["fsdp"])
  assert np.all(np.isfinite(one)) and len(set(one.tolist())) > 10
  np.testing.assert_allclose(fsdp, one, rtol=1e-4)
  one, eight = np.array(out["losses"]["3d_one"]), np.array(out["losses"]["3d_eight"])
  assert np.all(np.isfinite(one)) and len(set(one.tolist())) > 4
  np.testing.assert_allclose(eight, one, rtol=1e-4)
  for family in families:
    one, eight = (np.array(out["losses"][f"{family}_{n}"]) for n in ("one", "eight"))
    assert np.all(np.isfinite(one)) and len(set(one.tolist())) == 3, (family, one)
    np.testing.assert_allclose(eight, one, rtol=1e-4, err_msg=family)
  spec, shard, full = out["sharded"]
  assert "fsdp" in spec and np.prod(shard) * 4 == np.prod(full)
  for key in ("mae", "psnr", "ssim"):
    assert out["on_one"][key] == pytest.approx(out["trained"][key], rel=1e-5)
  assert out["resumed"] == 6
