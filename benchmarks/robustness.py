"""How medjax holds under hostile input and faults: inputs tried, faults injected, what broke.

  python benchmarks/robustness.py [--examples 200] [--seed 0]

1. Readers: `--examples` seeded hostile inputs for each reader (tests/fuzz_inputs.py: the
   generators tests/test_fuzz.py drives with hypothesis), in a child process so that a
   native reader that aborted would be counted, not fatal. Each input must be read sanely
   or refused in one line naming the file.
2. Stages: each fault injected into a real command run as a user types it — SIGKILL while
   writing (tests/kill_at.py), a damaged checkpoint, a disk that fills up (RLIMIT_FSIZE), a
   second writer, a stale lock — then the same command again without the fault. A
   traceback anywhere, a hang, or an output that differs from an uninterrupted run's
   (byte for byte; training: parameters bit for bit) is counted.

The baseline is the uninterrupted run of each stage, made in the same run. Last line: one
JSON object, {"inputs_tried", "faults_injected", "tracebacks", "hangs", "corrupted_or_lost",
"readers": {…}, "stages": {…}}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))


def readers(examples: int, seed: int) -> dict:
  script = ("import json, sys; sys.path.insert(0, sys.argv[1]); import fuzz_inputs; "
            "print(json.dumps(fuzz_inputs.tally(examples=int(sys.argv[2]), seed=int(sys.argv[3]))))")
  process = subprocess.run([sys.executable, "-c", script, str(TESTS), str(examples), str(seed)],
                           cwd=ROOT, capture_output=True, text=True)
  if process.returncode:  # the process itself died: every reader counts as broken
    return {"process": {"tried": 1, "traceback": 1, "hang": 0, "insane": 0, "bad_message": 0,
                        "first_problem": process.stderr[-2000:]}}
  return json.loads(process.stdout.strip().splitlines()[-1])


class Stages:
  """Each stage: an uninterrupted baseline, the fault, a rerun, the comparison."""

  def __init__(self, scratch: Path):
    self.scratch = scratch
    self.results = {}
    from medjax import cli
    self.cli = cli

  def medjax(self, *argv) -> tuple[int, str]:
    process = subprocess.run([sys.executable, "-m", "medjax.cli", *map(str, argv)], cwd=ROOT,
                             capture_output=True, text=True, timeout=900)
    return process.returncode, process.stderr

  def record(self, stage: str, faults: int, outputs_equal: bool, stderr: str,
             refused_cleanly: bool = True) -> None:
    entry = self.results.setdefault(stage, {"faults": 0, "tracebacks": 0,
                                            "corrupted_or_lost": 0, "unclear": 0})
    entry["faults"] += faults
    entry["tracebacks"] += stderr.count("Traceback (most recent call last)")
    entry["corrupted_or_lost"] += 0 if outputs_equal else 1
    entry["unclear"] += 0 if refused_cleanly else 1
    print(f"  {stage}: fault injected, outputs {'equal' if outputs_equal else 'DIFFER'}"
          f"{'' if refused_cleanly else ', message UNCLEAR'}", flush=True)

  # --- set-up shared by the stages -----------------------------------------------------
  def data(self) -> Path:
    data = self.scratch / "phantom"
    if not data.exists():
      assert self.medjax("phantom", "--output-dir", data, "--subjects", 5,
                         "--shape", "32x32x12")[0] == 0
    return data

  def experiment(self) -> Path:
    path = self.scratch / "experiment.py"
    path.write_text(
        "from medjax import config as c\n"
        f"def get_config():\n  cfg = c.load({str(ROOT / 'experiments' / 'phantom.py')!r}"
        " + ':method=regression,size=tiny')\n  cfg.unlock()\n  cfg.checkpoint.every = 2\n"
        "  return cfg\n")
    return path

  def trained(self) -> Path:
    run = self.scratch / "run"
    if not run.exists():
      assert self.medjax("train", "--config", self.experiment(), "--workdir", run)[0] == 0
    return run

  # --- the stages -----------------------------------------------------------------------
  def prepare_args(self, out):
    return ["prepare", "--layout", "phantom", "--input-dir", self.data(), "--source", "t1w",
            "--target", "t2w", "--spacing", "5x5x8", "--size", "32x32", "--output-dir", out]

  def killed(self, pattern: str, count: int, argv) -> str:
    process = subprocess.run([sys.executable, str(TESTS / "kill_at.py"), pattern, str(count),
                              "medjax", *map(str, argv)], cwd=ROOT, capture_output=True,
                             text=True, timeout=900)
    assert process.returncode == -9, process.stderr[-1000:]
    return process.stderr

  def kills(self) -> None:
    from test_kills import contents
    straight = self.scratch / "prepared"
    self.medjax(*self.prepare_args(straight))
    for name, pattern, count in (("prepare: SIGKILL writing a shard", "*.array_record", 2),
                                 ("prepare: SIGKILL writing the manifest", "manifest.json", 2)):
      out = self.scratch / f"prepared-{count}-{pattern[-8:]}"
      stderr = self.killed(pattern, count, self.prepare_args(out))
      code, again = self.medjax(*self.prepare_args(out))
      same = code == 0 and _without(contents(out), "manifest.json", "medjax.lock") == _without(
          contents(straight), "manifest.json", "medjax.lock")
      self.record(name, 1, same, stderr + again)

    run = self.trained()
    args = ["translate", "--workdir", run, "--input-dir", self.data(), "--layout", "phantom"]
    self.medjax(*args, "--output-dir", self.scratch / "translated")
    out = self.scratch / "translated-killed"
    stderr = self.killed("*.nii.gz", 3, [*args, "--output-dir", out])
    code, again = self.medjax(*args, "--output-dir", out)
    same = code == 0 and _without(contents(out), "translations.json") == _without(
        contents(self.scratch / "translated"), "translations.json")
    self.record("translate --input-dir: SIGKILL writing a volume", 1, same, stderr + again)

    args = ["score", "--pred-dir", self.scratch / "translated", "--target-dir", self.data(),
            "--layout", "phantom", "--target", "t2w", "--protocol", "mri"]
    self.medjax(*args, "--output", self.scratch / "scored" / "scores.csv")
    out = self.scratch / "scored-killed"
    stderr = self.killed("scores.json", 1, [*args, "--output", out / "scores.csv"])
    code, again = self.medjax(*args, "--output", out / "scores.csv")
    self.record("score: SIGKILL writing its table", 1,
                code == 0 and contents(out) == contents(self.scratch / "scored"), stderr + again)

    workdir = self.scratch / "train-killed"
    stderr = self.killed("checkpoint", 2, ["train", "--config", self.experiment(),
                                           "--workdir", workdir])
    code, again = self.medjax("train", "--config", self.experiment(), "--workdir", workdir)
    self.record("train: SIGKILL while a checkpoint is written", 1,
                code == 0 and _same_params(self.trained(), workdir), stderr + again)

  def checkpoints(self) -> None:
    import shutil
    from test_faults import damage_checkpoint
    for how in ("truncated", "deleted", "metadata"):
      workdir = self.scratch / f"damaged-{how}"
      shutil.copytree(self.trained(), workdir)
      damage_checkpoint(workdir, 6, how)
      output = self.scratch / f"damaged-{how}.nii.gz"
      code, stderr = self.medjax("translate", "--workdir", workdir, "--input",
                                 self.data() / "phantom_004" / "t1w.nii.gz", "--output", output)
      # translate reads only the EMA parameters: damage elsewhere (optimiser state) does
      # not stop it; damage it meets must be named in one line, with nothing written.
      named = (code == 2 and "damaged" in stderr and len(_messages(stderr)) == 1
               and not output.exists()) or (code == 0 and output.exists())
      code2, again = self.medjax("train", "--config", self.experiment(), "--workdir", workdir)
      self.record(f"checkpoint 6 {how}: translate refuses or reads past it, train resumes "
                  "from 4", 1,
                  code2 == 0 and _same_params(self.trained(), workdir), stderr + again, named)

  def disk(self) -> None:
    from test_faults import run_with_disk_limit
    from test_kills import contents
    out = self.scratch / "prepared-full"
    process = run_with_disk_limit(self.prepare_args(out), at="medjax.data.prepare:_write_shard",
                                  calls=1, limit=4096)
    clean = process.returncode == 1 and len(_messages(process.stderr)) == 1
    code, again = self.medjax(*self.prepare_args(out))
    same = code == 0 and _without(contents(out), "manifest.json") == _without(
        contents(self.scratch / "prepared"), "manifest.json")
    self.record("prepare: the disk fills up at the 2nd shard", 1, same,
                process.stderr + again, clean)

  def locks(self) -> None:
    from test_faults import dead_pid, hold_lock, write_lock
    out = self.scratch / "locked"
    holder = hold_lock(out, "medjax prepare")
    try:
      code, stderr = self.medjax(*self.prepare_args(out))
    finally:
      holder.kill()
      holder.wait()
    refused = code == 2 and str(holder.pid) in stderr and len(_messages(stderr)) == 1
    self.record("a second writer on a folder in use", 1, not (out / "manifest.json").exists(),
                stderr, refused)
    write_lock(out, pid=dead_pid())
    code, stderr = self.medjax(*self.prepare_args(out))
    self.record("a stale lock of a killed process", 1, code == 0, stderr, "took over" in stderr)


def _without(files: dict, *names) -> dict:
  return {k: v for k, v in files.items() if Path(k).name not in names}


def _messages(stderr: str) -> list[str]:
  from test_faults import messages
  return messages(stderr)


def _same_params(a: Path, b: Path) -> bool:
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  steps = lambda w: max(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
  load = lambda w: jax.tree.leaves(ocp.StandardCheckpointer().restore(
      w / "checkpoints" / str(steps(w)) / "state")["params"])
  return steps(a) == steps(b) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(load(a), load(b), strict=True))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--examples", type=int, default=200, help="hostile inputs per reader")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  start = time.perf_counter()
  print(f"readers: {args.examples} seeded hostile inputs each", flush=True)
  tally = readers(args.examples, args.seed)
  for name, counts in tally.items():
    broken = sum(counts.get(k, 0) for k in ("traceback", "bad_message", "insane", "hang"))
    print(f"  {name:15s} tried {counts['tried']:5d}  read {counts.get('ok', 0):5d}  refused "
          f"{counts.get('refused', 0):5d}  broken {broken}", flush=True)
  print("stages: one fault each, then the same command again", flush=True)
  with tempfile.TemporaryDirectory(prefix="medjax-robustness-") as scratch:
    stages = Stages(Path(scratch))
    for part in (stages.kills, stages.checkpoints, stages.disk, stages.locks):
      part()
  summary = {
      "inputs_tried": sum(c["tried"] for c in tally.values()),
      "faults_injected": sum(s["faults"] for s in stages.results.values()),
      "tracebacks": sum(c.get("traceback", 0) for c in tally.values())
                    + sum(s["tracebacks"] for s in stages.results.values()),
      "hangs": sum(c.get("hang", 0) for c in tally.values()),
      "unclear_messages": sum(c.get("bad_message", 0) for c in tally.values())
                          + sum(s["unclear"] for s in stages.results.values()),
      "insane_reads": sum(c.get("insane", 0) for c in tally.values()),
      "corrupted_or_lost": sum(s["corrupted_or_lost"] for s in stages.results.values()),
      "readers": {k: {m: c.get(m, 0) for m in ("tried", "ok", "refused", "traceback",
                                                "bad_message", "insane", "hang")}
                  for k, c in tally.items()},
      "stages": stages.results,
      "seconds": round(time.perf_counter() - start, 1),
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  os.environ.setdefault("MEDJAX_COMPILATION_CACHE", str(ROOT / ".jax_cache"))
  main()
