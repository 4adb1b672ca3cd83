"""70x70 PatchGAN discriminator (Isola et al. 2017, pix2pix): C64-C128-C256-C512-1.

Each output logit judges one overlapping input patch; the caller chooses the input
(source and target concatenated for pix2pix, the image alone for CycleGAN).

`dtype` is the compute dtype of every layer but the last: the logits, and so the GAN
losses, are float32; parameters and instance-norm statistics stay float32.
"""

import flax.linen as nn
import jax.numpy as jnp

from medjax.models.layers import compute_dtype, instance_norm

KERNEL, PADDING = 4, ((1, 1), (1, 1))


def receptive_field(num_layers: int) -> int:
  """Input patch side seen by one logit: 1 + sum_l (k-1) * prod_{i<l} stride_i."""
  strides = [2] * num_layers + [1, 1]
  field, jump = 1, 1
  for stride in strides:
    field += (KERNEL - 1) * jump
    jump *= stride
  return field


class PatchGAN(nn.Module):
  channels: int = 64
  num_layers: int = 3
  # "none" drops the norm; needed where logits must depend only on their own patch
  # (instance-norm statistics span the whole image).
  norm: str = "instance"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, image, *, train: bool):
    del train  # no running statistics, no dropout
    if self.norm not in ("instance", "none"):
      raise ValueError(f"PatchGAN norm must be 'instance' or 'none', got {self.norm!r}")
    dtype = compute_dtype(self.dtype)
    norm = (lambda: instance_norm(dtype=dtype)) if self.norm == "instance" else (
        lambda: (lambda h: h))
    h = nn.Conv(self.channels, (KERNEL, KERNEL), strides=(2, 2), padding=PADDING,
                dtype=dtype)(image)
    h = nn.leaky_relu(h, 0.2)
    for n in range(1, self.num_layers + 1):
      # the last feature layer keeps stride 1, widening the field without shrinking the map.
      stride = 2 if n < self.num_layers else 1
      features = self.channels * min(2 ** n, 8)
      # bias is redundant before a norm that subtracts the mean.
      h = nn.Conv(features, (KERNEL, KERNEL), strides=(stride, stride), padding=PADDING,
                  use_bias=self.norm == "none", dtype=dtype)(h)
      h = nn.leaky_relu(norm()(h), 0.2)
    return nn.Conv(1, (KERNEL, KERNEL), padding=PADDING, dtype=jnp.float32)(h)
