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
# # Quickstart: T1w → T2w on the phantom, trained, translated, inspected
#
# The same functions the CLI runs (`medjax train` is `train.train_and_evaluate`): the
# built-in phantom stands in for data, a conditional flow-matching U-Net learns T1w → T2w
# on a CPU, then translates a held-out volume several times; the spread of those draws is
# the model's uncertainty, which we set beside its actual error. Last, a NIfTI file in, a
# NIfTI file out, as `medjax translate` does it.
#
# **Run time at the default parameters: about 2½ minutes on 2 CPU cores** (measured
# whole, kernel start to last cell: 2.5 min; up to about 3½ with the cores shared). The
# next cell holds every budget: raise `STEPS` (the experiment's own is 1000, about 15
# minutes) for a model that is worth looking at.

# %% tags=["parameters"]
# Parameters: the cell to raise for a longer run (the tests replace it with tiny values).
SIZE = "small"  # experiments/phantom.py size: tiny (seconds) | small | base (accelerator)
STEPS = 150  # training steps
WORKDIR = None  # None: a temporary folder, removed by the last cell; a path is kept

# %%
import io
import json
import pathlib
import shutil
import tempfile

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
from IPython.display import Image, display

import medjax
from medjax import config as config_lib
from medjax import evaluate, figures, infer, train
from medjax.data import intensity, phantom, pipeline
from medjax.run import Run

EXPERIMENT = pathlib.Path(medjax.__file__).resolve().parents[1] / "experiments" / "phantom.py"
workdir = pathlib.Path(WORKDIR) if WORKDIR else pathlib.Path(
    tempfile.mkdtemp(prefix="medjax_quickstart_"))


def show(fig):
  # An explicit PNG rather than plt.show(): the same picture in any frontend, and an
  # image/png output the test suite can check in the executed notebook.
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
  plt.close(fig)
  display(Image(buffer.getvalue()))

# %% [markdown]
# ## The experiment
# One config file, as on the command line (`medjax train --config
# experiments/phantom.py:size=small`); here we only shorten the run to the budget.

# %%
config = config_lib.load(f"{EXPERIMENT}:method=flow,target=t2w,size={SIZE}")
config_lib.override(config, {
    "train.total_steps": STEPS, "eval.every": STEPS, "checkpoint.every": STEPS,
    # The experiment's warm-up, at most half the run: 150 steps that warmed up over 15
    # ended below the intensity-mapping baseline, over 75 above it.
    "train.warmup_steps": min(config.train.warmup_steps, STEPS // 2),
    "logging.progress": True})
print(f"{config.translator.name}: {config.data.source} → {config.data.target}, "
      f"{STEPS} steps of batch {config.train.batch_size}, workdir {workdir}")

# %% [markdown]
# ## The phantom
# One subject in every modality it renders (MR signal equations, CT in HU), mid-axial slice.

# %%
p = config.data.phantom
volumes = phantom.generate(p.seed, 0, shape=tuple(p.shape), spacing=tuple(p.spacing))
names = [m for m in ("t1w", "t2w", "pd", "flair", "ct", "mask") if m in volumes]
z = volumes["mask"].shape[2] // 2
fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names), 2.4))
for ax, name in zip(axes, names):
  window = {"ct": {"vmin": -1000, "vmax": 1500}}.get(name, {})
  ax.imshow(figures.display(volumes[name][:, :, z]), cmap="gray", **window)
  ax.set_title(name)
  ax.axis("off")
fig.tight_layout()
show(fig)

# %% [markdown]
# ## Train
# Checkpoints, `metrics.jsonl`, TensorBoard events, image grids and the held-out
# evaluation land in the workdir exactly as for `medjax train`; running this cell again
# resumes instead of retraining.

# %%
summary = train.train_and_evaluate(config, str(workdir))

# %%
logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
trained = [r for r in logged if r["split"] == "train"]
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot([r["step"] for r in trained], [r["loss"] for r in trained], "o-", ms=3)
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("flow-matching loss")
ax.set_title("training loss")
show(fig)

# %% [markdown]
# ## Translate a held-out volume
# `Run.load` restores what evaluation and `medjax translate` use: the config, the
# preprocessing recipe, the intensity-mapping baseline fitted on the training slices and
# the EMA parameters. `evaluate` draws `translator.samples` targets per slice at
# `translator.sample_steps` and scores their mean, beside the baseline, in output units
# (MR on [0, 1]).

