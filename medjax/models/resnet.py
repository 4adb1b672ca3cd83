"""CycleGAN ResNet generator (Johnson et al. 2016; Zhu et al. 2017), c7s1-64, d128, d256,
R256 x num_blocks, u128, u64, c7s1-out, tanh.

`dtype` is the compute dtype of every layer but the last (c7s1-out and tanh run in
float32); parameters and instance-norm statistics stay float32. `remat` recomputes each
residual block's activations in the backward pass. `dims` (2 | 3) is the inputs' number of
spatial axes: (B, H, W, C) slices or (B, D, H, W, C) volumes, kernels k^dims.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medjax.models.layers import (check_input, compute_dtype, instance_norm, kernel,
                                  maybe_remat, spatial_dims)


def reflect_pad(x, width: int):
  """`width` voxels of reflection on both sides of every spatial axis."""
  # reflection rather than zero padding: zero borders leak artefacts into synthetic images.
  return jnp.pad(x, ((0, 0), *((width, width),) * spatial_dims(x), (0, 0)), mode="reflect")


class ResidualBlock(nn.Module):
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k3 = kernel(3, spatial_dims(x))
    h = nn.Conv(self.channels, k3, padding="VALID", dtype=self.dtype)(reflect_pad(x, 1))
    h = nn.relu(instance_norm(dtype=self.dtype)(h))
    h = nn.Conv(self.channels, k3, padding="VALID", dtype=self.dtype)(reflect_pad(h, 1))
    return x + instance_norm(dtype=self.dtype)(h)


class ResNetGenerator(nn.Module):
  out_channels: int
  channels: int = 64
  num_blocks: int = 9
  dtype: str = "float32"
  remat: bool = False
  dims: int = 2

  @nn.compact
  def __call__(self, source, *, train: bool):
    del train  # instance norm keeps no running statistics; no dropout
    check_input(source, self.dims, 4, "ResNetGenerator (it downsamples twice)")
    dims = self.dims
    dtype = compute_dtype(self.dtype)
    norm = lambda: instance_norm(dtype=dtype)
    h = nn.Conv(self.channels, kernel(7, dims), padding="VALID", dtype=dtype)(
        reflect_pad(source, 3))
    h = nn.relu(norm()(h))
    for mult in (2, 4):
      h = nn.Conv(self.channels * mult, kernel(3, dims), strides=kernel(2, dims),
                  padding=((1, 1),) * dims, dtype=dtype)(h)
      h = nn.relu(norm()(h))
    # Named as flax would, so remat leaves the parameter tree as is.
    block = maybe_remat(ResidualBlock, self.remat)
    for i in range(self.num_blocks):
      h = block(self.channels * 4, dtype, name=f"ResidualBlock_{i}")(h)
    for mult in (2, 1):
      # "SAME" with stride 2 doubles every side exactly, like torch's padding=1,
      # output_padding=1.
      h = nn.ConvTranspose(self.channels * mult, kernel(3, dims), strides=kernel(2, dims),
                           padding="SAME", dtype=dtype)(h)
      h = nn.relu(norm()(h))
    # The output layer in float32: the image every loss compares.
    h = nn.Conv(self.out_channels, kernel(7, dims), padding="VALID", dtype=jnp.float32)(
        reflect_pad(h, 3))
    return jnp.tanh(h)
