"""Does training from shards match training on the in-memory phantom?

  python benchmarks/shards_parity.py [--steps 600] [--method regression] [--size small]
      [--subjects 20] [--out runs/parity]

In one run: writes phantom subjects as NIfTI (`medjax phantom`), prepares them into shards
(`medjax prepare --layout phantom`, `medjax.data.prepare.prepare`) on the same grid the
in-memory path renders, then trains the same experiment (`experiments/phantom.py`) three
times — in-memory phantom with seeds 0 and 1 (the run-to-run noise) and from shards with
seed 0 — and compares held-out metrics. The held-out subjects differ between the paths
(each path draws its own subject-level split), so the comparison is against the spread
between seeds, not a bitwise one. `--size tiny --steps 12 --subjects 5` checks that it
runs, in a minute. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from medjax import config as config_lib
from medjax import train
from medjax.data import phantom, prepare

EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "phantom.py"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--method", "--translator", dest="method", default="regression",
                      help=f"method of experiments/phantom.py: {', '.join(config_lib.METHODS)}")
  parser.add_argument("--size", default="small", help="experiments/phantom.py size")
  parser.add_argument("--subjects", type=int, default=20)
  parser.add_argument("--out", default="runs/parity")
  args = parser.parse_args()

  config = config_lib.load(f"{EXPERIMENT}:method={args.method},size={args.size}")
  config_lib.override(config, {
      "train.total_steps": args.steps, "eval.every": args.steps,
      "checkpoint.every": args.steps, "data.phantom.subjects": args.subjects,
      "train.warmup_steps": min(config.train.warmup_steps, args.steps // 2),
      "logging.progress": False})
  shape = tuple(config.data.phantom.shape)
  spacing = tuple(config.data.phantom.spacing)

  nifti, shard_dir = os.path.join(args.out, "nifti"), os.path.join(args.out, "shards")
  if not os.path.isdir(nifti):
    phantom.write_subjects(nifti, args.subjects, shape=shape, spacing=spacing,
                           seed=config.data.phantom.seed)
  prepare.prepare("phantom", nifti, shard_dir, list(config.data.source), config.data.target,
                  spacing=spacing, size=shape[:2], fractions=(0.8, 0.1, 0.1), seed=0,
                  progress=False)

  results = {}
  for name, kind, seed in (("phantom_seed0", "phantom", 0), ("phantom_seed1", "phantom", 1),
                           ("shards_seed0", "shards", 0)):
    run = config.copy_and_resolve_references()
    config_lib.override(run, {"seed": seed, "data.kind": kind,
                              "data.dir": shard_dir if kind == "shards" else ""})
    summary = train.train_and_evaluate(run, os.path.join(args.out, name))
    results[name] = {k: summary["model"][k] for k in ("mae", "psnr", "ssim")}
    results[name]["baseline_psnr"] = summary["baseline"]["psnr"]
    print(name, json.dumps(results[name]), flush=True)

  noise = abs(results["phantom_seed0"]["psnr"] - results["phantom_seed1"]["psnr"])
  gap = abs(results["shards_seed0"]["psnr"]
            - 0.5 * (results["phantom_seed0"]["psnr"] + results["phantom_seed1"]["psnr"]))
  print(json.dumps({"steps": args.steps, "method": args.method, "size": args.size,
                    "subjects": args.subjects, **{
                        f"{name}_psnr": r["psnr"] for name, r in results.items()},
                    "seed_noise_psnr": noise, "shards_gap_psnr": gap}))


if __name__ == "__main__":
  main()
