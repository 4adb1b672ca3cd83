"""CycleGAN ResNet generator (Johnson et al. 2016; Zhu et al. 2017), c7s1-64, d128, d256,
R256 x num_blocks, u128, u64, c7s1-out, tanh.

`dtype` is the compute dtype of every layer but the last (c7s1-out and tanh run in
float32); parameters and instance-norm statistics stay float32. `remat` recomputes each
residual block's activations in the backward pass.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medjax.models.layers import compute_dtype, instance_norm, maybe_remat


def reflect_pad(x, width: int):
  # reflection rather than zero padding: zero borders leak artefacts into synthetic images.
  return jnp.pad(x, ((0, 0), (width, width), (width, width), (0, 0)), mode="reflect")


class ResidualBlock(nn.Module):
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.channels, (3, 3), padding="VALID", dtype=self.dtype)(reflect_pad(x, 1))
    h = nn.relu(instance_norm(dtype=self.dtype)(h))
    h = nn.Conv(self.channels, (3, 3), padding="VALID", dtype=self.dtype)(reflect_pad(h, 1))
    return x + instance_norm(dtype=self.dtype)(h)


class ResNetGenerator(nn.Module):
  out_channels: int
  channels: int = 64
  num_blocks: int = 9
  dtype: str = "float32"
  remat: bool = False

  @nn.compact
  def __call__(self, source, *, train: bool):
    del train  # instance norm keeps no running statistics; no dropout
    _, height, width, _ = source.shape
    if height % 4 or width % 4:
      raise ValueError(f"ResNetGenerator downsamples twice: H and W must be divisible by 4, "
                       f"got {height}x{width}")
    dtype = compute_dtype(self.dtype)
    norm = lambda: instance_norm(dtype=dtype)
    h = nn.Conv(self.channels, (7, 7), padding="VALID", dtype=dtype)(reflect_pad(source, 3))
    h = nn.relu(norm()(h))
    for mult in (2, 4):
      h = nn.Conv(self.channels * mult, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                  dtype=dtype)(h)
      h = nn.relu(norm()(h))
    # Named as flax would, so remat leaves the parameter tree as is.
    block = maybe_remat(ResidualBlock, self.remat)
    for i in range(self.num_blocks):
      h = block(self.channels * 4, dtype, name=f"ResidualBlock_{i}")(h)
    for mult in (2, 1):
      # "SAME" with stride 2 doubles H and W exactly, like torch's padding=1, output_padding=1.
      h = nn.ConvTranspose(self.channels * mult, (3, 3), strides=(2, 2), padding="SAME",
                           dtype=dtype)(h)
      h = nn.relu(norm()(h))
    # The output layer in float32: the image every loss compares.
    h = nn.Conv(self.out_channels, (7, 7), padding="VALID", dtype=jnp.float32)(reflect_pad(h, 3))
    return jnp.tanh(h)
