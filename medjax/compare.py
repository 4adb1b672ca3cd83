"""`medjax compare`: train several methods at one step budget and score them side by side.

  medjax compare --configs experiments/phantom_flow.py experiments/phantom_pix2pix.py \
      experiments/phantom_bridge.py:i2sb --workdir runs/compare --steps 300

Each config trains through `train.train_and_evaluate` in `WORKDIR/<run>` (a finished run
is not retrained: its `compare.json` is read back; an unfinished one resumes), is then
scored on the held-out test subjects with `evaluate.evaluate`, and the stochastic ones are
swept over sampling steps. Written under WORKDIR:

  compare.csv / compare.md   per task: MAE, PSNR, SSIM, network evaluations per sample,
                             training and sampling wall time, beside the intensity-mapping
                             baseline
  compare_<target>.png       the same held-out slices, source | target | each method
  steps.csv / steps.png      quality against sampling steps (1 sample) for the stochastic ones
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import runpy
import time

import jax
import numpy as np

DEFAULT_CONFIGS = [
    f"experiments/{name}.py{variant}"
    for target in ("", "_ct")
    for name, variant in (("phantom_flow" if not target else "phantom_mr_ct", ""),
                          (f"phantom_diffusion{target}", ""),
                          (f"phantom_bridge{target}", ""),
                          (f"phantom_bridge{target}", ":i2sb"),
                          (f"phantom_pix2pix{target}", ""),
                          (f"phantom_cyclegan{target}", ""))]
SWEEP_STEPS = (1, 2, 4, 8, 16, 50)
TASK_NAMES = {"t2w": "T1w → T2w", "ct": "T1w → CT"}


def add_compare_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                      help="experiment files, each optionally FILE.py:VARIANT")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=300, help="training steps for every method")
  parser.add_argument("--batch_size", type=int, default=None, help="override train.batch_size")
  parser.add_argument("--samples", type=int, default=None,
                      help="override eval.samples (draws averaged by the stochastic methods)")
  parser.add_argument("--sweep_steps", default=",".join(map(str, SWEEP_STEPS)),
                      help="sampling steps of the quality sweep ('' to skip it)")
  parser.add_argument("--sweep_subjects", type=int, default=1,
                      help="test subjects the sweep scores (all: 0)")
  parser.add_argument("--image_slices", type=int, default=3)


def load_config(spec: str):
  """`FILE.py[:VARIANT]` → (run name, ConfigDict), as `medjax train --config` reads it."""
  path, _, variant = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  get_config = runpy.run_path(path)["get_config"]
  config = get_config(variant) if variant else get_config()
  run = os.path.splitext(os.path.basename(path))[0] + (f"-{variant.replace(',', '-')}"
                                                        if variant else "")
  return run, config


def method_label(config) -> str:
  t = config.translator
  extra = {"bridge": lambda: t.bridge, "diffusion": lambda: f"{t.sampler}, {t.prediction}",
           "flow": lambda: t.sampler, "pix2pix": lambda: t.gan_loss,
           "cyclegan": lambda: "unpaired" if config.data.get("unpaired") else "paired"}
  return f"{t.name} ({extra[t.name]()})" if t.name in extra else t.name


def train_seconds(workdir: str) -> float:
  """Training wall time from the logged step rates (the final evaluation not included)."""
  seconds, last = 0.0, 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record.get("split") == "train" and "steps_per_s" in record:
        seconds += (record["step"] - last) / max(record["steps_per_s"], 1e-9)
        last = record["step"]
  return seconds


def restore(config, workdir: str, mesh):
  """The translator, its inference params and the baseline of a finished run."""
  from medjax import train
  translator, state, baseline = train.restore_checkpoint(config, workdir, mesh)
  return translator, translator.inference_params(state), baseline


def picked_slices(volume, count: int) -> np.ndarray:
  filled = np.flatnonzero(volume.mask[..., 0].any(axis=(1, 2)))
  return np.linspace(filled[0], filled[-1], count + 2).round().astype(int)[1:-1]


def run_one(spec: str, args, mesh) -> dict:
  """Train (or resume) one config and score it; the result is cached in its workdir."""
  from medjax import evaluate as evaluate_lib
  from medjax import train
  from medjax.data import pipeline

  run, config = load_config(spec)
  config.train.steps = args.steps
  config.eval.every = config.checkpoint.every = args.steps
  config.train.warmup_steps = min(config.train.warmup_steps, args.steps // 10)
  config.logging.progress = False
  if args.batch_size:
    config.train.batch_size = args.batch_size
  if args.samples:
    config.eval.samples = args.samples
  workdir = os.path.join(args.workdir, run)
  done = os.path.join(workdir, "compare.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)

  print(f"[compare] {run}: training {args.steps} steps in {workdir}", flush=True)
  train.train_and_evaluate(config, workdir, mesh=mesh)
  translator, params, baseline = restore(config, workdir, mesh)
  samples = config.eval.samples if translator.stochastic else 1
  volumes = pipeline.eval_volumes(config, "test")
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 20_000_003)

  # Sampling time per slice, compiled and warm: one evaluation batch, timed on its second run.
  translate_fn = evaluate_lib.make_translate_fn(translator, mesh, steps=config.eval.steps,
                                                samples=samples)
  chunk = volumes[0].source[:config.eval.batch_size]
  for _ in range(2):
    start = time.perf_counter()
    evaluate_lib.translate_volume(translate_fn, params, chunk, rng, mesh, config.eval.batch_size)
    sample_seconds = (time.perf_counter() - start) / len(chunk)

  summary, _, predictions = evaluate_lib.evaluate(
      translator, params, volumes, baseline, rng, mesh, target_modality=config.data.target,
      steps=config.eval.steps, samples=samples, batch_size=config.eval.batch_size)
  slices = picked_slices(volumes[0], args.image_slices)
  np.savez_compressed(os.path.join(workdir, "compare_slices.npz"), slices=slices,
                      prediction=predictions[0].mean[slices, ..., 0],
                      std=predictions[0].std[slices, ..., 0])

  sweep = []
  steps_list = [int(s) for s in args.sweep_steps.split(",") if s]
  if translator.stochastic and steps_list:
    subset = volumes[:args.sweep_subjects] if args.sweep_subjects else volumes
    for steps in steps_list:
      scores, _, _ = evaluate_lib.evaluate(
          translator, params, subset, baseline, rng, mesh, target_modality=config.data.target,
          steps=steps, samples=1, batch_size=config.eval.batch_size)
      sweep.append({"steps": steps, "nfe": translator.nfe(steps),
                    **{k: scores["model"][k] for k in evaluate_lib.METRIC_KEYS},
                    "baseline_psnr": scores["baseline"]["psnr"]})
      print(f"[compare] {run}: {steps} steps → PSNR {scores['model']['psnr']:.2f}", flush=True)

  result = {
      "run": run, "config": spec, "method": method_label(config), "task": config.data.target,
      "translator": translator.name, "stochastic": translator.stochastic,
      "protocol": summary["protocol"], "subjects": summary["subjects"],
      "train_steps": args.steps, "batch_size": config.train.batch_size,
      "steps": config.eval.steps, "samples": samples, "nfe": samples * summary["nfe_per_sample"],
      "nfe_per_sample": summary["nfe_per_sample"], "train_s": train_seconds(workdir),
      "sample_ms_per_slice": 1000 * sample_seconds,
      "model": summary["model"], "baseline": summary["baseline"], "sweep": sweep}
  with open(done + ".tmp", "w") as f:
    json.dump(result, f, indent=2)
  os.replace(done + ".tmp", done)
  return result


def table_rows(results: list[dict]) -> list[dict]:
  """One row per method and task, plus the intensity-mapping baseline of each task."""
  rows = []
  for task in dict.fromkeys(r["task"] for r in results):
    mine = [r for r in results if r["task"] == task]
    base = mine[0]["baseline"]
    rows.append({"task": task, "method": "intensity map (baseline)", "mae": base["mae"],
                 "psnr": base["psnr"], "ssim": base["ssim"], "nfe_per_sample": 0, "samples": 1,
                 "train_s": 0.0, "sample_ms_per_slice": 0.0})
    for r in mine:
      rows.append({"task": task, "method": r["method"],
                   **{k: r["model"][k] for k in ("mae", "psnr", "ssim")},
                   "nfe_per_sample": r["nfe_per_sample"], "samples": r["samples"],
                   "train_s": r["train_s"], "sample_ms_per_slice": r["sample_ms_per_slice"]})
  return rows


def write_table(directory: str, results: list[dict]) -> list[dict]:
  rows = table_rows(results)
  with open(os.path.join(directory, "compare.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  lines = []
  for task in dict.fromkeys(r["task"] for r in rows):
    first = next(r for r in results if r["task"] == task)
    unit = "HU" if first["protocol"] == "synthrad2023" else "[0, 1]"
    lines += [f"### {TASK_NAMES.get(task, task)} — {first['train_steps']} training steps "
              f"(batch {first['batch_size']}), {first['subjects']} held-out test subjects, "
              f"{first['protocol']}", "",
              f"| method | MAE ({unit}) | PSNR (dB) | SSIM | NFE / sample | samples "
              f"| train (s) | sampling (ms / slice) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in (r for r in rows if r["task"] == task):
      lines.append(f"| {r['method']} | {r['mae']:.4g} | {r['psnr']:.2f} | {r['ssim']:.4f} "
                   f"| {r['nfe_per_sample']} | {r['samples']} | {r['train_s']:.0f} "
                   f"| {r['sample_ms_per_slice']:.1f} |")
    lines.append("")
  with open(os.path.join(directory, "compare.md"), "w") as f:
    f.write("\n".join(lines))
  return rows


def write_images(directory: str, results: list[dict], args) -> list[str]:
  """Per task: the same held-out slices of the first test subject, every method side by side."""
  from medjax import evaluate as evaluate_lib
  from medjax import images
  from medjax.data import pipeline
  paths = []
  for task in dict.fromkeys(r["task"] for r in results):
    mine = [r for r in results if r["task"] == task]
    _, config = load_config(mine[0]["config"])
    volume = pipeline.eval_volumes(config, "test")[0]
    protocol = evaluate_lib.protocol_for(task)
    physical = lambda unit: evaluate_lib.to_physical(unit, volume.target_params, protocol)
    saved = {r["method"]: np.load(os.path.join(args.workdir, r["run"], "compare_slices.npz"))
             for r in mine}
    slices = next(iter(saved.values()))["slices"]
    rows = []
    for i, z in enumerate(slices):
      row = {"source (T1w)": volume.source[z, ..., 0], f"target ({task})":
             physical(volume.target[z, ..., 0])}
      row.update({method: physical(npz["prediction"][i]) for method, npz in saved.items()})
      rows.append(row)
    window = (0, 1) if protocol == "mri" else (-1000, 1500)
    ranges = {name: window for name in rows[0]}
    ranges["source (T1w)"] = (-1, 1)
    path = os.path.join(directory, f"compare_{task}.png")
    paths.append(images.save_grid(path, rows, ranges, "HU" if protocol != "mri" else "[0, 1]"))
  return paths


def write_sweep(directory: str, results: list[dict]) -> None:
  swept = [r for r in results if r["sweep"]]
  if not swept:
    return
  with open(os.path.join(directory, "steps.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["task", "method", "steps", "nfe", "mae", "psnr", "ssim"])
    for r in swept:
      for point in r["sweep"]:
        writer.writerow([r["task"], r["method"], point["steps"], point["nfe"], point["mae"],
                         point["psnr"], point["ssim"]])
  import matplotlib.pyplot as plt
  tasks = list(dict.fromkeys(r["task"] for r in swept))
  fig, axes = plt.subplots(1, len(tasks), squeeze=False, figsize=(5 * len(tasks), 3.6))
  for ax, task in zip(axes[0], tasks):
    for r in (r for r in swept if r["task"] == task):
      ax.plot([p["nfe"] for p in r["sweep"]], [p["psnr"] for p in r["sweep"]], "o-",
              label=r["method"])
    # the baseline on the sweep's own subjects (it may score fewer than the table)
    first = next(r for r in swept if r["task"] == task)
    base = first["sweep"][0].get("baseline_psnr", first["baseline"]["psnr"])
    ax.axhline(base, color="gray", ls="--", label="intensity map")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per sample (1 sample)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(TASK_NAMES.get(task, task))
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(directory, "steps.png"), dpi=90)
  plt.close(fig)


def compare_main(args) -> int:
  from medjax import parallel
  os.makedirs(args.workdir, exist_ok=True)
  mesh = parallel.make_mesh()
  results = [run_one(spec, args, mesh) for spec in args.configs]
  write_table(args.workdir, results)
  write_images(args.workdir, results, args)
  write_sweep(args.workdir, results)
  with open(os.path.join(args.workdir, "compare.md")) as f:
    print(f.read())
  return 0


if __name__ == "__main__":
  parser = argparse.ArgumentParser(prog="python -m medjax.compare")
  add_compare_args(parser)
  raise SystemExit(compare_main(parser.parse_args()))
