"""`medjax prepare`: a dataset folder → subject-level split, ArrayRecord shards, a manifest.

Layout of OUT:
  manifest.json                  settings, recipe, subjects, splits, geometry,
                                 normalisation, skipped subjects and why
  {train,val,test}/<id>.array_record   one shard per subject: its foreground slices
  {train,val,test}/<id>.json           that subject's geometry and normalisation
  medjax.lock                    while a prepare runs (medjax/lock.py)

One shard per subject makes resuming trivial: a subject is done when its shard exists,
and a shard only exists once complete (`files.atomic_write`), so neither a crash nor
Ctrl-C leaves a file the loader would read. Every subject goes through
`preprocess.preprocess`, the function `medjax translate` runs on a new file.
"""

from __future__ import annotations

import multiprocessing
import shlex
import sys
from pathlib import Path

import numpy as np

from medjax import files, lock, modalities
from medjax.data import layouts, records, shards
from medjax.data.shards import MANIFEST, SHARD_SUFFIX, SPLITS
from medjax.data.preprocess import Recipe, preprocess
from medjax.data.volumes import DEFAULT_MAX_VOXELS, VolumeError
from medjax.errors import DISK_ERRNOS, PartialFailure, UserError

WRITER_OPTIONS = "group_size:1,zstd:3"  # group_size 1: random access, one record per read
CROP_WARNING = 0.005  # share of the body mask a crop may cut before prepare says so


class PrepareError(UserError):
  pass


