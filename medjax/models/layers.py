"""Building blocks shared by the backbones: time embedding, norms, resblocks, attention.

Everything is NHWC. Parameters are float32; a block computes in its `dtype` (the
backbone's `model.dtype`: float32, bfloat16 or float16), while norm statistics and the
attention softmax stay float32 (`compute_dtype`). Blocks that end a residual branch
zero-initialise their last projection (as in ADM), so every block starts as the identity
and a fresh network is a well-conditioned function of its input.
"""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

zeros_init = nn.initializers.zeros

DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(name: str):
  """The jnp dtype of a `model.dtype` string; a ValueError names the known ones."""
  if name not in DTYPES:
    raise ValueError(f"model dtype {name!r}; known: {', '.join(DTYPES)}")
  return jnp.dtype(name)


def maybe_remat(block: type[nn.Module], remat: bool, static_argnums=()):
  """`block`, or its activation-checkpointed version (`nn.remat`): its activations are
  recomputed in the backward pass instead of stored. Callers name the instances, so the
  parameter tree is the same with and without remat (`ResBlock_0`, not
  `CheckpointResBlock_0`) and checkpoints move between the two."""
  return nn.remat(block, static_argnums=static_argnums) if remat else block


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
  """Sinusoidal embedding of a (B,) float time, (B, dim): [cos(t f_k), sin(t f_k)]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
  return embedding


def group_norm(channels: int, num_groups: int = 32, name: str | None = None,
               dtype: Any = jnp.float32):
  # gcd keeps the group count a divisor of the channels, so tiny test widths
  # (8 channels) and odd widths work without special cases.
  # eps 1e-5 matches torch's GroupNorm, which published ADM weights were trained with.
  # flax computes mean, variance and the normalisation in float32 whatever the input
  # (force_float32_reductions); `dtype` is only the dtype of the result.
  return nn.GroupNorm(num_groups=math.gcd(num_groups, channels), epsilon=1e-5, name=name,
                      dtype=dtype)


def instance_norm(name: str | None = None, dtype: Any = jnp.float32):
  # affine-free, as in the CycleGAN / pix2pix reference code (InstanceNorm2d defaults);
  # statistics in float32 as group_norm's.
  return nn.InstanceNorm(epsilon=1e-5, use_scale=False, use_bias=False, name=name,
                         dtype=dtype)


class ResBlock(nn.Module):
  """ADM residual block with FiLM conditioning on the time embedding."""
  channels: int
  dropout: float = 0.0
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool):
    # `train` is positional: nn.remat marks it static by position (static_argnums=(3,)).
    norm = lambda c: group_norm(c, self.num_groups, dtype=self.dtype)
    conv = lambda *a, **k: nn.Conv(*a, dtype=self.dtype, **k)
    h = nn.silu(norm(x.shape[-1])(x))
    h = conv(self.channels, (3, 3))(h)
    scale, shift = jnp.split(nn.Dense(2 * self.channels, dtype=self.dtype)(nn.silu(emb)), 2,
                             axis=-1)
    h = norm(self.channels)(h)
    h = h * (1 + scale[:, None, None, :]) + shift[:, None, None, :]
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = conv(self.channels, (3, 3), kernel_init=zeros_init)(h)
    if x.shape[-1] != self.channels:
      x = conv(self.channels, (1, 1), name="skip")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over all pixels, pre-norm, residual."""
  num_heads: int = 4
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    if channels % self.num_heads:
      raise ValueError(f"attention over {channels} channels needs num_heads dividing it, "
                       f"got num_heads={self.num_heads}")
    h = group_norm(channels, self.num_groups, dtype=self.dtype)(x)
    h = h.reshape(batch, height * width, channels)
    # Projections in `dtype`; the logits' softmax in float32 (a bf16 softmax over
    # H·W keys loses most of its small weights).
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, out_kernel_init=zeros_init, deterministic=True,
        dtype=self.dtype, force_fp32_for_softmax=True)(h)
    return x + h.reshape(x.shape)


class Downsample(nn.Module):
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    # symmetric padding 1 (torch-style); flax's "SAME" pads stride-2 convs asymmetrically.
    return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                   dtype=self.dtype)(x)


class Upsample(nn.Module):
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    # nearest resize + conv rather than a transposed conv: no checkerboard artefacts.
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(self.channels, (3, 3), dtype=self.dtype)(x)
