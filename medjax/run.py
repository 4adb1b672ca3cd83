"""A trained run: the one object evaluate, translate, compare and the notebooks load.

`Run.load(workdir)` reads `config.json`, the preprocessing recipe and the fitted
intensity-mapping baseline that training saved beside it, and restores only the
inference (EMA) parameters of a checkpoint, never the optimiser. Nothing of the training
data is needed: a run can be evaluated on its held-out split and used for translation
with its training shards gone (docs/design.md, "Run directory"). `Run.load_model(folder)`
reads the same from a folder `medjax export` wrote (docs/design.md, "Exported models").
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import jax
import ml_collections
from jax.extend import core as jax_core
import numpy as np

from medjax import baseline as baseline_lib
from medjax import checkpoint as checkpoint_lib
from medjax import any2any, files, first_stage, metrics, parallel, translators
from medjax.data import pipeline
from medjax.data.preprocess import Recipe
from medjax.errors import ConfigError, UserError, WorkdirError

CONFIG = "config.json"
RECIPE = "preprocessing.json"
BASELINE = "baseline.json"
INPUTS = "inputs.json"  # what the training inputs looked like (`data.inputs.envelope`)
# An exported model folder (docs/design.md, "Exported models"): the three files above,
# the inference parameters and this marker.
MODEL = "model.json"
MODEL_FORMAT, MODEL_VERSION = "medjax-model", 1
PARAMS = "params"


def load_config(workdir):
  path = Path(workdir) / CONFIG
  if not path.is_file():
    raise WorkdirError(f"{path} does not exist: is {workdir} a medjax run directory?")
  return ml_collections.ConfigDict(files.read_json(path, dict))


def create_state(translator, config, mesh, recipe: Recipe):
  """The abstract state (for restoring) and a jitted, sharded initialiser (big_vision).

  Shapes come from the recipe's example record, so no data is read to build them; each
  leaf carries its sharding on `mesh` (`parallel.state_shardings`).
  """
  record = recipe.example_record(tuple(config.data.get("patch", ())))
  count = len(any2any.modalities(config))
  if count:  # any-to-any's model input: images, availability, target (3·M channels)
    record["source"] = np.zeros((*record["mask"].shape[:-1], any2any.GROUPS * count),
                                np.float32)
  batch = {k: jax.ShapeDtypeStruct((config.train.batch_size, *v.shape), v.dtype)
           for k, v in record.items()}
  rng = jax.random.PRNGKey(config.seed)
  try:
    # One trace gives both the shapes (for the shardings) and the program the jitted
    # initialiser replays: tracing a flax model costs seconds, replaying its jaxpr little.
    program, abstract = jax.make_jaxpr(translator.init, return_shape=True)(rng, batch)
  except ValueError as error:  # a backbone refusing these shapes: the config's doing
    shape = "x".join(map(str, batch["source"].shape[1:-1]))
    raise ConfigError(f"the model cannot take this run's {shape} inputs: {error}") from None
  shardings = parallel.state_shardings(abstract, mesh)
  tree = jax.tree.structure(abstract)

  def init(rng, batch):
    leaves = jax_core.jaxpr_as_fun(program)(*jax.tree.leaves((rng, batch)))
    return jax.tree.unflatten(tree, leaves)

  init = jax.jit(init, out_shardings=shardings)
  return checkpoint_lib.abstract_like(abstract, shardings), lambda: init(rng, batch)


def save_artefacts(workdir, recipe: Recipe, baseline, inputs: dict | None = None) -> None:
  """What a trained run needs besides its checkpoints (written once, by process 0)."""
  if jax.process_index() == 0:
    files.write_json(Path(workdir) / RECIPE, recipe.to_dict())
    files.write_json(Path(workdir) / BASELINE, baseline.to_dict(), indent=None)
    if inputs:
      files.write_json(Path(workdir) / INPUTS, inputs, indent=1)


def load_inputs(directory) -> dict | None:
  """A run's (or exported model's) inputs.json; None when it has none (an older run)."""
  path = Path(directory) / INPUTS
  if not path.is_file():
    return None
  value = files.read_json(path, dict)
  return value or None


def _artefacts(folder: Path):
  """config.json, preprocessing.json and baseline.json of a run or an exported model."""
  config = load_config(folder)
  recipe_path, baseline_path = folder / RECIPE, folder / BASELINE
  for path in (recipe_path, baseline_path):
    if not path.is_file():
      raise WorkdirError(f"{path} does not exist: {folder} was not written by this medjax "
                         "(train it again, or in a new --workdir)")
  try:
    recipe = Recipe.from_dict(files.read_json(recipe_path, dict))
  except (KeyError, TypeError, ValueError) as error:
    raise WorkdirError(f"{recipe_path}: not a preprocessing recipe ({error})") from None
  try:
    baseline = baseline_lib.from_dict(files.read_json(baseline_path, dict))
  except (KeyError, TypeError, ValueError) as error:
    raise WorkdirError(f"{baseline_path}: not a fitted baseline ({error})") from None
  return config, recipe, baseline


def read_model_marker(path) -> dict:
  """`model.json` of an exported model folder, checked; a one-line `UserError` naming the
  file for a missing folder, a run directory, any other folder or a damaged marker."""
  path = Path(path)
  marker = path / MODEL
  if not path.is_dir():
    raise UserError(f"{path}: no such model folder (medjax export writes one)")
  if not marker.is_file():
    if (path / "checkpoints").is_dir():
      what = "a run directory, not an exported model: use --workdir, or medjax export"
    elif (path / PARAMS).is_dir():
      what = "an incomplete model folder (export it again)"
    else:
      what = "not an exported medjax model (medjax export writes one)"
    raise UserError(f"{marker} does not exist: {path} is {what}")
  value = files.read_json(marker, dict)
  if value.get("format") != MODEL_FORMAT:
    raise UserError(f"{marker}: not a medjax model marker (format {value.get('format')!r}, "
                    f"expected {MODEL_FORMAT!r})")
  if value.get("version") != MODEL_VERSION:
    raise UserError(f"{marker}: model format version {value.get('version')!r}; this medjax "
                    f"reads version {MODEL_VERSION}")
  if not isinstance(value.get("step"), int) or isinstance(value.get("step"), bool):
    raise UserError(f"{marker}: its step is {value.get('step')!r}, not a whole number")
  return value


def _inference_skeleton(config, recipe: Recipe, mesh):
  """The mesh, the translator and its abstract inference (EMA) parameters, each leaf with
  its sharding: what a restore of a run or an exported model fills in."""
  mesh = mesh or parallel.mesh_for(config, fallback=True)
  translator = translators.build(config)
  abstract, _ = create_state(translator, config, mesh, recipe)
  return mesh, translator, translator.inference_params(abstract)


def first_stage_params(config, mesh):
  """The inference parameters of the first-stage run `config` names (docs/design.md,
  "Two-stage runs"), on `mesh` in the shardings a state's leaves get there."""
  key = first_stage.path_key(config)
  return Run.load(config.translator[key], mesh=mesh).params


