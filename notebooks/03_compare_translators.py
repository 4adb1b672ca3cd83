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
# Each method trains from the same experiment file (`experiments/phantom.py:method=…`) on
# the same phantom T1w → T2w task, for the same number of steps and batch size, and is
# scored on the same held-out test subjects beside the intensity-mapping baseline. Then
# two curves: quality against training steps (from each run's periodic evaluations) and,
# for the methods that sample, quality against sampling steps (network evaluations).
# `medjax compare` does the same from the command line.
#
# **Run time at the default parameters: about 2½ minutes on 2 CPU cores** (measured whole,
# kernel start to last cell: 2.2 and 2.4 min): four methods, 300 steps each, at the `tiny`
# size (32×32 slices, an 8-channel U-Net), where a method learns something in seconds.
# The next cell holds every budget; `SIZE = "small"` with `STEPS = 600` is the scale of
# the comparison in the README, about 10 minutes per method on 2 cores.

# %% tags=["parameters"]
# Parameters: the cell to raise for a longer run (the tests replace it with tiny values).
SIZE = "tiny"  # experiments/phantom.py size: tiny (seconds a method) | small | base
STEPS = 300  # training steps per method
METHODS = ["regression", "flow", "i2sb", "pix2pix"]  # + "diffusion", "bridge", "cyclegan"
SAMPLING_STEPS = [1, 2, 4, 8, 16]  # the sweep of the methods that sample
WORKDIR = None  # None: a temporary folder, removed by the last cell; a path is kept

# %%
import json
import pathlib
import shutil
import tempfile
import time

from IPython.display import Image, display

import medjax
from medjax import compare, evaluate, figures, train
from medjax import config as config_lib
from medjax.data import intensity
from medjax.run import Run

EXPERIMENT = pathlib.Path(medjax.__file__).resolve().parents[1] / "experiments" / "phantom.py"
workdir = pathlib.Path(WORKDIR) if WORKDIR else pathlib.Path(
    tempfile.mkdtemp(prefix="medjax_compare_"))
unknown = sorted(set(METHODS) - set(config_lib.METHODS))
if unknown:
  raise ValueError(f"unknown METHODS {unknown}; known: {', '.join(config_lib.METHODS)}")
results = {}