# %%
run = Run.load(workdir)
volume = run.eval_volumes("test")[0]
_, rows, predictions = evaluate.evaluate(run, [volume])
prediction = predictions[0]
print(f"{volume.subject}: {run.config.translator.samples} draws of "
      f"{run.config.translator.sample_steps} steps per slice, step {run.step}")
for name in ("model", "baseline"):
  print(f"  {name:9s}", "  ".join(f"{k} {rows[0][f'{name}_{k}']:.4f}"
                                  for k in evaluate.METRIC_KEYS))

# %%
# What training writes to images/: source | prediction | target | |error| | std.
grid = figures.evaluation_grid(workdir / "quickstart_test.png", volume, prediction,
                               target_modality=run.target, num_slices=3,
                               stochastic=run.translator.stochastic,
                               source_channel=run.recipe.centre_channel)
display(Image(filename=grid))

# %% [markdown]
# ## Error and uncertainty
# Where the draws disagree (high std) the model should also be wrong more often: foreground
# voxels binned by predicted std, with their mean absolute error.

# %%
unit = lambda image: intensity.to_output_units(image[..., 0], volume.target_params, run.target)
target, predicted = unit(volume.target), unit(prediction.mean)
std = intensity.std_to_output_units(prediction.std[..., 0], volume.target_params, run.target)
inside = volume.mask[..., 0] > 0.5
error, spread = np.abs(predicted - target)[inside], std[inside]
edges = np.quantile(spread, np.linspace(0, 1, 9))
which = np.clip(np.digitize(spread, edges[1:-1]), 0, 7)
bins = [b for b in range(8) if np.any(which == b)]
fig, ax = plt.subplots(figsize=(4, 3))
ax.plot([spread[which == b].mean() for b in bins], [error[which == b].mean() for b in bins],
        "o-")
ax.set_xlabel("std of draws ([0, 1])")
ax.set_ylabel("mean |error| ([0, 1])")
ax.set_title("error against uncertainty (foreground)")
show(fig)

# %% [markdown]
# ## A file in, a file out
# `medjax translate` is `infer.translate_file`: the run's recipe preprocesses a new file
# (the same test subject, rendered at twice the training resolution as a scanner might
# deliver it), the model translates its slices, and the result is written on the input's
# grid and header, in output units, with the std of the draws beside it.

# %%
shape = tuple(2 * n for n in p.shape)
scan = phantom.generate(p.seed, pipeline.phantom_split(run.config)["test"][0], shape=shape,
                        spacing=phantom.fov_spacing(shape))
nib.save(nib.Nifti1Image(scan["t1w"], scan["affine"]), workdir / "t1w.nii.gz")
result = infer.translate_file(run, [workdir / "t1w.nii.gz"], workdir / "t2w.nii.gz",
                              uncertainty=workdir / "t2w_std.nii.gz", progress=False)
infer.report_time(volume.subject, result)
written = {name: np.asarray(nib.load(workdir / f"{name}.nii.gz").dataobj)
           for name in ("t2w", "t2w_std")}
print(f"input {scan['t1w'].shape} → output {written['t2w'].shape}")
truth = intensity.to_unit_interval(intensity.normalise(
    scan["t2w"], intensity.fit(scan["t2w"], "t2w", scan["mask"])))
z = shape[2] // 2
panels = {"input T1w": (scan["t1w"], {"cmap": "gray"}),
          "translated T2w": (written["t2w"], {"cmap": "gray", "vmin": 0, "vmax": 1}),
          "phantom T2w": (truth, {"cmap": "gray", "vmin": 0, "vmax": 1}),
          "std of draws": (written["t2w_std"], {"cmap": "magma", "vmin": 0, "vmax": 0.25})}
fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8))
for ax, (title, (image, style)) in zip(axes, panels.items()):
  ax.imshow(figures.display(image[:, :, z]), **style)
  ax.set_title(title)
  ax.axis("off")
show(fig)

# %% [markdown]
# ## Clean up
# The temporary workdir goes; a `WORKDIR` you named stays: `medjax evaluate --workdir` /
# `medjax translate --workdir` it, or run the notebook again with more `STEPS` to train on
# (a run resumes when only its length changes: from `STEPS = 200` on, the warm-up is the
# experiment's own 100 steps).

# %%
if WORKDIR is None:
  shutil.rmtree(workdir, ignore_errors=True)
  print(f"removed {workdir}")
else:
  print(f"kept {workdir}")
