"""train_and_evaluate(config, workdir): the one training loop every translator runs through.

Pure pieces (translator.init / train_step / translate) are jitted here with explicit
shardings over the mesh; everything with a side effect — data iteration, checkpoints,
logs, images, evaluation files — stays in this module's loop.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from medjax import baseline as baseline_lib
from medjax import checkpoint as checkpoint_lib
from medjax import config as config_lib
from medjax import evaluate as evaluate_lib
from medjax import logging as logging_lib
from medjax import parallel, translators
from medjax.data import pipeline


class NonFiniteError(RuntimeError):
  """The loss or gradient norm stopped being finite; nothing from that step is saved."""


class WorkdirError(ValueError):
  """The workdir belongs to another experiment."""


def prepare_workdir(config, workdir: str) -> None:
  """Create the workdir, or check that it holds this same experiment before resuming."""
  path = os.path.join(workdir, "config.json")
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
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      f.write(config_lib.to_json(config))
    os.replace(path + ".tmp", path)


def build_translator(config):
  try:
    return translators.build(config)
  except ValueError as e:  # an unknown method, model or model option
    raise config_lib.ConfigError(str(e)) from None


def load_config(workdir: str):
  import ml_collections
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir} a medjax run directory?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def example_batch(source, batch_size: int) -> dict:
  """Global-batch shapes from one record, without advancing the training iterator."""
  record = source[0]
  return {k: jax.ShapeDtypeStruct((batch_size, *np.shape(v)), np.asarray(v).dtype)
          for k, v in record.items()}


def create_state(translator, config, mesh, source):
  """The abstract state (for restoring) and a jitted, sharded initialiser (big_vision)."""
  batch = example_batch(source, config.train.batch_size)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(translator.init, rng, batch)
  sharding = jax.tree.map(lambda _: parallel.replicated(mesh), abstract)
  init = jax.jit(translator.init, out_shardings=sharding)
  abstract = checkpoint_lib.abstract_like(abstract, parallel.replicated(mesh))
  return abstract, lambda: init(rng, batch)


def fit_baseline(config, source, max_records: int = 4096):
  stride = max(1, len(source) // max_records)
  return baseline_lib.fit((source[i] for i in range(0, len(source), stride)),
                          channel=pipeline.baseline_channel(config))


def check_finite(step: int, metrics: dict) -> None:
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not all(np.isfinite(v) for v in values.values()):
    raise NonFiniteError(
        f"non-finite training metrics at step {step}: "
        + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        + "; lower train.learning_rate or check the data. The last checkpoint is untouched.")


def run_evaluation(translator, state_params, config, mesh, baseline, *, split: str, step: int,
                   workdir: str, writer=None, prefix: str = ""):
  volumes = pipeline.eval_volumes(config, split)
  summary, rows, predictions = evaluate_lib.evaluate(
      translator, state_params, volumes, baseline,
      jax.random.fold_in(jax.random.PRNGKey(config.seed), 10_000_019), mesh,
      target_modality=config.data.target, steps=config.eval.steps,
      samples=config.eval.samples if translator.stochastic else 1,
      batch_size=config.eval.batch_size)
  summary = {"split": split, "step": int(step), "translator": translator.name, **summary}
  if jax.process_index() == 0:
    directory = os.path.join(workdir, "eval", str(step))
    evaluate_lib.write_results(directory, summary, rows, prefix=prefix)
    os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
    image = evaluate_lib.save_images(
        os.path.join(workdir, "images", f"{split}_{step:06d}.png"), volumes[0],
        predictions[0], target_modality=config.data.target,
        num_slices=config.eval.image_slices, stochastic=translator.stochastic)
    from medjax import infer, report
    report.write_report(
        os.path.join(directory, f"{prefix}report"),
        report.from_evaluation(volumes, predictions, rows, config.data.target,
                               spacing=infer.preprocessing(config)["spacing"]),
        protocol=summary["protocol"])
    if writer is not None:
      scalars = {f"{name}_{k}": v for name in ("model", "baseline")
                 for k, v in summary[name].items() if not k.endswith(("_std", "_median"))}
      writer.write(step, scalars, prefix=split)
      writer.image(step, f"{split}/grid", image)
  return summary


def format_summary(summary: dict) -> str:
  keys = [k for k in summary["model"] if not k.endswith(("_std", "_median"))]
  unit = {"synthrad2023": " (HU)", "mri": " ([0,1])"}.get(summary["protocol"], "")
  lines = [f"held-out {summary['split']} ({summary['subjects']} subjects, step {summary['step']},"
           f" {summary['protocol']}{unit}):",
           f"  {'':10s}" + "".join(f"{k:>16s}" for k in keys)]
  for name in ("model", "baseline"):
    cells = "".join(f"{summary[name][k]:10.4f} ±{summary[name][k + '_std']:<5.3f}"[:16].rjust(16)
                    for k in keys)
    lines.append(f"  {name:10s}{cells}")
  return "\n".join(lines)


def train_and_evaluate(config, workdir: str, *, mesh=None) -> dict:
  """Train `config` in `workdir` (resuming if it holds a checkpoint); the last val summary."""
  mesh = mesh or parallel.make_mesh()
  config_lib.validate(config, num_devices=mesh.size)
  translator = build_translator(config)
  prepare_workdir(config, workdir)
  source = pipeline.train_source(config)
  data_iter = iter(pipeline.train_dataset(config))

  abstract, init = create_state(translator, config, mesh, source)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                             max_to_keep=config.checkpoint.max_to_keep)
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(abstract, data_iter)
  else:
    state = init()
  start = int(state.step)

  replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  state_sharding = jax.tree.map(lambda _: replicated, abstract)
  train_step = jax.jit(translator.train_step,
                       in_shardings=(state_sharding, batch_sharding, replicated),
                       out_shardings=(state_sharding, replicated), donate_argnums=(0,))
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  baseline = fit_baseline(config, source)
  writer = logging_lib.MetricWriter(workdir)
  total = config.train.steps
  bar = tqdm(total=total, initial=start, desc=f"train {translator.name}", unit="step",
             dynamic_ncols=True, disable=not config.logging.progress or jax.process_index() != 0)
  summary = None
  pending = None  # the previous step's metrics, checked one step late to keep dispatch async
  tick, tick_step = time.perf_counter(), start
  try:
    for step in range(start + 1, total + 1):
      batch = parallel.global_batch(next(data_iter), mesh)
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
        summary = run_evaluation(translator, translator.inference_params(state), config, mesh,
                                 baseline, split="val", step=step, workdir=workdir,
                                 writer=writer)
        if jax.process_index() == 0:
          tqdm.write(format_summary(summary))
        tick = time.perf_counter()  # steps/s measures training, not evaluation
  finally:
    bar.close()
    checkpointer.close()
    writer.close()
  if summary is None:  # resumed a finished run: report its last evaluation again
    summary = run_evaluation(translator, translator.inference_params(state), config, mesh,
                             baseline, split="val", step=start, workdir=workdir)
  return summary


def restore_checkpoint(config, workdir: str, mesh, *, step: int | None = None):
  """The translator, its restored state and the baseline of a run (latest step by default)."""
  translator = build_translator(config)
  source = pipeline.train_source(config)
  abstract, _ = create_state(translator, config, mesh, source)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                             async_save=False)
  try:
    state = checkpointer.restore(abstract, step=step)
  finally:
    checkpointer.close()
  return translator, state, fit_baseline(config, source)


def evaluate_checkpoint(workdir: str, *, split: str = "test", step: int | None = None,
                        mesh=None) -> dict:
  """`medjax evaluate`: score the latest (or a given) checkpoint on held-out subjects."""
  config = load_config(workdir)
  mesh = mesh or parallel.make_mesh()
  translator, state, baseline = restore_checkpoint(config, workdir, mesh, step=step)
  return run_evaluation(translator, translator.inference_params(state), config, mesh,
                        baseline, split=split, step=int(state.step), workdir=workdir,
                        prefix=f"{split}_")
