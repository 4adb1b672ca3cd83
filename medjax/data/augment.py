"""Per-record augmentation for the grain pipeline: geometry on all, intensity on the source.

One random in-plane transform (left-right flip, small rotation, isotropic scaling about
the slice centre) moves source, target and mask together, so the pair stays aligned; a
gain/bias jitter on the source alone teaches the model not to lean on the scanner's
calibration. Targets keep their intensities: they are what the model must reproduce.

Speed matters (the pipeline must outrun an accelerator on two CPU cores): the warp is a
bilinear gather in numpy whose taps and weights serve every channel (≈4× faster than
`scipy.ndimage.affine_transform` per channel), only a share `P_AFFINE` of records pays
for it, and a flip alone is a reversed view.
"""

from __future__ import annotations

import threading

import numpy as np

IMAGE_FILL = -1.0  # [-1, 1] background
MASK_FILL = 0.0
# Share of records rotated/scaled: nnU-Net's 20%, which also keeps the warp (≈0.9 ms
# per 256² pair) to a fifth of its cost, so two cores reach 2,000 pairs/s.
P_AFFINE = 0.2
# Spatial axes of a slice record (H, W, C) that augmentation mirrors: H, the left-right
# (RAS x) axis, the anatomically plausible flip. Mirror TTA mirrors the same axes
# (evaluate.predict_volume; docs/design.md, "Sliding windows, TTA and ensembles"); of a
# volume (Z, H, W, C) they are axes 1 + MIRROR_AXES, and of a 3D patch record
# (D, H, W, C) MIRROR_AXES_3D, the same H.
MIRROR_AXES = (0,)
MIRROR_AXES_3D = (1,)


def random_matrix(rng: np.random.Generator, *, flip: bool, rotate_deg: float,
                  scale: float) -> np.ndarray:
  """2×2 map from output to input pixel offsets (about the centre)."""
  theta = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg)) if rotate_deg else 0.0
  zoom = rng.uniform(1.0 - scale, 1.0 + scale) if scale else 1.0
  mirror = -1.0 if flip and rng.random() < 0.5 else 1.0
  cos, sin = np.cos(theta), np.sin(theta)
  # H is the left-right (RAS x) axis: mirroring it is the anatomically plausible flip.
  return np.array([[mirror * cos, -mirror * sin], [sin, cos]]) / zoom


_scratch = threading.local()


def _buffer(slot: str, shape, dtype) -> np.ndarray:
  """A per-thread work array, reused across calls.

  Fresh multi-megabyte temporaries cost more in page faults than the arithmetic itself
  (malloc hands large blocks back to the OS); grain maps records on several threads,
  hence one set per thread.
  """
  buffers = getattr(_scratch, "buffers", None)
  if buffers is None:
    buffers = _scratch.buffers = {}
  key = (slot, tuple(shape), np.dtype(dtype).str)
  if key not in buffers:
    buffers[key] = np.empty(shape, dtype)
  return buffers[key]


def warp(images, matrix: np.ndarray, fills, order: int = 1) -> list[np.ndarray]:
  """Resampling of (H, W, C) images: out[p] = image[matrix @ (p - c) + c].

  Each image has its `fill` outside. Equals scipy.ndimage.affine_transform(...,
  order=order, mode="grid-constant", cval=fill) per channel (order 1: bilinear, 0:
  nearest), at about a quarter of its cost: one set of taps and weights for every
  channel, float32 throughout, in-place arithmetic on long vectors, reused work arrays.
  """
  if order not in (0, 1):
    raise ValueError(f"order must be 0 (nearest) or 1 (bilinear), got {order}")
  height, width = images[0].shape[:2]
  pixels, padded_width = height * width, width + 2
  matrix = matrix.astype(np.float32)
  di = np.arange(height, dtype=np.float32) - np.float32((height - 1) / 2)
  dj = np.arange(width, dtype=np.float32) - np.float32((width - 1) / 2)
  rows = _buffer("rows", (height, width), np.float32)
  cols = _buffer("cols", (height, width), np.float32)
  # +1 everywhere: coordinates in a frame one pixel wider on each side (see below).
  np.add((matrix[0, 0] * di)[:, None], matrix[0, 1] * dj + np.float32((height + 1) / 2), out=rows)
  np.add((matrix[1, 0] * di)[:, None], matrix[1, 1] * dj + np.float32((width + 1) / 2), out=cols)
  if order == 0:  # nearest: floor(x + 0.5), so that ties round up as scipy does
    rows += np.float32(0.5)
    cols += np.float32(0.5)
  np.clip(rows, 0, height + 1, out=rows)
  np.clip(cols, 0, width + 1, out=cols)
  row0 = np.floor(rows, out=_buffer("row0", (height, width), np.float32))
  col0 = np.floor(cols, out=_buffer("col0", (height, width), np.float32))
  if order:  # the far tap must stay inside the frame: a coordinate on it gets weight 1
    np.minimum(row0, np.float32(height), out=row0)
    np.minimum(col0, np.float32(width), out=col0)
  rows -= row0  # now the fractional parts
  cols -= col0
  row0 *= np.float32(padded_width)
  row0 += col0  # flat index of the top-left tap: exact in float32 below 2**24
  frac_r, frac_c = rows.ravel(), cols.ravel()
  # Flat indices of the four taps, shared by every channel.
  taps_at = [_buffer(f"at{i}", (pixels,), np.intp) for i in range(4)]
  taps_at[0][...] = row0.ravel()
  for at, offset in zip(taps_at[1:], (1, padded_width, padded_width + 1) if order else ()):
    np.add(taps_at[0], offset, out=at)
  taps = [_buffer(f"tap{i}", (pixels,), np.float32) for i in range(4)]
  top_left, top_right, bottom_left, bottom_right = taps
  # A one-pixel frame of `fill` lets every out-of-range coordinate clip onto the frame.
  padded = _buffer("padded", (height + 2, padded_width), np.float32)
  flat = padded.ravel()

  outputs = []
  for image, fill in zip(images, fills):
    out = np.empty(image.shape, np.float32)
    padded[0] = padded[-1] = padded[:, 0] = padded[:, -1] = fill
    for k in range(image.shape[-1]):
      padded[1:-1, 1:-1] = image[..., k]
      if order == 0:
        out[..., k] = np.take(flat, taps_at[0], out=top_left).reshape(height, width)
        continue
      for tap, at in zip(taps, taps_at):
        np.take(flat, at, out=tap)
      top_right -= top_left
      top_right *= frac_c
      top_left += top_right  # the upper row, interpolated along columns
      bottom_right -= bottom_left
      bottom_right *= frac_c
      bottom_left += bottom_right
      bottom_left -= top_left
      bottom_left *= frac_r
      top_left += bottom_left
      out[..., k] = top_left.reshape(height, width)
    outputs.append(out)
  return outputs