@dataclasses.dataclass
class Run:
  """A run's config, recipe, baseline, translator and inference parameters."""
  workdir: Path | None
  config: object
  recipe: Recipe
  baseline: baseline_lib.IntensityMap
  translator: object
  params: object
  step: int
  mesh: object
  inputs: dict | None = None  # the training inputs' ranges (inputs.json), if recorded
  _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def load(cls, workdir, *, step: int | None = None, mesh=None) -> Run:
    """The run in `workdir` at checkpoint `step` (the latest by default)."""
    workdir = Path(workdir)
    if (workdir / MODEL).is_file():
      raise WorkdirError(f"{workdir} is an exported model ({MODEL}), not a run directory: "
                         "load it with medjax.load_model (medjax translate --model)")
    config, recipe, baseline = _artefacts(workdir)
    mesh, translator, abstract = _inference_skeleton(config, recipe, mesh)
    checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", read_only=True)
    try:
      params, step = checkpointer.restore_params(abstract, translator.inference_path, step)
    finally:
      checkpointer.close()
    return cls(workdir, config, recipe, baseline, translator, params, int(step), mesh,
               load_inputs(workdir))

  @classmethod
  def load_model(cls, path, *, mesh=None) -> Run:
    """An exported model folder (`medjax export`; docs/design.md, "Exported models"): the
    same object as `load` of the run it came from, its parameters restored into the same
    shardings, so the jitted `translate` is the same. No run directory, no data."""
    path = Path(path)
    marker = read_model_marker(path)
    for name in (CONFIG, RECIPE, BASELINE):
      if not (path / name).is_file():
        raise UserError(f"{path / name} does not exist: the model folder {path} is "
                        "incomplete (export it again)")
    config, recipe, baseline = _artefacts(path)
    mesh, translator, abstract = _inference_skeleton(config, recipe, mesh)
    params = checkpoint_lib.restore_tree(path / PARAMS, abstract)
    return cls(path, config, recipe, baseline, translator, params, marker["step"], mesh,
               load_inputs(path))

  @classmethod
  def fresh(cls, config, *, mesh=None, recipe: Recipe | None = None) -> Run:
    """Freshly initialised parameters (timing, tests): the same object as a trained run."""
    mesh = mesh or parallel.mesh_for(config, fallback=True)
    recipe = recipe or pipeline.recipe(config)
    first_stage.embed(config)
    translator = translators.build(config)
    _, init = create_state(translator, config, mesh, recipe)
    identity = baseline_lib.IntensityMap(np.linspace(-1.0, 1.0, 2, dtype=np.float32),
                                         recipe.centre_channel)  # nothing fitted: source as is
    return cls(None, config, recipe, identity, translator,
               translator.inference_params(init()), 0, mesh)

  @property
  def target(self) -> str:
    return self.config.data.target

  @property
  def protocol(self) -> str:
    return metrics.protocol_for(self.target)

  def translate_fn(self, steps: int | None = None, samples: int | None = None, *,
                   ceiling: bool = False):
    """The jitted `translate` at these sampling settings (the run's own by default);
    `ceiling`: the translator's `reference` of the real target instead."""
    steps = steps or self.config.translator.sample_steps
    samples = samples or self.config.translator.samples
    key = (steps, samples, ceiling)
    if key not in self._compiled:
      method = self.translator.reference if ceiling else self.translator.translate
      fn = functools.partial(method, steps=steps, samples=samples)
      # Parameters stay where training (or the restore) put them, sharded along fsdp
      # or not; XLA gathers what each step needs. Slices are split along the batch axes.
      params = parallel.state_shardings(self.params, self.mesh)
      self._compiled[key] = jax.jit(
          fn, in_shardings=(params, parallel.batch_sharding(self.mesh),
                            parallel.replicated(self.mesh)),
          out_shardings=parallel.batch_sharding(self.mesh))
    return self._compiled[key]

  def eval_volumes(self, split: str):
    """The held-out subjects of `split`: rendered (phantom) or that split's shards only."""
    return pipeline.eval_volumes(self.config, split)

  def directory(self, *parts) -> str:
    return os.path.join(str(self.workdir), *map(str, parts))
