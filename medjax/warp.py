"""Dense displacement fields: warping an image by one, and its smoothness penalty.

One implementation for 2D (B, H, W, C) and 3D (B, D, H, W, C) images; a displacement has
the image's spatial shape and one component per spatial axis, in voxels, in axis order
(2D: (dy, dx) along H, W). docs/design.md, "Registration-aware training".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def warp(image, displacement):
  """`image` resampled at p + displacement(p): out[b, p, c] = image[b, p + u(b, p), c].

  Linear interpolation (bilinear in 2D, trilinear in 3D); positions outside the grid take
  the nearest edge voxel (border clamp), so a shift never pulls in zeros the target lacks.
  Differentiable in both arguments. A constant u = +s gives out[p] = image[p + s], i.e.
  np.roll(image, -s) away from the borders (VoxelMorph's spatial transformer convention).
  """
  spatial = image.shape[1:-1]
  if displacement.shape != (*image.shape[:-1], len(spatial)):
    raise ValueError(f"displacement {displacement.shape} does not fit image {image.shape}: "
                     f"expected {(*image.shape[:-1], len(spatial))}")
  grid = jnp.meshgrid(*(jnp.arange(n, dtype=jnp.float32) for n in spatial), indexing="ij")
  coordinates = [g + displacement[..., axis] for axis, g in enumerate(grid)]  # each (B, *S)

  def one(channel, coords):  # channel (*S), coords: a list of (*S)
    return jax.scipy.ndimage.map_coordinates(channel, coords, order=1, mode="nearest")

  per_channel = jax.vmap(one, in_axes=(-1, None), out_axes=-1)  # over channels
  return jax.vmap(per_channel)(image, coordinates)  # over the batch


def smoothness(displacement):
  """Mean squared forward difference of the field, averaged over the spatial axes
  (VoxelMorph's 'l2' gradient loss, which RegGAN weights by 10): zero for a constant
  field; a ramp u_0 = a·x along one axis gives a² / (ndim · ndim) (one of ndim components
  changes, along one of ndim axes)."""
  axes = range(1, displacement.ndim - 1)
  return sum(jnp.mean(jnp.diff(displacement, axis=axis) ** 2) for axis in axes) / len(axes)
