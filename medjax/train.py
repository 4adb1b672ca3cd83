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
from medjax import files, lock
from medjax import logging as logging_lib
from medjax import parallel, translators
from medjax.data import pipeline
from medjax.errors import NonFiniteError, WorkdirError
from medjax.run import CONFIG, Run, create_state, save_artefacts


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


def fit_baseline(source, channel: int, max_records: int = 4096):
  stride = max(1, len(source) // max_records)
  return baseline_lib.fit((source[i] for i in range(0, len(source), stride)), channel=channel)


def check_finite(step: int, metrics: dict) -> None:
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not all(np.isfinite(v) for v in values.values()):
    raise NonFiniteError(
        f"non-finite training metrics at step {step}: "
        + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        + "; lower train.learning_rate or check the data. The last checkpoint is untouched.")


def make_train_step(translator, mesh, abstract_state):
  """`translator.train_step` jitted over `mesh`: state replicated and donated, the batch
  split along the data axis, metrics replicated."""
  replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  return jax.jit(translator.train_step,
                 in_shardings=(state_sharding, batch_sharding, replicated),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))


def _first_process() -> bool:
  return jax.process_index() == 0


# One trainer per workdir (medjax/lock.py); in a multi-host run process 0 holds the lock
# for all, as it alone writes the run's files.
@lock.holding("workdir", "medjax train", when=_first_process)
def train_and_evaluate(config, workdir: str, *, mesh=None) -> dict:
  """Train `config` in `workdir` (resuming if it holds a checkpoint); the last val summary."""
  mesh = mesh or parallel.make_mesh()
  config_lib.validate(config, num_devices=mesh.size)
  translator = translators.build(config)
  recipe = pipeline.recipe(config)
  pipeline.check_splits(config)  # before any work: an empty held-out split cannot score
  prepare_workdir(config, workdir)
  source = pipeline.train_source(config)
  data_iter = iter(pipeline.train_dataset(config))

  abstract, init = create_state(translator, config, mesh, recipe)
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
  start = int(state.step)

  train_step = make_train_step(translator, mesh, abstract)
  # Placed once, explicitly: the step runs under a transfer guard that refuses implicit
  # host↔device copies, so nothing slips into the hot loop unnoticed.
  rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1),
                       parallel.replicated(mesh))
  baseline = fit_baseline(source, recipe.centre_channel)
  save_artefacts(workdir, recipe, baseline)
  run = Run(workdir, config, recipe, baseline, translator, None, start, mesh)
  writer = logging_lib.MetricWriter(workdir)
  total = config.train.total_steps
  bar = tqdm(total=total, initial=start, desc=f"train {translator.name}", unit="step",
             dynamic_ncols=True, disable=not config.logging.progress or jax.process_index() != 0)
  summary = None
  pending = None  # the previous step's metrics, checked one step late to keep dispatch async
  tick, tick_step = time.perf_counter(), start
  try:
    for step in range(start + 1, total + 1):
      batch = parallel.global_batch(next(data_iter), mesh)
      with jax.transfer_guard("disallow"):
        state, metrics = train_step(state, batch, rng)
      if pending is not None:
        check_finite(step - 1, pending)
      pending = metrics
      is_checkpoint = step % config.checkpoint.every == 0 or step == total
      is_eval = step % config.eval.every == 0 or step == total
      if step % config.train.log_every == 0 or is_checkpoint or is_eval:
        check_finite(step, metrics)
        now = time.perf_counter()
        rate = (step - tick_step) / max(now - tick, 1e-9)
        tick, tick_step = now, step
        scalars = {**jax.device_get(metrics), "steps_per_s": rate}
        writer.write(step, scalars)
        bar.set_postfix(loss=f"{float(scalars['loss']):.4f}", steps_s=f"{rate:.2f}")
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
    bar.close()
    try:
      checkpointer.close()  # waits for the last save: its failure (a full disk) is raised
    finally:
      writer.close()
  if summary is None:  # resumed a finished run: report its last evaluation again
    run.params, run.step = translator.inference_params(state), start
    summary = evaluate_lib.evaluate_run(run, "val")
  return summary

