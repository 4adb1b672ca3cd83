"""Task-based evaluation: does a synthesised modality segment like the real one?

A small 2D U-Net (`models.unet.UNet`, logits over the phantom's tissue classes) is trained
once per dataset on the REAL images of the run's training subjects, every modality as one
input channel, and cached in `WORKDIR/segmenter/`. A held-out subject is then segmented
three ways: with its real images, with the translated modality substituted for the real
one, and with that channel blank (−1, the background: the lower bound). The per-label
Dice of each, and the drop real − synthesised, say what a synthetic image is worth to a
downstream task; the segmenter's own Dice on the real validation subjects is its ceiling
(docs/design.md, "Segmentation-based evaluation").
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import checkpoint, files, modalities as modalities_lib
from medjax.data import phantom, pipeline
from medjax.errors import UserError
from medjax.models.unet import UNet

FOLDER = "segmenter"
INDEX = "segmenter.json"
PARAMS = "params"
# The labels scored: every phantom tissue but the air around the head.
LABELS = {name: value for name, value in phantom.TISSUES.items() if name != "air"}
CLASSES = max(phantom.TISSUES.values()) + 1
# BraTS tumour labels: necrotic core, oedema, enhancing tumour (4 in 2021, 3 from 2023).
BRATS_LABELS = {"brats2021": {"necrosis": 1, "oedema": 2, "enhancing": 4},
                "brats2023": {"necrosis": 1, "oedema": 2, "enhancing": 3},
                "brasyn": {"necrosis": 1, "oedema": 2, "enhancing": 3}}
MAX_SLICES = 4096  # a prepared dataset's training slices for the segmenter, evenly taken
# Measured on the `small` phantom (48×48×32, 16 training subjects), 2 CPU cores: see
# docs/design.md, "Segmentation-based evaluation".
DEFAULTS = {"steps": 400, "batch_size": 8, "learning_rate": 5e-3, "channels": 8,
            "dice_weight": 1.0, "seed": 0}
MAX_EPOCHS = 20  # default steps: fewer than DEFAULTS["steps"] on a tiny phantom
SEGMENT_BATCH = 32  # slices per jitted call of `Segmenter.segment`


def modalities(config) -> tuple[str, ...]:
  """The segmenter's input channels: `data.modalities` when the config has it (any-to-any
  runs), else the run's sources then its target (in order, each once)."""
  names = tuple(config.data.get("modalities", None) or ())
  if not names:
    names = modalities_lib.as_tuple(config.data.source) + (config.data.target,)
  return tuple(dict.fromkeys(names))


def network(settings: dict) -> UNet:
  return UNet(out_channels=int(settings.get("classes", CLASSES)),
              channels=int(settings["channels"]), channel_mult=(1, 2), num_res_blocks=1,
              attention_levels=())


def labels_for(config) -> dict:
  """The labels a run's segmenter learns and scores: the phantom's tissues, BraTS's
  tumour labels for BraTS layouts, else each label value found in the training shards."""
  if config.data.kind == "phantom":
    return dict(LABELS)
  from medjax.data import shards
  layout = (shards.load_manifest(config.data.dir).get("settings") or {}).get("layout")
  if layout in BRATS_LABELS:
    return dict(BRATS_LABELS[layout])
  found = set()
  for labels in _shard_labels(config, "train"):
    found |= set(np.unique(labels).tolist())
  return {f"label_{v}": int(v) for v in sorted(found - {0})}


def _shard_labels(config, split):
  from medjax.data import shards
  for meta in shards.split_metadata(config.data.dir, split):
    labels = shards.read_labels(config.data.dir, split, meta)
    if labels is None:
      raise UserError(f"{config.data.dir}/{split}: subject {meta['subject']} has no labels: "
                      "segmentation needs the dataset's seg files, prepared with them "
                      "(a layout that finds `seg`: brats2021, brats2023, phantom, csv)")
    yield labels


def subject_images(config, volume, names):
  """A held-out `Volume` as the segmenter reads it: ((Z, H, W, M) real images of `names`,
  (Z, H, W) labels, (Z, H, W, 1) mask). Phantom subjects are rendered again (the true,
  aligned target); a prepared subject's come from its shard and labels."""
  if config.data.kind == "phantom":
    return pipeline.phantom_images(config, pipeline.phantom_number(volume.subject), names)
  channels = modalities_lib.as_tuple(config.data.source) + (config.data.target,)
  if volume.labels is None:
    raise UserError(f"subject {volume.subject} of {config.data.dir} has no labels: "
                    "segmentation needs the dataset's seg files, prepared with them")
  stacked = np.concatenate([volume.source, volume.target], -1)
  return stacked[..., [channels.index(m) for m in names]], volume.labels, volume.mask


