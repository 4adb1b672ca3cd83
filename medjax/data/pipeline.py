"""The grain input pipeline and the held-out volumes evaluation runs on.

source → seeded shuffle (fresh order every epoch) → repeat → augment → batch →
this process's rows of each global batch → prefetch. Every stage is a random-access grain
`MapDataset`, so the iterator's whole state is one index: it goes into the checkpoint and
a resumed run reads exactly the next batch. Every process lays out the same global stream
and only reads (and augments) its own rows of it, so P processes train on exactly the
batches one process would.

Two sources yield the same slice records (docs/design.md, "Batch"): `PhantomSlices`, which
renders phantom subjects on the fly (the main job needs no files), and the ArrayRecord
shards written by `medjax prepare` (`medjax.data.shards.ShardSlices`).
"""

from __future__ import annotations

import functools
import os

import grain
import jax
import numpy as np

from medjax import any2any, metrics, modalities
from medjax.data import augment, inputs, intensity, patches, phantom
from medjax.data.preprocess import Recipe, Volume
from medjax.errors import ConfigError


PATCH_SEED_OFFSET = 2  # 3D patch placement: seed + 2 (order seed, augmentation seed + 1)
ANY2ANY_SEED_OFFSET = 3  # any-to-any's modality dropout draws: seed + 3
JITTER = 0.1  # augment.augment_record's default source intensity jitter


def _render(config, subject: int):
  """One phantom subject's volumes, its scoring mask and the [-1, 1] mapping of a modality
  (fitted in that mask; (X, Y, Z) → (Z, X, Y): one axial slice per leading index)."""
  p = config.data.phantom
  vols = phantom.generate(p.seed, subject, shape=tuple(p.shape), spacing=tuple(p.spacing))
  # A CBCT source sees only its field of view: the mask (scoring, the baseline) is the head
  # inside it, as SynthRAD Task 2's masks are (docs/design.md, "The phantom").
  sources = modalities.as_tuple(config.data.source)
  mask = vols["cbct_mask"] if "cbct" in sources else vols["mask"]

  def unit(modality):
    params = intensity.fit(vols[modality], modality, mask)
    return np.moveaxis(intensity.normalise(vols[modality], params), -1, 0), params

  return vols, mask, unit


def phantom_volume(config, subject: int) -> Volume:
  """Render and normalise one phantom subject (axial slices first)."""
  p = config.data.phantom
  vols, mask, unit = _render(config, subject)
  sources = [unit(m)[0] for m in modalities.as_tuple(config.data.source)]
  aligned = None
  misalign = float(p.get("misalign", 0.0))
  if misalign > 0:  # an imperfect pair: the target from another session (docs/design.md)
    t = config.data.target
    aligned = vols[t]
    vols[t] = phantom.misalign(aligned, tuple(p.spacing), p.seed, subject, misalign)
  target, target_params = unit(config.data.target)
  if aligned is not None:  # the truth, scaled as the target training sees
    aligned = np.moveaxis(intensity.normalise(aligned, target_params), -1, 0)[..., None]
  return Volume(
      subject=f"phantom_{subject:03d}",
      source=np.stack(sources, -1),
      target=target[..., None],
      mask=np.moveaxis(mask, -1, 0)[..., None].astype(np.float32),
      target_params=target_params, target_aligned=aligned)


def phantom_number(subject_id: str) -> int:
  """`phantom_volume`'s subject id (phantom_003) → the subject number (3)."""
  prefix = "phantom_"
  if not (subject_id.startswith(prefix) and subject_id[len(prefix):].isdigit()):
    raise ValueError(f"{subject_id!r} is not a phantom subject")
  return int(subject_id[len(prefix):])


def phantom_images(config, subject: int, modalities):
  """One phantom subject's `modalities`, normalised as `phantom_volume` normalises them
  (the real, aligned images: no misalignment), with its tissue labels (`phantom.TISSUES`)
  and mask: ((Z, H, W, M) float32 in [-1, 1], (Z, H, W) uint8, (Z, H, W, 1) float32)."""
  vols, mask, unit = _render(config, subject)
  images = np.stack([unit(m)[0] for m in modalities], -1)
  return (images, np.moveaxis(vols["labels"], -1, 0),
          np.moveaxis(mask, -1, 0)[..., None].astype(np.float32))