def experiment(method: str):
  """The method's experiment at this notebook's budget (what `medjax compare` trains), and
  its run directory (`medjax compare`'s: another budget is another run, never a stale one)."""
  budget = compare.Budget(train_steps=STEPS)
  config = compare.budget_config(f"{EXPERIMENT}:method={method},target=t2w,size={SIZE}", budget)
  # three points on the quality-against-training curve, and a progress bar while training
  config_lib.override(config, {"eval.every": max(1, STEPS // 3), "logging.progress": True})
  return config, workdir / f"{method}-{SIZE}" / budget.workdir_name(config)


def train_and_score(method: str) -> None:
  """Train `method` (or resume its run in the workdir), score it on the test subjects and
  sweep its sampling steps; the result goes into `results`."""
  if method not in METHODS:
    print(f"{method}: not in METHODS, skipped (add it in the parameters cell)")
    return
  config, path = experiment(method)
  print(f"[{method}] training {STEPS} steps of batch {config.train.batch_size} in {path}",
        flush=True)
  start = time.perf_counter()
  train.train_and_evaluate(config, str(path))
  run = Run.load(path)
  test = run.eval_volumes("test")
  summary, _, predictions = evaluate.evaluate(run, test)
  # A deterministic method is one point: one network evaluation, one draw.
  sweep = [(summary["nfe_per_sample"], summary["model"]["psnr"])]
  if run.translator.stochastic:
    sweep = []
    for steps in SAMPLING_STEPS:
      scores, _, _ = evaluate.evaluate(run, test, steps=steps, samples=1)
      sweep.append((run.translator.nfe(steps), scores["model"]["psnr"]))
      print(f"[{method}] {steps} sampling steps, 1 sample: PSNR {scores['model']['psnr']:.2f}")
  curve = sorted(((int(step.name), json.loads((step / "summary.json").read_text()))
                  for step in (path / "eval").iterdir()), key=lambda point: point[0])
  results[method] = {"label": compare.method_label(config), "summary": summary,
                     "prediction": predictions[0], "volume": test[0],
                     "train_s": compare.train_seconds(str(path)),
                     "nfe": summary["samples"] * summary["nfe_per_sample"], "sweep": sweep,
                     "curve": [(step, s["model"]["psnr"]) for step, s in curve],
                     "val_baseline": curve[-1][1]["baseline"]["psnr"]}
  print(f"[{method}] trained and scored in {time.perf_counter() - start:.0f} s: test PSNR "
        f"{summary['model']['psnr']:.2f} dB (baseline {summary['baseline']['psnr']:.2f})")

# %% [markdown]
# ## One cell per method
# Each trains its method (with a progress bar), scores it on the held-out test subjects
# and, if it samples, at each of `SAMPLING_STEPS`. A method not in `METHODS` is skipped.

# %%
train_and_score("regression")

# %%
train_and_score("flow")

# %%
train_and_score("i2sb")

# %%
train_and_score("pix2pix")

# %%
train_and_score("diffusion")

# %%
train_and_score("bridge")

# %%
train_and_score("cyclegan")

# %% [markdown]
# ## The table
# MRI protocol: volumes on [0, 1], metrics inside the head mask. NFE: network evaluations
# per slice (samples × steps) at the evaluation setting; train s: training time without
# the evaluations.

# %%
baseline_scores = next(iter(results.values()))["summary"]["baseline"]
rows = [("intensity map (baseline)", baseline_scores, 0, 0.0)]
rows += [(r["label"], r["summary"]["model"], r["nfe"], r["train_s"]) for r in results.values()]
print(f"{'method':28s}{'MAE':>9s}{'PSNR':>9s}{'SSIM':>9s}{'NFE':>6s}{'train s':>9s}")
for label, scores, nfe, seconds in sorted(rows, key=lambda row: -row[1]["psnr"]):
  print(f"{label:28s}{scores['mae']:9.4f}{scores['psnr']:9.2f}{scores['ssim']:9.4f}"
        f"{nfe:6d}{seconds:9.1f}")

# %% [markdown]
# ## The same slices, every method

# %%
volume = next(iter(results.values()))["volume"]
unit = lambda image: intensity.to_output_units(image, volume.target_params, "t2w")
slices = figures.foreground_slices(volume.mask, 2)
grid = [{"source (T1w)": volume.source[z, ..., 0], "target (T2w)": unit(volume.target[z, ..., 0]),
         **{r["label"]: unit(r["prediction"].mean[z, ..., 0]) for r in results.values()}}
        for z in slices]
shown = figures.window("mri")
ranges = {name: shown["image"] for name in grid[0]} | {"source (T1w)": (-1, 1)}
display(Image(filename=figures.save_grid(workdir / "compare_t2w.png", grid, ranges,
                                         shown["units"])))

# %% [markdown]
# ## Quality against training steps and against sampling steps

# %%
panels = [{"title": "held-out val during training", "xlabel": "training step",
           "ylabel": "PSNR (dB)",
           "hline": ("intensity map", next(iter(results.values()))["val_baseline"]),
           "lines": [(r["label"], *zip(*r["curve"])) for r in results.values()]},
          {"title": "test, 1 sample (a deterministic method is one point)",
           "xlabel": "network evaluations per sample", "ylabel": "PSNR (dB)", "xlog": True,
           "hline": ("intensity map", baseline_scores["psnr"]),
           "lines": [(r["label"], *zip(*r["sweep"])) for r in results.values()]}]
display(Image(filename=figures.save_curves(workdir / "curves.png", panels)))

# %% [markdown]
# ## Clean up
# The temporary folder (every run) goes; a `WORKDIR` you named stays: the notebook run
# again on it at the same budget finds each run finished (another budget trains its own
# runs beside them).

# %%
if WORKDIR is None:
  shutil.rmtree(workdir, ignore_errors=True)
  print(f"removed {workdir}")
else:
  print(f"kept {workdir}")
