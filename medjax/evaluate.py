"""Held-out evaluation per 3D subject volume, in physical units, model beside baseline.

`predict_volume` is the one inference path (evaluation and `medjax translate`): a 2D run's
slices go through the run's jitted `translate` in fixed-size batches and are stacked back
into a volume, a 3D run's through Gaussian-weighted sliding windows
(`sliding.sliding_window`), either optionally with mirror TTA (`sliding.mirror_tta`;
docs/design.md, "Sliding windows, TTA and ensembles"). Volumes are scored with the
protocol of the target modality (`synthrad2023` in HU for CT, `mri` on [0, 1] otherwise)
inside the body mask (docs/design.md, "Evaluation protocols"). Nothing here knows the method. `evaluate_run` is what training runs after
each evaluation interval and what `medjax evaluate` runs on a trained run.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from medjax import any2any, figures, files, metrics, parallel, sliding
from medjax.data import augment, intensity

METRIC_KEYS = ("mae", "psnr", "ssim", "through_plane_mae")
EVAL_SEED_OFFSET = 10_000_019  # the evaluation's draws never share keys with training's
TTA = ("none", "flip")


@dataclasses.dataclass
class Prediction:
  mean: np.ndarray  # (Z, H, W, 1) in [-1, 1]
  std: np.ndarray


def translate_volume(translate_fn, params, source: np.ndarray, rng, mesh,
                     batch_size: int, on_batch=None) -> Prediction:
  """All axial slices of one (Z, H, W, Cs) volume, in batches padded to `batch_size`."""
  sharding = parallel.batch_sharding(mesh)
  means, stds = [], []
  for start in range(0, source.shape[0], batch_size):
    chunk = source[start:start + batch_size]
    pad = batch_size - chunk.shape[0]
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
    key = jax.random.fold_in(rng, start)
    mean, std = translate_fn(params, parallel.put_global(padded, sharding), key)
    means.append(parallel.to_host(mean)[:chunk.shape[0]])
    stds.append(parallel.to_host(std)[:chunk.shape[0]])
    if on_batch is not None:
      on_batch(chunk.shape[0])
  return Prediction(np.concatenate(means), np.concatenate(stds))


def inference_settings(config, overlap=None, tta=None) -> tuple[float, str]:
  """(overlap, tta): given values, else the run's `eval.overlap`/`eval.tta` (a run trained
  before they existed: 0.5, 'none'), checked."""
  overlap = config.eval.get("overlap", 0.5) if overlap is None else overlap
  tta = config.eval.get("tta", "none") if tta is None else tta
  if not (isinstance(overlap, (int, float)) and 0.0 <= overlap < 1.0):
    raise ValueError(f"eval.overlap={overlap!r}: expected a fraction in [0, 1)")
  if tta not in TTA:
    raise ValueError(f"eval.tta={tta!r}: expected one of {', '.join(map(repr, TTA))}")
  return float(overlap), tta


def dims(config) -> int:
  return int(config.model.get("dims", 2))


def mirror_axes(config) -> tuple[int, ...]:
  """Axes of a (Z, H, W, C) volume that mirror TTA flips: those training mirrors."""
  if dims(config) == 3:
    return tuple(augment.MIRROR_AXES_3D)
  return tuple(1 + axis for axis in augment.MIRROR_AXES)


def work_units(run, shape, *, overlap=None, tta=None) -> int:
  """What `predict_volume`'s `on_batch` counts for a volume of `shape`: slices (2D) or
  windows (3D), over every TTA member."""
  overlap, tta = inference_settings(run.config, overlap, tta)
  members = len(sliding.mirror_sets(mirror_axes(run.config))) if tta == "flip" else 1
  if dims(run.config) == 3:
    return members * len(sliding.window_grid(shape[:3], tuple(run.config.data.patch),
                                             overlap))
  return members * shape[0]


def predict_volume(run, source: np.ndarray, rng, *, overlap: float | None = None,
                   tta: str | None = None, batch_size: int | None = None, on_batch=None,
                   steps: int | None = None, samples: int | None = None,
                   ceiling: bool = False) -> Prediction:
  """A (Z, H, W, Cs) volume's prediction (Z, H, W, 1): what evaluation scores and what
  `medjax translate` writes (docs/design.md, "Sliding windows, TTA and ensembles").

  `model.dims` 2: axial slices in `parallel.balanced_batch` batches (`translate_volume`);
  3: `sliding.sliding_window` with window `data.patch`, windows batched on the mesh, the
  key of batch i `fold_in(rng, i)`. `tta='flip'`: also on the volume mirrored along
  `mirror_axes`, combined by the mixture law; member 0 (no mirror) draws with `rng`,
  member k with `fold_in(rng, k)`, so 'none' is exactly member 0. Unset settings are
  the run's (`eval.overlap`, `eval.tta`, `eval.batch_size`). `ceiling`: the translator's
  `reference` of `source` (the real target) instead of its translation.
  """
  overlap, tta = inference_settings(run.config, overlap, tta)
  batch_size = batch_size or run.config.eval.batch_size
  translate_fn = (run.translate_fn(steps, samples, ceiling=True) if ceiling
                  else run.translate_fn(steps, samples))
  sharding = parallel.batch_sharding(run.mesh)

  def one(volume, key):
    if dims(run.config) != 3:
      size = parallel.balanced_batch(volume.shape[0], batch_size, run.mesh.size)
      prediction = translate_volume(translate_fn, run.params, volume, key, run.mesh, size,
                                    on_batch=on_batch)
      return prediction.mean, prediction.std
    window = tuple(run.config.data.patch)
    count = len(sliding.window_grid(volume.shape[:3], window, overlap))
    size = parallel.balanced_batch(count, batch_size, run.mesh.size)

    def predict(batch, index):
      mean, std = translate_fn(run.params, parallel.put_global(batch, sharding),
                               jax.random.fold_in(key, index))
      return parallel.to_host(mean), parallel.to_host(std)
    return sliding.sliding_window(predict, volume, window, overlap=overlap, batch_size=size,
                                  pad_value=augment.IMAGE_FILL, on_batch=on_batch)

  if tta == "none":
    return Prediction(*one(source, rng))
  mean, std = sliding.mirror_tta(
      lambda volume, member: one(volume, rng if member == 0 else jax.random.fold_in(rng, member)),
      source, mirror_axes(run.config))
  return Prediction(mean, std)


def evaluation_rng(config):
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), EVAL_SEED_OFFSET)


def direction_volumes(run, volumes, available, target: str):
  """Any-to-any: the held-out volumes as one direction sees them — the model input for
  `available` → `target` (`any2any.condition`) and that modality as the target."""
  names = any2any.modalities(run.config)
  index = any2any.channel_index(run.config)
  out = []
  for volume in volumes:
    images = any2any.images_of(volume.source, volume.target, index)
    k = names.index(target)
    out.append(dataclasses.replace(
        volume, source=any2any.condition(images, names, available, target),
        target=np.ascontiguousarray(images[..., k:k + 1]), target_aligned=None))
  return out


def evaluate(run, volumes, *, steps: int | None = None, samples: int | None = None,
             rng=None, batch_size: int | None = None, progress=None,
             overlap: float | None = None, tta: str | None = None,
             directions: str | None = None, segmentation: bool | None = None):
  """Scores of the run's model and baseline per subject, their summary, the predictions.

  Any-to-any runs are scored per direction (`any2any.directions`, `eval.directions`):
  rows carry a `direction` column, the summary a `directions` block (each direction's
  model and baseline), its `model`/`baseline` the mean over every (subject, direction),
  and the predictions are the first direction's. `segmentation` (default
  `eval.segmentation`): each row also gets the Dice of the run's segmenter with the real,
  the synthesised and a blank target modality (`task_columns`; docs/design.md,
  "Segmentation-based evaluation")."""
  config = run.config
  steps = steps or config.translator.sample_steps
  samples = samples or config.translator.samples
  rng = evaluation_rng(config) if rng is None else rng
  overlap, tta = inference_settings(config, overlap, tta)
  settings = dict(steps=steps, samples=samples, batch_size=batch_size, overlap=overlap,
                  tta=tta)
  if segmentation is None:
    segmentation = config.eval.get("segmentation", False)
  segmenter = None
  if segmentation:
    from medjax import segmentation as segmentation_lib
    segmenter = segmentation_lib.segmenter_for(run)
  summary = {"protocol": run.protocol, "steps": steps, "samples": samples,
             "nfe_per_sample": run.translator.nfe(steps), "tta": tta, "overlap": overlap,
             # what the volumes were split over: one CPU device per core under the
             # commands (medjax/host.py), so a figure says which machine gave it
             "devices": parallel.describe(run.mesh)}
  if segmenter is not None:
    summary["segmenter"] = {"modalities": list(segmenter.modalities),
                            "ceiling": segmentation_lib.val_dice(run.workdir)}
  names = any2any.modalities(config)
  if not names:
    rows, predictions = _score(run, volumes, run.target, rng, progress=progress, **settings)
    if segmenter is not None:
      rows = task_columns(segmenter, run, volumes, run.target, predictions, rows)
    return {**summary, "subjects": len(rows), **summarise(rows)}, rows, predictions
  which = directions or config.eval.get("directions", "standard")
  rows, per, first = [], {}, None
  todo = any2any.directions(names, which)
  for d, (available, target) in enumerate(todo):
    name = any2any.direction_name(available, target)
    direction_rows, predictions = _score(
        run, direction_volumes(run, volumes, available, target), target,
        jax.random.fold_in(rng, d), **settings,
        progress=None if progress is None else
        (lambda i, n, d=d: progress(d * n + i, len(todo) * n)))
    if segmenter is not None:
      direction_rows = task_columns(segmenter, run, volumes, target, predictions,
                                    direction_rows)
    per[name] = {"available": list(available), "target": target,
                 **summarise(direction_rows)}
    rows += [{"subject": row["subject"], "direction": name,
              **{k: v for k, v in row.items() if k != "subject"}} for row in direction_rows]
    first = first or predictions
  return ({**summary, "subjects": len(volumes), "directions_evaluated": which,
           **summarise(rows), "directions": per}, rows, first)


def task_columns(segmenter, run, volumes, target: str, predictions, rows) -> list[dict]:
  """`rows` with each subject's segmentation Dice (real / synthesised / blank `target`)
  in `segmentation.columns`' names; `volumes` are the held-out subjects as loaded (phantom
  subjects' labels rendered, a prepared subject's from its `seg` file)."""
  from medjax import segmentation
  if target not in segmenter.modalities:
    raise ValueError(f"the segmenter reads {', '.join(segmenter.modalities)}, not {target}")
  out = []
  for volume, prediction, row in zip(volumes, predictions, rows):
    images, labels, mask = segmentation.subject_images(run.config, volume,
                                                       segmenter.modalities)
    scores = segmentation.task_scores(segmenter, images, labels,
                                      segmenter.modalities.index(target),
                                      prediction.mean[..., 0], mask[..., 0] > 0)
    out.append({**row, **segmentation.columns(scores)})
  return out


def _score(run, volumes, target_modality: str, rng, *, steps, samples, batch_size, overlap,
           tta, progress=None):
  """Per-subject rows (model and baseline scores) and predictions of `volumes`."""
  protocol = metrics.protocol_for(target_modality)
  rows, predictions = [], []
  for i, volume in enumerate(volumes):
    # `medjax translate`'s path: the same batching and padding, the same draws.
    prediction = predict_volume(run, volume.source, jax.random.fold_in(rng, i),
                                overlap=overlap, tta=tta, batch_size=batch_size,
                                steps=steps, samples=samples)
    predictions.append(prediction)
    physical = lambda unit: intensity.to_output_units(unit[..., 0], volume.target_params,
                                                      target_modality)
    target, mask = physical(volume.target), volume.mask[..., 0]
    # A misaligned phantom pair also carries the perfectly aligned target: scored against
    # both, what a real study would see (`mae`) and the truth (`aligned_mae`)
    # (docs/design.md, "Evaluation protocols").
    aligned = getattr(volume, "target_aligned", None)
    truth = physical(aligned) if aligned is not None else None
    row = {"subject": volume.subject}
    for name, pred in (("model", physical(prediction.mean)),
                       ("baseline", physical(run.baseline(volume.source)))):
      scores = metrics.score(pred, target, mask, protocol=protocol)
      row.update({f"{name}_{k}": v for k, v in scores.items()})
      if truth is not None:
        scores = metrics.score(pred, truth, mask, protocol=protocol)
        row.update({f"{name}_aligned_{k}": v for k, v in scores.items()})
    if run.translator.has_ceiling:
      # e.g. a latent translator's VAE reconstruction of the real target, through the same
      # slicing and windows (docs/design.md, "Evaluation protocols").
      reference = predict_volume(run, volume.target, jax.random.fold_in(rng, i),
                                 overlap=overlap, tta=tta, batch_size=batch_size,
                                 steps=steps, samples=samples, ceiling=True)
      scores = metrics.score(physical(reference.mean), target, mask, protocol=protocol)
      row.update({f"ceiling_{k}": v for k, v in scores.items()})
    rows.append(row)
    if progress is not None:
      progress(i + 1, len(volumes))
  return rows, predictions


def summarise(rows: list[dict]) -> dict:
  """{"model": {"mae": mean, "mae_std": …, "mae_median": …}, "baseline": {…}}, with
  `ceiling_*` columns a "ceiling" block alike, and with segmentation columns
  {"segmentation": {"dice_real_mean": {mean, std, median, n}, …}}."""
  out = {"model": {}, "baseline": {}}
  for column, stats in metrics.summarise(rows).items():
    name, key = column.split("_", 1)
    if name == "ceiling":
      out.setdefault("ceiling", {})
    if name not in ("model", "baseline", "ceiling"):  # dice_*: the segmenter's, a block of its own
      out.setdefault("segmentation", {})[column] = stats
      continue
    out[name].update({key: stats["mean"], f"{key}_std": stats["std"],
                      f"{key}_median": stats["median"]})
  return out


def write_results(directory, summary: dict, rows: list[dict], prefix: str = "") -> None:
  """`summary.json` and a per-subject CSV, each written whole or not at all."""
  files.write_json(os.path.join(directory, f"{prefix}summary.json"), summary)
  files.write_csv(os.path.join(directory, f"{prefix}subjects.csv"), rows)


def evaluate_run(run, split: str, *, writer=None, prefix: str | None = None,
                 overlap: float | None = None, tta: str | None = None,
                 segmentation: bool | None = None, directions: str | None = None) -> dict:
  """Score the run's parameters on `split` and write what a person reads: the summary and
  per-subject CSV under eval/<step>/, a picture in images/, a report with 3-plane views.
  `overlap`, `tta`: the run's `eval.overlap`, `eval.tta` unless given."""
  volumes = run.eval_volumes(split)
  summary, rows, predictions = evaluate(run, volumes, overlap=overlap, tta=tta,
                                        segmentation=segmentation, directions=directions)
  summary = {"split": split, "step": int(run.step), "translator": run.translator.name,
             **summary}
  prefix = ("" if split == "val" else f"{split}_") if prefix is None else prefix
  target, channel, pictured = run.target, run.recipe.centre_channel, rows
  if "directions" in summary:  # any-to-any: the pictures show the first direction
    name, first = next(iter(summary["directions"].items()))
    target, channel = first["target"], any2any.modalities(run.config).index(first["available"][0])
    volumes = direction_volumes(run, volumes, tuple(first["available"]), target)
    pictured = [row for row in rows if row["direction"] == name]
  if jax.process_index() == 0:
    directory = run.directory("eval", run.step)
    write_results(directory, summary, rows, prefix=prefix)
    image = figures.evaluation_grid(
        run.directory("images", f"{split}_{run.step:06d}.png"), volumes[0], predictions[0],
        target_modality=target, num_slices=run.config.eval.image_slices,
        stochastic=run.translator.stochastic, source_channel=channel)
    figures.write_report(
        os.path.join(directory, f"{prefix}report"),
        figures.evaluation_subjects(volumes, predictions, pictured, target,
                                    spacing=run.recipe.spacing, source_channel=channel),
        protocol=summary["protocol"])
    if writer is not None:
      scalars = {f"{name}_{k}": v for name in ("model", "baseline", "ceiling")
                 for k, v in summary.get(name, {}).items()
                 if not k.endswith(("_std", "_median"))}
      writer.write(run.step, scalars, prefix=split)
      writer.image(run.step, f"{split}/grid", image)
  return summary


