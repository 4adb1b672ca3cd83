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
# # Data: from a folder of NIfTI files to the batches a run trains on
#
# The one direction data flows in medjax: **layouts** find subjects and their modality
# files → **preprocess** resamples, crops and normalises each subject (the one function
# `medjax prepare` and `medjax translate` share) → **shards** hold a subject-level split
# of slice records → the grain **pipeline** shuffles, augments and batches them, each
# process reading only its own rows of every global batch.
#
# The phantom, written as NIfTI files, stands in for a dataset folder here; point
# `find_subjects` / `prepare` at IXI, BraTS, SynthRAD, BIDS or a CSV the same way.
#
# **Run time at the default parameters: about 10 seconds on 2 CPU cores** (measured whole,
# kernel start to last cell: 0.14 min). The next cell holds the sizes.

# %% tags=["parameters"]
# Parameters: the cell to raise for a larger dataset (the tests replace it with tiny values).
SIZE = "small"  # phantom grid and subject count of experiments/phantom.py: tiny | small | base
WORKDIR = None  # None: a temporary folder, removed by the last cell; a path is kept

# %%
import io
import pathlib
import shutil
import tempfile

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

import medjax
from medjax import config as config_lib
from medjax import figures
from medjax.data import augment, layouts, phantom, pipeline, prepare, records, shards

EXPERIMENT = pathlib.Path(medjax.__file__).resolve().parents[1] / "experiments" / "phantom.py"
workdir = pathlib.Path(WORKDIR) if WORKDIR else pathlib.Path(
    tempfile.mkdtemp(prefix="medjax_data_"))
# The grid and subject count the experiment renders in memory at this size, so the shards
# below are what `experiments/phantom.py:size=SIZE` trains on, from files.
SHAPE = config_lib.SIZES[SIZE]["shape"]
SUBJECTS = config_lib.SIZES[SIZE]["subjects"]


def show(fig):
  # An explicit PNG rather than plt.show(): the same picture in any frontend, and an
  # image/png output the test suite can check in the executed notebook.
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
  plt.close(fig)
  display(Image(buffer.getvalue()))

# %% [markdown]
# ## A dataset folder
# `medjax phantom --output-dir DIR` writes the same files: one folder per subject with
# `t1w, t2w, pd, flair, ct, cbct, mask .nii.gz` in RAS over the head.

# %%
root = workdir / "phantom_nifti"
phantom.write_subjects(root, SUBJECTS, shape=SHAPE, spacing=phantom.fov_spacing(SHAPE),
                       progress=False)
subjects = layouts.find_subjects("phantom", root)
for subject in subjects[:3]:
  print(subject.id, {m: pathlib.Path(p).name for m, p in sorted(subject.files.items())})
print(f"… {len(subjects)} subjects; layouts known: {', '.join(sorted(layouts.LAYOUTS))}")

# %% [markdown]
# ## Shards
# `prepare` (= `medjax prepare`) splits by subject — no subject has slices on both sides
# of the train/test line — resamples to one grid, normalises each modality
# (MR: robust percentiles inside the body → [-1, 1]; CT: HU window → [-1, 1]) and writes one
# ArrayRecord shard of foreground slices per subject, beside its geometry and
# normalisation, plus `manifest.json` with the recipe `medjax translate` repeats.

# %%
out = workdir / "shards"
manifest = prepare.prepare("phantom", root, out, sources=["t1w"], targets=["ct"],
                           spacing=phantom.fov_spacing(SHAPE), size=SHAPE[:2],
                           fractions=(0.8, 0.1, 0.1), progress=False)
print(manifest["command"])
print("recipe:            ", shards.recipe(out))
print("subjects per split:", manifest["counts"]["subjects"])
print("slices per split:  ", manifest["counts"]["slices"])
for split in prepare.SPLITS:
  print(f"{split:5s}", [p.name for p in shards.shard_paths(out, split)])

# %% [markdown]
# A record is int16 fixed point on [-1, 1] (`medjax.data.records`): two bytes a pixel, at
# most 1.5e-5 off (0.03 HU on the CT window), and a header that makes it decode on its own.

# %%
train_slices = shards.ShardSlices(out, "train")
train_records = [train_slices[i] for i in range(len(train_slices))]
first = train_records[0]
ramp = np.linspace(-1, 1, first["source"].size, dtype=np.float32).reshape(first["source"].shape)
encoded = records.encode({**first, "source": ramp})
print(f"{records.STORAGE}: {len(encoded)} bytes a record, "
      f"{sum(first[k].nbytes for k in ('source', 'target', 'mask'))} as float32; "
      f"largest error on a ramp: {np.abs(records.decode(encoded)['source'] - ramp).max():.2g}")