def _subjects(config, split, names):
  """(images, labels, mask) of every subject of `split` (phantom or prepared shards)."""
  if config.data.kind == "phantom":
    for subject in pipeline.phantom_split(config)[split]:
      yield pipeline.phantom_images(config, subject, names)
    return
  from medjax.data import shards
  for volume in shards.split_volumes(config.data.dir, split):
    yield subject_images(config, volume, names)


@dataclasses.dataclass
class Segmenter:
  """A trained segmenter: its input `modalities` (channel order), the `labels` it scores
  ({name: value}), its parameters and the `settings` it was made with (training, grid)."""
  modalities: tuple[str, ...]
  labels: dict
  params: object
  settings: dict
  _apply: object = dataclasses.field(default=None, repr=False)

  def segment(self, images) -> np.ndarray:
    """(Z, H, W, M) images on the [-1, 1] model scale → (Z, H, W) class per voxel."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != len(self.modalities):
      raise ValueError(f"images of shape {images.shape}: expected (Z, H, W, "
                       f"{len(self.modalities)}) for modalities {list(self.modalities)}")
    if self._apply is None:
      net = network(self.settings)
      self._apply = jax.jit(lambda params, x: jnp.argmax(
          net.apply({"params": params}, None, None, x, train=False), -1).astype(jnp.int32))
    out = []
    for start in range(0, len(images), SEGMENT_BATCH):
      batch = images[start:start + SEGMENT_BATCH]
      count = len(batch)
      if count < SEGMENT_BATCH:  # one compiled shape: the last batch padded
        batch = np.concatenate([batch, np.repeat(batch[-1:], SEGMENT_BATCH - count, 0)])
      out.append(np.asarray(self._apply(self.params, batch))[:count])
    return np.concatenate(out)


def dice(pred, truth, labels: dict, mask=None) -> dict[str, float]:
  """{name: 2|P∩T| / (|P| + |T|)} over the volume (inside `mask` when given); NaN where the
  label is in neither P nor T (no evidence either way: summaries skip NaN)."""
  pred, truth = np.asarray(pred), np.asarray(truth)
  if pred.shape != truth.shape:
    raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
  if mask is not None:
    inside = np.asarray(mask).reshape(pred.shape) > 0.5
    pred, truth = pred[inside], truth[inside]
  scores = {}
  for name, value in labels.items():
    p, t = pred == value, truth == value
    total = int(p.sum()) + int(t.sum())
    scores[name] = 2.0 * int((p & t).sum()) / total if total else math.nan
  return scores


def mean(scores: dict) -> float:
  """The mean over labels, NaN (label absent) skipped; NaN if every label is."""
  values = [v for v in scores.values() if not math.isnan(v)]
  return float(np.mean(values)) if values else math.nan


def task_scores(segmenter: Segmenter, images, labels, index: int, synthesised,
                mask=None) -> dict[str, dict[str, float]]:
  """Per-label Dice with the real images, with channel `index` replaced by `synthesised`
  ((Z, H, W) on the [-1, 1] model scale, clipped), and with it blank (−1 everywhere)."""
  images = np.asarray(images, np.float32)
  synthesised = np.asarray(synthesised, np.float32).reshape(images.shape[:-1])
  swapped, blank = images.copy(), images.copy()
  swapped[..., index] = np.clip(synthesised, -1.0, 1.0)
  blank[..., index] = -1.0
  return {name: dice(segmenter.segment(x), labels, segmenter.labels, mask)
          for name, x in (("real", images), ("synthesised", swapped), ("blank", blank))}


COLUMN = {"real": "real", "synthesised": "synth", "blank": "blank"}


def columns(scores: dict) -> dict[str, float]:
  """`task_scores` as flat row columns: dice_{real,synth,blank}_{label}, their _mean, and
  dice_drop_mean (real − synthesised)."""
  row = {}
  for kind, short in COLUMN.items():
    row.update({f"dice_{short}_{name}": float(v) for name, v in scores[kind].items()})
    row[f"dice_{short}_mean"] = mean(scores[kind])
  row["dice_drop_mean"] = row["dice_real_mean"] - row["dice_synth_mean"]
  return row


# --- training --------------------------------------------------------------------------

def _loss(net, params, images, labels, dice_weight: float):
  logits = net.apply({"params": params}, None, None, images, train=True)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  # Soft Dice over the batch per class present: the small labels (lesion, oedema) weigh
  # as much as the large ones, which cross-entropy alone lets the model neglect.
  probs = jax.nn.softmax(logits)
  onehot = jax.nn.one_hot(labels, logits.shape[-1])
  overlap = (probs * onehot).sum((0, 1, 2))
  size = probs.sum((0, 1, 2)) + onehot.sum((0, 1, 2))
  present = onehot.sum((0, 1, 2)) > 0
  soft = jnp.where(present, 1 - 2 * overlap / jnp.maximum(size, 1e-6), 0.0)
  return ce + dice_weight * soft.sum() / jnp.maximum(present.sum(), 1)


def training_slices(config, names, split: str = "train"):
  """The axial slices of the subjects of `split`: (N, H, W, M) images, (N, H, W) labels;
  of a prepared dataset at most `MAX_SLICES`, evenly taken."""
  images, labels = [], []
  for x, y, _ in _subjects(config, split, names):
    images.append(x)
    labels.append(y)
  images, labels = np.concatenate(images), np.concatenate(labels)
  stride = max(1, -(-len(images) // MAX_SLICES))
  return images[::stride], labels[::stride]


def train(config, names, settings: dict, progress=None) -> object:
  """Parameters of a segmenter trained on the real slices of the run's training subjects,
  with random left-right flips; deterministic in `settings["seed"]`."""
  images, labels = training_slices(config, names)
  net = network(settings)
  rng = np.random.default_rng(int(settings["seed"]))
  # Jitted: flax's eager init dispatches every op apart, far slower than one compilation
  # (which the persistent compilation cache then keeps).
  params = jax.jit(lambda key: net.init(key, None, None, jnp.asarray(images[:1]),
                                        train=False)["params"])(
      jax.random.PRNGKey(int(settings["seed"])))
  steps = int(settings["steps"])
  schedule = optax.cosine_decay_schedule(float(settings["learning_rate"]), max(steps, 1))
  optimiser = optax.adamw(schedule, weight_decay=1e-4)
  opt_state = optimiser.init(params)
  loss_fn = functools.partial(_loss, net, dice_weight=float(settings["dice_weight"]))

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimiser.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  batch = min(int(settings["batch_size"]), len(images))
  for index in range(steps):
    rows = rng.choice(len(images), batch, replace=False)
    x, y = images[rows], labels[rows]
    # The head is nearly symmetric left-right (axis H of a (Z, X, Y) slice is R-L): a
    # flip is a new, plausible head.
    flip = rng.random(batch) < 0.5
    x[flip], y[flip] = x[flip, ::-1], y[flip, ::-1]
    params, opt_state, loss = step(params, opt_state, x, y.astype(np.int32))
    if progress and (index + 1) % max(1, steps // 10) == 0:
      progress(f"segmenter step {index + 1}/{steps}: loss {float(loss):.4f}")
  return params


def _made_for(config, names, settings: dict) -> dict:
  """What a cached segmenter must have been made with to be reused."""
  labels = labels_for(config)
  settings = {**settings, "classes": max(max(labels.values(), default=0) + 1, 2),
              "source": list(modalities_lib.as_tuple(config.data.source))}
  if config.data.kind != "phantom":
    recipe = pipeline.recipe(config)
    return {"modalities": list(names), "labels": labels,
            "settings": {**settings, "data_dir": str(Path(config.data.dir).resolve()),
                         "size": [int(s) for s in recipe.size],
                         "spacing": [float(s) for s in recipe.spacing]}}
  p = config.data.phantom
  return {"modalities": list(names), "labels": labels,
          "settings": {**settings, "shape": [int(s) for s in p.shape],
                       "spacing": [float(s) for s in p.spacing], "phantom_seed": int(p.seed),
                       "subjects": int(p.subjects)}}


def validation_dice(segmenter: Segmenter, config) -> dict[str, float]:
  """The segmenter's Dice on the REAL validation subjects (mean over subjects per label,
  NaN skipped, and 'mean' over labels): the ceiling of every other Dice it reports."""
  per_subject = []
  for images, labels, _ in _subjects(config, "val", segmenter.modalities):
    per_subject.append(dice(segmenter.segment(images), labels, segmenter.labels))
  scores = {name: mean({s: d[name] for s, d in enumerate(per_subject)})
            for name in segmenter.labels}
  return {**scores, "mean": mean(scores)}


def _resolve(source):
  """(config, workdir) of a run directory, a loaded `run.Run`, or a (config, workdir) pair."""
  if isinstance(source, tuple):
    config, workdir = source
  elif hasattr(source, "config") and hasattr(source, "workdir"):
    config, workdir = source.config, source.workdir
  else:
    from medjax import run
    config, workdir = run.load_config(source), source
  if workdir is None:
    raise UserError("the segmenter is cached in a run directory; this model has none "
                    "(give the run's workdir)")
  return config, Path(workdir)


def default_steps(config) -> int:
  """`DEFAULTS["steps"]`, or `MAX_EPOCHS` passes over the training slices if fewer (a tiny
  phantom learns what it can in those and trains in seconds)."""
  if config.data.kind == "phantom":
    slices = len(pipeline.phantom_split(config)["train"]) * int(config.data.phantom.shape[2])
  else:
    from medjax.data import shards
    slices = sum(len(m["slices"]) for m in shards.split_metadata(config.data.dir, "train"))
  epochs = -(-MAX_EPOCHS * slices // DEFAULTS["batch_size"])
  return int(min(DEFAULTS["steps"], epochs))


def segmenter_for(source, *, steps: int | None = None, progress=None) -> Segmenter:
  """The run's segmenter: `WORKDIR/segmenter/` when it was made for the same modalities,
  labels and settings, else trained now on the training subjects, measured on the real
  validation subjects and saved there (atomically). `source`: a run directory, a
  `run.Run` or a (config, workdir) pair. `steps`: train this many (a cached segmenter of
  another length is replaced); None: a cached one of any length, else `default_steps`."""
  config, workdir = _resolve(source)
  names = modalities(config)
  settings = {**DEFAULTS, "steps": default_steps(config) if steps is None else int(steps)}
  made_for = _made_for(config, names, settings)
  folder = workdir / FOLDER
  net = network(made_for["settings"])
  if (folder / INDEX).is_file():
    index = files.read_json(folder / INDEX, dict)
    wanted = made_for
    if steps is None:  # any length of training will do
      cached_steps = (index.get("settings") or {}).get("steps")
      wanted = {**made_for, "settings": {**made_for["settings"], "steps": cached_steps}}
    if all(index.get(k) == v for k, v in wanted.items()):
      grid = (config.data.phantom.shape[:2] if config.data.kind == "phantom"
              else pipeline.recipe(config).size)
      shape = (1, *[int(s) for s in grid], len(names))
      abstract = jax.eval_shape(lambda: net.init(
          jax.random.PRNGKey(0), None, None, jnp.zeros(shape), train=False)["params"])
      one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      abstract = checkpoint.abstract_like(abstract, jax.tree.map(lambda _: one, abstract))
      params = checkpoint.restore_tree(folder / PARAMS, abstract)
      return Segmenter(names, made_for["labels"], params, wanted["settings"])
  start = time.perf_counter()
  params = train(config, names, made_for["settings"], progress)
  segmenter = Segmenter(names, made_for["labels"], params, made_for["settings"])
  val = validation_dice(segmenter, config)
  seconds = time.perf_counter() - start
  if progress:
    progress(f"segmenter: mean Dice {val['mean']:.3f} on the real validation subjects "
             f"({seconds:.0f} s)")
  with files.atomic_directory(folder, replace=True) as tmp:
    checkpoint.save_tree(tmp / PARAMS, params, report_as=folder)
    files.write_json(tmp / INDEX, {**made_for, "steps": settings["steps"],
                                   "seed": settings["seed"],
                                   "val_dice": {k: None if math.isnan(v) else v
                                                for k, v in val.items()},
                                   "seconds": round(seconds, 2)})
  return segmenter


def val_dice(workdir) -> dict | None:
  """The cached segmenter's own Dice on the real validation subjects, if there is one."""
  path = Path(workdir) / FOLDER / INDEX
  return files.read_json(path, dict).get("val_dice") if path.is_file() else None


