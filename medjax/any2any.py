"""Any-to-any multi-contrast synthesis: one network for every (available set → target).

The model input of an any-to-any run is 3·M channels for the M modalities of
`data.modalities` (docs/design.md, "Any-to-any synthesis"):

  [images · available (M) | available (M) | one-hot target (M)]

the images on the [-1, 1] scale with every missing modality zeroed, the availability mask
broadcast over the grid, and the target modality one-hot, also broadcast. The layout keeps
the translator protocol as it is: a batch's `source`, a volume's sliding windows, mirror
TTA and ensembles all carry the direction with the pixels. The backbone wrapper
(`models.conditioned`) multiplies the images by the mask again (so garbage in a missing
channel never reaches the network) and reads the target as a learned embedding.

Pure array functions (numpy or jax.numpy through `xp`), imported by the data pipeline,
the models, evaluation and inference alike.
"""

from __future__ import annotations

import itertools

import numpy as np

from medjax import modalities as modalities_lib

GROUPS = 3  # images, availability, target one-hot
DIRECTIONS = ("standard", "missing_one")


def enabled(config) -> bool:
  return bool(config.data.get("any2any", False))


def modalities(config) -> tuple[str, ...]:
  """The run's modality set in channel order: `data.modalities`, or the prepared channels
  `data.source` + `data.target` when it is empty. () for a one-direction run."""
  if not enabled(config):
    return ()
  named = tuple(config.data.get("modalities", ()) or ())
  if named:
    return named
  channels = modalities_lib.as_tuple(config.data.source) + (config.data.target,)
  return tuple(dict.fromkeys(channels))


def channel_index(config) -> list[int]:
  """Where each of `modalities(config)` sits in a record's source + target channels."""
  channels = modalities_lib.as_tuple(config.data.source) + (config.data.target,)
  return [channels.index(m) for m in modalities(config)]


def images_of(source, target, index):
  """A record's (…, Cs) source and (…, 1) target → (…, M) images in `index` order."""
  stacked = np.concatenate([source, target], axis=-1)
  return stacked[..., index]


def model_input(images, available, target: int, xp=np):
  """(…, M) images, (M,) availability (0/1), target index → the (…, 3M) model input."""
  count = images.shape[-1]
  available = xp.asarray(available, images.dtype)
  onehot = xp.asarray(np.eye(count, dtype=np.float32)[target], images.dtype)
  shape = images.shape[:-1] + (count,)
  return xp.concatenate([images * available, xp.broadcast_to(available, shape),
                         xp.broadcast_to(onehot, shape)], axis=-1)


def split(source, count: int):
  """The (B, …, 3M) model input → images (B, …, M) with missing ones zeroed, availability
  (B, M) and target one-hot (B, M), read at each example's first voxel (they are constant
  over the grid by construction)."""
  if source.shape[-1] != GROUPS * count:
    raise ValueError(f"an any-to-any model over {count} modalities takes {GROUPS * count} "
                     f"input channels, got {source.shape[-1]}")
  images = source[..., :count]
  first = source[(slice(None),) + (0,) * (source.ndim - 2)]  # (B, 3M)
  available = first[:, count:2 * count]
  onehot = first[:, 2 * count:]
  return images * available.reshape(available.shape[:1] + (1,) * (source.ndim - 2)
                                    + (count,)), available, onehot


def draw(rng: np.random.Generator, count: int) -> tuple[int, np.ndarray]:
  """Modality dropout: a target uniform over the M modalities, then an available set
  uniform over the 2^(M−1) − 1 non-empty subsets of the others."""
  target = int(rng.integers(count))
  others = [m for m in range(count) if m != target]
  subset = int(rng.integers(1, 2 ** len(others)))  # bit j: others[j] available
  available = np.zeros(count, np.float32)
  for bit, m in enumerate(others):
    if subset >> bit & 1:
      available[m] = 1.0
  return target, available


def directions(names, which: str = "standard") -> list[tuple[tuple[str, ...], str]]:
  """The (available, target) directions an evaluation reports: each modality missing
  with all the others given, and ('standard') every one-input direction."""
  if which not in DIRECTIONS:
    raise ValueError(f"eval.directions={which!r}: expected one of "
                     f"{', '.join(map(repr, DIRECTIONS))}")
  names = tuple(names)
  out = [(tuple(m for m in names if m != target), target) for target in names]
  if which == "standard":
    out += [((given,), target) for target, given in itertools.permutations(names, 2)]
  return list(dict.fromkeys(out))


def direction_name(available, target: str) -> str:
  return f"{'+'.join(available)}>{target}"


def condition(images, names, available, target: str, xp=np):
  """The model input for named `available` modalities → `target` over `names`."""
  names = tuple(names)
  unknown = [m for m in (*available, target) if m not in names]
  if unknown:
    raise ValueError(f"modality {unknown[0]!r} is not one of this run's {', '.join(names)}")
  mask = np.array([1.0 if m in available else 0.0 for m in names], np.float32)
  return model_input(images, mask, names.index(target), xp=xp)
