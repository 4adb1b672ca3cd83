"""The automatic body mask: what is body and what is air, for a volume given without a mask.

The mask decides which voxels the MR robust range (`intensity.MR_PERCENTILES` inside the
mask) is taken over, so a mask that loses half the head shifts the normalisation away from
the one the model was trained with; on the phantom, Otsu + largest component did exactly
that and cost a translated volume 13 dB.

Method, after the initial threshold of FSL BET (Smith 2002, "Fast robust automated brain
extraction", Human Brain Mapping 17:143-155):
1. the robust range: t2 and t98, the 2nd and 98th intensity percentiles. t2 is the
   background (air: Rayleigh noise on MR, -1000 HU on CT) whenever air fills more than
   2 % of the field of view, and t98 is bright tissue without the few outliers above it;
2. body = intensity above t2 + 10 % of (t98 - t2). Otsu's threshold splits the
   histogram's two largest classes and on MR falls between tissues (on the phantom's T1w
   between CSF and grey matter, so CSF and skull become a dark ring that cuts the scalp
   off the brain); 10 % of the robust range sits just above the air, MR and CT alike;
3. fill holes (enclosed air: sinuses, rectal and bowel gas, lungs; and the dark skull
   and CSF between the bright scalp and the brain) in every 2D plane along each of the
   three axes. A hole enclosed in 3D is enclosed in every plane through it, so this finds
   all a 3D fill would, and also the cavities open only where the volume cuts through
   the body (the cranium, open at the bottom slice of a head scan), whichever axis the
   cut is across;
4. keep the largest connected component: after filling, so that the scalp ring and the
   brain it encloses are one body and not two pieces of which the smaller is dropped;
   what is left out is what an air gap separates from the body (the CT couch, a
   head-rest, noise specks in the air).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

ROBUST_PERCENTILES = (2.0, 98.0)  # BET's t2 and t98
THRESHOLD_FRACTION = 0.1  # BET's t: t2 + 0.1 (t98 - t2)


def robust_threshold(volume: np.ndarray) -> float | None:
  """BET's body/air intensity threshold; None when the volume has one value only."""
  values = volume if np.isfinite(volume).all() else volume[np.isfinite(volume)]
  if values.size == 0:
    return None
  lo, hi = np.percentile(values, ROBUST_PERCENTILES)
  if not hi > lo:
    # 96 % or more of the voxels share one value: a body that small in a background of
    # exact zeros (or padding) is still a body, the full range separates it.
    lo, hi = values.min(), values.max()
    if not hi > lo:
      return None
  return float(lo + THRESHOLD_FRACTION * (hi - lo))


def _plane_structure(ndim: int, axes: tuple[int, int]) -> np.ndarray:
  """Face connectivity within the planes spanned by `axes` only: one
  `binary_fill_holes` call with it fills every such plane of the volume at once."""
  structure = np.zeros((3,) * ndim, bool)
  centre = [1] * ndim
  for axis in axes:
    for offset in (0, 2):
      index = list(centre)
      index[axis] = offset
      structure[tuple(index)] = True
  structure[tuple(centre)] = True
  return structure


def fill_holes(mask: np.ndarray) -> np.ndarray:
  """Holes filled in every plane through two of the axes (in 2D: the image's holes).

  No separate 3D fill: its holes are holes in each plane too, and the plane fills also
  catch cavities open to the volume's ends, which a 3D fill reaches from the border.
  """
  filled = np.asarray(mask, bool)
  for axes in itertools.combinations(range(filled.ndim), 2):
    filled = ndimage.binary_fill_holes(filled, structure=_plane_structure(filled.ndim, axes))
  return filled


def largest_component(mask: np.ndarray) -> np.ndarray:
  """The largest face-connected component (all False when there is none)."""
  labels, count = ndimage.label(mask)
  if count <= 1:
    return labels > 0
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0  # the background is not a component
  return labels == np.argmax(sizes)


def body_mask(volume: np.ndarray) -> np.ndarray:
  """Boolean body mask of an MR or CT volume (any orientation, 2D or 3D): BET's robust
  threshold, holes filled, then the largest connected component (module docstring)."""
  volume = np.asarray(volume)
  if volume.ndim not in (2, 3):
    raise ValueError(f"body_mask needs a 2D or 3D volume, got shape {volume.shape}")
  threshold = robust_threshold(volume)
  if threshold is None:
    return np.zeros(volume.shape, bool)
  body = volume > threshold  # NaN voxels compare False: not body unless enclosed
  return largest_component(fill_holes(body))
