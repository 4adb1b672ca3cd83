"""Orbax checkpoints of the train state together with the grain iterator position.

Saving both in one `ocp.args.Composite` (as maxdiffusion does) is what makes a restart
continue on the very next batch. Orbax writes each step under a temporary name and
renames it when complete, so a crash mid-save leaves the previous checkpoint intact.
A trained run restores only its inference parameters (`restore_params`): the EMA, never
the optimiser state.

Faults (docs/design.md, "Files and failures"): a checkpoint whose files were truncated
or deleted afterwards (a disk error, a hand-made copy) fails to restore; `damage(step)`
then says why by reading every file of it, `restore_good` falls back to the previous
checkpoint that restores, and `set_aside` moves the damaged one to
`<workdir>/checkpoints.damaged/<step>` (never deleted). A save that runs out of disk
becomes one `OSError` naming the checkpoint (`errors.disk_error`); the previous
checkpoint is untouched, and orbax removes the unfinished one at the next start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from medjax.errors import UserError, WorkdirError, disk_error

DAMAGED = ".damaged"  # <workdir>/checkpoints.damaged/<step>: what `set_aside` moved


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = True,
               read_only: bool = False):
    """`read_only`: for loading a trained run; nothing is created, cleaned or written."""
    self.directory = os.path.abspath(directory)
    self._manager = None
    self._saving = None  # the step of the save that may still run in the background
    _quiet_orbax_failures()
    if read_only:
      if not os.path.isdir(self.directory):
        raise UserError(f"no checkpoints: {self.directory} does not exist")
      return
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True))

  def all_steps(self) -> list[int]:
    if self._manager is not None:
      return sorted(self._manager.all_steps())
    # Orbax renames a step's folder to its bare number only once it is complete.
    return sorted(int(name) for name in os.listdir(self.directory) if name.isdigit())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def _step(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise UserError(f"no checkpoint in {self.directory}")
      return max(steps)
    if step not in steps:
      raise UserError(f"no checkpoint for step {step} in {self.directory}; have {steps}")
    return step

  def save(self, step: int, state, data_iter=None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self.wait()  # the previous save's failure, if any, is reported as that step's
    self._saving = step
    with self._disk_errors():
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state, data_iter=None, step: int | None = None):
    """The state at `step` (the latest by default) into `abstract_state`'s shapes and
    shardings; the data iterator, if given, is moved to its saved position in place."""
    step = self._step(step)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_params(self, abstract_params, path: tuple[str, ...], step: int | None = None):
    """(params, step): only the subtree of the saved state at `path` (e.g. 'ema_params'),
    read into `abstract_params`' shapes and shardings; nothing else is read. A damaged
    checkpoint is a `UserError` naming it and the earlier steps; nothing is moved."""
    step = self._step(step)
    item = abstract_params
    for key in reversed(path):
      item = {key: item}
    try:
      restored = ocp.PyTreeCheckpointer().restore(
          os.path.join(self.directory, str(step), "state"),
          args=ocp.args.PyTreeRestore(
              item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
              partial_restore=True))
    except Exception:
      why = self.damage(step, items=("state",))
      if why is None:
        raise
      earlier = [s for s in self.all_steps() if s < step]
      raise UserError(
          f"checkpoint {step} in {self.directory} is damaged ({why}); "
          + (f"earlier checkpoint{'s' * (len(earlier) > 1)}: {', '.join(map(str, earlier))} "
             f"(use --checkpoint {earlier[-1]})" if earlier else "there is no earlier one")
      ) from None
    for key in path:
      restored = restored[key]
    return restored, step

  def restore_good(self, abstract_state, data_iter=None):
    """(state, skipped): the latest checkpoint that restores, and [(step, why)] for the
    later, damaged ones it passed over (nothing is moved: see `set_aside`). A restore
    that fails although every file of the checkpoint reads is not damage (e.g. a state
    of other shapes) and is raised as it is. No good checkpoint: a `WorkdirError`."""
    skipped = []
    for step in reversed(self.all_steps()):
      try:
        return self.restore(abstract_state, data_iter, step), skipped
      except Exception:
        why = self.damage(step)
        if why is None:
          raise
        skipped.append((step, why))
    raise WorkdirError(
        f"no checkpoint in {self.directory} can be restored: "
        + "; ".join(f"step {step}: {why}" for step, why in skipped)
        + f"; nothing was moved: move {self.directory} aside to start over, or use a new "
        "--workdir")

  def damage(self, step: int, items=("state", "iter")) -> str | None:
    """Why checkpoint `step` cannot be read in full (a file missing, truncated or not
    what it should be), or None if every array and file of `items` reads. It reads the
    whole checkpoint into host memory, so it runs only after a restore failed."""
    folder = Path(self.directory) / str(step)
    for item in items:
      if not (folder / item).is_dir():
        return f"{item}/ is missing"
    if "iter" in items:
      positions = sorted((folder / "iter").glob("process_*.json"))
      if not positions:
        return "iter/ holds no data-iterator position (process_*.json)"
      for path in positions:
        if (why := _json_damage(path, folder)) is not None:
          return why
    if "state" not in items:
      return None
    return _tree_damage(folder / "state", folder)

  def set_aside(self, step: int) -> Path:
    """Move damaged checkpoint `step` to `<workdir>/checkpoints.damaged/<step>` (a
    second one of the same step: `<step>.1`, …): kept for whoever wants to rescue it, and
    out of the way, so that saving this step again works. Process 0 moves it; every
    process waits for that and re-reads the steps."""
    source = Path(self.directory) / str(step)
    aside = Path(self.directory + DAMAGED)
    target, n = aside / str(step), 0
    while target.exists():
      n += 1
      target = aside / f"{step}.{n}"
    _sync(f"medjax checkpoint {step} set aside: before")
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      os.rename(source, target)
    _sync(f"medjax checkpoint {step} set aside: after")
    if self._manager is not None:
      self._manager.reload()
    return target

  def wait(self) -> None:
    if self._manager is not None:
      with self._disk_errors():
        self._manager.wait_until_finished()

  def close(self) -> None:
    if self._manager is not None:
      with self._disk_errors():
        self._manager.wait_until_finished()
      self._manager.close()

  def _disk_errors(self):
    return _DiskErrors(None if self._saving is None else
                       os.path.join(self.directory, str(self._saving)))


def save_tree(directory, tree, *, report_as=None) -> None:
  """One pytree of arrays (an exported model's parameters) into a new orbax folder,
  synchronously; nothing else (no optimiser, no iterator). A write that fails for lack
  of space or permission is one `OSError` naming `report_as` (default `directory`): the
  folder the user asked for, not a temporary one."""
  with _DiskErrors(str(report_as or directory)):
    ocp.PyTreeCheckpointer().save(os.path.abspath(directory), args=ocp.args.PyTreeSave(tree))


def restore_tree(directory, abstract):
  """What `save_tree` wrote, read into `abstract`'s shapes, dtypes and shardings. A
  missing, damaged or mismatched folder is a one-line `UserError` naming it."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise UserError(f"{directory} does not exist: the model folder is incomplete "
                    "(export it again)")
  _quiet_orbax_failures()
  try:
    with _quiet("absl"):
      return ocp.PyTreeCheckpointer().restore(directory, args=ocp.args.PyTreeRestore(
          item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
  except Exception as error:  # noqa: BLE001  TensorStore and orbax say it in many types
    why = _tree_damage(Path(directory)) or _reason(error, Path(directory))
    raise UserError(f"{directory}: the model's parameters cannot be read ({why}); export "
                    "the model again") from None


def _tree_damage(folder: Path, named: Path | None = None) -> str | None:
  """Why an orbax tree does not read in full (the array and what is wrong with it), found
  by reading every array into host memory; None if all of it reads. Paths in the reason
  are relative to `named` (default: the tree's own folder)."""
  named = named or folder
  if (why := _json_damage(folder / "_METADATA", named)) is not None:
    return why
  try:
    with _quiet("absl"):
      tree = ocp.PyTreeCheckpointer().metadata(folder).item_metadata
      if tree is None:
        where = folder.relative_to(named).as_posix() + "/" if folder != named else ""
        return (f"its array index does not read ({where}manifest.ocdbt or a file under "
                f"{where}d/ is missing or truncated)")
      tree = getattr(tree, "tree", tree)
      read_all = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      ocp.PyTreeCheckpointer().restore(folder, args=ocp.args.PyTreeRestore(
          restore_args=read_all))
  except Exception as error:  # noqa: BLE001  TensorStore and orbax say it in many types
    return _reason(error, named)
  return None


class _DiskErrors:
  """A save that failed for lack of space or permission, in whichever of orbax's and
  TensorStore's words, becomes one `OSError` naming the checkpoint being written."""

  def __init__(self, path):
    self.path = path

  def __enter__(self):
    return self

  def __exit__(self, kind, error, traceback):
    if isinstance(error, Exception):
      failed = disk_error(error, self.path or getattr(error, "filename", None))
      if failed is not None:
        raise failed from error
    return False


def _json_damage(path: Path, folder: Path) -> str | None:
  try:
    json.loads(path.read_bytes())
  except FileNotFoundError:
    return f"{path.relative_to(folder)} is missing"
  except (ValueError, UnicodeDecodeError):
    return f"{path.relative_to(folder)} is truncated or not JSON"
  return None


def _reason(error: Exception, folder: Path) -> str:
  """TensorStore's message in one short line: what could not be read, and why."""
  text = " ".join(str(error).split())
  for cut in (" [tensorstore_spec", " [source locations", " See full TensorStore"):
    text = text.split(cut)[0]
  text = text.replace(f'local file "{folder}/', 'local file "').replace(f"{folder}/", "")
  found = re.match(r'([A-Z_]+): Error reading "([^"/]+)[^"]*" in OCDBT database at local '
                   r'file "[^"]*": (.*)', text)
  if found:
    text = f"cannot read {found.group(2)}: {found.group(3)} ({found.group(1)})"
  if isinstance(error, FileNotFoundError) and error.filename:
    text = f"{os.path.relpath(error.filename, folder)} is missing"
  return text if len(text) <= 240 else text[:236] + " …"


class _quiet:
  """Logger `name` silent below ERROR for the block."""

  def __init__(self, name: str):
    self.logger = logging.getLogger(name)

  def __enter__(self):
    self.level = self.logger.level
    self.logger.setLevel(max(self.level, logging.ERROR))

  def __exit__(self, *exc):
    self.logger.setLevel(self.level)
    return False


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


_QUIET = False


def _quiet_orbax_failures() -> None:
  """Keep orbax's and TensorStore's echoes of a failed save or restore off the
  terminal. The failure itself still reaches medjax (raised by the restore, or by the
  save when waited for) and is reported once, in one line; what is dropped here are
  the same errors logged from background threads as they happen (absl ERROR records,
  asyncio's "exception was never retrieved", and "Event loop is closed" from reads
  finishing after their loop), hundreds of lines each time."""
  global _QUIET
  if _QUIET:
    return
  _QUIET = True

  def orbax_echo(record) -> bool:
    if record.levelno < logging.ERROR:
      return True
    if "orbax" in record.pathname:
      return False
    text = record.getMessage()
    return not ("never retrieved" in text and ("orbax" in text or "OCDBT" in text))

  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(orbax_echo)
  previous = sys.unraisablehook

  def unraisable(event):
    if not _orbax_leftover(event):
      previous(event)

  sys.unraisablehook = unraisable


def _orbax_leftover(event) -> bool:
  """An unraisable error from the reads of a failed restore: a coroutine of orbax's
  collected with its exception, or a read finishing after its event loop closed."""
  if isinstance(event.exc_value, RuntimeError) and "Event loop is closed" in str(
      event.exc_value):
    return True
  code = getattr(event.object, "cr_code", None)
  if code is not None and "orbax" in code.co_filename:
    return True
  frame = event.exc_traceback
  while frame is not None:
    if "orbax" in frame.tb_frame.f_code.co_filename:
      return True
    frame = frame.tb_next
  return False


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying `shardings` (one per leaf): the restore target for a state
  of this shape. Orbax reads each array into its target sharding, so a checkpoint saved on
  one mesh restores on another (train on 8 devices, resume on 4, evaluate on 1)."""
  return jax.tree.map(
      lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree,
      shardings)

