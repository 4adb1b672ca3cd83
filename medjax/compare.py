"""Several methods trained at one budget and scored side by side (`medjax compare`).

Each experiment (`FILE.py[:ARG]`) trains through `train.train_and_evaluate` in
`ROOT/<run>/<budget>/`, so a run at another step budget or batch size is another
workdir, never a stale result; an unfinished run resumes. The budget is a number of
steps, or wall-clock seconds (`train_seconds`): each experiment's step rate is measured on
this machine first and its steps set to fill the seconds, so every family trains for the
same time whatever its cost per step (a two-stage run is charged its first stage's
training time too). It is then loaded as a `Run`
and scored on the held-out test subjects (`evaluate.evaluate`), and the stochastic
methods are swept over sampling steps. A finished run's `compare.json` is reused only
when it was made with the same budget, samples and sweep. Written under ROOT:

  compare.csv / compare.md   per task: MAE, PSNR, SSIM, network evaluations per sample,
                             parameters, training and sampling wall time (per slice and
                             per volume), beside the intensity-mapping baseline
  compare_<target>.png       the same held-out slices, source | target | each method
  steps.csv / steps.png      quality against sampling steps (1 sample) for the stochastic ones
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from medjax import any2any
from medjax import config as config_lib
from medjax import evaluate, figures, files, first_stage, metrics, modalities, parallel, train
from medjax import translators
from medjax.data import intensity, pipeline
from medjax.run import Run, create_state

METHODS = ("flow", "diffusion", "bridge", "i2sb", "pix2pix", "cyclegan")
DEFAULT_EXPERIMENTS = [f"experiments/phantom.py:method={method},target={target}"
                       for target in ("t2w", "ct") for method in METHODS]
SWEEP_STEPS = (1, 2, 4, 8, 16, 50)
TASK_NAMES = {"t2w": "T1w → T2w", "ct": "T1w → CT"}


@dataclasses.dataclass(frozen=True)
class Budget:
  """What every method of one comparison gets."""
  train_steps: int = 300
  # Wall-clock seconds of training per experiment instead of `train_steps` (None: steps)
  train_seconds: float | None = None
  batch_size: int | None = None  # None: each experiment's own
  samples: int | None = None  # draws the stochastic methods average; None: the experiment's
  sweep_steps: tuple[int, ...] = SWEEP_STEPS
  sweep_subjects: int = 1  # test subjects the sweep scores (0: all)
  image_slices: int = 3

  def workdir_name(self, config) -> str:
    if self.train_seconds:
      return f"seconds{self.train_seconds:g}_bs{config.train.batch_size}"
    return f"steps{self.train_steps}_bs{config.train.batch_size}"


def run_name(spec: str) -> str:
  """`experiments/phantom.py:method=flow,target=ct` → `phantom-flow-ct`."""
  path, _, arg = spec.partition(":")
  values = [item.partition("=")[2] or item for item in arg.split(",") if item]
  return files.safe_stem("-".join([os.path.splitext(os.path.basename(path))[0], *values]))


def train_steps(config, budget: Budget) -> int:
  """An experiment's steps at `budget`: `train_steps`, or for an any-to-any experiment
  over M modalities M × `train_steps` — the total of M dedicated runs, one per missing
  modality, so the comparison is at equal total training (docs/design.md, "Any-to-any
  synthesis")."""
  return budget.train_steps * max(1, len(any2any.modalities(config)))


def task_of(config) -> str:
  """The task a one-direction run is compared in: its target, or with several sources
  the direction (`t2w+pd+flair>t1w`, as an any-to-any run names its directions)."""
  sources = modalities.as_tuple(config.data.source)
  return any2any.direction_name(sources, config.data.target) if len(sources) > 1 \
      else config.data.target


def budget_config(spec: str, budget: Budget, steps: int | None = None):
  """`spec` at `budget`: its batch and samples, and `steps` training steps (by default
  the step budget's; a time budget's come from `timed_steps`)."""
  config = config_lib.load(spec)
  steps = steps or train_steps(config, budget)
  with config.unlocked():
    config.train.total_steps = steps
    config.eval.every = config.checkpoint.every = steps
    config.train.warmup_steps = min(config.train.warmup_steps, steps // 10)
    config.logging.progress = False
    if budget.batch_size:
      config.train.batch_size = budget.batch_size
    if budget.samples and config.translator.samples > 1:
      config.translator.samples = budget.samples
  return config


def step_rate(config, mesh=None, *, min_seconds: float = 10.0, max_steps: int = 200) -> float:
  """Training steps per second of `config` here: the jitted step on real batches,
  compiled and warmed up first, then timed (device work included) for at least
  `min_seconds` or `max_steps` steps. Data loading is left out: the grain pipeline runs
  ahead of the step in training."""
  mesh = mesh or parallel.mesh_for(config)
  first_stage.embed(config)
  translator = translators.build(config)
  abstract, init = create_state(translator, config, mesh, pipeline.recipe(config))
  step = train.make_train_step(translator, mesh, abstract)
  data = iter(pipeline.train_dataset(config))
  batches = [parallel.global_batch(next(data), mesh) for _ in range(2)]
  rng = jax.device_put(jax.random.PRNGKey(0), parallel.replicated(mesh))
  state = init()
  for i in range(2):  # compile, then one warm step
    state, metrics = step(state, batches[i], rng)
  jax.block_until_ready(metrics)
  count, start = 0, time.perf_counter()
  while count < max_steps and (count < 3 or time.perf_counter() - start < min_seconds):
    state, metrics = step(state, batches[count % 2], rng)
    jax.block_until_ready(metrics)
    count += 1
  return count / (time.perf_counter() - start)


def first_stage_seconds(config) -> float:
  """Training seconds of the first-stage run a two-stage config names (0 without one)."""
  key = first_stage.path_key(config)
  if key is None:
    return 0.0
  log = os.path.join(config.translator[key], "metrics.jsonl")
  return train_seconds(os.path.dirname(log)) if os.path.isfile(log) else 0.0


def timed_steps(spec: str, budget: Budget, workdir: str, mesh=None, log=print) -> dict:
  """A time budget made steps, once per workdir: the plan (seconds, rate, steps) is
  written to `budget.json` before training, so a resumed run keeps its steps (and its
  learning-rate schedule) whatever this machine's load is later."""
  path = os.path.join(workdir, "budget.json")
  if os.path.isfile(path):
    return files.read_json(path, dict)
  config = budget_config(spec, budget)
  # any-to-any over M modalities: M dedicated runs' time (`train_steps`); a two-stage run
  # pays for its first stage out of the same budget
  share = max(1, len(any2any.modalities(config)))
  charged = first_stage_seconds(config)
  seconds = budget.train_seconds * share - charged
  if seconds <= 0:
    raise ValueError(f"{spec}: its first stage alone trained {charged:.0f} s, more than the "
                     f"{budget.train_seconds:g} s budget")
  rate = step_rate(config, mesh)
  plan = {"seconds": seconds, "first_stage_s": charged, "steps_per_s": rate,
          "steps": max(1, int(seconds * rate))}
  log(f"[compare] {run_name(spec)}: {rate:.2f} steps/s here → {plan['steps']} steps "
      f"in {seconds:.0f} s")
  files.write_json(path, plan)
  return plan


# each method's own backbone: another one is named in its label
DEFAULT_BACKBONE = {"cyclegan": "resnet", "vae": "autoencoder", "vqvae": "autoencoder",
                    "autoregressive": "ar_transformer"}


def method_label(config) -> str:
  """`flow (euler)`, `flow (euler) · mamba`, `latent flow (euler)`, …: the method, its
  main option, and the backbone when it is not the method's usual one."""
  t = config.translator
  extra = {"bridge": lambda: t.bridge, "diffusion": lambda: f"{t.sampler}, {t.prediction}",
           "flow": lambda: t.sampler, "pix2pix": lambda: t.gan_loss,
           "cyclegan": lambda: "unpaired" if config.data.get("unpaired") else "paired",
           "autoregressive": lambda: f"T={t.temperature:g}"}
  label = f"{t.name} ({extra[t.name]()})" if t.name in extra else t.name
  if t.get("latent_vae"):
    label = f"latent {label}"
  backbone = config.model.name
  if backbone != DEFAULT_BACKBONE.get(t.name, "unet"):
    label += f" · {backbone}"
  return label


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


def run_one(spec: str, root: str, budget: Budget, mesh=None, log=print) -> dict:
  """Train (or resume) one experiment at `budget` and score it; cached per budget."""
  config = budget_config(spec, budget)
  workdir = os.path.join(root, run_name(spec), budget.workdir_name(config))
  plan = None
  if budget.train_seconds:
    plan = timed_steps(spec, budget, workdir, mesh, log)
    config = budget_config(spec, budget, plan["steps"])
  done = os.path.join(workdir, "compare.json")
  asked = dataclasses.asdict(budget) | {"batch_size": config.train.batch_size,
                                        "samples": config.translator.samples}
  asked["sweep_steps"] = list(asked["sweep_steps"])
  if os.path.exists(done):
    with open(done) as f:
      cached = json.load(f)
    if cached.get("budget") == asked:
      return {**cached, "method": method_label(config)}  # labels may have grown since

  log(f"[compare] {run_name(spec)}: training {config.train.total_steps} steps in {workdir}")
  train.train_and_evaluate(config, workdir, mesh=mesh)
  run = Run.load(workdir, mesh=mesh)
  volumes = run.eval_volumes("test")

  # Sampling time per slice, compiled and warm, timed on the second run of the scored path
  # (`predict_volume`, mirror TTA included): in 2D one evaluation batch of slices; in 3D
  # the whole first volume, whose sliding window over patches is the unit of work (its
  # windows are not axial slices a batch could be cut from).
  rng = evaluate.evaluation_rng(config)
  first = volumes[0]
  names = any2any.modalities(config)
  if names:  # any-to-any: time the first evaluated direction
    available, target = any2any.directions(names, config.eval.get("directions", "standard"))[0]
    first = evaluate.direction_volumes(run, volumes[:1], available, target)[0]
  chunk = first.source[:config.eval.batch_size] if evaluate.dims(config) == 2 else first.source
  for _ in range(2):
    start = time.perf_counter()
    evaluate.predict_volume(run, chunk, rng)
    sample_seconds = (time.perf_counter() - start) / len(chunk)

  summary, _, predictions = evaluate.evaluate(run, volumes)
  volume_seconds = sample_seconds * np.mean([len(v.source) for v in volumes])
  slices = figures.foreground_slices(volumes[0].mask, budget.image_slices)
  with files.atomic_write(os.path.join(workdir, "compare_slices.npz")) as tmp:
    np.savez_compressed(tmp, slices=slices, prediction=predictions[0].mean[slices, ..., 0],
                        std=predictions[0].std[slices, ..., 0])

  sweep = []
  # any-to-any: every direction per sampling step would multiply the sweep; not swept
  if run.translator.stochastic and budget.sweep_steps and "directions" not in summary:
    subset = volumes[:budget.sweep_subjects] if budget.sweep_subjects else volumes
    for steps in budget.sweep_steps:
      scores, _, _ = evaluate.evaluate(run, subset, steps=steps, samples=1)
      sweep.append({"steps": steps, "nfe": run.translator.nfe(steps),
                    **{k: scores["model"][k] for k in evaluate.METRIC_KEYS},
                    "baseline_psnr": scores["baseline"]["psnr"]})
      log(f"[compare] {run_name(spec)}: {steps} steps → PSNR {scores['model']['psnr']:.2f}")

  result = {
      "run": run_name(spec), "workdir": workdir, "config": spec, "budget": asked,
      "method": method_label(config), "task": task_of(config),
      "translator": run.translator.name, "stochastic": run.translator.stochastic,
      "protocol": summary["protocol"], "subjects": summary["subjects"],
      "train_steps": config.train.total_steps, "batch_size": config.train.batch_size,
      "steps": summary["steps"], "samples": summary["samples"],
      "nfe": summary["samples"] * summary["nfe_per_sample"],
      "nfe_per_sample": summary["nfe_per_sample"], "train_s": train_seconds(workdir),
      "sample_ms_per_slice": 1000 * sample_seconds, "sample_s_per_volume": volume_seconds,
      "params": int(sum(np.size(leaf) for leaf in jax.tree.leaves(run.params))),
      "first_stage_s": plan["first_stage_s"] if plan else first_stage_seconds(config),
      "model": summary["model"], "baseline": summary["baseline"], "sweep": sweep,
      **({"directions": summary["directions"]} if "directions" in summary else {})}
  files.write_json(done, result)
  return result


def by_direction(results: list[dict]) -> list[dict]:
  """An any-to-any result becomes one result per evaluated direction (its task the
  direction's name), so it sits in each task's table beside that direction's dedicated
  run; other results pass through."""
  out = []
  for r in results:
    if "directions" not in r:
      out.append(r)
      continue
    for name, block in r["directions"].items():
      out.append({**{k: v for k, v in r.items() if k != "directions"},
                  "task": name, "method": f"{r['method']}, any-to-any",
                  "model": block["model"], "baseline": block["baseline"], "any2any": True})
  return out


def table_rows(results: list[dict]) -> list[dict]:
  """One row per method and task, plus the intensity-mapping baseline of each task."""
  rows = []
  for task in dict.fromkeys(r["task"] for r in results):
    mine = [r for r in results if r["task"] == task]
    base = mine[0]["baseline"]
    rows.append({"task": task, "method": "intensity map (baseline)",
                 **{k: base.get(k, math.nan) for k in evaluate.METRIC_KEYS},
                 "nfe_per_sample": 0, "samples": 1, "train_steps": 0, "train_s": 0.0,
                 "sample_ms_per_slice": 0.0, "sample_s_per_volume": 0.0, "params": 0})
    for r in mine:
      # .get: a result cached before through_plane_mae existed shows nan there
      rows.append({"task": task, "method": r["method"],
                   **{k: r["model"].get(k, math.nan) for k in evaluate.METRIC_KEYS},
                   "nfe_per_sample": r["nfe_per_sample"], "samples": r["samples"],
                   "train_steps": r["train_steps"],
                   # a two-stage run's time includes its first stage's
                   "train_s": r["train_s"] + r.get("first_stage_s", 0.0),
                   "sample_ms_per_slice": r["sample_ms_per_slice"],
                   # .get: results cached before these columns existed
                   "sample_s_per_volume": r.get("sample_s_per_volume", math.nan),
                   "params": r.get("params", 0)})
  return rows


def write_table(directory: str, results: list[dict]) -> list[dict]:
  rows = table_rows(results)
  files.write_csv(os.path.join(directory, "compare.csv"), rows)
  lines = []
  for task in dict.fromkeys(r["task"] for r in rows):
    first = next(r for r in results if r["task"] == task)
    unit = "HU" if first["protocol"] != "mri" else "[0, 1]"
    lines += [f"### {TASK_NAMES.get(task, task)} — batch {first['batch_size']}, "
              f"{first['subjects']} held-out test subjects, {first['protocol']}", "",
              f"| method | MAE ({unit}) | PSNR (dB) | SSIM | through-plane MAE ({unit}) "
              f"| NFE / sample | samples | parameters | train steps | train (s) "
              f"| sampling (ms / slice) | sampling (s / volume) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in (r for r in rows if r["task"] == task):
      lines.append(f"| {r['method']} | {r['mae']:.4g} | {r['psnr']:.2f} | {r['ssim']:.4f} "
                   f"| {r['through_plane_mae']:.4g} "
                   f"| {r['nfe_per_sample']} | {r['samples']} | {_count(r['params'])} "
                   f"| {r['train_steps']} | {r['train_s']:.0f} "
                   f"| {r['sample_ms_per_slice']:.1f} | {r['sample_s_per_volume']:.2f} |")
    lines.append("")
  files.write_text(os.path.join(directory, "compare.md"), "\n".join(lines))
  return rows


def _count(n: int) -> str:
  """A parameter count the way papers print it: 1.2M, 310k, or – for the baseline."""
  if not n:
    return "–"
  return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def write_images(directory: str, results: list[dict]) -> list[str]:
  """Per task: the same held-out slices of the first test subject, every method side by side."""
  paths = []
  for task in dict.fromkeys(r["task"] for r in results if not r.get("any2any")):
    mine = [r for r in results if r["task"] == task and not r.get("any2any")]
    volume = Run.load(mine[0]["workdir"]).eval_volumes("test")[0]
    physical = lambda unit: intensity.to_output_units(unit, volume.target_params, task)
    saved = {r["method"]: np.load(os.path.join(r["workdir"], "compare_slices.npz"))
             for r in mine}
    slices = next(iter(saved.values()))["slices"]
    rows = []
    for i, z in enumerate(slices):
      row = {"source": volume.source[z, ..., 0], f"target ({task})":
             physical(volume.target[z, ..., 0])}
      row.update({method: physical(npz["prediction"][i]) for method, npz in saved.items()})
      rows.append(row)
    shown = figures.window(metrics.protocol_for(task))
    ranges = {name: shown["image"] for name in rows[0]} | {"source": (-1, 1)}
    paths.append(figures.save_grid(os.path.join(directory, f"compare_{task}.png"), rows,
                                   ranges, shown["units"]))
  return paths


def write_sweep(directory: str, results: list[dict]) -> None:
  swept = [r for r in results if r["sweep"]]
  if not swept:
    return
  with files.atomic_write(os.path.join(directory, "steps.csv")) as tmp, \
      open(tmp, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["task", "method", "steps", "nfe", "mae", "psnr", "ssim"])
    for r in swept:
      for point in r["sweep"]:
        writer.writerow([r["task"], r["method"], point["steps"], point["nfe"], point["mae"],
                         point["psnr"], point["ssim"]])
  panels = []
  for task in dict.fromkeys(r["task"] for r in swept):
    mine = [r for r in swept if r["task"] == task]
    # the baseline on the sweep's own subjects (it may score fewer than the table)
    first = mine[0]
    panels.append({
        "title": TASK_NAMES.get(task, task), "xlog": True, "ylabel": "PSNR (dB)",
        "xlabel": "network evaluations per sample (1 sample)",
        "lines": [(r["method"], [p["nfe"] for p in r["sweep"]], [p["psnr"] for p in r["sweep"]])
                  for r in mine],
        "hline": ("intensity map", first["sweep"][0].get("baseline_psnr",
                                                         first["baseline"]["psnr"]))})
  figures.save_curves(os.path.join(directory, "steps.png"), panels, width=5.0)


def compare(specs, root: str, budget: Budget, *, mesh=None, log=print) -> list[dict]:
  """Train and score every experiment, then write the table, pictures and sweep."""
  os.makedirs(root, exist_ok=True)
  results = by_direction([run_one(spec, root, budget, mesh=mesh, log=log) for spec in specs])
  write_table(root, results)
  write_images(root, results)
  write_sweep(root, results)
  return results
