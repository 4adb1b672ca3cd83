"""ADM U-Net (Dhariwal & Nichol 2021, "guided diffusion") for image-to-image translation.

One backbone for every translator: flow matching and diffusion pass the current state `x`
and time `t`; regression and GANs pass `x=None` and the network sees only `source`.

`dtype` ('float32' | 'bfloat16' | 'float16') is the compute dtype of the convolutions,
attention and residual blocks; parameters stay float32, and the time embedding (sinusoid
and MLP), the output head (last norm and convolution) and so the output are float32.
`remat` recomputes each residual and attention block's activations in the backward pass.

`dims` (2: (B, H, W, C) slices, 3: (B, D, H, W, C) volumes) is the inputs' number of
spatial axes: kernels are 3^dims and every spatial axis halves between levels; a 2D
parameter tree is that of the 2D-only U-Net, so older checkpoints load. `decoder_blocks`
(None: ADM's decoder) gives nnU-Net ResEnc's shape: a decoder of that many blocks per
level that concatenates one skip per level (docs/design.md, "Translator protocol").
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from medjax.models.layers import (AttentionBlock, Downsample, ResBlock, Upsample,
                                  check_input, compute_dtype, film_embedding, group_norm,
                                  kernel, maybe_remat, zeros_init)


class UNet(nn.Module):
  out_channels: int
  channels: int = 64
  channel_mult: Sequence[int] = (1, 2, 2, 4)
  num_res_blocks: int = 2
  attention_levels: Sequence[int] = ()  # indices into channel_mult
  num_heads: int = 4
  dropout: float = 0.0
  num_groups: int = 32
  # sinusoidal frequencies are tuned for integer diffusion steps in [0, 1000]; t in [0, 1]
  # unscaled would leave most of the embedding constant.
  time_scale: float = 1000.0
  dtype: str = "float32"
  remat: bool = False
  dims: int = 2
  # None: num_res_blocks + 1 blocks per decoder level, each consuming a skip (ADM). An
  # int: that many blocks per level, the first consuming the level's one skip (ResEnc).
  decoder_blocks: int | None = None

  @nn.compact
  def __call__(self, x, t, source, *, train: bool, cond=None):
    batch = source.shape[0]
    check_input(source, self.dims, 2 ** (len(self.channel_mult) - 1),
                f"UNet with {len(self.channel_mult)} levels")
    if x is not None:
      check_input(x, self.dims)
    resenc = self.decoder_blocks is not None
    if resenc and not (isinstance(self.decoder_blocks, int) and self.decoder_blocks >= 1):
      raise ValueError(f"model.decoder_blocks={self.decoder_blocks!r}: expected None or an "
                       "int ≥ 1 (blocks per decoder level)")
    for level in self.attention_levels:
      if not 0 <= level < len(self.channel_mult):
        raise ValueError(f"attention level {level} outside 0..{len(self.channel_mult) - 1}")
    dtype = compute_dtype(self.dtype)
    emb = film_embedding(t, batch, self.channels, self.time_scale, cond)

    h = source if x is None else jnp.concatenate([x, source], axis=-1)
    # Named explicitly (the names flax would give), so remat leaves the parameter tree as is.
    res_block = maybe_remat(ResBlock, self.remat, static_argnums=(3,))  # (self, x, emb, train)
    attn_block = maybe_remat(AttentionBlock, self.remat)
    count = {"res": 0, "attn": 0}

    def res(c):
      count["res"] += 1
      return res_block(c, self.dropout, self.num_groups, dtype,
                       name=f"ResBlock_{count['res'] - 1}")

    def attn():
      count["attn"] += 1
      return attn_block(self.num_heads, self.num_groups, dtype,
                        name=f"AttentionBlock_{count['attn'] - 1}")

    h = nn.Conv(self.channels, kernel(3, self.dims), dtype=dtype)(h)
    skips = [h]  # ADM: the input conv's, every block's and every Downsample's output
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = res(self.channels * mult)(h, emb, train)
        if level in self.attention_levels:
          h = attn()(h)
        skips.append(h)
      if resenc:  # one skip per level: its last output, at the level's resolution
        skips[-(self.num_res_blocks + 1):] = [h]
      if level != len(self.channel_mult) - 1:
        h = Downsample(h.shape[-1], dtype)(h)
        skips.append(h)

    h = res(h.shape[-1])(h, emb, train)
    if self.attention_levels:
      h = attn()(h)
    h = res(h.shape[-1])(h, emb, train)

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      # ADM: one more block than on the way down, as it consumes the skip left by
      # Downsample (or, at level 0, by the input conv). ResEnc: the first block consumes
      # the level's skip, the others refine.
      blocks = self.num_res_blocks + 1 if not resenc else self.decoder_blocks
      for block in range(blocks):
        if not resenc or block == 0:
          h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(self.channels * mult)(h, emb, train)
        if level in self.attention_levels:
          h = attn()(h)
      if level:
        h = Upsample(h.shape[-1], dtype)(h)
    assert not skips, len(skips)  # every skip consumed

    # The head runs in float32: the output (a velocity, noise, an image) is what every
    # loss and sampler step consumes.
    h = nn.silu(group_norm(h.shape[-1], self.num_groups, dtype=jnp.float32)(h))
    return nn.Conv(self.out_channels, kernel(3, self.dims), kernel_init=zeros_init,
                   dtype=jnp.float32)(h)
