"""train_and_evaluate(config, workdir): the one training loop every translator runs through.

Pure pieces (translator.init / train_step / translate) are jitted with explicit shardings
over the mesh (`make_train_step`); everything with a side effect — data iteration,
checkpoints, logs, pictures, evaluation files — stays in this module's loop.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from medjax import baseline as baseline_lib
from medjax import checkpoint as checkpoint_lib
from medjax import config as config_lib
from medjax import evaluate as evaluate_lib
from medjax import any2any, files, first_stage, lock
from medjax import logging as logging_lib
from medjax import parallel, translators
from medjax.data import pipeline
from medjax.errors import NonFiniteError, WorkdirError
from medjax.run import CONFIG, Run, create_state, first_stage_params, save_artefacts


def prepare_workdir(config, workdir: str) -> None:
  """Create the workdir, or check that it holds this same experiment before resuming."""
  path = os.path.join(workdir, CONFIG)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    differences = config_lib.experiment_differences(saved, config.to_dict())
    if differences:
      raise WorkdirError(
          f"workdir {workdir} holds another experiment (its config.json differs in "
          f"{', '.join(differences[:6])}{' …' if len(differences) > 6 else ''}); "
          "use a new --workdir, or the same config to resume")
  if jax.process_index() == 0:
    files.write_text(path, config_lib.to_json(config))


def fit_baseline(source, channel: int, config=None, max_records: int = 4096):
  """The intensity-map baseline on every k-th training record; any-to-any: one map per
  ordered modality pair (`baseline.fit_pairs`)."""
  stride = max(1, len(source) // max_records)
  records = (source[i] for i in range(0, len(source), stride))
  if config is not None and any2any.enabled(config):
    index = any2any.channel_index(config)
    return baseline_lib.fit_pairs(
        (any2any.images_of(r["source"], r["target"], index) for r in records),
        any2any.modalities(config))
  return baseline_lib.fit(records, channel=channel)


def check_finite(step: int, metrics: dict) -> None:
  """`metrics`: one step's values, on the host."""
  values = {k: float(v) for k, v in metrics.items()}
  if not all(np.isfinite(v) for v in values.values()):
    raise NonFiniteError(
        f"non-finite training metrics at step {step}: "
        + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        + "; lower train.learning_rate or check the data. The last checkpoint is untouched.")


def make_train_step(translator, mesh, abstract_state):
  """`translator.train_step` jitted over `mesh`: the state in the shardings its abstract
  leaves carry (`create_state`: fsdp-sharded or replicated) and donated, the batch split
  along the batch axes, metrics replicated."""
  replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  state_sharding = jax.tree.map(lambda leaf: leaf.sharding, abstract_state)
  options = {}
  if translator.config.model.get("remat") and jax.default_backend() == "cpu":
    # XLA:CPU strips remat's optimisation barriers and merges the recomputation back
    # into the forward pass (no memory saved); keeping them makes remat do its job there.
    # GPU and TPU compilers keep them anyway.
    options["xla_disable_hlo_passes"] = "cse_barrier_expander"
  return jax.jit(translator.train_step,
                 in_shardings=(state_sharding, batch_sharding, replicated),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,),
                 compiler_options=options or None)


def fetch(tree):
  """The one way the loop brings values to the host: at log points only (tests count it)."""
  return jax.device_get(tree)


def check_window(window: list[tuple[int, dict]]) -> dict:
  """The metrics of the steps since the last log point, fetched at once: the first
  non-finite one stops the run naming its step; else their means (what is logged)."""
  steps = [step for step, _ in window]
  values = fetch([metrics for _, metrics in window])
  for step, metrics in zip(steps, values):
    check_finite(step, metrics)
  return {k: float(np.mean([m[k] for m in values])) for k in values[-1]}


class Profiler:
  """`train.profile_steps = (START, COUNT)`: a jax.profiler trace of steps START …
  START+COUNT-1 in WORKDIR/profile, for TensorBoard's profile plugin or XProf."""

  def __init__(self, profile_steps, workdir: str):
    self.start, self.count = (tuple(profile_steps) + (0, 0))[:2]
    self.directory = os.path.join(workdir, "profile")
    self.active = False

  def before(self, step: int) -> None:
    if self.count and step == self.start and jax.process_index() == 0:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step == self.start + self.count - 1:
      jax.block_until_ready(state)  # the trace holds the steps' device work, not just dispatch
      jax.profiler.stop_trace()
      self.active = False

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def _first_process() -> bool:
  return jax.process_index() == 0


