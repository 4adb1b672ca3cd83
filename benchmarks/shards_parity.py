"""Does training from shards match training on the in-memory phantom?

  python benchmarks/shards_parity.py [--steps 600] [--translator regression] [--out runs/parity]

In one run: writes phantom subjects as NIfTI (`medjax phantom`), prepares them into shards
(`medjax prepare --layout phantom`) on the same grid the in-memory path renders, then
trains the same config three times — in-memory phantom with seeds 0 and 1 (the
run-to-run noise) and from shards with seed 0 — and compares held-out metrics. The held-
out subjects differ between the paths (each path draws its own subject-level split), so
the comparison is against the spread between seeds, not a bitwise one.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy

from medjax import train
from medjax.data import phantom, shards


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--translator", default="regression")
  parser.add_argument("--subjects", type=int, default=20)
  parser.add_argument("--out", default="runs/parity")
  args = parser.parse_args()

  config = runpy.run_path("experiments/phantom_regression.py")["get_config"]()
  config.translator.name = args.translator
  config.train.steps = args.steps
  config.eval.every = args.steps
  config.checkpoint.every = args.steps
  config.data.phantom.subjects = args.subjects
  config.logging.progress = False
  shape = tuple(config.data.phantom.shape)
  spacing = phantom.fov_spacing(shape)

  files, shard_dir = os.path.join(args.out, "nifti"), os.path.join(args.out, "shards")
  if not os.path.isdir(files):
    phantom.write_subjects(files, args.subjects, shape=shape, spacing=spacing,
                           seed=config.data.phantom.seed)
  shards.prepare("phantom", files, shard_dir, list(config.data.source), config.data.target,
                 spacing=spacing, size=shape[:2], split=(0.8, 0.1, 0.1), seed=0)

  results = {}
  for name, kind, seed in (("phantom_seed0", "phantom", 0), ("phantom_seed1", "phantom", 1),
                           ("shards_seed0", "shards", 0)):
    run = config.copy_and_resolve_references()
    run.seed = seed
    run.data.kind = kind
    run.data.dir = shard_dir if kind == "shards" else ""
    summary = train.train_and_evaluate(run, os.path.join(args.out, name))
    results[name] = {k: summary["model"][k] for k in ("mae", "psnr", "ssim")}
    results[name]["baseline_psnr"] = summary["baseline"]["psnr"]
    print(name, json.dumps(results[name]), flush=True)

  noise = abs(results["phantom_seed0"]["psnr"] - results["phantom_seed1"]["psnr"])
  gap = abs(results["shards_seed0"]["psnr"]
            - 0.5 * (results["phantom_seed0"]["psnr"] + results["phantom_seed1"]["psnr"]))
  print(json.dumps({"steps": args.steps, "translator": args.translator, **{
      f"{name}_psnr": r["psnr"] for name, r in results.items()},
      "seed_noise_psnr": noise, "shards_gap_psnr": gap}))


if __name__ == "__main__":
  main()
