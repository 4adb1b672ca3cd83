"""Seconds to translate one 256×256×200 NIfTI volume with the default flow model.

  python benchmarks/translate_volume.py [--steps 1,4,16] [--samples 1] [--repeats 2]

The default experiment (`experiments/phantom.py`: flow, small) with freshly initialised
parameters (`Run.fresh`: timing does not depend on training) translates a 1 mm head-sized
volume through the whole `medjax translate` path (`infer.translate_file`): load, reorient,
resample to the model's grid (160/48 mm in-plane, 3 mm axial), normalise, crop, batches of
slices through the jitted sampler on the mesh, inversion back to the input's grid, NIfTI
write. Compilation is done once per step count before timing and reported apart. One draw
per slice by default, as these figures always were; `medjax translate` draws the run's
`translator.samples` (4 for flow), which `--samples 0` times.

Baseline measured in the same run: the network alone — one jitted 1-step translate of a
batch of slices already on the model's grid — gives the cost per slice per network
evaluation; `network_s` is what the volume's slices and draws cost at that rate,
`overhead_s` the rest (I/O, resampling, inversion). Pin the cores to measure "on 2 cores":
`taskset -c 0,1 python benchmarks/translate_volume.py`. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
from scipy import ndimage

SHAPE = (256, 256, 200)
CONFIG = Path(__file__).resolve().parent.parent / "experiments" / "phantom.py"


def write_volume(path: Path) -> Path:
  """A head-sized (150 × 180 × 170 mm) body with smooth texture, at 1 mm, RAS."""
  rng = np.random.default_rng(0)
  x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) - n / 2 for n in SHAPE),
                        indexing="ij")
  body = (x / 75) ** 2 + (y / 90) ** 2 + (z / 85) ** 2 < 1
  texture = ndimage.zoom(rng.standard_normal((16, 16, 12)).astype(np.float32),
                         np.array(SHAPE) / (16, 16, 12), order=1)
  image = np.where(body, 600 + 200 * texture, 0).astype(np.float32)
  affine = np.diag([1.0, 1.0, 1.0, 1.0])
  affine[:3, 3] = -np.array(SHAPE) / 2
  nib.save(nib.Nifti1Image(image, affine), path)
  return path


def time_network(run, batch_size: int, repeats: int) -> float:
  """Seconds per slice of one network evaluation (1 Euler step, 1 sample)."""
  from medjax import parallel
  height, width = run.recipe.size
  source = np.random.default_rng(1).uniform(-1, 1, (batch_size, height, width,
                                                    run.recipe.source_channels))
  batch = parallel.put_global(source.astype(np.float32), parallel.batch_sharding(run.mesh))
  fn = run.translate_fn(1, 1)
  key = jax.random.PRNGKey(0)
  jax.block_until_ready(fn(run.params, batch, key))  # compile
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(run.params, batch, key))
    best = min(best, time.perf_counter() - start)
  return best / batch_size


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", default="1,4,16")
  parser.add_argument("--samples", type=int, default=1,
                      help="draws per slice (0: the run's translator.samples, as `medjax "
                      "translate` draws)")
  parser.add_argument("--repeats", type=int, default=2, help="timed runs per step count (best)")
  parser.add_argument("--batch-size", type=int, default=None,
                      help="slices per batch (default: the config's eval.batch_size)")
  args = parser.parse_args()
  from medjax import config as config_lib
  from medjax import infer
  from medjax.run import Run

  config = config_lib.load(str(CONFIG))
  batch_size = args.batch_size or config.eval.batch_size
  samples = args.samples or config.translator.samples
  run = Run.fresh(config)
  network_s_per_slice = time_network(run, batch_size, max(args.repeats, 3))
  print(f"network alone: {1e3 * network_s_per_slice:.1f} ms per slice per evaluation "
        f"(batch {batch_size}, {'x'.join(map(str, run.recipe.size))} slices)")

  results = {}
  with tempfile.TemporaryDirectory(prefix="medjax_bench_") as tmp:
    source = write_volume(Path(tmp) / "t1w.nii.gz")
    output = Path(tmp) / "t2w.nii.gz"
    for steps in (int(s) for s in args.steps.split(",")):
      start = time.perf_counter()
      options = {"steps": steps, "samples": samples, "batch_size": batch_size, "progress": False}
      first = infer.translate_file(run, [source], output, **options)
      compile_s = time.perf_counter() - start
      seconds = min(infer.translate_file(run, [source], output, **options)["seconds"]
                    for _ in range(args.repeats))
      slices = first["slices"]
      network_s = network_s_per_slice * slices * samples * run.translator.nfe(steps)
      results[steps] = {"seconds": seconds, "slices": slices, "network_s": network_s,
                        "first_call_s": compile_s}
      print(f"{steps:2d} steps: {seconds:6.2f} s per volume ({slices} slices on the model's"
            f" grid, {slices / seconds:.1f} slices/s); network alone {network_s:.2f} s,"
            f" overhead {seconds - network_s:.2f} s; first call {compile_s:.1f} s")
    assert nib.load(output).shape == SHAPE

  one = results[min(results)]
  print(json.dumps({
      "seconds": {str(k): round(v["seconds"], 2) for k, v in results.items()},
      "slices_per_s": {str(k): round(v["slices"] / v["seconds"], 1) for k, v in results.items()},
      "network_s": {str(k): round(v["network_s"], 2) for k, v in results.items()},
      "network_ms_per_slice_nfe": round(1e3 * network_s_per_slice, 2),
      "overhead_s": round(one["seconds"] - one["network_s"], 2),
      "under_60s_at_1_step": bool(results.get(1, one)["seconds"] < 60),
      "input_shape": list(SHAPE), "model_slices": one["slices"],
      "slice_size": list(run.recipe.size), "batch_size": batch_size, "samples": samples,
      "cores": len(os.sched_getaffinity(0)), "load_avg": round(os.getloadavg()[0], 2),
      "device": jax.devices()[0].platform}))


if __name__ == "__main__":
  main()
