"""Running a sweep: one `medjax train` process per point, its results gathered.

Each point trains as `medjax train --config C --workdir ROOT/<point> --config.KEY=VALUE …`
in its own process, pinned to its own accelerators (`devices.slot_env`). A point is
finished when its workdir holds the checkpoint at its `train.total_steps` and the
evaluation summary of that step, so running the sweep again skips finished points and
resumes the others from their last checkpoint. At the end:

  ROOT/sweep.csv   every point's final held-out metrics (printed best first, by model PSNR)
  ROOT/sweep.png   the metrics against the swept values
  ROOT/logs/<point>.log   each point's output
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np

from medjax import figures, files
from medjax.sweep import devices, slurm
from medjax.sweep.grid import (SweepError, check_points, load_sweep, override_flags, point_names,
                               value_text)

METRICS = ("psnr", "ssim", "mae")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "mae": False}


def train_command(config_spec: str, workdir: str, point: dict) -> list[str]:
  return [sys.executable, "-m", "medjax.cli", "train", "--config", config_spec,
          "--workdir", workdir, *override_flags(point)]


def final_step(config, point: dict) -> int:
  return int(point.get("train.total_steps", config.train.total_steps))


def is_finished(workdir: str, steps: int) -> bool:
  """Its last checkpoint is committed and its last evaluation written.

  Orbax writes a step under a temporary name and renames it when complete, and the
  summary is written atomically, so neither exists half-written.
  """
  return (os.path.isdir(os.path.join(workdir, "checkpoints", str(steps)))
          and os.path.isfile(os.path.join(workdir, "eval", str(steps), "summary.json")))


def _die_with_parent():
  """In the child: be killed if the sweep dies, so a killed sweep leaves no trainer
  writing to a workdir that the next sweep would resume."""
  try:
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


# --- running ---------------------------------------------------------------------------

def run_points(jobs: list[dict], *, parallel: int, kind: str, ids: list[str],
               devices_per_run: int, log_dir: str) -> dict[str, int]:
  """Run `jobs` (name, command) on `parallel` slots; their exit status by name."""
  os.makedirs(log_dir, exist_ok=True)
  pending, running, status = list(jobs), {}, {}
  free = list(range(parallel))
  try:
    while pending or running:
      while pending and free:
        job, slot = pending.pop(0), free.pop(0)
        env = {**os.environ, **devices.slot_env(kind, ids, slot, devices_per_run,
                                                    slots=parallel)}
        # Each point is a one-process run, even when the sweep itself was started inside a
        # multi-task SLURM allocation (which would make `medjax train` wait for its peers).
        env.pop("SLURM_NTASKS", None)
        log = open(os.path.join(log_dir, f"{job['name']}.log"), "a")
        log.write(f"$ {shlex.join(job['command'])}\n")
        log.flush()
        process = subprocess.Popen(job["command"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        running[process] = (job, slot, log, time.time())
        print(f"[sweep] start {job['name']} (slot {slot}"
              f"{', devices ' + env.get('CUDA_VISIBLE_DEVICES', env.get('TPU_VISIBLE_CHIPS', '')) if kind != 'cpu' else ''})",
              flush=True)
      time.sleep(0.2)
      for process in [p for p in running if p.poll() is not None]:
        job, slot, log, start = running.pop(process)
        log.close()
        free.append(slot)
        status[job["name"]] = process.returncode
        outcome = "done" if process.returncode == 0 else (
            f"FAILED (exit {process.returncode}; see {os.path.join(log_dir, job['name'] + '.log')})")
        print(f"[sweep] {outcome}: {job['name']} in {time.time() - start:.0f} s", flush=True)
  finally:
    for process in running:  # interrupted: stop the trainers; their checkpoints stay
      process.terminate()
    for process in running:
      process.wait()
  return status


# --- results ---------------------------------------------------------------------------

def collect(root: str, names: list[str], points: list[dict], steps: list[int]) -> list[dict]:
  rows = []
  for name, point, step in zip(names, points, steps):
    path = os.path.join(root, name, "eval", str(step), "summary.json")
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      summary = json.load(f)
    row = {"point": name, **{k: value_text(v) for k, v in point.items()}, "step": summary["step"]}
    row.update({f"model_{m}": summary["model"][m] for m in METRICS if m in summary["model"]})
    row.update({f"baseline_{m}": summary["baseline"][m] for m in METRICS
                if m in summary["baseline"]})
    rows.append(row)
  rows.sort(key=lambda r: -r.get("model_psnr", -math.inf))
  return rows


def write_table(path: str, rows: list[dict]) -> None:
  files.write_csv(path, rows)


def format_table(rows: list[dict]) -> str:
  columns = list(rows[0])
  cells = [[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns]
           for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
  lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


def _number(text: str):
  try:
    return float(text)
  except ValueError:
    return None


def plot(path: str, rows: list[dict], keys: list[str]) -> None:
  """Each metric against the first swept key; one line per value of the other keys."""
  x_key, other = keys[0], keys[1:]
  values = [r[x_key] for r in rows]
  numeric = all(_number(v) is not None for v in values)
  order = sorted(set(values), key=lambda v: _number(v) if numeric else v)
  groups = {}
  for row in rows:
    groups.setdefault(tuple(row[k] for k in other), []).append(row)
  positive = numeric and min(_number(v) for v in order) > 0
  panels = []
  for metric in (m for m in METRICS if f"model_{m}" in rows[0]):
    lines = []
    for group, members in sorted(groups.items()):
      members = sorted(members, key=lambda r: order.index(r[x_key]))
      xs = [_number(r[x_key]) if numeric else order.index(r[x_key]) for r in members]
      label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(other, group)) or "model"
      lines.append((label, xs, [r[f"model_{metric}"] for r in members]))
    baseline = [r[f"baseline_{metric}"] for r in rows if f"baseline_{metric}" in r]
    panels.append({
        "title": f"final held-out (val) {metric.upper()}, {len(rows)} points",
        "xlabel": x_key, "lines": lines,
        "ylabel": f"{metric.upper()} ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better)",
        "hline": ("baseline", float(np.mean(baseline))) if baseline else None,
        "xlog": positive and max(_number(v) for v in order) / min(_number(v) for v in order) >= 10,
        "xticks": None if numeric else order})
  figures.save_curves(path, panels, width=4.2)


def run_sweep(config_spec: str, sweep_file: str, root: str, *, parallel: int | None = None,
              devices_per_run: int = 1, dry_run: bool = False, emit: str | None = None,
              log=print) -> dict:
  """Run (or resume, list, emit) the sweep. Returns {"finished": [...], "unfinished": [...]}."""
  from medjax import config as config_lib
  points = load_sweep(sweep_file)
  config = config_lib.load(config_spec)
  check_points(config, points)
  if devices_per_run < 1:
    raise SweepError("--devices-per-run must be at least 1")
  names = point_names(points)
  steps = [final_step(config, p) for p in points]
  workdirs = [os.path.join(root, n) for n in names]
  jobs = [{"name": n, "command": train_command(config_spec, w, p)}
          for n, w, p in zip(names, workdirs, points)]
  finished = [is_finished(w, s) for w, s in zip(workdirs, steps)]
  todo = [job for job, done in zip(jobs, finished) if not done]
  kind, ids = devices.accelerators()

  if emit == "slurm":
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    path = os.path.join(root, "sweep.slurm")
    files.write_text(path, slurm.script(config_spec, root, jobs, parallel=parallel,
                                        devices_per_run=devices_per_run, kind=kind))
    log(f"wrote {path}: {len(jobs)} array tasks ({len(todo)} unfinished); sbatch {path}")
    return {"finished": [n for n, f in zip(names, finished) if f],
            "unfinished": [j["name"] for j in todo]}
  if dry_run:
    for job, done in zip(jobs, finished):
      log(f"{'finished' if done else 'to run  '}  {job['name']}:  {shlex.join(job['command'])}")
    return {"finished": [n for n, f in zip(names, finished) if f],
            "unfinished": [j["name"] for j in todo]}

  if kind == "cpu":
    slots = parallel or 1
  else:
    available = len(ids) // devices_per_run
    if available < 1:
      raise SweepError(f"--devices-per-run {devices_per_run} but only {len(ids)} "
                       f"{kind.upper()}s are visible")
    if parallel and parallel > available:
      raise SweepError(f"--parallel {parallel} × --devices-per-run {devices_per_run} needs "
                       f"{parallel * devices_per_run} {kind.upper()}s; {len(ids)} are visible")
    slots = parallel or available
  log(f"[sweep] {len(points)} points, {len(points) - len(todo)} finished, {len(todo)} to run"
      f" ({slots} at a time on {kind}{'' if kind == 'cpu' else ' ' + ','.join(ids)})")
  run_points(todo, parallel=slots, kind=kind, ids=ids, devices_per_run=devices_per_run,
             log_dir=os.path.join(root, "logs"))

  rows = collect(root, names, points, steps)
  if rows:
    write_table(os.path.join(root, "sweep.csv"), rows)
    plot(os.path.join(root, "sweep.png"), rows, list(points[0]))
    log(format_table(rows))
    log(f"[sweep] wrote {os.path.join(root, 'sweep.csv')} and sweep.png")
  unfinished = [n for n, w, s in zip(names, workdirs, steps) if not is_finished(w, s)]
  return {"finished": [n for n in names if n not in unfinished], "unfinished": unfinished}