class PhantomSlices(grain.sources.RandomAccessDataSource):
  """Axial slice pairs of phantom subjects, rendered on first use and cached."""

  def __init__(self, config, subjects):
    self._config = config
    self._subjects = list(subjects)
    self._depth = int(config.data.phantom.shape[2])
    self._cache: dict[int, Volume] = {}

  def __len__(self):
    return len(self._subjects) * self._depth

  def _volume(self, position: int) -> Volume:
    if position not in self._cache:
      self._cache[position] = phantom_volume(self._config, self._subjects[position])
    return self._cache[position]

  def __getitem__(self, index):
    position, z = divmod(int(index), self._depth)
    volume = self._volume(position)
    return {"source": volume.source[z], "target": volume.target[z], "mask": volume.mask[z],
            "subject": np.int32(self._subjects[position]), "slice": np.int32(z)}

  def __getstate__(self):  # worker processes render their own cache
    return {**self.__dict__, "_cache": {}}

  def __repr__(self):
    return f"PhantomSlices(subjects={self._subjects})"


def phantom_split(config) -> dict[str, list[int]]:
  return phantom.split_subjects(config.data.phantom.subjects)


def train_source(config):
  if config.data.kind == "phantom":
    return PhantomSlices(config, phantom_split(config)["train"])
  from medjax.data import shards
  check_shards(config)
  return shards.ShardSlices(config.data.dir, "train")


def recipe(config) -> Recipe:
  """How the training slices are made: the phantom grid, or the shards' recipe."""
  if config.data.kind == "phantom":
    return Recipe.of_phantom(config)
  made = check_shards(config)
  if made.context and any2any.enabled(config):
    raise ConfigError(f"{config.data.dir} was prepared with --context {made.context}; an "
                      "any-to-any run (data.any2any) needs shards prepared with --context 0")
  if made.context and is_volumetric(config):
    # 2.5D neighbour slices are 2D's stand-in for depth; a 3D model sees depth itself.
    raise ConfigError(f"{config.data.dir} was prepared with --context {made.context}; a 3D "
                      "model (model.dims=3) needs shards prepared with --context 0")
  return made


def check_shards(config) -> Recipe:
  """The shard folder's recipe, after checking it is what the config asks for."""
  from medjax.data import shards
  if not os.path.isfile(os.path.join(config.data.dir, "manifest.json")):
    raise ConfigError(
        f"data.dir={config.data.dir!r} holds no manifest.json: run `medjax prepare` first")
  made = shards.recipe(config.data.dir)
  asked = {"sources": modalities.as_tuple(config.data.source), "targets": (config.data.target,)}
  for key, value in asked.items():
    if getattr(made, key) != value:
      raise ConfigError(f"{config.data.dir} was prepared with {key}={list(getattr(made, key))},"
                        f" the config asks {list(value)}")
  return made


def check_splits(config) -> None:
  """Refuse, before training, a held-out split without subjects: evaluation needs one."""
  if config.data.kind == "phantom":
    counts = {name: len(ids) for name, ids in phantom_split(config).items()}
    where = f"data.phantom.subjects={config.data.phantom.subjects}"
  else:
    from medjax.data import shards
    counts = {name: len(shards.shard_paths(config.data.dir, name)) for name in ("val", "test")}
    where = f"{config.data.dir}"
  for name in ("val", "test"):
    if not counts.get(name):
      raise ConfigError(f"the {name} split of {where} has no subject; evaluation needs at "
                        "least one (more subjects, or other split fractions)")
  if config.data.kind == "shards":
    from medjax.data import shards
    short = {meta["subject"]: len(meta["slices"]) for name in ("val", "test")
             for meta in shards.split_metadata(config.data.dir, name)
             if len(meta["slices"]) < metrics.MIN_SIDE}
    if short:
      raise ConfigError(f"held-out subjects of {config.data.dir} with fewer foreground slices "
                        f"than the evaluation's {metrics.MIN_SIDE}-voxel SSIM window: "
                        + ", ".join(f"{s} ({n})" for s, n in sorted(short.items())))


