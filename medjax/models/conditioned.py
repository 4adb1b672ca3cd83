"""The any-to-any wrapper: one backbone for every (available modalities → target) direction.

The model input is `any2any`'s 3·M channels (docs/design.md, "Any-to-any synthesis"). The
wrapper zeroes every missing modality's image again (whatever a caller left in that
channel, the network sees 0 there), feeds the images and the availability mask to the
backbone as 2·M image channels, and hands it the target's one-hot as `cond`: a bias-free
Dense of a one-hot is a learned embedding of the target modality, added to the backbone's
time embedding (FiLM in every U-Net block; the time token of the U-ViT).
"""

import flax.linen as nn
import jax.numpy as jnp

from medjax import any2any


class ModalityConditioned(nn.Module):
  backbone: nn.Module
  count: int  # M, the run's modalities

  @nn.compact
  def __call__(self, x, t, source, *, train: bool):
    images, available, onehot = any2any.split(source, self.count)
    mask = jnp.broadcast_to(
        available.reshape(available.shape[:1] + (1,) * (source.ndim - 2) + (self.count,)),
        images.shape).astype(source.dtype)
    return self.backbone(x, t, jnp.concatenate([images, mask], axis=-1), train=train,
                         cond=onehot)