def split_subjects(keys, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> dict[str, list[str]]:
  """Deterministic in (keys, fractions, seed); every split with a share gets ≥1 key once
  there are at least as many keys as such splits."""
  keys = sorted(set(keys))
  fractions = np.asarray(fractions, np.float64)
  if fractions.shape != (len(SPLITS),) or np.any(fractions < 0) or fractions.sum() <= 0:
    raise PrepareError(f"split fractions must be {len(SPLITS)} non-negative numbers, "
                       f"got {fractions.tolist()}")
  share = fractions / fractions.sum() * len(keys)
  counts = np.floor(share).astype(int)
  for i in np.argsort(-(share - counts), kind="stable")[: len(keys) - counts.sum()]:
    counts[i] += 1
  wanted = fractions > 0
  if len(keys) >= wanted.sum():
    for i in np.flatnonzero(wanted & (counts == 0)):
      counts[np.argmax(counts)] -= 1
      counts[i] += 1
  order = np.random.default_rng(seed).permutation(len(keys))
  bounds = np.concatenate([[0], np.cumsum(counts)])
  return {name: sorted(keys[j] for j in order[bounds[i]:bounds[i + 1]])
          for i, name in enumerate(SPLITS)}


def refuse_shared_stems(ids, where: str) -> None:
  """Two subject ids that become one file name would overwrite each other's files."""
  seen = {}
  for subject_id in ids:
    stem = files.safe_stem(subject_id)
    if stem in seen:
      raise PrepareError(f"{where}: subjects {seen[stem]!r} and {subject_id!r} would both be "
                         f"written as {stem!r}; rename one of them")
    seen[stem] = subject_id


def shard_path(out, split: str, subject_id: str) -> Path:
  return Path(out) / split / (files.safe_stem(subject_id) + SHARD_SUFFIX)


def _write_shard(path: Path, subject_records) -> int:
  from array_record.python.array_record_module import ArrayRecordWriter
  count = 0
  with files.atomic_write(path) as tmp:
    writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
    try:
      for record in subject_records:
        writer.write(records.encode(record))
        count += 1
    finally:
      writer.close()
    if count == 0:
      raise _Empty()
  return count


class _Empty(Exception):
  """No slice of the subject has foreground: no shard (the temporary is removed)."""


def _prepare_one(task: dict) -> dict:
  """Preprocess and write one subject; never raises for a bad subject (returns the reason)."""
  subject, split, out = task["subject"], task["split"], Path(task["out"])
  recipe = Recipe.from_dict(task["recipe"])
  try:
    prepared = preprocess(subject.files, recipe, subject_id=subject.id,
                          max_voxels=task.get("max_voxels", DEFAULT_MAX_VOXELS))
    meta = {"subject": subject.id, "index": task["index"], "split": split,
            "sources": list(recipe.sources), "targets": list(recipe.targets),
            "geometry": prepared.geometry, "normalisation": prepared.normalisation,
            "inputs": prepared.inputs,
            "slices": [int(z) for z in prepared.foreground_slices()]}
    shard = shard_path(out, split, subject.id)
    if prepared.labels is not None:
      meta["labels"] = shards.labels_path(shard).name
    # The json goes first (then the labels): a shard that exists always has its metadata
    # (and labels) next to it.
    try:
      files.write_json(shard.with_suffix(".json"), meta, indent=None)
      if prepared.labels is not None:
        with files.atomic_write(shards.labels_path(shard)) as tmp, open(tmp, "wb") as f:
          np.savez_compressed(f, labels=prepared.labels[meta["slices"]])
      _write_shard(shard, prepared.records(recipe.context, task["index"]))
    except OSError as error:
      if error.errno in DISK_ERRNOS:  # the output's fault: every subject would fail alike
        return {"subject": subject.id, "stop": [error.errno, error.strerror, error.filename]}
      raise
    return {"subject": subject.id, "meta": meta}
  except _Empty:
    return {"subject": subject.id, "skipped": "no slice with foreground"}
  except Exception as error:  # one bad subject must never stop the run
    reason = str(error) if isinstance(error, VolumeError) else f"{type(error).__name__}: {error}"
    return {"subject": subject.id, "skipped": reason}


def _done_meta(shard: Path, subject_id: str, split: str) -> dict:
  """The json of a shard an earlier run finished, checked: a damaged one is named."""
  path = shards.meta_path(shard)
  meta = shards.subject_meta(path)
  if meta["subject"] != subject_id or meta.get("split", split) != split:
    raise PrepareError(f"{path}: describes subject {meta['subject']!r} in {meta.get('split')!r},"
                       f" not {subject_id!r} in {split!r}; delete it and its shard and run "
                       "`medjax prepare` again")
  return meta


def _command(settings: dict, recipe: Recipe, root, out,
             max_voxels=DEFAULT_MAX_VOXELS) -> str:
  args = ["medjax", "prepare", "--layout", settings["layout"], "--input-dir", str(root),
          "--output-dir", str(out), "--source", ",".join(recipe.sources),
          "--target", ",".join(recipe.targets),
          "--spacing", "x".join(f"{s:g}" for s in recipe.spacing),
          "--size", "x".join(str(s) for s in recipe.size),
          "--context", str(recipe.context),
          "--fractions", ",".join(f"{f:g}" for f in settings["fractions"]),
          "--seed", str(settings["seed"])]
  if recipe.register:
    args += ["--register", recipe.register]
  if max_voxels != DEFAULT_MAX_VOXELS:
    args += ["--max-voxels", str(max_voxels)]
  return shlex.join(args)


def _channels(recipe: Recipe) -> dict:
  """What each record channel holds: modality and slice offset (2.5D context)."""
  k = recipe.context
  return {"source": [f"{m}[z{d:+d}]" if k else m for m in recipe.sources
                     for d in range(-k, k + 1)],
          "target": list(recipe.targets)}


def _missing_reason(subject, wanted) -> str | None:
  missing = subject.missing(wanted)
  if not missing:
    return None
  notes = [i for i in subject.issues if any(m in i for m in missing)]
  return f"missing modality {', '.join(missing)}" + (f" ({'; '.join(notes)})" if notes else "")


def _mask_mode(done: dict) -> str:
  made = {meta["geometry"].get("mask", "auto") for meta in done.values()}
  return made.pop() if len(made) == 1 else "mixed" if made else "auto"


def make_recipe(sources, targets, *, spacing=(1.0, 1.0, 1.0), size=256, context: int = 0,
                register: str | None = None) -> Recipe:
  targets = [targets] if isinstance(targets, str) else list(targets)
  size = [int(size)] * 2 if np.isscalar(size) else [int(s) for s in size]
  spacing = [float(spacing)] * 3 if np.isscalar(spacing) else [float(s) for s in spacing]
  try:
    return Recipe(sources=[modalities.canonical(m) for m in sources],
                  targets=[modalities.canonical(m) for m in targets],
                  spacing=spacing, size=size, context=context, register=register)
  except ValueError as error:
    raise PrepareError(str(error)) from None


# One writer per output folder (medjax/lock.py): two runs would race for its shards.
@lock.holding("out", "medjax prepare")
def prepare(layout: str, root, out, sources, targets, *, spacing=(1.0, 1.0, 1.0), size=256,
            context: int = 0, fractions=(0.8, 0.1, 0.1), seed: int = 0, workers: int = 1,
            strict: bool = False, register: str | None = None,
            progress: bool = True, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> dict:
  """Write shards and OUT/manifest.json; returns the manifest.

  Running again on the same `out` with the same settings only does the subjects that are
  not done yet. `strict` raises `PartialFailure` (after writing the manifest) if any
  subject was skipped. A volume of more than `max_voxels` voxels (on disk, or resampled
  to `spacing`) is a skipped subject, refused before it is allocated. A full or
  read-only disk stops the run with an `OSError` naming the file (the shards written so
  far stay complete); `out` is locked while it runs (medjax/lock.py).
  """
  root, out = Path(root).resolve(), Path(out)
  recipe = make_recipe(sources, targets, spacing=spacing, size=size, context=context,
                       register=register)
  settings = {"layout": layout, "fractions": [float(f) for f in fractions], "seed": int(seed),
              "storage": records.STORAGE}
  if register:
    try:
      import SimpleITK  # noqa: F401
    except ImportError as error:
      raise PrepareError("--register rigid needs SimpleITK: pip install 'medjax[itk]'") from error
  try:
    subjects = layouts.find_subjects(layout, root)
  except ValueError as error:
    raise PrepareError(str(error)) from None
  if not subjects:
    raise PrepareError(f"no {layout} subjects found under {root}")
  ids = [s.id for s in subjects]
  asked = {"settings": settings, "recipe": {k: v for k, v in recipe.to_dict().items()
                                            if k != "mask"}}
  manifest_path = out / MANIFEST
  if manifest_path.exists():
    previous = shards.load_manifest(out)
    before = {"settings": previous.get("settings"),
              "recipe": {k: v for k, v in (previous.get("recipe") or {}).items() if k != "mask"}}
    if before != asked:
      changed = sorted(k for part in asked for k in asked[part]
                       if (before[part] or {}).get(k) != asked[part][k])
      raise PrepareError(f"{out} was prepared with other settings ({', '.join(changed)});"
                         " use a new --output-dir")
    if previous.get("subjects") != ids:
      raise PrepareError(f"the subjects under {root} changed since {out} was started;"
                         " use a new --output-dir")

  refuse_shared_stems(ids, f"subjects under {root}")
  by_key = split_subjects([s.split_key for s in subjects], settings["fractions"], seed)
  split_of_key = {k: name for name, keys in by_key.items() for k in keys}
  planned = {s.id: split_of_key[s.split_key] for s in subjects}
  manifest = {"version": 2, "command": _command(settings, recipe, root, out, max_voxels),
              "root": str(root), "settings": settings, "recipe": recipe.to_dict(),
              "channels": _channels(recipe), "subjects": ids, "complete": False}
  for name in SPLITS:
    (out / name).mkdir(parents=True, exist_ok=True)
    files.remove_stale(out / name)  # left by an interrupted run
  files.remove_stale(out)
  files.write_json(manifest_path, manifest, indent=1)

  done, skipped, tasks = {}, [], []
  for index, subject in enumerate(subjects):
    shard = shard_path(out, planned[subject.id], subject.id)
    if shard.exists():
      done[subject.id] = _done_meta(shard, subject.id, planned[subject.id])
      continue
    reason = _missing_reason(subject, recipe.sources + recipe.targets)
    if reason:
      skipped.append({"subject": subject.id, "reason": reason})
      continue
    tasks.append({"subject": subject, "split": planned[subject.id], "index": index,
                  "out": str(out), "recipe": recipe.to_dict(), "max_voxels": max_voxels})

  from tqdm import tqdm
  bar = tqdm(total=len(tasks), desc="prepare", unit="subject", disable=not progress)
  if workers > 1 and len(tasks) > 1:
    # spawn: the parent may hold JAX's threads, which a fork would copy half-way.
    with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
      results = _collect(pool.imap_unordered(_prepare_one, tasks), bar)
  else:
    results = _collect(map(_prepare_one, tasks), bar)
  bar.close()
  for result in results:
    if "meta" in result:
      done[result["subject"]] = result["meta"]
    else:
      skipped.append({"subject": result["subject"], "reason": result["skipped"]})

  skipped.sort(key=lambda s: s["subject"])
  splits = {name: sorted(i for i in done if done[i]["split"] == name) for name in SPLITS}
  manifest["recipe"] = {**recipe.to_dict(), "mask": _mask_mode(done)}
  manifest.update({
      "complete": True,
      "splits": splits,
      "geometry": {i: done[i]["geometry"] for i in sorted(done)},
      "normalisation": {i: done[i]["normalisation"] for i in sorted(done)},
      # What each subject's sources look like (`inputs.describe`): training turns the
      # train split's into the run's inputs.json, which `translate` checks new files by.
      "inputs": {i: done[i].get("inputs") for i in sorted(done)},
      "slices": {i: done[i]["slices"] for i in sorted(done)},
      "counts": {
          "found": len(subjects), "prepared": len(done), "skipped": len(skipped),
          "subjects": {n: len(splits[n]) for n in SPLITS},
          "slices": {n: sum(len(done[i]["slices"]) for i in splits[n]) for n in SPLITS}},
      "skipped": skipped,
      "issues": {s.id: list(s.issues) for s in subjects if s.issues},
  })
  files.write_json(manifest_path, manifest, indent=1)
  _report(manifest, progress)
  if strict and skipped:
    raise PartialFailure(f"{len(skipped)} subject(s) skipped under --strict: "
                         + "; ".join(f"{s['subject']}: {s['reason']}" for s in skipped),
                         {s["subject"]: s["reason"] for s in skipped})
  return manifest


def _collect(results, bar) -> list[dict]:
  collected = []
  for result in results:
    if "stop" in result:  # a full or read-only disk stops the run (the pool is ended)
      bar.close()
      raise OSError(*result["stop"])
    collected.append(result)
    bar.update()
  return collected


def _report(manifest, verbose: bool):
  counts = manifest["counts"]
  lines = [f"prepared {counts['prepared']}/{counts['found']} subjects; slices " + ", ".join(
      f"{n} {counts['slices'][n]} ({counts['subjects'][n]} subjects)" for n in SPLITS)]
  empty = [n for n, f in zip(SPLITS, manifest["settings"]["fractions"])
           if f > 0 and not counts["subjects"][n]]
  if empty:
    lines.append(f"warning: no subject in the {' and '.join(empty)} split(s); training "
                 "needs at least one validation and one test subject")
  cropped = {i: g.get("body_cropped", 0.0) for i, g in manifest["geometry"].items()
             if g.get("body_cropped", 0.0) > CROP_WARNING}
  if cropped:
    worst = max(cropped, key=cropped.get)
    size = "x".join(map(str, manifest["recipe"]["size"]))
    lines.append(f"warning: --size {size} cuts off part of the body in {len(cropped)} "
                 f"subject(s) (up to {100 * cropped[worst]:.1f} % of the body mask, {worst}); "
                 "a larger --size or a coarser --spacing keeps it whole")
  if manifest["skipped"]:
    lines.append(f"skipped {len(manifest['skipped'])}:")
    lines += [f"  {s['subject']}: {s['reason']}" for s in manifest["skipped"]]
  if verbose or empty or cropped:
    print("\n".join(lines), file=sys.stderr)