# --- files (`medjax score --segmentation`) ---------------------------------------------

def _read(path, max_voxels):
  """A volume file in RAS voxel order (axes R, A, S) and its RAS affine."""
  from medjax.data import volumes
  try:
    data, affine = volumes.load(path, max_voxels)
  except volumes.VolumeError as error:
    raise UserError(f"{path}: {error.reason}") from None
  return volumes.to_ras(data, affine)


def subject_inputs(segmenter: Segmenter, subject_files: dict, prediction, target: str, *,
                   max_voxels=None):
  """A phantom-layout subject's real images ({modality: file}, with 'mask' and 'seg'), as
  the segmenter's training slices are made, and the prediction for `target` on the model
  scale: (images (Z, H, W, M), labels (Z, H, W), mask (Z, H, W), synthesised (Z, H, W))."""
  from medjax.data import intensity, volumes
  wanted = (*segmenter.modalities, "mask", "seg")
  missing = [m for m in wanted if m not in subject_files]
  if missing:
    raise UserError(f"no {', '.join(missing)} file for the segmenter (it reads "
                    f"{', '.join(wanted)})")
  shape = tuple(segmenter.settings["shape"])
  spacing = np.asarray(segmenter.settings["spacing"])
  arrays = {}
  for name in (*wanted, "prediction"):
    path = prediction if name == "prediction" else subject_files[name]
    data, affine = _read(path, max_voxels)
    if data.shape != shape or not np.allclose(volumes.voxel_spacing(affine), spacing,
                                              rtol=1e-3):
      raise UserError(
          f"{path}: grid {'x'.join(map(str, data.shape))} of "
          f"{'x'.join(f'{s:g}' for s in volumes.voxel_spacing(affine))} mm differs from the "
          f"segmenter's training slices ({'x'.join(map(str, shape))} of "
          f"{'x'.join(f'{s:g}' for s in spacing)} mm): write the phantom on the run's grid")
    arrays[name] = data
  mask = arrays["mask"] > 0.5
  if not mask.any():
    raise UserError(f"{subject_files['mask']}: empty mask")

  def slices(volume):  # (X, Y, Z) → (Z, X, Y), as `pipeline.phantom_volume`
    return np.moveaxis(volume, -1, 0)

  def scaled(volume, modality):
    return intensity.normalise(volume, intensity.fit(volume, modality, mask))

  images = np.stack([slices(scaled(arrays[m], m)) for m in segmenter.modalities], -1)
  pred = arrays["prediction"]
  if modalities_lib.is_ct(target):  # translate writes HU: the fixed CT window
    synthesised = scaled(pred, target)
  else:  # translate writes MR on [0, 1]: u → 2u − 1
    synthesised = np.clip(2.0 * pred - 1.0, -1.0, 1.0)
  return (images, slices(np.rint(arrays["seg"])).astype(np.int32), slices(mask),
          slices(synthesised).astype(np.float32))


