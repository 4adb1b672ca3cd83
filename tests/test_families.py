"""What every model family owes the trainer: a run resumed from a checkpoint ends bit for
bit where the uninterrupted run ends (docs/design.md, "Tests"). The flow U-Net has its
own, longer version (test_train.py); these cover the families whose training state is
new: the autoencoders (a GAN's state) and the two-stage runs' frozen first stage inside
ema_params. One device against eight for the same families (`conftest.family_specs`)
runs in test_mesh.py's 8-device subprocess, beside the flow U-Net's (one JAX start for
both)."""

import json
import shutil

import jax
import numpy as np
import pytest

from medjax import config as config_lib
from medjax import train

from conftest import TWO_STAGE_SAVES, family_specs
from test_train import saved_params

# A backbone (mamba) has no state of its own to resume. The autoencoders' state is the
# GAN translators' (the tiny vqvae trains its PatchGAN) plus the VAE's running latent std.
pytestmark = pytest.mark.xdist_group("two_stage")  # one worker trains the first stages

# family → the session fixture holding its trained tiny run (tests/conftest.py)
TRAINED = {"vae": "tiny_vae_run", "vqvae": "tiny_vq_run", "latent": "tiny_latent_run",
           "autoregressive": "tiny_ar_run"}


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
  spec = family_specs(saved["translator"].get("latent_vae"),
                      saved["translator"].get("tokenizer"))[name]
  config = config_lib.load(spec, TWO_STAGE_SAVES)
  assert train.train_and_evaluate(config, str(resumed))["step"] == 6
  ours, theirs = (jax.tree.leaves(saved_params(w, 6)) for w in (straight, resumed))
  assert len(ours) == len(theirs) > 0
  for x, y in zip(ours, theirs):
    assert np.array_equal(np.asarray(x), np.asarray(y))