# One trainer per workdir (medjax/lock.py); in a multi-host run process 0 holds the lock
# for all, as it alone writes the run's files.
@lock.holding("workdir", "medjax train", when=_first_process)
def train_and_evaluate(config, workdir: str, *, mesh=None) -> dict:
  """Train `config` in `workdir` (resuming if it holds a checkpoint); the last val summary."""
  mesh = mesh or parallel.mesh_for(config)
  # a two-stage run's first stage, checked and described (resuming: as the run began)
  first_stage.embed(config, workdir)
  config_lib.validate(config, num_devices=mesh.size)
  translator = translators.build(config)
  recipe = pipeline.recipe(config)
  pipeline.check_splits(config)  # before any work: an empty held-out split cannot score
  # the model's own shape checks, before anything is written
  abstract, init = create_state(translator, config, mesh, recipe)
  prepare_workdir(config, workdir)
  source = pipeline.train_source(config)
  # Batches are placed on the mesh two steps ahead; the checkpoint stores the position of
  # the next batch to be used, not of the grain iterator running ahead.
  data_iter = parallel.DevicePrefetch(iter(pipeline.train_dataset(config)), mesh, depth=2)

  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                             max_to_keep=config.checkpoint.max_to_keep)
  if checkpointer.latest_step() is not None:
    # A damaged latest checkpoint (files truncated or deleted) gives way to the previous
    # good one; it is moved aside, not deleted, and a later save of its step works.
    state, damaged = checkpointer.restore_good(abstract, data_iter)
    for step, why in damaged:
      moved = checkpointer.set_aside(step)
      if jax.process_index() == 0:
        print(f"medjax train: warning: checkpoint {step} is damaged ({why}); moved to "
              f"{moved}; resuming from step {int(state.step)}", file=sys.stderr)
  else:
    state = init()
    if translator.first_stage_key:  # the frozen first stage, from its own run directory
      state = translator.attach_first_stage(state, first_stage_params(config, mesh))
  start = int(state.step)

  train_step = make_train_step(translator, mesh, abstract)
  # Placed once, explicitly: the step runs under a transfer guard that refuses implicit
  # host↔device copies, so nothing slips into the hot loop unnoticed.
  rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1),
                       parallel.replicated(mesh))
  baseline = fit_baseline(source, recipe.centre_channel, config)
  save_artefacts(workdir, recipe, baseline, pipeline.training_inputs(config))
  run = Run(workdir, config, recipe, baseline, translator, None, start, mesh)
  writer = logging_lib.MetricWriter(workdir)
  total = config.train.total_steps
  # the bar says how the batch is split: 'train flow on 2 cpu'
  bar = tqdm(total=total, initial=start, unit="step",
             desc=f"train {translator.name} on {parallel.describe(mesh)}", dynamic_ncols=True,
             disable=not config.logging.progress or jax.process_index() != 0)
  profiler = Profiler(config.train.profile_steps, workdir)
  summary = None
  window = []  # (step, device metrics) since the last log point: fetched there, at once
  tick, tick_step = time.perf_counter(), start
  try:
    for step in range(start + 1, total + 1):
      batch = next(data_iter)
      profiler.before(step)
      # No host sync between log points: the host dispatches steps ahead of the device,
      # and an implicit host↔device copy in the step is an error, not a silent cost.
      with jax.transfer_guard("disallow"):
        state, metrics = train_step(state, batch, rng)
      profiler.after(step, state)
      window.append((step, metrics))
      is_checkpoint = step % config.checkpoint.every == 0 or step == total
      is_eval = step % config.eval.every == 0 or step == total
      if step % config.train.log_every == 0 or is_checkpoint or is_eval:
        scalars = check_window(window)  # a non-finite step stops here, before any save
        window = []
        now = time.perf_counter()
        rate = (step - tick_step) / max(now - tick, 1e-9)
        tick, tick_step = now, step
        writer.write(step, {**scalars, "steps_per_s": rate})
        bar.set_postfix(loss=f"{scalars['loss']:.4f}", steps_s=f"{rate:.2f}")
      bar.update(1)
      if is_checkpoint:
        checkpointer.save(step, state, data_iter)
      if is_eval:
        bar.clear()
        run.params, run.step = translator.inference_params(state), step
        summary = evaluate_lib.evaluate_run(run, "val", writer=writer)
        if jax.process_index() == 0:
          tqdm.write(evaluate_lib.format_summary(summary))
        tick = time.perf_counter()  # steps/s measures training, not evaluation
  finally:
    profiler.close()
    bar.close()
    try:
      checkpointer.close()  # waits for the last save: its failure (a full disk) is raised
    finally:
      writer.close()
  if summary is None:  # resumed a finished run: report its last evaluation again
    run.params, run.step = translator.inference_params(state), start
    summary = evaluate_lib.evaluate_run(run, "val")
  return summary

