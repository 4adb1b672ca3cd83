"""Orbax checkpoints of the train state together with the grain iterator position.

Saving both in one `ocp.args.Composite` (as maxdiffusion does) is what makes a restart
continue on the very next batch. Orbax writes each step under a temporary name and
renames it when complete, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_iter=None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state, data_iter=None, step: int | None = None):
    """The state at `step` (the latest by default) into `abstract_state`'s shapes and
    shardings; the data iterator, if given, is moved to its saved position in place."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(
          f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree, sharding):
  """ShapeDtypeStructs carrying `sharding`: the restore target for a state of this shape."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