def training_inputs(config) -> dict:
  """The range of every `inputs.describe` statistic over the training subjects: what
  `medjax translate` checks a new input against (a run's inputs.json). {} when the
  shards were prepared before medjax recorded them."""
  if config.data.kind == "phantom":
    p = config.data.phantom
    # any-to-any: every modality of the set is an input of some direction
    sources = any2any.modalities(config) or modalities.as_tuple(config.data.source)
    descriptions = []
    for subject in phantom_split(config)["train"]:
      vols = phantom.generate(p.seed, subject, shape=tuple(p.shape), spacing=tuple(p.spacing))
      head = vols["cbct_mask"] if "cbct" in sources else vols["mask"] > 0
      descriptions.append(inputs.describe({m: vols[m] for m in sources}, head,
                                          ras_shape=tuple(p.shape), ras_spacing=p.spacing,
                                          grid_spacing=p.spacing))
    return inputs.envelope(descriptions)
  from medjax.data import shards
  manifest = shards.load_manifest(config.data.dir)
  described = manifest.get("inputs") or {}
  train = (manifest.get("splits") or {}).get("train") or []
  return inputs.envelope([described.get(i) for i in train if isinstance(described.get(i), dict)])


def eval_volumes(config, split: str) -> list[Volume]:
  """The held-out subjects of `split` ('val' or 'test'), whole volumes."""
  if config.data.kind == "phantom":
    return [phantom_volume(config, s) for s in phantom_split(config)[split]]
  from medjax.data import shards
  return shards.split_volumes(config.data.dir, split)


def _augment(record, rng, jitter_group=None, jitter=JITTER):
  return augment.augment_record(record, rng, jitter_group=jitter_group, jitter=jitter)


def any2any_record(record, rng, *, index, jitter: float = 0.0):
  """Modality dropout on one (augmented) record: its source and target channels become
  the images of the run's M modalities (`index`), a target and a non-empty available set
  of the others are drawn (`any2any.draw`), the available images get the source intensity
  jitter, and the record becomes that direction's model input and target
  (docs/design.md, "Any-to-any synthesis"). The target keeps its true intensities."""
  images = any2any.images_of(record["source"], record["target"], index)
  target, available = any2any.draw(rng, images.shape[-1])
  inputs = augment.jitter_source(images, record["mask"], rng, jitter, 1) if jitter else images
  out = dict(record)
  out["source"] = np.ascontiguousarray(any2any.model_input(inputs, available, target),
                                       np.float32)
  out["target"] = np.ascontiguousarray(images[..., target:target + 1], np.float32)
  return out


def _shuffled(source, seed: int) -> grain.MapDataset:
  return grain.MapDataset.source(source).shuffle(seed=seed).repeat()


def _unpair(pair):
  """Source of one slice, target of another: nothing links them but the modality."""
  a, b = pair
  return {"source": a["source"], "target": b["target"], "mask": b["mask"],
          "subject": a["subject"], "slice": a["slice"]}