def jitter_source(source: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                  amount: float, group: int | None = None) -> np.ndarray:
  """Gain on (source + 1) and bias inside the mask, so the background stays at -1.

  Channels in one `group` (a modality's 2.5D neighbours) share one gain and bias;
  `group=None` gives all source channels one.
  """
  channels = source.shape[-1]
  group = channels if group is None else group
  draws = -(-channels // group)
  gain = np.repeat(rng.uniform(1 - amount, 1 + amount, draws), group)[:channels]
  bias = np.repeat(rng.uniform(-amount, amount, draws), group)[:channels]
  out = (source + 1.0) * gain.astype(np.float32) - 1.0
  out += mask * bias.astype(np.float32)
  return np.clip(out, -1.0, 1.0, out=out)


def augment_record(record: dict, rng: np.random.Generator, *, flip: bool = True,
                   rotate_deg: float = 10.0, scale: float = 0.1, jitter: float = 0.1,
                   p_affine: float = P_AFFINE, order: int = 1,
                   jitter_group: int | None = None) -> dict:
  """A randomly transformed copy of a slice record (source, target, mask: (H, W, C)) or
  of a 3D patch ((D, H, W, C)).

  A fraction `p_affine` of records gets a rotation/scaling (the costly part, ≈1 ms at
  256² with bilinear `order=1`); the rest only a flip, which is free. A patch gets the
  same in-plane transform on every slice — a rotation about the superior–inferior axis,
  an in-plane scaling, a left-right flip — by folding D into the channels, so one set of
  taps serves the whole patch.
  """
  source, target, mask = record["source"], record["target"], record["mask"]
  out = dict(record)
  depth = source.shape[0] if source.ndim == 4 else None
  if depth is not None:
    fold = lambda a: np.moveaxis(a, 0, 2).reshape(*a.shape[1:3], depth * a.shape[-1])
    unfold = lambda a, c: np.moveaxis(a.reshape(*a.shape[:2], depth, c), 2, 0)
    channels = [a.shape[-1] for a in (source, target, mask)]
    source, target, mask = fold(source), fold(target), fold(mask)
  if (rotate_deg or scale) and rng.random() < p_affine:
    matrix = random_matrix(rng, flip=flip, rotate_deg=rotate_deg, scale=scale)
    source, target, mask = warp([source, target, mask], matrix,
                                [IMAGE_FILL, IMAGE_FILL, MASK_FILL], order)
    mask = (mask >= 0.5).astype(np.float32)
  elif flip and rng.random() < 0.5:
    # folded patches too: H is axis 0 after folding (MIRROR_AXES_3D of the patch)
    source, target, mask = (np.flip(a, MIRROR_AXES) for a in (source, target, mask))
  if depth is not None:
    source, target, mask = (unfold(a, c) for a, c in zip((source, target, mask), channels))
  if jitter:
    source = jitter_source(source, mask, rng, jitter, jitter_group)
  out["source"] = np.ascontiguousarray(source, np.float32)
  out["target"] = np.ascontiguousarray(target, np.float32)
  out["mask"] = np.ascontiguousarray(mask, np.float32)
  return out
