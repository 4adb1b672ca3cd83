"""The registration network R of registration-aware training (docs/design.md,
"Registration-aware training"): a small U-Net over concat(moving, fixed) that outputs a
dense displacement field in voxels, one component per spatial axis.

Written for any number of spatial dimensions (2D slices today, volumes later); float32
throughout, since its output moves voxels and is only needed while training. The last
convolution is zero-initialised, so R starts at the identity (zero displacement) and the
corrected loss starts as the plain one.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from medjax.models.layers import zeros_init


class RegistrationNet(nn.Module):
  features: Sequence[int] = (16, 32, 32)  # one level each, halving the grid between them

  @nn.compact
  def __call__(self, moving, fixed):
    ndim = moving.ndim - 2
    kernel = (3,) * ndim
    factor = 2 ** (len(self.features) - 1)
    if any(n % factor for n in moving.shape[1:-1]):
      raise ValueError(f"RegistrationNet with {len(self.features)} levels needs every side "
                       f"divisible by {factor}, got {moving.shape[1:-1]}")
    act = lambda h: nn.leaky_relu(h, 0.2)  # VoxelMorph's activation
    h = jnp.concatenate([moving, fixed], axis=-1).astype(jnp.float32)
    skips = []
    for level, width in enumerate(self.features):
      h = act(nn.Conv(width, kernel)(h))
      if level < len(self.features) - 1:
        skips.append(h)
        h = act(nn.Conv(width, kernel, strides=(2,) * ndim)(h))
    for width in reversed(self.features[:-1]):
      for axis in range(1, ndim + 1):  # nearest upsampling, as the U-Net's
        h = jnp.repeat(h, 2, axis=axis)
      h = act(nn.Conv(width, kernel)(jnp.concatenate([h, skips.pop()], axis=-1)))
    return nn.Conv(ndim, kernel, kernel_init=zeros_init, bias_init=zeros_init)(h)
