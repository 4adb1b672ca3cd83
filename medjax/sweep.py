"""`medjax sweep`: one experiment config, a grid of overrides, one process per point.

  medjax sweep --config experiments/phantom_flow.py --sweep experiments/sweeps/phantom_lr.py \
      --workdir runs/phantom_lr --parallel 2

A sweep is data (as in big_vision): `experiments/sweeps/NAME.py` defines `get_sweep()`, a
list of override dicts built with `sweep`, `product` and `zipped`:

  def get_sweep():
    return product(sweep("train.learning_rate", [3e-4, 1e-3]), sweep("seed", [0, 1]))

Each point trains as `medjax train --config C --workdir ROOT/<point> --config.KEY=VALUE …`
in its own process, pinned to its own accelerators (CUDA_VISIBLE_DEVICES, or TPU_VISIBLE_CHIPS
on a TPU host; on a CPU the points share the cores and `--devices-per-run D` gives each D
virtual devices). A point is finished when its workdir holds the checkpoint at its
`train.steps` and the evaluation summary of that step, so running the sweep again skips
finished points and resumes the others from their last checkpoint. At the end:

  ROOT/sweep.csv   every point's final held-out metrics (printed best first, by model PSNR)
  ROOT/sweep.png   the metrics against the swept values
  ROOT/logs/<point>.log   each point's output

`--emit slurm` writes ROOT/sweep.slurm, a SLURM job array with one task per unfinished
point, instead of running anything.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import time

# Short names for the keys sweeps vary most, so point names stay readable.
ABBREVIATIONS = {"learning_rate": "lr", "batch_size": "bs", "weight_decay": "wd",
                 "warmup_steps": "warmup", "ema_decay": "ema", "channels": "ch",
                 "num_res_blocks": "blocks", "channel_mult": "mult"}
METRICS = ("psnr", "ssim", "mae")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "mae": False}


class SweepError(ValueError):
  """A sweep file or sweep request that cannot run; the message says why."""


# --- building sweeps -------------------------------------------------------------------

def sweep(key: str, values) -> list[dict]:
  """One axis: [{key: v} for v in values]."""
  return [{key: value} for value in values]


def product(*axes: list[dict]) -> list[dict]:
  """Every combination of the axes' points (the first axis varies slowest)."""
  return [_merge(points) for points in itertools.product(*axes)]


def zipped(*axes: list[dict]) -> list[dict]:
  """The axes' points taken together, i-th with i-th; they must be equally long."""
  lengths = {len(axis) for axis in axes}
  if len(lengths) > 1:
    raise SweepError(f"zipped axes differ in length: {sorted(lengths)}")
  return [_merge(points) for points in zip(*axes)]


def _merge(points) -> dict:
  merged = {}
  for point in points:
    clash = merged.keys() & point.keys()
    if clash:
      raise SweepError(f"key {sorted(clash)[0]!r} is set by two axes of one point")
    merged.update(point)
  return merged


# --- points: names, commands, state ----------------------------------------------------

def load_sweep(path: str) -> list[dict]:
  if not os.path.isfile(path):
    raise SweepError(f"sweep file {path} does not exist")
  module = runpy.run_path(path)
  if "get_sweep" not in module:
    raise SweepError(f"{path} defines no get_sweep()")
  points = list(module["get_sweep"]())
  if not points or not all(isinstance(p, dict) and p for p in points):
    raise SweepError(f"{path}: get_sweep() must return a non-empty list of non-empty dicts")
  keys = list(points[0])
  for point in points:
    if set(point) != set(keys):
      # A missing key would silently mean "the config's value" in some points only.
      raise SweepError(f"{path}: points set different keys ({sorted(keys)} vs {sorted(point)})")
  if len({json.dumps(p, sort_keys=True, default=list) for p in points}) != len(points):
    raise SweepError(f"{path}: get_sweep() lists a point twice")
  return points


