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
# for a few hundred steps on a CPU, then translates a held-out volume several times; the
# spread of those draws is the model's uncertainty, which we set beside its actual error.
#
# Budget: `MEDJAX_NOTEBOOK_STEPS` training steps (default 300, a few minutes on a laptop
# CPU); `MEDJAX_NOTEBOOK_SIZE=tiny` shrinks data and model to what CI executes in seconds.

# %%
import io
import json
import os
import pathlib
import tempfile

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

import medjax
from medjax import compare, evaluate, metrics, parallel, train
from medjax.data import phantom, pipeline


def show(fig):
  # An explicit PNG rather than plt.show(): the same picture in any frontend, and an
  # image/png output the test suite can check in the executed notebook.
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
  plt.close(fig)
  display(Image(buffer.getvalue()))


STEPS = int(os.environ.get("MEDJAX_NOTEBOOK_STEPS", 300))
TINY = os.environ.get("MEDJAX_NOTEBOOK_SIZE") == "tiny"
WORKDIR = os.environ.get("MEDJAX_NOTEBOOK_WORKDIR") or tempfile.mkdtemp(prefix="medjax_")
EXPERIMENTS = pathlib.Path(medjax.__file__).resolve().parents[1] / "experiments"

# %% [markdown]
# ## The experiment
# One config file, as on the command line; here we only shorten the run to the budget.

# %%
_, config = compare.load_config(str(EXPERIMENTS / "phantom_flow.py"))
config.train.steps = config.eval.every = config.checkpoint.every = STEPS
config.train.warmup_steps = min(config.train.warmup_steps, STEPS // 10)
# The EMA must forget its initialisation within the budget (0.999 would average ~1000 steps).
config.train.ema_decay = min(config.train.ema_decay, 1.0 - 10.0 / STEPS)
if TINY:
  config.data.phantom.update(subjects=5, shape=(32, 32, 12), spacing=(5.0, 5.0, 8.0))
  config.model.update(channels=8, channel_mult=(1, 2), attention_levels=())
  config.train.batch_size = 8
  config.eval.update(steps=2, samples=2, batch_size=8)
print(f"{config.translator.name}: {config.data.source} → {config.data.target}, "
      f"{STEPS} steps of batch {config.train.batch_size}, workdir {WORKDIR}")

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
  window = {"ct": dict(vmin=-1000, vmax=1500)}.get(name, {})
  ax.imshow(np.rot90(volumes[name][:, :, z]), cmap="gray", **window)
  ax.set_title(name)
  ax.axis("off")
fig.tight_layout()
show(fig)

# %% [markdown]
# ## Train
# Checkpoints, `metrics.jsonl`, TensorBoard events, image grids and the held-out
# evaluation land in `WORKDIR` exactly as for `medjax train`; running this cell again
# resumes instead of retraining.

# %%
summary = train.train_and_evaluate(config, WORKDIR)
print(train.format_summary(summary))

# %%
logged = [json.loads(line) for line in open(os.path.join(WORKDIR, "metrics.jsonl"))]
steps = [r["step"] for r in logged if r["split"] == "train"]
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(steps, [r["loss"] for r in logged if r["split"] == "train"], "o-", ms=3)
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("flow-matching loss")
ax.set_title("training loss")
show(fig)

# %% [markdown]
# ## Translate a held-out volume
# `translate` draws `eval.samples` targets per slice and returns their mean and standard
# deviation; the baseline is a per-subject intensity mapping fitted on the training slices.

# %%
mesh = parallel.make_mesh()
translator, params, baseline = compare.restore(config, WORKDIR, mesh)
volume = pipeline.eval_volumes(config, "test")[0]
translate_fn = evaluate.make_translate_fn(translator, mesh, steps=config.eval.steps,
                                          samples=config.eval.samples)
prediction = evaluate.translate_volume(translate_fn, params, volume.source,
                                       jax.random.PRNGKey(0), mesh, config.eval.batch_size)

protocol = evaluate.protocol_for(config.data.target)
to_unit = lambda unit: evaluate.to_physical(unit, volume.target_params, protocol)
target = to_unit(volume.target[..., 0])
mask = volume.mask[..., 0]
predicted = to_unit(prediction.mean[..., 0])
std = evaluate.std_to_physical(prediction.std[..., 0], volume.target_params, protocol)
for name, estimate in (("model", predicted), ("baseline", to_unit(baseline(volume.source)[..., 0]))):
  scores = metrics.score(estimate, target, mask, protocol=protocol)
  print(f"{volume.subject} {name:9s}", "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))

# %% [markdown]
# ## Error and uncertainty maps
# Where the draws disagree (high std) the model should also be wrong more often: the last
# panel bins foreground voxels by predicted std and shows their mean absolute error.

# %%
z = int(np.argmax(mask.sum(axis=(1, 2))))
error = np.abs(predicted - target)
panels = {"source (T1w)": (volume.source[z, ..., 0], dict(vmin=-1, vmax=1, cmap="gray")),
          "prediction": (predicted[z], dict(vmin=0, vmax=1, cmap="gray")),
          "target": (target[z], dict(vmin=0, vmax=1, cmap="gray")),
          "|error|": (error[z] * mask[z], dict(vmin=0, vmax=0.25, cmap="magma")),
          "std of draws": (std[z] * mask[z], dict(vmin=0, vmax=0.25, cmap="magma"))}
fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.6 * (len(panels) + 1), 2.8))
for ax, (title, (image, style)) in zip(axes, panels.items()):
  ax.imshow(np.rot90(image), **style)
  ax.set_title(title)
  ax.axis("off")
inside = mask > 0.5
edges = np.quantile(std[inside], np.linspace(0, 1, 9))
which = np.clip(np.digitize(std[inside], edges[1:-1]), 0, 7)
centres = [std[inside][which == b].mean() for b in range(8) if np.any(which == b)]
errors = [error[inside][which == b].mean() for b in range(8) if np.any(which == b)]
axes[-1].plot(centres, errors, "o-")
axes[-1].set_xlabel("std of draws")
axes[-1].set_ylabel("mean |error|")
axes[-1].set_title("error vs uncertainty")
fig.tight_layout()
show(fig)
