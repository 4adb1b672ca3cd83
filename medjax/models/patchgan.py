"""70x70 PatchGAN discriminator (Isola et al. 2017, pix2pix): C64-C128-C256-C512-1.

Each output logit judges one overlapping input patch; the caller chooses the input
(source and target concatenated for pix2pix, the image alone for CycleGAN).

`dtype` is the compute dtype of every layer but the last: the logits, and so the GAN
losses, are float32; parameters and instance-norm statistics stay float32. `dims` (2 | 3):
(B, H, W, C) slices or (B, D, H, W, C) volumes, 4^dims kernels; a logit then judges a
70×70(×70) patch.
"""

import flax.linen as nn
import jax.numpy as jnp

from medjax.models.layers import check_input, compute_dtype, instance_norm, kernel

KERNEL, PADDING = 4, (1, 1)  # per spatial axis


def receptive_field(num_layers: int) -> int:
  """Input patch side seen by one logit: 1 + sum_l (k-1) * prod_{i<l} stride_i."""
  strides = [2] * num_layers + [1, 1]
  field, jump = 1, 1
  for stride in strides:
    field += (KERNEL - 1) * jump
    jump *= stride
  return field


def output_size(side: int, num_layers: int) -> int:
  """Logits along an input side of `side` voxels: each 4-wide conv with padding 1 and
  stride s maps n to (n + 2 - 4) // s + 1."""
  for stride in [2] * num_layers + [1, 1]:
    side = (side + 2 - KERNEL) // stride + 1
  return side


class PatchGAN(nn.Module):
  channels: int = 64
  num_layers: int = 3
  # "none" drops the norm; needed where logits must depend only on their own patch
  # (instance-norm statistics span the whole image).
  norm: str = "instance"
  dtype: str = "float32"
  dims: int = 2

  @nn.compact
  def __call__(self, image, *, train: bool):
    del train  # no running statistics, no dropout
    if self.norm not in ("instance", "none"):
      raise ValueError(f"PatchGAN norm must be 'instance' or 'none', got {self.norm!r}")
    spatial = check_input(image, self.dims)
    if any(output_size(n, self.num_layers) < 1 for n in spatial):
      raise ValueError(f"PatchGAN with num_layers={self.num_layers} leaves no logit along a "
                       f"side of {min(spatial)} voxels (input {tuple(image.shape)}); lower "
                       "num_layers or enlarge the input")
    dims, padding = self.dims, (PADDING,) * self.dims
    dtype = compute_dtype(self.dtype)
    norm = (lambda: instance_norm(dtype=dtype)) if self.norm == "instance" else (
        lambda: (lambda h: h))
    h = nn.Conv(self.channels, kernel(KERNEL, dims), strides=kernel(2, dims), padding=padding,
                dtype=dtype)(image)
    h = nn.leaky_relu(h, 0.2)
    for n in range(1, self.num_layers + 1):
      # the last feature layer keeps stride 1, widening the field without shrinking the map.
      stride = 2 if n < self.num_layers else 1
      features = self.channels * min(2 ** n, 8)
      # bias is redundant before a norm that subtracts the mean.
      h = nn.Conv(features, kernel(KERNEL, dims), strides=kernel(stride, dims),
                  padding=padding, use_bias=self.norm == "none", dtype=dtype)(h)
      h = nn.leaky_relu(norm()(h), 0.2)
    return nn.Conv(1, kernel(KERNEL, dims), padding=padding, dtype=jnp.float32)(h)
