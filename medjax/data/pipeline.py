"""The grain input pipeline and the held-out volumes evaluation runs on.

source → seeded shuffle (fresh order every epoch) → repeat → augment → batch →
this process's rows of each global batch → prefetch. Every stage is a random-access grain
`MapDataset`, so the iterator's whole state is one index: it goes into the checkpoint and
a resumed run reads exactly the next batch. Every process lays out the same global stream
and only reads (and augments) its own rows of it, so P processes train on exactly the
batches one process would.

Two sources yield the same slice records (DESIGN.md, "Batch"): `PhantomSlices`, which
renders phantom subjects on the fly (the main job needs no files), and the ArrayRecord
shards written by `medjax prepare` (`medjax.data.shards.ShardSlices`).
"""

from __future__ import annotations

import dataclasses

import grain
import jax
import numpy as np

from medjax import config as config_lib
from medjax.data import intensity, phantom


@dataclasses.dataclass
class Volume:
  """One held-out subject, normalised, as axial slices: arrays are (Z, H, W, C)."""
  subject: str
  source: np.ndarray
  target: np.ndarray
  mask: np.ndarray
  target_params: dict  # intensity.denormalise parameters of the target modality

  def records(self):
    for z in range(self.source.shape[0]):
      yield {"source": self.source[z], "target": self.target[z], "mask": self.mask[z]}


def phantom_volume(config, subject: int) -> Volume:
  """Render and normalise one phantom subject (axial slices first)."""
  p = config.data.phantom
  vols = phantom.generate(p.seed, subject, shape=tuple(p.shape), spacing=tuple(p.spacing))
  mask = vols["mask"]

  def unit(modality):
    params = intensity.fit(vols[modality], modality, mask)
    # (X, Y, Z) → (Z, X, Y): one axial slice per leading index.
    return np.moveaxis(intensity.normalise(vols[modality], params), -1, 0), params

  sources = [unit(m)[0] for m in config_lib.source_modalities(config)]
  target, target_params = unit(config.data.target)
  return Volume(
      subject=f"phantom_{subject:03d}",
      source=np.stack(sources, -1),
      target=target[..., None],
      mask=np.moveaxis(mask, -1, 0)[..., None].astype(np.float32),
      target_params=target_params)


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


def check_shards(config) -> dict:
  """The shard folder's prepare settings, after checking they are what the config asks."""
  from medjax.data import shards
  import os
  if not os.path.isfile(os.path.join(config.data.dir, "manifest.json")):
    raise config_lib.ConfigError(
        f"data.dir={config.data.dir!r} holds no manifest.json: run `medjax prepare` first")
  settings = shards.load_manifest(config.data.dir)["settings"]
  asked = {"sources": list(config_lib.source_modalities(config)), "targets": [config.data.target]}
  for key, value in asked.items():
    if settings[key] != value:
      raise config_lib.ConfigError(
          f"{config.data.dir} was prepared with {key}={settings[key]}, the config asks {value}")
  return settings


def baseline_channel(config) -> int:
  """The source channel holding the first modality's centre slice (2.5D context aside)."""
  if config.data.kind == "phantom":
    return 0
  return int(check_shards(config)["context"])


def eval_volumes(config, split: str) -> list[Volume]:
  """The held-out subjects of `split` ('val' or 'test'), whole volumes."""
  if config.data.kind == "phantom":
    return [phantom_volume(config, s) for s in phantom_split(config)[split]]
  from medjax.data import shards
  return shards.split_volumes(config.data.dir, split)


def _augment(record, rng):
  from medjax.data import augment
  return augment.augment_record(record, rng)


def _shuffled(source, seed: int) -> grain.MapDataset:
  return grain.MapDataset.source(source).shuffle(seed=seed).repeat()


def _unpair(pair):
  """Source of one slice, target of another: nothing links them but the modality."""
  a, b = pair
  return {"source": a["source"], "target": b["target"], "mask": b["mask"],
          "subject": a["subject"], "slice": a["slice"]}


def make_dataset(source, *, seed: int, batch_size: int, augment: bool = True,
                 process_index: int | None = None, process_count: int | None = None,
                 workers: int = 0, target_source=None) -> grain.IterDataset:
  """Batches of `batch_size` records (this process's share of the global batch).

  With `target_source`, the pipeline is unpaired: targets come from it in an
  independent permutation while sources come from `source`.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  ds = _shuffled(source, seed)
  if target_source is not None:
    targets = _shuffled(target_source, seed + 7919)
    ds = grain.experimental.ZipMapDataset([ds, targets]).map(_unpair)
  if augment:
    ds = ds.random_map(_augment, seed=seed + 1)  # seeded by global position: same on any P
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


def train_dataset(config) -> grain.IterDataset:
  global_batch = config.train.batch_size
  if global_batch % jax.process_count():
    raise config_lib.ConfigError(
        f"train.batch_size={global_batch} is not divisible by {jax.process_count()} processes")
  source, target_source = train_source(config), None
  if config.data.unpaired:
    source, target_source = unpaired_sources(config)
  return make_dataset(source, seed=config.seed, batch_size=global_batch // jax.process_count(),
                      augment=config.data.augment, workers=config.data.workers,
                      target_source=target_source)


def unpaired_sources(config):
  """Where unpaired sources and targets come from.

  Phantom: disjoint halves of the training subjects, so no target ever belongs to the
  subject its source came from. Shards: the same slices in independent permutations.
  """
  if config.data.kind == "phantom":
    subjects = phantom_split(config)["train"]
    if len(subjects) < 2:
      raise config_lib.ConfigError("data.unpaired needs at least 2 training subjects")
    half = len(subjects) // 2
    return PhantomSlices(config, subjects[:half]), PhantomSlices(config, subjects[half:])
  source = train_source(config)
  return source, source
