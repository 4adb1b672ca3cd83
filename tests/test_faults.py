"""Faults while running (issue 15): one writer per folder, damaged checkpoints, a full
disk, and non-finite or constant volumes at translate time.

Every fault ends in one line `medjax <command>: error: …` (or a one-line warning when the
work can go on), a documented exit status, and nothing half-written or lost: the previous
checkpoint, shards and volumes stay complete, and a rerun finishes the work with the
outputs an uninterrupted run gives. The small functions at the top inject the faults;
`benchmarks/robustness.py` can reuse them (each returns what it did).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import orbax.checkpoint as ocp
import pytest

from medjax import checkpoint as checkpoint_lib
from medjax import cli, errors, lock
from medjax.data import phantom

from conftest import ROOT, tiny_config, tiny_spec

# --- fault injectors (reused by benchmarks/robustness.py) ------------------------------


def damage_checkpoint(workdir, step: int, how: str = "truncated") -> Path:
  """Damage checkpoint `step` the ways a disk or a careless copy does: `truncated` (every
  array file cut to half its size: a copy that stopped short), `deleted` (its largest
  array file removed), `metadata` (state/_METADATA cut short) or `iterator` (the
  data-iterator position removed). Returns a damaged file."""
  state = Path(workdir) / "checkpoints" / str(step) / "state"
  if how == "metadata":
    target = state / "_METADATA"
    target.write_bytes(target.read_bytes()[:100])
    return target
  if how == "iterator":
    target = next((state.parent / "iter").glob("process_*.json"))
    target.unlink()
    return target
  data = [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"]
  target = max(data, key=lambda p: p.stat().st_size)
  if how == "truncated":
    for path in data:
      os.truncate(path, path.stat().st_size // 2)
  elif how == "deleted":
    target.unlink()
  else:
    raise ValueError(how)
  return target


# Runs `medjax ARGS…` with the file-size limit (RLIMIT_FSIZE) lowered to LIMIT bytes just
# before call CALLS+1 of MODULE.NAME: the outputs written before fit, a later one does
# not, as when a disk fills up mid-run. A checkpoint save still running in the background
# is waited for first, so the limit hits the save it is meant for. (CPython ignores
# SIGXFSZ: a write past the limit is an OSError EFBIG, as a full disk's is ENOSPC.)
LIMITED = textwrap.dedent("""
    import functools, importlib, resource, sys
    module, name, calls, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    owner = importlib.import_module(module)
    *path, attribute = name.split(".")
    for part in path:
      owner = getattr(owner, part)
    original, seen = getattr(owner, attribute), [0]

    @functools.wraps(original)
    def limited(*args, **kwargs):
      seen[0] += 1
      if seen[0] == calls + 1:
        if hasattr(args[0], "wait"):
          args[0].wait()
        resource.setrlimit(resource.RLIMIT_FSIZE,
                           (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
      return original(*args, **kwargs)

    setattr(owner, attribute, limited)
    from medjax import cli
    sys.exit(cli.main(["medjax", *sys.argv[5:]]))
""")


def run_with_disk_limit(argv, *, at: str, calls: int, limit: int, timeout: float = 600):
  """`medjax ARGV…` in a subprocess whose disk "fills up" (RLIMIT_FSIZE = `limit`) when
  `at` ("module:Class.function") is called for the (calls+1)-th time. Output goes to
  pipes, which the limit does not touch."""
  module, name = at.split(":")
  return subprocess.run([sys.executable, "-c", LIMITED, module, name, str(calls), str(limit),
                         *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def hold_lock(directory, command: str = "medjax train") -> subprocess.Popen:
  """Another process holding `directory`'s lock until it is killed."""
  script = ("import sys, time; from medjax import lock; lock.acquire(sys.argv[1], sys.argv[2]);"
            " print('held', flush=True); time.sleep(600)")
  process = subprocess.Popen([sys.executable, "-c", script, str(directory), command],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == "held"
  return process


def write_lock(directory, **fields) -> Path:
  """A lock file as another process would have left it, with `fields` changed."""
  content = {**lock.identity("medjax train"), **fields}
  path = Path(directory) / lock.LOCK
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(content))
  return path


def dead_pid() -> int:
  """The pid of a process that has just exited (not yet reused, in practice)."""
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def race_for_lock(directory, starters: int = 6) -> list[str]:
  """`starters` processes take `directory`'s lock at the same instant; what each got:
  "won" or the first words of its refusal."""
  go = Path(directory).with_name(Path(directory).name + ".go")
  script = textwrap.dedent("""
      import os, sys, time
      from medjax import errors, lock
      while not os.path.exists(sys.argv[2]):
        time.sleep(0.001)
      try:
        held = lock.acquire(sys.argv[1], "medjax prepare")
        print("won", flush=True)
        time.sleep(1.0)  # still holding it while the others try
        held.release()
      except errors.WorkdirError as error:
        print("refused", flush=True)
      """)
  processes = [subprocess.Popen([sys.executable, "-c", script, str(directory), str(go)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(starters)]
  time.sleep(0.5)  # all started and waiting
  go.touch()
  outcomes = [p.communicate(timeout=60)[0].strip() for p in processes]
  go.unlink()
  return outcomes


# --- shared set-up ---------------------------------------------------------------------


def saved_params(workdir, step: int = 6):
  path = Path(workdir) / "checkpoints" / str(step) / "state"
  return jax.tree.leaves(ocp.StandardCheckpointer().restore(path)["params"])


def assert_bitwise_equal(a, b):
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    assert np.array_equal(np.asarray(x), np.asarray(y))


def messages(stderr: str) -> list[str]:
  """What a command said on stderr, without its progress bars' lines."""
  return [line for line in re.split(r"[\r\n]+", stderr.strip())
          if line.strip() and not re.search(r"\d+%\|", line)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """An uninterrupted tiny run: checkpoints at steps 3 and 6."""
  from medjax import train
  workdir = tmp_path_factory.mktemp("faults") / "straight"
  train.train_and_evaluate(tiny_config("flow"), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  return workdir


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
  """Three phantom subjects in the phantom layout."""
  root = tmp_path_factory.mktemp("faults") / "phantom"
  phantom.write_subjects(root, 3, shape=(32, 32, 12), spacing=(5.0, 5.0, 8.0), progress=False)
  return root


def copy_run(trained, tmp_path, name="run") -> Path:
  target = tmp_path / name
  shutil.copytree(trained, target)
  return target


# --- one writer per folder -------------------------------------------------------------


def prepare_argv(subjects, out):
  return ["medjax", "prepare", "--layout", "phantom", "--input-dir", str(subjects),
          "--output-dir", str(out), "--source", "t1w", "--target", "t2w", "--spacing", "5",
          "--size", "32"]


def test_a_second_writer_is_refused_naming_the_holder(subjects, tmp_path, capsys):
  workdir, out = tmp_path / "run", tmp_path / "shards"
  holders = [hold_lock(workdir, "medjax train"), hold_lock(out, "medjax prepare")]
  try:
    assert cli.main(["medjax", "train", "--config", tiny_spec(), "--workdir",
                     str(workdir)]) == 2
    assert cli.main(prepare_argv(subjects, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    for line, holder, command in zip(err, holders, ("train", "prepare")):
      assert line.startswith(f"medjax {command}: error: ")
      assert f"pid {holder.pid} on host {socket.gethostname()}" in line
      assert f"`medjax {command}`" in line and "in use" in line
    # Nothing was written beside the other process's lock.
    assert os.listdir(workdir) == [lock.LOCK] and os.listdir(out) == [lock.LOCK]
  finally:
    for holder in holders:
      holder.kill()
      holder.wait()
  # Its holder SIGKILLed, the lock is stale: the next prepare takes it over and says so.
  assert cli.main(prepare_argv(subjects, out)) == 0
  err = capsys.readouterr().err
  took = [line for line in err.splitlines() if "took over the lock" in line]
  assert len(took) == 1 and f"process {holders[1].pid} is gone" in took[0]
  assert (out / "manifest.json").is_file() and not (out / lock.LOCK).exists()


@pytest.mark.parametrize("case", ["pid reused", "host restarted"])
def test_a_stale_lock_on_this_host_is_taken_over(subjects, tmp_path, capsys, case):
  out = tmp_path / "shards"
  if case == "pid reused":  # a live pid (this test's) that started at another time
    write_lock(out, pid=os.getpid(), process_start=1)
  else:
    write_lock(out, pid=os.getpid(), boot_id="another-boot")
  assert cli.main(prepare_argv(subjects, out)) == 0
  err = capsys.readouterr().err
  reason = "now belongs to another process" if case == "pid reused" else "restarted"
  assert "took over the lock" in err and reason in err
  assert not (out / lock.LOCK).exists()


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(subjects, tmp_path,
                                                                  capsys):
  out = tmp_path / "shards"
  path = write_lock(out, host="elsewhere.example", pid=dead_pid())
  assert cli.main(prepare_argv(subjects, out)) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "elsewhere.example" in err
  assert f"remove {path}" in err and path.exists()


def test_an_unreadable_lock_is_refused(tmp_path, monkeypatch):
  monkeypatch.setattr(lock, "_UNREADABLE_WAIT_S", 0.1)
  (tmp_path / lock.LOCK).write_text("")  # killed between creating and writing it
  with pytest.raises(errors.WorkdirError, match="not a readable medjax lock"):
    lock.acquire(tmp_path, "medjax train")


def test_a_refused_or_failed_start_leaves_nothing(tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  out = tmp_path / "new" / "shards"
  assert cli.main(prepare_argv(empty, out)) == 2  # no subjects: refused after locking
  assert "no phantom subjects" in capsys.readouterr().err
  assert not (tmp_path / "new").exists()  # the folders the lock made went again


@pytest.mark.parametrize("stale", [False, True])
def test_one_of_many_simultaneous_starters_wins(tmp_path, stale):
  folder = tmp_path / "shards"
  if stale:
    write_lock(folder, pid=dead_pid())
  outcomes = race_for_lock(folder)
  assert outcomes.count("won") == 1, outcomes
  assert outcomes.count("refused") == len(outcomes) - 1
  assert not (folder / lock.LOCK).exists()


# --- damaged checkpoints ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["truncated", pytest.param("deleted", marks=pytest.mark.slow)])
def test_a_damaged_latest_checkpoint_resumes_from_the_previous(trained, tmp_path, capsys, how):
  workdir = copy_run(trained, tmp_path)
  damaged = damage_checkpoint(workdir, 6, how)
  assert cli.main(["medjax", "train", "--config", tiny_spec(), "--workdir", str(workdir)]) == 0
  err = capsys.readouterr().err
  warnings = [line for line in err.splitlines() if "warning: checkpoint" in line]
  assert len(warnings) == 1
  assert re.match(r"medjax train: warning: checkpoint 6 is damaged \(.+\); moved to "
                  rf"{re.escape(str(workdir))}/checkpoints\.damaged/6; resuming from step 3$",
                  warnings[0])
  # Moved aside, not deleted; step 6 saved again; the result is the uninterrupted run's.
  assert (workdir / "checkpoints.damaged" / "6" / damaged.relative_to(
      workdir / "checkpoints" / "6")).exists() == (how == "truncated")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  assert_bitwise_equal(saved_params(workdir), saved_params(trained))
  assert not (workdir / lock.LOCK).exists()


def test_no_good_checkpoint_is_one_line_and_moves_nothing(trained, tmp_path, capsys):
  workdir = copy_run(trained, tmp_path)
  damage_checkpoint(workdir, 6, "metadata")
  damage_checkpoint(workdir, 3, "iterator")
  assert cli.main(["medjax", "train", "--config", tiny_spec(), "--workdir", str(workdir)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert re.match(r"medjax train: error: no checkpoint in .* can be restored: step 6: "
                  r"state/_METADATA is truncated or not JSON; step 3: iter/ holds no", err)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  assert not (workdir / "checkpoints.damaged").exists()


def test_translate_and_evaluate_name_a_damaged_checkpoint(trained, subjects, tmp_path,
                                                          capsys):
  workdir = copy_run(trained, tmp_path)
  damage_checkpoint(workdir, 6, "truncated")
  source, output = subjects / "phantom_000" / "t1w.nii.gz", tmp_path / "out.nii.gz"
  translate = ["medjax", "translate", "--workdir", str(workdir), "--input", str(source),
               "--output", str(output)]
  assert cli.main(translate) == 2
  assert cli.main(["medjax", "evaluate", "--workdir", str(workdir)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2
  for line, command in zip(err, ("translate", "evaluate")):
    assert re.match(rf"medjax {command}: error: checkpoint 6 in .* is damaged \(.+\); "
                    r"earlier checkpoint: 3 \(use --checkpoint 3\)$", line)
  assert not output.exists()
  # Read-only: nothing moved; the earlier checkpoint works.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  assert not (workdir / "checkpoints.damaged").exists()
  assert cli.main(translate + ["--checkpoint", "3"]) == 0 and output.is_file()
  assert cli.main(["medjax", "evaluate", "--workdir", str(workdir), "--checkpoint", "3"]) == 0
  assert (workdir / "eval" / "3" / "test_summary.json").is_file()


# --- a full disk ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_save(trained, tmp_path):
  workdir = tmp_path / "run"
  result = run_with_disk_limit(["train", "--config", tiny_spec(), "--workdir", workdir],
                               at="medjax.checkpoint:Checkpointer.save", calls=1,
                               limit=4096)
  assert result.returncode == 1, result.stderr[-3000:]
  lines = messages(result.stderr)
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith(f"medjax train: error: {workdir}/checkpoints/6: File too large;")
  # Checkpoint 3 is whole; the unfinished save of 6 is orbax's temporary, never a "6".
  assert checkpoint_lib.Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [3]
  assert checkpoint_lib.Checkpointer(workdir / "checkpoints",
                                     read_only=True).damage(3) is None
  assert not (workdir / lock.LOCK).exists()
  # Space freed: the same command finishes from step 3, as if nothing had happened.
  assert cli.main(["medjax", "train", "--config", tiny_spec(), "--workdir", str(workdir)]) == 0
  assert_bitwise_equal(saved_params(workdir), saved_params(trained))


def shard_files(out) -> dict[str, bytes]:
  return {str(p.relative_to(out)): p.read_bytes() for p in sorted(Path(out).rglob("*"))
          if p.is_file() and p.name != "manifest.json"}


def manifest_of(out) -> dict:
  manifest = json.loads((Path(out) / "manifest.json").read_text())
  manifest["command"] = manifest["command"].replace(str(out), "OUT")
  return manifest


def test_a_full_disk_stops_prepare_and_keeps_the_shards(subjects, tmp_path):
  reference = tmp_path / "reference"
  assert cli.main(prepare_argv(subjects, reference)) == 0
  out = tmp_path / "shards"
  result = run_with_disk_limit(prepare_argv(subjects, out)[1:],
                               at="medjax.data.prepare:_write_shard", calls=1, limit=4096)
  assert result.returncode == 1, result.stderr[-3000:]
  lines = messages(result.stderr)
  assert len(lines) == 1, result.stderr[-3000:]
  assert re.match(r"medjax prepare: error: .*/phantom_001\.array_record: File too large;",
                  lines[0])
  # The first subject's shard is complete and identical; the third was never tried.
  written = shard_files(out)
  expected = shard_files(reference)
  first = [name for name in written if name.endswith("phantom_000.array_record")]
  assert len(first) == 1 and written[first[0]] == expected[first[0]]
  assert not [name for name in written if "phantom_002" in name or ".tmp-" in name]
  assert json.loads((out / "manifest.json").read_text())["complete"] is False
  # Space freed: the same command finishes, with the uninterrupted run's files.
  assert cli.main(prepare_argv(subjects, out)) == 0
  assert shard_files(out) == expected
  assert manifest_of(out) == manifest_of(reference)


@pytest.mark.slow
def test_a_full_disk_stops_translate_input_dir(trained, subjects, tmp_path):
  argv = ["translate", "--workdir", trained, "--input-dir", subjects, "--layout", "phantom"]
  reference, out = tmp_path / "reference", tmp_path / "out"
  assert cli.main(["medjax", *map(str, argv), "--output-dir", str(reference)]) == 0
  first = sorted(name for name in os.listdir(reference) if name.startswith("phantom_000"))
  # The disk fills up once the first subject's files (its volume, and its std with
  # samples ≥ 2) are written.
  result = run_with_disk_limit(argv + ["--output-dir", out],
                               at="medjax.data.volumes:save_like", calls=len(first),
                               limit=4096)
  assert result.returncode == 1, result.stderr[-3000:]
  lines = messages(result.stderr)
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith(f"medjax translate: error: {out}/phantom_001.nii.gz: File too large")
  assert sorted(os.listdir(out)) == first  # no temporary, no third subject
  for name in first:
    assert_same_volume(out / name, reference / name)
  assert cli.main(["medjax", *map(str, argv), "--output-dir", str(out)]) == 0
  for name in os.listdir(reference):
    if name.endswith(".nii.gz"):
      assert_same_volume(out / name, reference / name)


def assert_same_volume(a, b):
  a, b = nib.load(a), nib.load(b)
  assert np.array_equal(a.get_fdata(), b.get_fdata())
  assert np.array_equal(a.affine, b.affine) and a.header.binaryblock == b.header.binaryblock


@pytest.mark.parametrize("code,status", [
    (errno.ENOSPC, 1), (errno.EDQUOT, 1), (errno.EFBIG, 1), (errno.EIO, 1),
    (errno.EROFS, 2), (errno.EACCES, 2), (errno.EPERM, 2), (errno.ENOENT, 2)])
def test_os_errors_are_one_line_with_their_status(code, status):
  error = OSError(code, os.strerror(code), "/data/out/x.nii.gz")
  assert errors.os_error_status(error) == status
  line = errors.os_error_line(error)
  assert line.startswith(f"/data/out/x.nii.gz: {os.strerror(code)}") and "\n" not in line
  assert ("run the same command again" in line) == (code in errors.FULL_ERRNOS)


def test_writers_words_for_a_full_disk_are_recognised():
  array_record = RuntimeError("write() failed: No space left on device; writing /o/x; at byte 7")
  tensorstore = ValueError('OUT_OF_RANGE: Error writing local file "/c/6.orbax-checkpoint-tmp/'
                           "_sharding\": Failed to write 99188 bytes: File too large "
                           "[os_error_code='27']")
  chained = RuntimeError("save failed")
  chained.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
  for error, code in ((array_record, errno.ENOSPC), (tensorstore, errno.EFBIG),
                      (chained, errno.EDQUOT)):
    found = errors.disk_error(error, "/target")
    assert found.errno == code and found.filename == "/target"
  assert errors.disk_error(ValueError("shape mismatch")) is None
  assert errors.disk_error(errors.UserError("Permission denied by the layout")) is None


# --- what translate refuses to write ---------------------------------------------------


def translate_one(workdir, source, output):
  return cli.main(["medjax", "translate", "--workdir", str(workdir), "--input", str(source),
                   "--output", str(output)])


@pytest.mark.parametrize("case", ["zeros", "constant", "nan", "inf"])
def test_constant_or_non_finite_inputs_are_one_line(trained, subjects, tmp_path, capsys, case):
  image = nib.load(subjects / "phantom_000" / "t1w.nii.gz")
  data = np.asarray(image.get_fdata(), np.float32)
  if case == "zeros":
    data[:] = 0
  elif case == "constant":
    data[:] = 417.5
  else:
    data[3, 4, 5] = np.nan if case == "nan" else np.inf
  source = tmp_path / "t1w.nii.gz"
  nib.save(nib.Nifti1Image(data, image.affine), source)
  output = tmp_path / "out" / "t1w_t2w.nii.gz"
  assert translate_one(trained, source, output) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith(f"medjax translate: error: {source}: ")
  if case in ("zeros", "constant"):
    assert f"constant image: every voxel is {0 if case == 'zeros' else 417.5:g}" in err
    assert "empty body mask" not in err
  else:
    assert re.search(r"NaN|Inf|finite", err), err
  assert not output.exists()


def test_a_non_finite_model_output_is_never_written(trained, subjects, tmp_path, capsys,
                                                    monkeypatch):
  from medjax import run as run_lib
  load = run_lib.Run.load

  def poisoned(*args, **kwargs):  # parameters gone NaN, as a damaged run's would be
    run = load(*args, **kwargs)
    run.params = jax.tree.map(lambda x: x * np.nan, run.params)
    return run

  monkeypatch.setattr(run_lib.Run, "load", poisoned)
  output = tmp_path / "out" / "t2w.nii.gz"
  assert translate_one(trained, subjects / "phantom_000" / "t1w.nii.gz", output) == 1
  err = messages(capsys.readouterr().err)
  assert len(err) == 1
  assert re.match(rf"medjax translate: error: {re.escape(str(output))}: the model's output is "
                  r"not finite in \d+ of \d+ voxels \(NaN/Inf\); nothing was written", err[0])
  assert not output.parent.exists() or not os.listdir(output.parent)
