"""Held-out evaluation per 3D subject volume, in physical units, model beside baseline.

Slices go through the run's jitted `translate` in fixed-size batches, are stacked back
into volumes and scored with the protocol of the target modality (`synthrad2023` in HU
for CT, `mri` on [0, 1] otherwise) inside the body mask (docs/design.md, "Evaluation
protocols"). Nothing here knows the method. `evaluate_run` is what training runs after
each evaluation interval and what `medjax evaluate` runs on a trained run.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from medjax import figures, files, metrics, parallel
from medjax.data import intensity

METRIC_KEYS = ("mae", "psnr", "ssim")
EVAL_SEED_OFFSET = 10_000_019  # the evaluation's draws never share keys with training's


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


def evaluation_rng(config):
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), EVAL_SEED_OFFSET)


def evaluate(run, volumes, *, steps: int | None = None, samples: int | None = None,
             rng=None, batch_size: int | None = None, progress=None):
  """Scores of the run's model and baseline per subject, their summary, the predictions."""
  config = run.config
  steps = steps or config.translator.sample_steps
  samples = samples or config.translator.samples
  rng = evaluation_rng(config) if rng is None else rng
  batch_size = batch_size or config.eval.batch_size
  translate_fn = run.translate_fn(steps, samples)
  rows, predictions = [], []
  for i, volume in enumerate(volumes):
    # Batched as `medjax translate` batches a volume: the same padding, the same draws.
    size = parallel.balanced_batch(volume.source.shape[0], batch_size, run.mesh.size)
    prediction = translate_volume(translate_fn, run.params, volume.source,
                                  jax.random.fold_in(rng, i), run.mesh, size)
    predictions.append(prediction)
    physical = lambda unit: intensity.to_output_units(unit[..., 0], volume.target_params,
                                                      run.target)
    target, mask = physical(volume.target), volume.mask[..., 0]
    # A misaligned phantom pair also carries the perfectly aligned target: scored against
    # both, what a real study would see (`mae`) and the truth (`aligned_mae`)
    # (docs/design.md, "Evaluation protocols").
    aligned = getattr(volume, "target_aligned", None)
    truth = physical(aligned) if aligned is not None else None
    row = {"subject": volume.subject}
    for name, pred in (("model", physical(prediction.mean)),
                       ("baseline", physical(run.baseline(volume.source)))):
      scores = metrics.score(pred, target, mask, protocol=run.protocol)
      row.update({f"{name}_{k}": v for k, v in scores.items()})
      if truth is not None:
        scores = metrics.score(pred, truth, mask, protocol=run.protocol)
        row.update({f"{name}_aligned_{k}": v for k, v in scores.items()})
    rows.append(row)
    if progress is not None:
      progress(i + 1, len(volumes))
  summary = {
      "protocol": run.protocol, "subjects": len(rows), "steps": steps, "samples": samples,
      "nfe_per_sample": run.translator.nfe(steps), **summarise(rows)}
  return summary, rows, predictions


def summarise(rows: list[dict]) -> dict:
  """{"model": {"mae": mean, "mae_std": …, "mae_median": …}, "baseline": {…}}."""
  out = {"model": {}, "baseline": {}}
  for column, stats in metrics.summarise(rows).items():
    name, key = column.split("_", 1)
    out[name].update({key: stats["mean"], f"{key}_std": stats["std"],
                      f"{key}_median": stats["median"]})
  return out


def write_results(directory, summary: dict, rows: list[dict], prefix: str = "") -> None:
  """`summary.json` and a per-subject CSV, each written whole or not at all."""
  files.write_json(os.path.join(directory, f"{prefix}summary.json"), summary)
  files.write_csv(os.path.join(directory, f"{prefix}subjects.csv"), rows)


def evaluate_run(run, split: str, *, writer=None, prefix: str | None = None) -> dict:
  """Score the run's parameters on `split` and write what a person reads: the summary and
  per-subject CSV under eval/<step>/, a picture in images/, a report with 3-plane views."""
  volumes = run.eval_volumes(split)
  summary, rows, predictions = evaluate(run, volumes)
  summary = {"split": split, "step": int(run.step), "translator": run.translator.name,
             **summary}
  prefix = ("" if split == "val" else f"{split}_") if prefix is None else prefix
  if jax.process_index() == 0:
    directory = run.directory("eval", run.step)
    write_results(directory, summary, rows, prefix=prefix)
    image = figures.evaluation_grid(
        run.directory("images", f"{split}_{run.step:06d}.png"), volumes[0], predictions[0],
        target_modality=run.target, num_slices=run.config.eval.image_slices,
        stochastic=run.translator.stochastic, source_channel=run.recipe.centre_channel)
    figures.write_report(
        os.path.join(directory, f"{prefix}report"),
        figures.evaluation_subjects(volumes, predictions, rows, run.target,
                                    spacing=run.recipe.spacing,
                                    source_channel=run.recipe.centre_channel),
        protocol=summary["protocol"])
    if writer is not None:
      scalars = {f"{name}_{k}": v for name in ("model", "baseline")
                 for k, v in summary[name].items() if not k.endswith(("_std", "_median"))}
      writer.write(run.step, scalars, prefix=split)
      writer.image(run.step, f"{split}/grid", image)
  return summary


def format_summary(summary: dict) -> str:
  keys = [k for k in summary["model"] if not k.endswith(("_std", "_median"))]
  unit = {"synthrad2023": " (HU)", "mri": " ([0,1])"}.get(summary["protocol"], "")
  lines = [f"held-out {summary['split']} ({summary['subjects']} subjects, step {summary['step']},"
           f" {summary['protocol']}{unit}):",
           f"  {'':10s}" + "".join(f"{k:>16s}" for k in keys)]
  for name in ("model", "baseline"):
    cells = "".join(f"{summary[name][k]:10.4f} ±{summary[name][k + '_std']:<5.3f}"[:16].rjust(16)
                    for k in keys)
    lines.append(f"  {name:10s}{cells}")
  return "\n".join(lines)
