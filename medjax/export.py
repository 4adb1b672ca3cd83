"""`medjax export`: a trained run as one self-contained model folder.

The folder holds what `Run.load_model` needs to translate and nothing else
(docs/design.md, "Exported models"): the run's config, preprocessing recipe and fitted
baseline, the inference (EMA) parameters of one checkpoint as their own orbax tree (no
optimiser state, no data-iterator position), the training inputs' statistics when the
run recorded them, a `model.json` marker and a model card. It is written into a hidden
sibling folder and renamed into place when complete, so a crash never leaves half a model
under the chosen name.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import shutil
from pathlib import Path

from medjax import checkpoint as checkpoint_lib
from medjax import files, modalities
from medjax import run as run_lib
from medjax.errors import UserError

INPUTS = run_lib.INPUTS  # the training inputs' ranges (data.inputs.envelope), if kept
CARD = "MODEL_CARD.md"


def version() -> str:
  try:
    return importlib.metadata.version("medjax")
  except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
    return "unknown"


def export(workdir, out, *, step: int | None = None, force: bool = False) -> dict:
  """Write the run in `workdir` at checkpoint `step` (the latest by default) as a model
  folder `out`; its `model.json` marker is returned. An existing `out` is refused unless
  it is empty, or `force` is given and it is an earlier export (a folder with model.json):
  nothing else is ever deleted."""
  workdir, out = Path(workdir), Path(out)
  _check_out(workdir, out, force)
  run = run_lib.Run.load(workdir, step=step)
  with files.atomic_directory(out, replace=True) as tmp:
    for name in (run_lib.CONFIG, run_lib.RECIPE, run_lib.BASELINE):
      _copy(workdir / name, tmp / name)
    has_inputs = (workdir / INPUTS).is_file()
    if has_inputs:
      _copy(workdir / INPUTS, tmp / INPUTS)
    checkpoint_lib.save_tree(tmp / run_lib.PARAMS, run.params, report_as=out)
    marker = {"format": run_lib.MODEL_FORMAT, "version": run_lib.MODEL_VERSION,
              "medjax": version(), "step": run.step, "source": list(run.recipe.sources),
              "target": run.target, "translator": run.translator.name,
              "inputs": INPUTS if has_inputs else None,
              "exported": datetime.datetime.now(datetime.UTC).isoformat(
                  timespec="seconds")}
    files.write_text(tmp / CARD, model_card(run, marker, _evaluations(workdir, run.step),
                                            _training_subjects(run.config)))
    files.write_json(tmp / run_lib.MODEL, marker)  # last: a folder with it is complete
  return marker


def _check_out(workdir: Path, out: Path, force: bool) -> None:
  if out.exists() and not out.is_dir():
    raise UserError(f"{out} exists and is not a folder: give a new --out")
  if out.resolve() == workdir.resolve() or workdir.resolve().is_relative_to(out.resolve()):
    raise UserError(f"{out} holds the run {workdir}: give --out a folder of its own")
  if out.is_dir() and any(out.iterdir()):
    if not force:
      raise UserError(f"{out} exists and is not empty: give a new --out, or --force to "
                      "replace an earlier export")
    if not (out / run_lib.MODEL).is_file():
      raise UserError(f"{out} is not an exported model ({run_lib.MODEL} is missing): --force "
                      "replaces only an earlier export; give a new --out")


def _copy(source: Path, target: Path) -> None:
  with files.atomic_write(target) as tmp:
    shutil.copyfile(source, tmp)


def _evaluations(workdir: Path, step: int) -> list[tuple[str, dict]]:
  """[(file, summary)] of the exported step's held-out evaluations (or of the latest
  evaluated step before it): validation during training (summary.json) and
  `medjax evaluate` (<split>_summary.json)."""
  folder = workdir / "eval" / str(step)
  if not folder.is_dir():  # not evaluated at that step: the latest evaluation before it
    earlier = sorted(int(p.name) for p in (workdir / "eval").glob("*")
                     if p.name.isdigit() and int(p.name) < step)
    if not earlier:
      return []
    folder = workdir / "eval" / str(earlier[-1])
  found = []
  for name in ("summary.json", "test_summary.json", "val_summary.json"):
    path = folder / name
    if path.is_file():
      try:
        found.append((f"eval/{folder.name}/{name}", files.read_json(path, dict)))
      except UserError:  # a damaged summary: the card says nothing of it
        continue
  return found


def _training_subjects(config) -> int | None:
  """How many subjects trained the model: the phantom's train split, or the manifest's
  count (None when the prepared folder is gone)."""
  if config.data.kind == "phantom":
    from medjax.data import pipeline
    return len(pipeline.phantom_split(config)["train"])
  try:
    manifest = files.read_json(Path(config.data.dir) / "manifest.json", dict)
    return int(manifest["counts"]["subjects"]["train"])
  except (UserError, KeyError, TypeError, ValueError):
    return None


def model_card(run, marker: dict, evaluations, subjects: int | None) -> str:
  config = run.config
  sources = " + ".join(run.recipe.sources)
  steps, samples = config.translator.sample_steps, config.translator.samples
  data = (f"the phantom head (`data.phantom`, seed {config.data.phantom.seed})"
          if config.data.kind == "phantom" else f"prepared shards `{config.data.dir}`")
  units = "HU" if modalities.is_ct(run.target) else "[0, 1] (the target's robust range)"
  lines = [
      f"# medjax model: {sources} → {run.target}", "",
      ("**Intended use: research only. Not for clinical use** — not validated for "
       "diagnosis, treatment planning or any decision about a patient."), "",
      "## Task", "",
      (f"- Translate {sources} into a synthetic {run.target}, written in {units} in the "
       "input's geometry."),
      (f"- Method: `{run.translator.name}` ({config.model.name} backbone), checkpoint step "
       f"{run.step} (EMA parameters), medjax {marker['medjax']}."),
      (f"- Preprocessing: spacing {'x'.join(map(str, run.recipe.spacing))} mm, slices "
       f"{'x'.join(map(str, run.recipe.size))}, context {run.recipe.context}, "
       f"mask `{run.recipe.mask}` (`preprocessing.json`)."),
      (f"- Sampling: {steps} step(s) × {samples} draw(s), "
       f"{run.translator.nfe(steps)} network evaluation(s) per draw."), "",
      "## Data", "",
      f"- Experiment: {data}.",
      f"- Training subjects: {subjects if subjects is not None else 'unknown'}.",
      "- Training input statistics: "
      + ("`inputs.json`." if marker["inputs"] else "not recorded by this run."), "",
      "## Held-out metrics", ""]
  if not evaluations:
    lines.append(f"No evaluation of step {run.step} was found in the run.")
  for name, summary in evaluations:
    get = {key: summary.get(key, "?") for key in ("step", "split", "subjects", "protocol",
                                                  "steps", "samples")}
    lines += [(f"`{name}`: step {get['step']}, split `{get['split']}`, {get['subjects']} "
               f"subject(s), protocol `{get['protocol']}`, {get['steps']} step(s) × "
               f"{get['samples']} draw(s)."), "",
              "| metric | model | baseline |", "|---|---|---|"]
    model, baseline = summary.get("model") or {}, summary.get("baseline") or {}
    for key in model:
      if key.endswith(("_std", "_median")):
        continue
      lines.append(f"| {key} | {_number(model.get(key), model.get(key + '_std'))} | "
                   f"{_number(baseline.get(key), baseline.get(key + '_std'))} |")
    lines.append("")
  return "\n".join(lines).rstrip() + "\n"


def _number(value, std=None) -> str:
  if not isinstance(value, (int, float)):
    return "–"
  return f"{value:.4g}" + (f" ± {std:.2g}" if isinstance(std, (int, float)) else "")
