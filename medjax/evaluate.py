"""Held-out evaluation per 3D subject volume, in physical units, model beside baseline.

Slices go through the jitted `translate` in fixed-size batches, are stacked back into
volumes and scored with the protocol of the target modality (`synthrad2023` in HU for
CT, `mri` on [0, 1] otherwise) inside the body mask. Nothing here knows the method.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os

import jax
import numpy as np

from medjax import images, metrics, parallel
from medjax.data import intensity

METRIC_KEYS = ("mae", "psnr", "ssim")


@dataclasses.dataclass
class Prediction:
  mean: np.ndarray  # (Z, H, W, 1) in [-1, 1]
  std: np.ndarray


def protocol_for(target_modality: str) -> str:
  return "synthrad2023" if intensity.is_ct(target_modality) else "mri"


def to_physical(unit, params: dict, protocol: str):
  """[-1, 1] → the units the protocol scores in (HU, or [0, 1] for MR)."""
  if protocol == "mri":
    return intensity.to_unit_interval(unit)
  return intensity.denormalise(unit, params)


def std_to_physical(std, params: dict, protocol: str):
  return std * (0.5 if protocol == "mri" else 0.5 * (params["hi"] - params["lo"]))


def make_translate_fn(translator, mesh, *, steps, samples):
  fn = functools.partial(translator.translate, steps=steps, samples=samples)
  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh),
                                   parallel.replicated(mesh)),
                 out_shardings=parallel.batch_sharding(mesh))


def translate_volume(translate_fn, params, source: np.ndarray, rng, mesh,
                     batch_size: int) -> Prediction:
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
  return Prediction(np.concatenate(means), np.concatenate(stds))


def evaluate(translator, params, volumes, baseline, rng, mesh, *, target_modality: str,
             steps: int, samples: int, batch_size: int, progress=None):
  """Scores of model and baseline per subject, their summary, and the predictions."""
  protocol = protocol_for(target_modality)
  translate_fn = make_translate_fn(translator, mesh, steps=steps, samples=samples)
  rows, predictions = [], []
  for i, volume in enumerate(volumes):
    prediction = translate_volume(translate_fn, params, volume.source,
                                  jax.random.fold_in(rng, i), mesh, batch_size)
    predictions.append(prediction)
    target = to_physical(volume.target[..., 0], volume.target_params, protocol)
    mask = volume.mask[..., 0]
    model_pred = to_physical(prediction.mean[..., 0], volume.target_params, protocol)
    baseline_pred = to_physical(baseline(volume.source)[..., 0], volume.target_params, protocol)
    row = {"subject": volume.subject}
    for name, pred in (("model", model_pred), ("baseline", baseline_pred)):
      scores = metrics.score(pred, target, mask, protocol=protocol)
      row.update({f"{name}_{k}": v for k, v in scores.items()})
    rows.append(row)
    if progress is not None:
      progress(i + 1, len(volumes))
  summary = {
      "protocol": protocol, "subjects": len(rows), "steps": steps, "samples": samples,
      "nfe_per_sample": translator.nfe(steps),
      **summarise(rows)}
  return summary, rows, predictions


def summarise(rows: list[dict]) -> dict:
  """{"model": {"mae": mean, "mae_std": …, "mae_median": …}, "baseline": {…}}."""
  out = {"model": {}, "baseline": {}}
  for column, stats in metrics.summarise(rows).items():
    name, key = column.split("_", 1)
    out[name].update({key: stats["mean"], f"{key}_std": stats["std"],
                      f"{key}_median": stats["median"]})
  return out


def write_results(directory: str, summary: dict, rows: list[dict], prefix: str = "") -> None:
  """`summary.json` and a per-subject CSV, each written whole or not at all."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"{prefix}summary.json")
  with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=2)
  os.replace(path + ".tmp", path)
  path = os.path.join(directory, f"{prefix}subjects.csv")
  with open(path + ".tmp", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  os.replace(path + ".tmp", path)


def save_images(path: str, volume, prediction: Prediction, *, target_modality: str,
                num_slices: int, stochastic: bool) -> str:
  """Evenly spaced axial slices through the subject's foreground."""
  protocol = protocol_for(target_modality)
  params = volume.target_params
  filled = np.flatnonzero(volume.mask[..., 0].any(axis=(1, 2)))
  lo, hi = (filled[0], filled[-1]) if filled.size else (0, volume.mask.shape[0] - 1)
  slices = np.linspace(lo, hi, num_slices + 2).round().astype(int)[1:-1]
  rows = []
  for z in slices:
    target = to_physical(volume.target[z, ..., 0], params, protocol)
    pred = to_physical(prediction.mean[z, ..., 0], params, protocol)
    row = {"source": volume.source[z, ..., 0], "prediction": pred, "target": target,
           "|error|": np.abs(pred - target)}
    if stochastic:
      row["std"] = std_to_physical(prediction.std[z, ..., 0], params, protocol)
    rows.append(row)
  if protocol == "mri":
    ranges = {"source": (-1, 1), "prediction": (0, 1), "target": (0, 1), "|error|": (0, 0.25),
              "std": (0, 0.25)}
    units = "[0, 1]"
  else:
    ranges = {"source": (-1, 1), "prediction": (-1000, 1500), "target": (-1000, 1500),
              "|error|": (0, 500), "std": (0, 500)}
    units = "HU"
  return images.save_grid(path, rows, ranges, units)
