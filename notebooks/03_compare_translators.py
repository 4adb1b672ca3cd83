# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Comparing translators at one budget
#
# Every registered method (`medjax.translators.TRANSLATORS`) trains from its experiment
# file on the same phantom T1w → T2w task, for the same number of steps and batch size,
# and is scored on the same held-out test subject beside the intensity-mapping baseline.
# Then two curves: quality against training steps (from each run's periodic evaluations)
# and, for the methods that sample, quality against sampling steps (network evaluations).
# `medjax compare` does the same from the command line, at full size.
#
# Budget: `MEDJAX_NOTEBOOK_STEPS` (default 300) training steps per method;
# `MEDJAX_NOTEBOOK_METHODS` (comma-separated, default: all registered);
# `MEDJAX_NOTEBOOK_SIZE=tiny` for CI.

# %%
import io
import json
import os
import pathlib
import tempfile
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

import medjax
from medjax import compare, evaluate, parallel, train, translators
from medjax.data import pipeline

STEPS = int(os.environ.get("MEDJAX_NOTEBOOK_STEPS", 300))
TINY = os.environ.get("MEDJAX_NOTEBOOK_SIZE") == "tiny"
WORKDIR = pathlib.Path(os.environ.get("MEDJAX_NOTEBOOK_WORKDIR")
                       or tempfile.mkdtemp(prefix="medjax_compare_"))
METHODS = [m for m in os.environ.get("MEDJAX_NOTEBOOK_METHODS", "").split(",") if m] \
    or sorted(translators.TRANSLATORS)
SAMPLING_STEPS = (1, 2) if TINY else (1, 2, 4, 8, 16)
EXPERIMENTS = pathlib.Path(medjax.__file__).resolve().parents[1] / "experiments"


def show(fig):
  # An explicit PNG rather than plt.show(): the same picture in any frontend, and an
  # image/png output the test suite can check in the executed notebook.
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
  plt.close(fig)
  display(Image(buffer.getvalue()))

# %% [markdown]
# ## One experiment file per method, one budget for all

# %%
def experiment(method: str):
  _, config = compare.load_config(str(EXPERIMENTS / f"phantom_{method}.py"))
  config.train.steps = config.checkpoint.every = STEPS
  config.eval.every = max(1, STEPS // 3)  # three points on the quality-vs-training curve
  config.train.warmup_steps = min(config.train.warmup_steps, STEPS // 10)
  # The EMA must forget its initialisation within the budget.
  config.train.ema_decay = min(config.train.ema_decay, 1.0 - 10.0 / STEPS)
  config.logging.progress = False
  if TINY:
    config.data.phantom.update(subjects=5, shape=(32, 32, 12), spacing=(5.0, 5.0, 8.0))
    small = {"channels": 8, "channel_mult": (1, 2), "attention_levels": (), "num_blocks": 2}
    for key, value in small.items():
      if key in config.model:
        config.model[key] = value
    if "discriminator" in config.translator:
      config.translator.discriminator.update(channels=8, num_layers=2)
    config.train.batch_size = 8
    config.eval.update(steps=2, samples=2, batch_size=8, image_slices=1)
  return config


missing = [m for m in METHODS if not (EXPERIMENTS / f"phantom_{m}.py").exists()]
METHODS = [m for m in METHODS if m not in missing]
print("methods:", ", ".join(METHODS), f"(no experiment file for {missing})" if missing else "")

# %%
mesh = parallel.make_mesh()
results = {}
for method in METHODS:
  config = experiment(method)
  workdir = str(WORKDIR / method)
  start = time.perf_counter()
  train.train_and_evaluate(config, workdir, mesh=mesh)
  seconds = time.perf_counter() - start
  translator, params, baseline = compare.restore(config, workdir, mesh)
  test = pipeline.eval_volumes(config, "test")[:1]
  rng = jax.random.PRNGKey(0)
  samples = config.eval.samples if translator.stochastic else 1
  summary, _, predictions = evaluate.evaluate(
      translator, params, test, baseline, rng, mesh, target_modality=config.data.target,
      steps=config.eval.steps, samples=samples, batch_size=config.eval.batch_size)
  sweep = []
  if translator.stochastic:
    for steps in SAMPLING_STEPS:
      scores, _, _ = evaluate.evaluate(
          translator, params, test, baseline, rng, mesh, target_modality=config.data.target,
          steps=steps, samples=1, batch_size=config.eval.batch_size)
      sweep.append((translator.nfe(steps), scores["model"]["psnr"]))
  curve = sorted((int(step), json.load(open(WORKDIR / method / "eval" / step / "summary.json")))
                 for step in os.listdir(WORKDIR / method / "eval"))
  results[method] = {"label": compare.method_label(config), "summary": summary,
                     "prediction": predictions[0], "volume": test[0], "seconds": seconds,
                     "nfe": samples * summary["nfe_per_sample"], "sweep": sweep,
                     "curve": [(step, s["model"]["psnr"]) for step, s in curve]}
  print(f"{method:11s} trained and scored in {seconds:5.1f} s: "
        f"PSNR {summary['model']['psnr']:.2f} dB (baseline {summary['baseline']['psnr']:.2f})")

# %% [markdown]
# ## The table
# MRI protocol: volumes on [0, 1], metrics inside the head mask. NFE: network evaluations
# per slice (samples × steps) at the evaluation setting.

# %%
baseline_scores = next(iter(results.values()))["summary"]["baseline"]
rows = [("intensity map (baseline)", baseline_scores, 0, 0.0)]
rows += [(r["label"], r["summary"]["model"], r["nfe"], r["seconds"]) for r in results.values()]
print(f"{'method':28s}{'MAE':>9s}{'PSNR':>9s}{'SSIM':>9s}{'NFE':>6s}{'train s':>9s}")
for label, scores, nfe, seconds in sorted(rows, key=lambda row: -row[1]["psnr"]):
  print(f"{label:28s}{scores['mae']:9.4f}{scores['psnr']:9.2f}{scores['ssim']:9.4f}"
        f"{nfe:6d}{seconds:9.1f}")

# %% [markdown]
# ## The same slice, every method

# %%
first = next(iter(results.values()))
volume = first["volume"]
z = int(np.argmax(volume.mask[..., 0].sum(axis=(1, 2))))
protocol = evaluate.protocol_for("t2w")
unit = lambda image: evaluate.to_physical(image, volume.target_params, protocol)
panels = [("source (T1w)", volume.source[z, ..., 0], (-1, 1)),
          ("target (T2w)", unit(volume.target[z, ..., 0]), (0, 1))]
panels += [(r["label"], unit(r["prediction"].mean[z, ..., 0]), (0, 1)) for r in results.values()]
fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.7))
for ax, (title, image, (lo, hi)) in zip(np.atleast_1d(axes), panels):
  ax.imshow(np.rot90(image), cmap="gray", vmin=lo, vmax=hi)
  ax.set_title(title, fontsize=8)
  ax.axis("off")
show(fig)

# %% [markdown]
# ## Quality against training steps and against sampling steps

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
for r in results.values():
  left.plot(*zip(*r["curve"]), "o-", label=r["label"])
  if r["sweep"]:
    right.plot(*zip(*r["sweep"]), "o-", label=r["label"])
for ax in (left, right):
  ax.axhline(baseline_scores["psnr"], color="grey", ls="--", label="intensity map")
  ax.set_ylabel("PSNR (dB)")
  ax.legend(fontsize=7)
left.set_xlabel("training step (held-out val)")
right.set_xlabel("network evaluations per sample (test, 1 sample)")
right.set_xscale("log")
fig.tight_layout()
show(fig)
