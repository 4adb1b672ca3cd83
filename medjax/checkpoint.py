"""Orbax checkpoints of the train state together with the grain iterator position.

Saving both in one `ocp.args.Composite` (as maxdiffusion does) is what makes a restart
continue on the very next batch. Orbax writes each step under a temporary name and
renames it when complete, so a crash mid-save leaves the previous checkpoint intact.
A trained run restores only its inference parameters (`restore_params`): the EMA, never
the optimiser state.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

from medjax.errors import UserError


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = True,
               read_only: bool = False):
    """`read_only`: for loading a trained run; nothing is created, cleaned or written."""
    self.directory = os.path.abspath(directory)
    self._manager = None
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
    read into `abstract_params`' shapes and shardings; nothing else is read."""
    step = self._step(step)
    item = abstract_params
    for key in reversed(path):
      item = {key: item}
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(self.directory, str(step), "state"),
        args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True))
    for key in path:
      restored = restored[key]
    return restored, step

  def wait(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()


def abstract_like(tree, sharding):
  """ShapeDtypeStructs carrying `sharding`: the restore target for a state of this shape."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
