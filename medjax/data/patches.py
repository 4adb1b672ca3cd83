"""3D patches of subject volumes, the records of volumetric training (docs/design.md,
"3D patches").

A volume store holds subjects as (Z, H, W, C) model-scale arrays and reads a run of
slices on demand: `PhantomVolumes` renders phantom subjects (cached), `ShardVolumes` reads
a subject's shard — the same ArrayRecord files 2D training reads, one record per
foreground slice, each compressed on its own — so a patch decodes only its D slices, never
the whole volume. `PatchSource` is a grain random-access source of patches: record i is
subject i mod N, placed by a generator seeded with (seed, i), so the stream is a pure
function of the index (exact resume) and fresh patches keep coming for
`DRAWS_PER_SUBJECT` records per subject before an epoch repeats.

Placement follows nnU-Net: a share `foreground` of the patches is centred on a random
body-mask voxel, the rest lie uniformly among all positions inside the volume; a volume
smaller than the patch is padded at its end with the background (-1, mask 0).
"""

from __future__ import annotations

import numpy as np

from medjax.data import augment
from medjax.errors import UserError

DRAWS_PER_SUBJECT = 4096  # records per subject before the (shuffled) index repeats
FOREGROUND_POINTS = 4096  # body voxels kept per subject to centre foreground patches on


def _subsample(points: np.ndarray, seed: int) -> np.ndarray:
  if len(points) <= FOREGROUND_POINTS:
    return points
  keep = np.random.default_rng(seed).choice(len(points), FOREGROUND_POINTS, replace=False)
  return points[np.sort(keep)]


class PhantomVolumes:
  """Phantom subjects as volumes, `render(subject)` → Volume (`pipeline.phantom_volume`),
  rendered on first use and cached per process."""

  def __init__(self, render, subjects):
    self._render, self._subjects = render, list(subjects)
    self._cache, self._points = {}, {}

  def __len__(self):
    return len(self._subjects)

  def _volume(self, position):
    if position not in self._cache:
      self._cache[position] = self._render(self._subjects[position])
    return self._cache[position]

  def subject(self, position) -> int:
    return self._subjects[position]

  def shape(self, position) -> tuple[int, int, int]:
    return self._volume(position).source.shape[:3]

  def window(self, position, z0: int, z1: int) -> dict:
    volume = self._volume(position)
    return {"source": volume.source[z0:z1], "target": volume.target[z0:z1],
            "mask": volume.mask[z0:z1]}

  def foreground(self, position) -> np.ndarray:
    if position not in self._points:
      points = np.argwhere(self._volume(position).mask[..., 0] > 0)
      self._points[position] = _subsample(points, position)
    return self._points[position]

  def __getstate__(self):  # worker processes render their own
    return {**self.__dict__, "_cache": {}, "_points": {}}


class ShardVolumes:
  """A split's subjects as volumes of their foreground slices, in slice order (the volume
  `shards.split_volumes` rebuilds), read a run of slices at a time."""

  def __init__(self, directory, split: str):
    from medjax.data import shards
    self._slices = shards.ShardSlices(directory, split)
    self._offsets, self._depths, self._order = [], [], []
    offset = 0
    for path in shards.shard_paths(directory, split):
      meta = shards.subject_meta(shards.meta_path(path))
      slices = meta["slices"]
      # records are written in `slices` order; the volume stacks them by z
      self._order.append(np.argsort(slices, kind="stable"))
      self._offsets.append(offset)
      self._depths.append(len(slices))
      offset += len(slices)
    if offset != len(self._slices):
      raise UserError(f"{directory}/{split}: its shards hold {len(self._slices)} slices, "
                      f"their json files list {offset}; delete the folder and run "
                      "`medjax prepare` again")
    self._points, self._shape = {}, None

  def __len__(self):
    return len(self._depths)

  def subject(self, position) -> int:
    return position

  def _plane(self):
    if self._shape is None:
      self._shape = self._slices[0]["source"].shape[:2]
    return self._shape

  def shape(self, position) -> tuple[int, int, int]:
    return (self._depths[position], *self._plane())

  def window(self, position, z0: int, z1: int) -> dict:
    indices = [self._offsets[position] + int(i) for i in self._order[position][z0:z1]]
    records = self._slices.__getitems__(indices)
    return {key: np.stack([r[key] for r in records]) for key in ("source", "target", "mask")}

  def foreground(self, position) -> np.ndarray:
    # One pass over the subject's slices, on its first foreground draw (per process).
    if position not in self._points:
      mask = self.window(position, 0, self._depths[position])["mask"][..., 0]
      self._points[position] = _subsample(np.argwhere(mask > 0), position)
    return self._points[position]


def place(shape, patch, rng: np.random.Generator, points: np.ndarray | None) -> tuple:
  """The patch's first voxel: centred on one of `points` (clipped into the volume), or
  uniform over the positions where it lies inside (0 where the volume is smaller)."""
  room = [max(n - p, 0) for n, p in zip(shape, patch)]
  if points is not None and len(points):
    centre = points[rng.integers(len(points))]
    return tuple(int(np.clip(c - p // 2, 0, r)) for c, p, r in zip(centre, patch, room))
  return tuple(int(rng.integers(0, r + 1)) for r in room)


def cut(store, position: int, start, patch) -> dict:
  """The (D, H, W, C) patch at `start`, padded at the far ends with the background."""
  (z0, y0, x0), (depth, height, width) = start, patch
  window = store.window(position, z0, z0 + depth)
  out = {}
  for key, fill in (("source", augment.IMAGE_FILL), ("target", augment.IMAGE_FILL),
                    ("mask", augment.MASK_FILL)):
    values = window[key][:, y0:y0 + height, x0:x0 + width]
    pad = [(0, p - n) for p, n in zip(patch, values.shape[:3])] + [(0, 0)]
    if any(after for _, after in pad):
      values = np.pad(values, pad, constant_values=fill)
    out[key] = np.ascontiguousarray(values, np.float32)
  return out


class PatchSource:
  """Random-access 3D patch records (docs/design.md, "Batch"): `source`, `target`, `mask`
  (D, H, W, C), `subject`, and `slice` = the patch's first z."""

  def __init__(self, store, patch, *, seed: int, foreground: float = 1 / 3):
    if len(store) == 0:
      raise UserError("no training subjects to cut 3D patches from")
    self._store, self._patch = store, tuple(int(p) for p in patch)
    self._seed, self._foreground = int(seed), float(foreground)

  def __len__(self):
    return len(self._store) * DRAWS_PER_SUBJECT

  def __getitem__(self, index):
    index = int(index)
    position = index % len(self._store)
    rng = np.random.default_rng([self._seed, index])
    points = self._store.foreground(position) if rng.random() < self._foreground else None
    start = place(self._store.shape(position), self._patch, rng, points)
    record = cut(self._store, position, start, self._patch)
    return {**record, "subject": np.int32(self._store.subject(position)),
            "slice": np.int32(start[0])}

  def __repr__(self):
    return f"PatchSource(patch={self._patch}, subjects={len(self._store)})"