def format_summary(summary: dict) -> str:
  keys = [k for k in summary["model"] if not k.endswith(("_std", "_median"))]
  unit = {"synthrad2023": " (HU)", "mri": " ([0,1])"}.get(summary["protocol"], "")
  width = max([16] + [len(k) + 1 for k in keys])
  lines = [f"held-out {summary['split']} ({summary['subjects']} subjects, step {summary['step']},"
           f" {summary['protocol']}{unit}):",
           f"  {'':10s}" + "".join(f"{k:>{width}s}" for k in keys)]
  for name in ("model", "baseline", "ceiling"):
    if name not in summary:
      continue
    cells = "".join(f"{summary[name][k]:10.4f} ±{summary[name][k + '_std']:<5.3f}"[:16]
                    .rjust(width) for k in keys)
    lines.append(f"  {name:10s}{cells}")
  if summary.get("segmentation"):
    from medjax import segmentation
    ceiling = (summary.get("segmenter") or {}).get("ceiling")
    lines.append("  segmentation Dice (real | with the synthesised | with it blank):")
    lines += ["  " + line for line in segmentation.format_table(summary["segmentation"],
                                                                ceiling).splitlines()]
  directions = summary.get("directions") or {}
  if directions:
    width = max(len(name) for name in directions) + 2
    dice = all("segmentation" in block for block in directions.values())
    lines.append(f"  {'per direction':{width}s}" + "".join(
        f"{h:>11s}" for h in ("psnr", "ssim", "base psnr", "base ssim")
        + (("Dice synth",) if dice else ())))
    for name, block in directions.items():
      cells = [block[part][k] for part in ("model", "baseline") for k in ("psnr", "ssim")]
      if dice:
        cells.append(block["segmentation"]["dice_synth_mean"]["mean"])
      lines.append(f"  {name:{width}s}" + "".join(f"{v:11.3f}" for v in cells))
  return "\n".join(lines)
