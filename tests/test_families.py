"""What every model family owes the trainer, checked the same way for each: one device and
eight give the same losses, and a run resumed from a checkpoint ends bit for bit where the
uninterrupted run ends (docs/design.md, "Tests"). The flow U-Net has its own, longer
versions of both (test_mesh.py, test_train.py); these cover the other families."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from medjax import config as config_lib
from medjax import train

from conftest import ROOT, TWO_STAGE_SAVES
from test_train import saved_params

TINY = "size=tiny"
# family → the experiment a user trains it from, at the tests' tiny size; {vae} and {vq}:
# the tiny first-stage runs of tests/conftest.py
FAMILIES = {
    "mamba": f"experiments/phantom.py:method=regression,model=mamba,{TINY}",
    "vae": f"experiments/phantom_vae.py:{TINY}",
    "vqvae": f"experiments/phantom_vae.py:kind=vq,adversarial=0.1,{TINY}",
    "latent": f"experiments/phantom_latent.py:vae={{vae}},{TINY}",
    "autoregressive": f"experiments/phantom_ar.py:tokenizer={{vq}},{TINY}",
}
FIRST_STAGES = {"vae": "tiny_vae_run", "vq": "tiny_vq_run"}
# The suite's 10 minutes keep each check to what is new in a family's state or sharding:
# the two-stage runs' frozen first stage inside ema_params (resumed and sharded), and
# mamba's vmapped scan parameters (sharded; a backbone has no state of its own to
# resume). The autoencoders' state is the GAN translators' plus one running scalar; both
# checks pass for `vae` and `vqvae` too (SHARDED and TRAINED take them), at ~40 s more.
SHARDED = ("mamba", "latent", "autoregressive")
pytestmark = pytest.mark.xdist_group("two_stage")  # one worker trains the first stages


@pytest.fixture
def specs(request):
  """FAMILIES with their first-stage folders filled in (the fixtures run only if named)."""
  def spec(name):
    text = FAMILIES[name]
    folders = {key: request.getfixturevalue(fixture)[0] for key, fixture in FIRST_STAGES.items()
               if "{" + key + "}" in text}
    return os.path.join(ROOT, text.format(**folders))
  return spec


# family → the session fixture holding its trained tiny run (tests/conftest.py)
TRAINED = {"latent": "tiny_latent_run", "autoregressive": "tiny_ar_run"}


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_a_resumed_run_ends_where_the_straight_run_ends(name, request, tmp_path, monkeypatch):
  """The family's tiny run (6 steps, checkpoints at 3 and 6), copied as it stood at step
  3 (the later checkpoint removed, as a crash would leave it) and trained again: the
  step-6 state (trained and EMA parameters, the frozen first stage) is bit-identical.
  What is checked is the training state: the resumed loop's evaluation is stubbed out
  (it costs more than the steps; the family's evaluation has its own tests)."""
  straight = request.getfixturevalue(TRAINED[name])[0]
  monkeypatch.setattr(train.evaluate_lib, "evaluate_run",
                      lambda run, split, **kwargs: {"step": run.step})
  monkeypatch.setattr(train.evaluate_lib, "format_summary", lambda summary: "")
  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("eval", "images"))
  shutil.rmtree(resumed / "checkpoints" / "6")
  saved = json.loads((straight / "config.json").read_text())
  config = config_lib.load(os.path.join(ROOT, FAMILIES[name]).format(
      vae=saved["translator"].get("latent_vae"), vq=saved["translator"].get("tokenizer")),
      TWO_STAGE_SAVES)
  assert train.train_and_evaluate(config, str(resumed))["step"] == 6
  ours, theirs = (jax.tree.leaves(saved_params(w, 6)) for w in (straight, resumed))
  assert len(ours) == len(theirs) > 0
  for x, y in zip(ours, theirs):
    assert np.array_equal(np.asarray(x), np.asarray(y))


def test_eight_devices_train_every_family_as_one(specs):
  """3 steps of each family on one device and on a 2 (data) × 4 (fsdp) mesh of 8 virtual
  CPU devices: the same losses (rtol 1e-4, float32)."""
  script = textwrap.dedent("""
      import json, sys
      import jax
      from medjax import config as config_lib
      from medjax import first_stage, parallel, translators
      from medjax.data import pipeline
      from medjax.run import create_state
      from medjax.train import make_train_step
      assert jax.device_count() == 8
      out = {}
      for name, spec in json.loads(sys.argv[1]).items():
        config = config_lib.load(spec)
        first_stage.embed(config)
        for mesh_name, mesh in (("one", parallel.make_mesh(1)),
                                ("eight", parallel.make_mesh(data=2, fsdp=4))):
          translator = translators.build(config)
          data = iter(pipeline.train_dataset(config))
          abstract, init = create_state(translator, config, mesh, pipeline.recipe(config))
          state, step = init(), make_train_step(translator, mesh, abstract)
          rng = jax.device_put(jax.random.PRNGKey(1), parallel.replicated(mesh))
          losses = []
          for _ in range(3):
            state, metrics = step(state, parallel.global_batch(next(data), mesh), rng)
            losses.append(float(metrics["loss"]))
          out[f"{name}/{mesh_name}"] = losses
      print(json.dumps(out))
      """)
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
         + " --xla_force_host_platform_device_count=8"}
  every = {name: specs(name) for name in SHARDED}
  result = subprocess.run([sys.executable, "-c", script, json.dumps(every)], cwd=ROOT,
                          env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  for name in SHARDED:
    one, eight = np.array(out[f"{name}/one"]), np.array(out[f"{name}/eight"])
    assert np.all(np.isfinite(one)) and len(set(one.tolist())) == 3, (name, one)
    np.testing.assert_allclose(eight, one, rtol=1e-4, err_msg=name)