def load_config(spec: str):
  """`FILE.py[:VARIANT]` → ConfigDict, as `medjax train --config` reads it."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise SweepError(f"config file {path} does not exist")
  get_config = runpy.run_path(path)["get_config"]
  return get_config(variant) if variant else get_config()


def check_keys(config, points: list[dict]) -> None:
  for key in points[0]:
    node = config
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node:
        raise SweepError(f"unknown config key {key!r} in the sweep")
      node = node[part]


def _text(value) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (list, tuple)):
    return "x".join(_text(v) for v in value)
  return str(value)


def _labels(keys) -> dict[str, str]:
  """Each key's last part (abbreviated where common), or the whole dotted key where two
  keys would read the same."""
  short = {k: ABBREVIATIONS.get(k.rsplit(".", 1)[-1], k.rsplit(".", 1)[-1]) for k in keys}
  taken = list(short.values())
  return {k: label if taken.count(label) == 1 else k.replace(".", "-")
          for k, label in short.items()}


def point_name(point: dict) -> str:
  """`{"train.learning_rate": 0.001, "seed": 1}` → `lr0.001_seed1`: a readable slug."""
  labels = _labels(point)
  name = "_".join(f"{labels[k]}{_text(v)}" for k, v in point.items())
  return re.sub(r"[^A-Za-z0-9._+=-]+", "-", name).strip("-") or "point"


def point_names(points: list[dict]) -> list[str]:
  names = [point_name(p) for p in points]
  if len(set(names)) < len(names):  # sanitising merged two values: number them
    names = [f"{i:03d}_{name}" for i, name in enumerate(names)]
  return names


def override_flags(point: dict) -> list[str]:
  """`--config.KEY=VALUE` in the syntax absl config_flags parses for the key's type."""
  def text(value):
    if isinstance(value, (list, tuple)):
      return str(tuple(value))
    return repr(value) if isinstance(value, float) else str(value)  # repr: every digit
  return [f"--config.{key}={text(value)}" for key, value in point.items()]


def train_command(config_spec: str, workdir: str, point: dict) -> list[str]:
  return [sys.executable, "-m", "medjax.cli", "train", "--config", config_spec,
          "--workdir", workdir, *override_flags(point)]


def final_step(config, point: dict) -> int:
  return int(point.get("train.steps", config.train.steps))


def is_finished(workdir: str, steps: int) -> bool:
  """Its last checkpoint is committed and its last evaluation written.

  Orbax writes a step under a temporary name and renames it when complete, and the
  summary is written atomically, so neither exists half-written.
  """
  return (os.path.isdir(os.path.join(workdir, "checkpoints", str(steps)))
          and os.path.isfile(os.path.join(workdir, "eval", str(steps), "summary.json")))


# --- where each process runs ----------------------------------------------------------

