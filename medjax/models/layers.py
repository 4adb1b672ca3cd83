"""Building blocks shared by the backbones: time embedding, norms, resblocks, attention.

Everything is channels-last with any number of spatial axes: NHWC slices (`model.dims=2`)
and NDHWC volumes (`model.dims=3`), one code path; a block reads the number of spatial
axes from its input, kernels and strides are (k,) * dims (docs/design.md, "Translator
protocol"). Parameters are float32; a block computes in its `dtype` (the
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


AXES = ("D", "H", "W")  # NDHWC's spatial axes; 2D inputs are the last two


def layout(dims: int) -> str:
  """'(B, H, W, C)' for 2 spatial axes, '(B, D, H, W, C)' for 3."""
  return "(B, " + ", ".join(AXES[-dims:]) + ", C)"


def check_input(x, dims: int, factor: int = 1, what: str = "") -> tuple[int, ...]:
  """The spatial shape of `x` after checking its rank against `model.dims` and, with
  `factor` > 1, that every spatial side divides by it (`what` names who needs it)."""
  if dims not in (2, 3):
    raise ValueError(f"model.dims={dims!r}: expected 2 (slices) or 3 (volumes)")
  if x.ndim != dims + 2:
    raise ValueError(f"model.dims={dims} expects {layout(dims)} inputs, got shape "
                     f"{tuple(x.shape)}")
  spatial = tuple(x.shape[1:-1])
  if factor > 1 and any(n % factor for n in spatial):
    names = AXES[-dims:]
    raise ValueError(f"{what} needs {', '.join(names[:-1])} and {names[-1]} divisible by "
                     f"{factor}, got {'x'.join(map(str, spatial))}")
  return spatial


def kernel(k: int, dims: int) -> tuple[int, ...]:
  return (k,) * dims


def spatial_dims(x) -> int:
  return x.ndim - 2


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


def film_embedding(t, batch: int, channels: int, time_scale: float, cond=None):
  """The U-Nets' conditioning vector (B, 4·channels), called inside a compact `__call__`
  (its layers belong to the caller, named as they always were): time t (None: 0; t in
  [0, 1] scaled by `time_scale`) as a sinusoid through a two-layer MLP, plus, with `cond`
  (B, K), a bias-free Dense of it (`cond_embed`: on a one-hot, a learned embedding, e.g.
  any-to-any's target). float32: B × width is tiny, and every block's FiLM scale comes
  from it."""
  if t is None:
    t = jnp.zeros((batch,), jnp.float32)
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
  emb_dim = 4 * channels
  emb = timestep_embedding(t * time_scale, channels)
  emb = nn.Dense(emb_dim, dtype=jnp.float32)(nn.silu(nn.Dense(emb_dim, dtype=jnp.float32)(emb)))
  if cond is not None:
    if cond.ndim != 2 or cond.shape[0] != batch:
      raise ValueError(f"cond must be (B, K) with B={batch}, got shape {tuple(cond.shape)}")
    emb = emb + nn.Dense(emb_dim, use_bias=False, dtype=jnp.float32,
                         name="cond_embed")(jnp.asarray(cond, jnp.float32))
  return emb


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
    dims = spatial_dims(x)
    h = nn.silu(norm(x.shape[-1])(x))
    h = conv(self.channels, kernel(3, dims))(h)
    film = nn.Dense(2 * self.channels, dtype=self.dtype)(nn.silu(emb))
    # (B, 2C) -> (B, 1, …, 1, 2C): one scale and shift per example and channel.
    film = film.reshape(film.shape[0], *(1,) * dims, film.shape[-1])
    scale, shift = jnp.split(film, 2, axis=-1)
    h = norm(self.channels)(h)
    h = h * (1 + scale) + shift
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = conv(self.channels, kernel(3, dims), kernel_init=zeros_init)(h)
    if x.shape[-1] != self.channels:
      x = conv(self.channels, kernel(1, dims), name="skip")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over all pixels (voxels), pre-norm, residual."""
  num_heads: int = 4
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, channels = x.shape[0], x.shape[-1]
    if channels % self.num_heads:
      raise ValueError(f"attention over {channels} channels needs num_heads dividing it, "
                       f"got num_heads={self.num_heads}")
    h = group_norm(channels, self.num_groups, dtype=self.dtype)(x)
    h = h.reshape(batch, -1, channels)  # every spatial position is one token
    # Projections in `dtype`; the logits' softmax in float32 (a bf16 softmax over
    # H·W (D·H·W) keys loses most of its small weights).
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
    dims = spatial_dims(x)
    return nn.Conv(self.channels, kernel(3, dims), strides=kernel(2, dims),
                   padding=((1, 1),) * dims, dtype=self.dtype)(x)


class Upsample(nn.Module):
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    # nearest resize + conv rather than a transposed conv: no checkerboard artefacts.
    dims = spatial_dims(x)
    for axis in range(1, dims + 1):
      x = jnp.repeat(x, 2, axis=axis)
    return nn.Conv(self.channels, kernel(3, dims), dtype=self.dtype)(x)
