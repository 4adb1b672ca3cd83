"""Slice pairs per second: prepared shards through grain vs. opening NIfTI files per item.

  python benchmarks/data_pipeline.py [--subjects 6] [--depth 48] [--seconds 10] [--workers 0]

Writes a synthetic 256×256 dataset (phantom layout: t1w → t2w with a mask), prepares it
with `medjax.data.prepare.prepare`, then times, in the same run:
- shards: `pipeline.make_dataset` (shuffle → repeat → augment → batch; grain threads, or
  `--workers` processes) over `ShardSlices`;
- naive: for every item, load both NIfTI files, normalise, cut the slice, augment.
Pin the cores to measure "on 2 cores": `taskset -c 0,1 python benchmarks/data_pipeline.py`.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

SIZE = 256


def write_dataset(root: Path, subjects: int, depth: int):
  """Smooth, body-shaped volumes (compress like real scans, unlike white noise)."""
  rng = np.random.default_rng(0)
  x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (SIZE, SIZE, depth)), indexing="ij")
  body = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 1.2) ** 2 < 1
  for s in range(subjects):
    folder = root / f"phantom_{s:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    texture = ndimage.zoom(rng.standard_normal((16, 16, 6)), (SIZE / 16, SIZE / 16, depth / 6),
                           order=1)
    for modality, gain in (("t1w", 400.0), ("t2w", -250.0)):
      image = np.where(body, 600 + gain * texture + 20 * rng.standard_normal(body.shape), 0)
      nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)),
               folder / f"{modality}.nii.gz")
    nib.save(nib.Nifti1Image(body.astype(np.uint8), np.eye(4)), folder / "mask.nii.gz")


def naive_items(root: Path):
  """What a loader without shards does: every item reopens and normalises its volumes."""
  from medjax.data import intensity, volumes
  folders = sorted(root.glob("phantom_*"))
  depth = nib.load(folders[0] / "t1w.nii.gz").shape[2]
  rng = np.random.default_rng(0)
  while True:
    folder, z = folders[rng.integers(len(folders))], int(rng.integers(depth))
    mask = np.asarray(nib.load(folder / "mask.nii.gz").dataobj) > 0
    record = {"mask": mask[:, :, z, None].astype(np.float32)}
    for key, modality in (("source", "t1w"), ("target", "t2w")):
      image, _ = volumes.load(folder / f"{modality}.nii.gz")
      unit = intensity.normalise(image, intensity.fit(image, modality, mask))
      record[key] = unit[:, :, z, None]
    yield record, rng


def rate(batches, batch_size: int, seconds: float, warmup: int = 3) -> tuple[float, float]:
  """Pairs per wall-clock second, and per CPU second of this process (all its threads).

  The second figure does not depend on what else the machine runs: on a shared machine,
  pairs per CPU second × cores is what those cores would give.
  """
  for _ in range(warmup):
    next(batches)
  count, start, cpu = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    next(batches)
    count += batch_size
  return count / (time.perf_counter() - start), count / (time.process_time() - cpu)


def shard_batches(out: Path, batch_size: int, workers: int):
  from medjax.data import pipeline, shards
  dataset = pipeline.make_dataset(shards.ShardSlices(out, "train"), seed=0,
                                  batch_size=batch_size, augment=True, process_index=0,
                                  process_count=1, workers=workers)
  return iter(dataset)


def naive_batches(root: Path, batch_size: int):
  from medjax.data import augment
  items = naive_items(root)
  while True:
    pairs = [augment.augment_record(*next(items)) for _ in range(batch_size)]
    yield {k: np.stack([p[k] for p in pairs]) for k in ("source", "target", "mask")}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--subjects", type=int, default=6)
  parser.add_argument("--depth", type=int, default=48)
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--naive-seconds", type=float, default=5.0)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--workers", type=int, default=0,
                      help="grain worker processes; 0: threads in this process, the faster"
                      " choice on 2 cores (no 25 MB batches between processes)")
  args = parser.parse_args()
  from absl import flags
  if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
    flags.FLAGS.mark_as_parsed()
  from medjax.data import prepare

  with tempfile.TemporaryDirectory(prefix="medjax_bench_") as tmp:
    root, out = Path(tmp) / "dataset", Path(tmp) / "shards"
    write_dataset(root, args.subjects, args.depth)
    start = time.perf_counter()
    manifest = prepare.prepare("phantom", root, out, ["t1w"], "t2w", size=SIZE,
                               fractions=(1, 0, 0), workers=max(args.workers, 2),
                               progress=False)
    prepare_s = time.perf_counter() - start
    shard_mb = sum(p.stat().st_size for p in (out / "train").glob("*.array_record")) / 2**20
    slices = manifest["counts"]["slices"]["train"]
    print(f"prepared {slices} slices in {prepare_s:.1f}s ({shard_mb:.1f} MiB of shards)")

    pairs_per_s, per_cpu_s = rate(shard_batches(out, args.batch_size, args.workers),
                                  args.batch_size, args.seconds)
    print(f"shards + grain ({args.workers} workers, augment): {pairs_per_s:.0f} pairs/s"
          + ("" if args.workers else f", {per_cpu_s:.0f} pairs per CPU second"))
    naive, naive_per_cpu_s = rate(naive_batches(root, 4), 4, args.naive_seconds, warmup=1)
    print(f"naive NIfTI loader (augment): {naive:.1f} pairs/s, "
          f"{naive_per_cpu_s:.1f} pairs per CPU second")

  print(json.dumps({"pairs_per_s": round(pairs_per_s, 1), "naive_pairs_per_s": round(naive, 1),
                    "ratio": round(pairs_per_s / naive, 1), "cores": len(os.sched_getaffinity(0)),
                    "load_avg": round(os.getloadavg()[0], 2),
                    # Threads only: worker processes' CPU time is not this process's.
                    "pairs_per_cpu_s": None if args.workers else round(per_cpu_s, 1),
                    "naive_pairs_per_cpu_s": round(naive_per_cpu_s, 1),
                    "workers": args.workers, "batch_size": args.batch_size, "size": SIZE,
                    "slices": slices, "prepare_s": round(prepare_s, 1)}))


if __name__ == "__main__":
  main()