def make_dataset(source, *, seed: int, batch_size: int, augment: bool = True,
                 process_index: int | None = None, process_count: int | None = None,
                 workers: int = 0, target_source=None,
                 jitter_group: int | None = None, dropout=None) -> grain.IterDataset:
  """Batches of `batch_size` records (this process's share of the global batch).

  With `target_source`, the pipeline is unpaired: targets come from it in an
  independent permutation while sources come from `source`. `jitter_group`: source
  channels per modality (2.5D neighbours share one intensity jitter). `dropout`:
  any-to-any's per-record draw (`any2any_record` with its index bound), after
  augmentation, which then leaves intensities to it.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  ds = _shuffled(source, seed)
  if target_source is not None:
    targets = _shuffled(target_source, seed + 7919)
    ds = grain.experimental.ZipMapDataset([ds, targets]).map(_unpair)
  if augment:
    # Seeded by global position: the same on any number of processes.
    ds = ds.random_map(functools.partial(_augment, jitter_group=jitter_group,
                                         jitter=0.0 if dropout else JITTER), seed=seed + 1)
  if dropout is not None:
    ds = ds.random_map(functools.partial(dropout, jitter=JITTER if augment else 0.0),
                       seed=seed + ANY2ANY_SEED_OFFSET)
  # Global batch g is local batches g·P … g·P+P-1 of the one global stream; process i keeps
  # the i-th, which is the rows `make_array_from_process_local_data` expects of it. The
  # maps above are lazy, so a process never reads or augments the other processes' rows.
  ds = ds.batch(batch_size, drop_remainder=True)[process_index::process_count]
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4 * batch_size))
  if workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a notebook has none
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it


def is_volumetric(config) -> bool:
  """A 3D run: the model sees (D, H, W) patches, not slices (model.dims=3)."""
  return config.model.get("dims", 2) == 3


def volume_store(config, subjects=None):
  """The training subjects as volumes (3D patches are cut from them)."""
  if config.data.kind == "phantom":
    subjects = phantom_split(config)["train"] if subjects is None else subjects
    return patches.PhantomVolumes(functools.partial(phantom_volume, config), subjects)
  check_shards(config)
  return patches.ShardVolumes(config.data.dir, "train")


def patch_source(config, store, seed_offset: int = PATCH_SEED_OFFSET):
  return patches.PatchSource(store, tuple(config.data.patch), seed=config.seed + seed_offset,
                             foreground=config.data.get("foreground", 1 / 3))


def train_dataset(config) -> grain.IterDataset:
  global_batch = config.train.batch_size
  if global_batch % jax.process_count():
    raise ConfigError(
        f"train.batch_size={global_batch} is not divisible by {jax.process_count()} processes")
  if is_volumetric(config):
    source, target_source = volumetric_sources(config)
  else:
    source, target_source = train_source(config), None
    if config.data.unpaired:
      source, target_source = unpaired_sources(config)
  return make_dataset(source, seed=config.seed, batch_size=global_batch // jax.process_count(),
                      augment=config.data.augment, workers=config.data.workers,
                      target_source=target_source,
                      jitter_group=2 * recipe(config).context + 1,
                      dropout=dropout(config))


def dropout(config):
  """Any-to-any's record map (`any2any_record` for this config), or None."""
  if not any2any.enabled(config):
    return None
  return functools.partial(any2any_record, index=any2any.channel_index(config))


def volumetric_sources(config):
  """3D patch sources: (patches, None), or unpaired (source patches, target patches) from
  disjoint halves of the phantom's subjects / independently placed in the shards."""
  if not config.data.unpaired:
    return patch_source(config, volume_store(config)), None
  if config.data.kind == "phantom":
    subjects = phantom_split(config)["train"]
    if len(subjects) < 2:
      raise ConfigError("data.unpaired needs at least 2 training subjects")
    half = len(subjects) // 2
    return (patch_source(config, volume_store(config, subjects[:half])),
            patch_source(config, volume_store(config, subjects[half:]), PATCH_SEED_OFFSET + 1))
  store = volume_store(config)
  return patch_source(config, store), patch_source(config, store, PATCH_SEED_OFFSET + 1)


def unpaired_sources(config):
  """Where unpaired sources and targets come from.

  Phantom: disjoint halves of the training subjects, so no target ever belongs to the
  subject its source came from. Shards: the same slices in independent permutations.
  """
  if config.data.kind == "phantom":
    subjects = phantom_split(config)["train"]
    if len(subjects) < 2:
      raise ConfigError("data.unpaired needs at least 2 training subjects")
    half = len(subjects) // 2
    return PhantomSlices(config, subjects[:half]), PhantomSlices(config, subjects[half:])
  source = train_source(config)
  return source, source