def score_subject(segmenter: Segmenter, subject_files: dict, prediction, target: str, *,
                  max_voxels=None) -> dict[str, float]:
  """`columns` of one subject's `task_scores` (inside its mask), the prediction for
  `target` substituted."""
  if target not in segmenter.modalities:
    raise UserError(f"the segmenter reads {', '.join(segmenter.modalities)}, not the "
                    f"target {target}")
  images, labels, mask, synthesised = subject_inputs(
      segmenter, subject_files, prediction, target, max_voxels=max_voxels)
  return columns(task_scores(segmenter, images, labels, segmenter.modalities.index(target),
                             synthesised, mask))


def format_table(summary_metrics: dict, ceiling: dict | None = None) -> str:
  """Per label: the segmenter's own Dice on real validation images (its ceiling), then the
  mean over scored subjects with real, synthesised and blank inputs, and the drop."""
  names = sorted({k[len("dice_real_"):] for k in summary_metrics
                  if k.startswith("dice_real_")}, key=lambda n: (n == "mean", n))

  def value(key):
    stat = summary_metrics.get(key) or {}
    return f"{stat['mean']:.3f}" if stat.get("mean") is not None else "-"

  width = max(len(n) for n in names + ["label"])
  lines = [f"{'label':{width}s}" + "".join(f"{h:>12s}" for h in
                                            ("ceiling", "real", "synth", "blank", "drop"))]
  for name in names:
    top = (ceiling or {}).get(name)
    cells = [f"{top:.3f}" if isinstance(top, float) and not math.isnan(top) else "-"]
    cells += [value(f"dice_{k}_{name}") for k in ("real", "synth", "blank")]
    real, synth = (summary_metrics.get(f"dice_{k}_{name}", {}).get("mean")
                   for k in ("real", "synth"))
    cells.append(f"{real - synth:.3f}" if real is not None and synth is not None else "-")
    lines.append(f"{name:{width}s}" + "".join(f"{c:>12s}" for c in cells))
  return "\n".join(lines)