def accelerators() -> tuple[str, list[str]]:
  """('gpu' | 'tpu' | 'cpu', the ids a slot can be pinned to), without importing jax
  (which would claim every accelerator in this parent process)."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None and visible.strip() not in ("", "-1"):
    return "gpu", [d.strip() for d in visible.split(",") if d.strip()]
  if visible is None and shutil.which("nvidia-smi"):
    try:
      out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30).stdout
      ids = [line.strip() for line in out.splitlines() if line.strip().isdigit()]
      if ids:
        return "gpu", ids
    except (OSError, subprocess.SubprocessError):
      pass
  chips = sorted(p for p in os.listdir("/dev") if re.fullmatch(r"accel\d+", p)) \
      if os.path.isdir("/dev") else []
  if chips:
    return "tpu", [c[len("accel"):] for c in chips]
  return "cpu", []


_TPU_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}


def slot_env(kind: str, ids: list[str], slot: int, devices_per_run: int) -> dict[str, str]:
  """Environment that gives slot `slot` its own `devices_per_run` accelerators."""
  env = {}
  if kind == "cpu":
    if devices_per_run > 1:
      flags = os.environ.get("XLA_FLAGS", "")
      flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
      env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_run}".strip()
    return env
  mine = ids[slot * devices_per_run:(slot + 1) * devices_per_run]
  if kind == "gpu":
    env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
  else:
    # Several independent jax processes on one TPU host: each sees only its chips, as a
    # one-process slice of its own, with its own port (jax-ml/jax#8809).
    env.update({"TPU_VISIBLE_CHIPS": ",".join(mine), "TPU_PROCESS_BOUNDS": "1,1,1",
                "TPU_CHIPS_PER_PROCESS_BOUNDS": _TPU_BOUNDS.get(devices_per_run, "1,1,1"),
                "TPU_PROCESS_PORT": str(8476 + slot),
                "TPU_MESH_CONTROLLER_PORT": str(8476 + slot),
                "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{8476 + slot}"})
  return env


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
        env = {**os.environ, **slot_env(kind, ids, slot, devices_per_run)}
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
    row = {"point": name, **{k: _text(v) for k, v in point.items()}, "step": summary["step"]}
    row.update({f"model_{m}": summary["model"][m] for m in METRICS if m in summary["model"]})
    row.update({f"baseline_{m}": summary["baseline"][m] for m in METRICS
                if m in summary["baseline"]})
    rows.append(row)
  rows.sort(key=lambda r: -r.get("model_psnr", -math.inf))
  return rows


def write_table(path: str, rows: list[dict]) -> None:
  with open(path + ".tmp", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  os.replace(path + ".tmp", path)


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
  from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

  x_key, other = keys[0], keys[1:]
  values = [r[x_key] for r in rows]
  numeric = all(_number(v) is not None for v in values)
  order = sorted(set(values), key=lambda v: _number(v) if numeric else v)
  metrics = [m for m in METRICS if f"model_{m}" in rows[0]]
  figure = Figure(figsize=(4.2 * len(metrics), 3.4))
  axes = figure.subplots(1, len(metrics), squeeze=False)
  groups = {}
  for row in rows:
    groups.setdefault(tuple(row[k] for k in other), []).append(row)
  for ax, metric in zip(axes[0], metrics):
    for group, members in sorted(groups.items()):
      members = sorted(members, key=lambda r: order.index(r[x_key]))
      xs = [_number(r[x_key]) if numeric else order.index(r[x_key]) for r in members]
      label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(other, group)) or "model"
      ax.plot(xs, [r[f"model_{metric}"] for r in members], "o-", label=label)
    baseline = [r[f"baseline_{metric}"] for r in rows if f"baseline_{metric}" in r]
    if baseline:
      ax.axhline(float(sum(baseline) / len(baseline)), color="grey", ls="--", lw=1,
                 label="baseline")
    if numeric and min(_number(v) for v in order) > 0 and \
        max(_number(v) for v in order) / min(_number(v) for v in order) >= 10:
      ax.set_xscale("log")
    if not numeric:
      ax.set_xticks(range(len(order)), order)
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"{metric.upper()} ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better)")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  figure.suptitle(f"final held-out (val) metrics of {len(rows)} points")
  figure.tight_layout()
  figure.savefig(path, dpi=100)


# --- SLURM -----------------------------------------------------------------------------

def slurm_script(config_spec: str, root: str, jobs: list[dict], *, parallel: int | None,
                 devices_per_run: int, kind: str) -> str:
  """A job array, one task per point; each task is a plain one-process `medjax train`."""
  root = os.path.abspath(root)
  limit = f"%{parallel}" if parallel else ""
  lines = [
      "#!/bin/bash",
      f"# medjax sweep: {len(jobs)} points of {config_spec}. Submit: sbatch {root}/sweep.slurm",
      "# Re-submitting is safe: finished points exit at once, others resume from their checkpoint.",
      "#SBATCH --job-name=medjax-sweep",
      f"#SBATCH --array=0-{len(jobs) - 1}{limit}",
      "#SBATCH --ntasks=1",
      f"#SBATCH --cpus-per-task={max(4, 4 * devices_per_run)}",
      f"#SBATCH --output={root}/logs/%x-%A_%a.log",
  ]
  if kind != "cpu":
    lines.append(f"#SBATCH --gres=gpu:{devices_per_run}")
  lines += ["", "set -euo pipefail", f"cd {shlex.quote(os.getcwd())}", "POINTS=("]
  lines += [f"  {shlex.quote(shlex.join(job['command'][1:]))}" for job in jobs]
  lines += [")", f"PYTHON=${{PYTHON:-{shlex.quote(sys.executable)}}}",
            'eval "$PYTHON ${POINTS[$SLURM_ARRAY_TASK_ID]}"', ""]
  return "\n".join(lines)


# --- the command -----------------------------------------------------------------------

def add_sweep_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  parser.add_argument("--config", required=True, help="experiment file (FILE.py[:VARIANT])")
  parser.add_argument("--sweep", required=True, help="sweep file with get_sweep()")
  parser.add_argument("--workdir", required=True, help="root: one sub-workdir per point")
  parser.add_argument("--parallel", type=int, default=None,
                      help="points run at once (default: accelerators / devices-per-run, 1 on CPU)")
  parser.add_argument("--devices_per_run", "--devices-per-run", type=int, default=1,
                      help="accelerators per point (on CPU: virtual devices)")
  parser.add_argument("--dry_run", "--dry-run", action="store_true",
                      help="print each point's command and state; run nothing")
  parser.add_argument("--emit", choices=("slurm",), default=None,
                      help="write ROOT/sweep.slurm (a job array) instead of running")
  return parser


def sweep_main(args: argparse.Namespace) -> int:
  """Run (or resume, print, emit) the sweep; 0 when every point finished."""
  points = load_sweep(args.sweep)
  config = load_config(args.config)
  check_keys(config, points)
  if args.devices_per_run < 1:
    raise SweepError("--devices-per-run must be at least 1")
  names = point_names(points)
  steps = [final_step(config, p) for p in points]
  workdirs = [os.path.join(args.workdir, n) for n in names]
  jobs = [{"name": n, "command": train_command(args.config, w, p)}
          for n, w, p in zip(names, workdirs, points)]
  finished = [is_finished(w, s) for w, s in zip(workdirs, steps)]
  todo = [job for job, done in zip(jobs, finished) if not done]
  kind, ids = accelerators()

  if args.emit == "slurm":
    os.makedirs(os.path.join(args.workdir, "logs"), exist_ok=True)
    path = os.path.join(args.workdir, "sweep.slurm")
    with open(path, "w") as f:
      f.write(slurm_script(args.config, args.workdir, jobs, parallel=args.parallel,
                           devices_per_run=args.devices_per_run, kind=kind))
    print(f"wrote {path}: {len(jobs)} array tasks ({len(todo)} unfinished); sbatch {path}")
    return 0
  if args.dry_run:
    for job, done in zip(jobs, finished):
      print(f"{'finished' if done else 'to run  '}  {job['name']}:  {shlex.join(job['command'])}")
    return 0

  if kind == "cpu":
    parallel = args.parallel or 1
  else:
    slots = len(ids) // args.devices_per_run
    if slots < 1:
      raise SweepError(f"--devices-per-run {args.devices_per_run} but only {len(ids)} "
                       f"{kind.upper()}s are visible")
    if args.parallel and args.parallel > slots:
      raise SweepError(f"--parallel {args.parallel} × --devices-per-run {args.devices_per_run} "
                       f"needs {args.parallel * args.devices_per_run} {kind.upper()}s; "
                       f"{len(ids)} are visible")
    parallel = args.parallel or slots
  print(f"[sweep] {len(points)} points, {len(points) - len(todo)} finished, {len(todo)} to run"
        f" ({parallel} at a time on {kind}"
        f"{'' if kind == 'cpu' else ' ' + ','.join(ids)})", flush=True)
  status = run_points(todo, parallel=parallel, kind=kind, ids=ids,
                      devices_per_run=args.devices_per_run,
                      log_dir=os.path.join(args.workdir, "logs"))

  rows = collect(args.workdir, names, points, steps)
  if rows:
    write_table(os.path.join(args.workdir, "sweep.csv"), rows)
    plot(os.path.join(args.workdir, "sweep.png"), rows, list(points[0]))
    print(format_table(rows))
    print(f"[sweep] wrote {os.path.join(args.workdir, 'sweep.csv')} and sweep.png")
  failed = sorted(n for n, code in status.items() if code != 0)
  missing = [n for n, w, s in zip(names, workdirs, steps) if not is_finished(w, s)]
  if failed or missing:
    print(f"[sweep] unfinished: {', '.join(missing or failed)}; logs in "
          f"{os.path.join(args.workdir, 'logs')}", file=sys.stderr)
    return 1
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = add_sweep_args(argparse.ArgumentParser(prog="medjax sweep"))
  try:
    return sweep_main(parser.parse_args(argv))
  except SweepError as e:
    print(f"medjax: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