# Four records of different subjects, each its subject's slice with the most head in it.
largest = {}
for index, r in enumerate(train_records):
  area = r["mask"].sum()
  if area > largest.get(int(r["subject"]), (-1, None))[0]:
    largest[int(r["subject"])] = (area, index)
picks = [index for _, index in list(largest.values())[:4]]
fig, axes = plt.subplots(3, len(picks), figsize=(2.4 * len(picks), 7.2), squeeze=False)
for column, index in enumerate(picks):
  record = train_records[index]
  for row, (key, style) in enumerate((("source", {"vmin": -1, "vmax": 1}),
                                      ("target", {"vmin": -1, "vmax": 1}),
                                      ("mask", {"vmin": 0, "vmax": 1}))):
    axes[row, column].imshow(figures.display(record[key][..., 0]), cmap="gray", **style)
    axes[row, column].set_title(f"{key}  s{int(record['subject'])} z{int(record['slice'])}",
                                fontsize=8)
    axes[row, column].axis("off")
fig.suptitle("training records from the shards (T1w source, CT target, both in [-1, 1])")
show(fig)

# %% [markdown]
# ## Augmentation
# One random flip / rotation / scaling moves source, target and mask together; a gain and
# bias jitter touches the source only. The pipeline seeds it by a record's position in
# the global stream, so a resumed run and a run on more processes see the same draws.

# %%
record = train_records[picks[0]]
fig, axes = plt.subplots(2, 6, figsize=(13, 4.6))
for column in range(6):
  augmented = record if column == 0 else augment.augment_record(
      record, np.random.default_rng(column), p_affine=0.7)
  for row, key in enumerate(("source", "target")):
    axes[row, column].imshow(figures.display(augmented[key][..., 0]), cmap="gray",
                             vmin=-1, vmax=1)
  axes[0, column].set_title("original" if column == 0 else f"draw {column}", fontsize=9)
  for ax in axes[:, column]:
    ax.axis("off")
fig.suptitle("one record, augmented: top source (T1w), bottom target (CT)")
show(fig)

# %% [markdown]
# ## Batches, and how processes share them
# A run on P processes lays out the same shuffled global stream in every process; each
# reads and augments only its own rows of each global batch, which
# `jax.make_array_from_process_local_data` joins into the global array. So P processes
# train on exactly the batches one process would (tests/test_multihost.py checks it).

# %%
batch_size = 8
one = next(iter(pipeline.make_dataset(train_slices, seed=0, batch_size=batch_size,
                                      augment=True, process_index=0, process_count=1)))
parts = [next(iter(pipeline.make_dataset(train_slices, seed=0, batch_size=batch_size // 2,
                                         augment=True, process_index=i, process_count=2)))
         for i in range(2)]
ids = lambda batch: [f"s{s}z{z}" for s, z in zip(batch["subject"], batch["slice"])]
print("one process:      ", ids(one))
for i, part in enumerate(parts):
  print(f"process {i} of 2:   ", ids(part))
joined = {k: np.concatenate([p[k] for p in parts]) for k in one}
assert all(np.array_equal(joined[k], one[k]) for k in one)
print({k: (v.shape, v.dtype.name) for k, v in one.items()})

fig, axes = plt.subplots(2, batch_size, figsize=(1.6 * batch_size, 3.6))
for column in range(batch_size):
  for row, key in enumerate(("source", "target")):
    axes[row, column].imshow(figures.display(one[key][column, ..., 0]), cmap="gray",
                             vmin=-1, vmax=1)
  axes[0, column].set_title(f"process {column // (batch_size // 2)}", fontsize=8)
  for ax in axes[:, column]:
    ax.axis("off")
fig.suptitle("one global batch (augmented); each half is read by one of two processes")
show(fig)

# %% [markdown]
# ## Training on the shards
# The experiment reads them with `data.kind='shards'`; the run checks, before any work,
# that the shards hold the modalities it asks for.

# %%
spec = f"{EXPERIMENT}:target=ct,size={SIZE}"
config = config_lib.load(spec, ["data.kind=shards", f"data.dir={out}"])
print("shards match the experiment:", pipeline.check_shards(config))
print(f"medjax train --config experiments/phantom.py:target=ct,size={SIZE} "
      f"--workdir runs/ct_shards --config.data.kind=shards --config.data.dir={out}")

# %% [markdown]
# ## Clean up
# The temporary folder (NIfTI files and shards) goes; a `WORKDIR` you named stays, to train
# on as above.

# %%
if WORKDIR is None:
  shutil.rmtree(workdir, ignore_errors=True)
  print(f"removed {workdir}")
else:
  print(f"kept {workdir}")
