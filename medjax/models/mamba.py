"""A state-space (Mamba) U-Net for image-to-image translation, 2D and 3D.

Mamba's selective scan (Gu & Dao 2023): per channel d and state n the linear recurrence
h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = C_t · h_t + D u_t, with Δ, B, C computed from
the input (the "selection") and A diagonal. It is evaluated with
`jax.lax.associative_scan` (log-depth, linear work), never a Python loop, and in float32
whatever `model.dtype` (a state summed over thousands of steps in bf16's 8-bit mantissa
loses the small contributions).

An image or volume is no sequence, so a `VSSBlock` scans it as VMamba / I2I-Mamba do:
the grid is flattened with each spatial axis in turn the fastest-varying one, forward and
backward (2·dims sequences, `cross_scan`), each sequence goes through its own
`MambaBlock`, and the outputs are un-flattened and averaged (`cross_merge`): every voxel
then sees the whole image, at a cost linear in the number of voxels.

`MambaUNet` is U-Net shaped (docs/design.md, "Translator protocol", Mamba): ResBlocks
carry the time (and `cond`) embedding by FiLM, VSSBlocks follow them on the levels of
`ssm_levels` and in the middle, one skip per level. Same call as UNet and UViT:
`(x, t, source, *, train, cond=None)`; a fresh network outputs 0.
"""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.models.layers import (Downsample, ResBlock, Upsample, check_input, compute_dtype,
                                  film_embedding, group_norm, kernel, maybe_remat, zeros_init)


def selective_scan(u, delta, A, B, C, D, chunk: int | None = None):
  """Mamba's selective scan along the sequence axis, in float32.

  u, delta: (..., L, Din); A: (Din, N) (negative: a decaying state); B, C: (..., L, N);
  D: (Din,). Returns y: (..., L, Din), y_t = C_t · h_t + D u_t with
  h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, h_0 = 0 (zero-order-hold A, Euler B, as Mamba).

  `chunk` None or 0: one associative scan over all L steps, every (L, Din, N) state in
  memory at once. An int: the sequence in chunks of that many steps, an associative scan
  inside each and the state carried from chunk to chunk (`lax.scan`), each chunk
  recomputed in the backward pass: only (L, Din)-sized arrays and one chunk's states are
  ever stored (docs/design.md, Mamba). Same result either way.
  """
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  u, delta, A, B, C, D = map(f32, (u, delta, A, B, C, D))
  length = u.shape[-2]
  if not chunk or chunk >= length:
    h = _scan_states(u, delta, A, B)
    return jnp.einsum("...dn,...n->...d", h, C) + D * u

  # Padding steps at the end (Δ = 0: the state is held) only produce outputs cut off below.
  pad = -length % chunk
  padded = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, pad), (0, 0)])
  # (..., L, X) → (L / chunk, ..., chunk, X): lax.scan runs over the leading axis.
  split = lambda a: jnp.moveaxis(a.reshape(*a.shape[:-2], -1, chunk, a.shape[-1]), -3, 0)
  chunks = [split(padded(a)) for a in (u, delta, B, C)]

  @jax.checkpoint
  def step(h, xs):
    u, delta, B, C = xs
    decay, states = _scan_states(u, delta, A, B, with_decay=True)
    states = states + decay * h[..., None, :, :]  # the state carried in from before
    return states[..., -1, :, :], jnp.einsum("...dn,...n->...d", states, C)

  h0 = jnp.zeros((*u.shape[:-2], *A.shape), jnp.float32)
  _, y = jax.lax.scan(step, h0, chunks)
  y = jnp.moveaxis(y, 0, -3).reshape(*u.shape[:-2], -1, u.shape[-1])[..., :length, :]
  return y + D * u


def _scan_states(u, delta, A, B, with_decay=False):
  """h_t for h_0 = 0, (..., L, Din, N); with `with_decay` also the cumulative decays
  prod_{s ≤ t} exp(Δ_s A), by which an initial state h_0 reaches step t."""
  decay = jnp.exp(delta[..., None] * A)                   # (..., L, Din, N)
  drive = (delta * u)[..., None] * B[..., None, :]        # (..., L, Din, N)

  def combine(first, second):
    # (a1, b1) then (a2, b2): h ↦ a2 (a1 h + b1) + b2 = (a1 a2) h + (a2 b1 + b2)
    (a1, b1), (a2, b2) = first, second
    return a1 * a2, a2 * b1 + b2

  cumulative, h = jax.lax.associative_scan(combine, (decay, drive), axis=decay.ndim - 3)
  return (cumulative, h) if with_decay else h


def scan_orders(dims: int) -> list[tuple[int, ...]]:
  """The spatial-axis orders (0-based) a cross-scan flattens with: each axis in turn the
  last (fastest-varying), the others in their natural order. 2D: (H, W), (W, H)."""
  return [tuple(a for a in range(dims) if a != last) + (last,) for last in reversed(range(dims))]


def cross_scan(x):
  """(B, *grid, C) → (2·dims, B, prod(grid), C): the grid flattened in every `scan_orders`
  order, each forward then backward."""
  batch, grid, channels = x.shape[0], x.shape[1:-1], x.shape[-1]
  sequences = []
  for order in scan_orders(len(grid)):
    seq = x.transpose(0, *(1 + a for a in order), x.ndim - 1).reshape(batch, -1, channels)
    sequences += [seq, seq[:, ::-1]]
  return jnp.stack(sequences)


def cross_merge(sequences, grid: Sequence[int]):
  """The inverse of `cross_scan`, averaged: (2·dims, B, prod(grid), C) → (B, *grid, C)."""
  batch, channels = sequences.shape[1], sequences.shape[-1]
  total = 0.0
  for k, order in enumerate(scan_orders(len(grid))):
    for seq in (sequences[2 * k], sequences[2 * k + 1, :, ::-1]):
      h = seq.reshape(batch, *(grid[a] for a in order), channels)
      inverse = np.argsort(order)
      total = total + h.transpose(0, *(1 + a for a in inverse), h.ndim - 1)
  return total / len(sequences)


def dt_bias_init(dt_min: float = 1e-3, dt_max: float = 0.1):
  """Mamba's Δ bias: softplus(bias) log-uniform in [dt_min, dt_max] per channel."""
  def init(key, shape, dtype=jnp.float32):
    dt = jnp.exp(jax.random.uniform(key, shape, dtype) * (math.log(dt_max) - math.log(dt_min))
                 + math.log(dt_min))
    dt = jnp.maximum(dt, 1e-4)
    return dt + jnp.log(-jnp.expm1(-dt))  # softplus⁻¹
  return init


def symmetric_uniform(scale: float):
  """Uniform in [−scale, scale] (Mamba's Δ projection kernel, scale = dt_rank^−½)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)
  return init


def s4d_real_init(key, shape, dtype=jnp.float32):
  """A_log with A = −exp(A_log) = −(1, 2, …, N) on every channel (S4D-real)."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=dtype)), shape)


class CausalDepthwiseConv(nn.Module):
  """Per-channel convolution along the sequence that sees steps t − width + 1 … t only.

  Written as `width` shifted multiply-adds: XLA:CPU runs a grouped `nn.Conv`
  (feature_group_count = channels), and above all its gradient, many times slower."""
  width: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    length, channels = x.shape[-2:]
    # (width, C): fan-in `width`, as nn.Conv's LeCun-normal kernel of a depthwise conv
    w = self.param("kernel", nn.initializers.lecun_normal(in_axis=0, out_axis=1),
                   (self.width, channels)).astype(self.dtype)
    b = self.param("bias", nn.initializers.zeros, (channels,)).astype(self.dtype)
    x = jnp.pad(x.astype(self.dtype), [(0, 0)] * (x.ndim - 2) + [(self.width - 1, 0), (0, 0)])
    # kernel row k multiplies the step k − (width − 1) back, as a causal conv's tap k
    return sum(x[..., k:k + length, :] * w[k] for k in range(self.width)) + b


class MambaBlock(nn.Module):
  """Mamba's block on (B, L, C) sequences: in-projection to x and the gate z, a causal
  depthwise convolution along the sequence, SiLU, input-dependent Δ (softplus of a rank
  `dt_rank` projection), B and C; A = −exp(A_log); y = scan(x) · SiLU(z); out-projection
  zero-initialised, so a fresh block outputs 0."""
  d_state: int = 16
  expand: int = 2
  d_conv: int = 4
  dt_rank: int | None = None  # None: ⌈C / 16⌉ (Mamba's "auto")
  scan_chunk: int | None = None  # selective_scan's `chunk`
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    inner = self.expand * channels
    rank = self.dt_rank or math.ceil(channels / 16)
    dense = lambda n, name, **k: nn.Dense(n, dtype=self.dtype, name=name, **k)
    x, z = jnp.split(dense(2 * inner, "in_proj", use_bias=False)(x), 2, axis=-1)
    x = CausalDepthwiseConv(self.d_conv, dtype=self.dtype, name="conv")(x)
    x = nn.silu(x)
    dt, B, C = jnp.split(dense(rank + 2 * self.d_state, "x_proj", use_bias=False)(x),
                         [rank, rank + self.d_state], axis=-1)
    dt = dense(inner, "dt_proj", kernel_init=symmetric_uniform(rank ** -0.5),
               bias_init=dt_bias_init())(dt)
    delta = jax.nn.softplus(dt.astype(jnp.float32))
    A = -jnp.exp(self.param("A_log", s4d_real_init, (inner, self.d_state)))
    D = self.param("D", nn.initializers.ones, (inner,))
    y = selective_scan(x, delta, A, B, C, D, self.scan_chunk).astype(self.dtype) * nn.silu(z)
    return dense(channels, "out_proj", use_bias=False, kernel_init=zeros_init)(y)


class VSSBlock(nn.Module):
  """Visual state-space block (VMamba): pre-LayerNorm, `cross_scan` into 2·dims
  sequences, one MambaBlock per direction (parameters stacked on a leading axis, all
  directions in one vectorised scan), `cross_merge`, residual. Identity at init."""
  d_state: int = 16
  expand: int = 2
  d_conv: int = 4
  scan_chunk: int | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    # LayerNorm statistics in float32 (force_float32_reductions); the result in `dtype`.
    h = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
    directions = nn.vmap(MambaBlock, in_axes=0, out_axes=0, variable_axes={"params": 0},
                         split_rngs={"params": True})
    h = directions(self.d_state, self.expand, self.d_conv, scan_chunk=self.scan_chunk,
                   dtype=self.dtype, name="directions")(cross_scan(h))
    return x + cross_merge(h, x.shape[1:-1]).astype(x.dtype)


class MambaUNet(nn.Module):
  out_channels: int
  channels: int = 32
  channel_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 1
  # indices into channel_mult; None: every level but the first (full resolution, where
  # the scans' (L, Din, N) states are largest). The middle always has one.
  ssm_levels: Sequence[int] | None = None
  d_state: int = 16
  expand: int = 2
  d_conv: int = 4
  scan_chunk: int = 16  # selective_scan's `chunk`; 0: one scan over the whole sequence
  dropout: float = 0.0
  num_groups: int = 32
  time_scale: float = 1000.0  # as UNet: frequencies tuned for steps in [0, 1000]
  dtype: str = "float32"
  remat: bool = False
  dims: int = 2

  @nn.compact
  def __call__(self, x, t, source, *, train: bool, cond=None):
    levels = len(self.channel_mult)
    check_input(source, self.dims, 2 ** (levels - 1), f"MambaUNet with {levels} levels")
    if x is not None:
      check_input(x, self.dims)
    ssm_levels = range(1, levels) if self.ssm_levels is None else tuple(self.ssm_levels)
    for level in ssm_levels:
      if not 0 <= level < levels:
        raise ValueError(f"model.ssm_levels: level {level} outside 0..{levels - 1}")
    for key in ("d_state", "expand", "d_conv", "num_res_blocks", "scan_chunk"):
      value, least = getattr(self, key), 0 if key == "scan_chunk" else 1
      if not (isinstance(value, int) and value >= least):
        raise ValueError(f"model.{key}={value!r}: expected an int ≥ {least}")
    batch = source.shape[0]
    dtype = compute_dtype(self.dtype)
    emb = film_embedding(t, batch, self.channels, self.time_scale, cond)

    # Named explicitly, so remat leaves the parameter tree as is (layers.maybe_remat).
    res_block = maybe_remat(ResBlock, self.remat, static_argnums=(3,))
    vss_block = maybe_remat(VSSBlock, self.remat)
    count = {"res": 0, "vss": 0}

    def res(h, c):
      count["res"] += 1
      return res_block(c, self.dropout, self.num_groups, dtype,
                       name=f"ResBlock_{count['res'] - 1}")(h, emb, train)

    def vss(h):
      count["vss"] += 1
      return vss_block(self.d_state, self.expand, self.d_conv, self.scan_chunk, dtype,
                       name=f"VSSBlock_{count['vss'] - 1}")(h)

    h = source if x is None else jnp.concatenate([x, source], axis=-1)
    h = nn.Conv(self.channels, kernel(3, self.dims), dtype=dtype, name="stem")(h)
    skips = []
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = res(h, self.channels * mult)
        if level in ssm_levels:
          h = vss(h)
      skips.append(h)  # one skip per level, its last output
      if level != levels - 1:
        h = Downsample(h.shape[-1], dtype)(h)

    h = vss(res(h, h.shape[-1]))
    h = res(h, h.shape[-1])

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for block in range(self.num_res_blocks):
        if block == 0:
          h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(h, self.channels * mult)
        if level in ssm_levels:
          h = vss(h)
      if level:
        h = Upsample(h.shape[-1], dtype)(h)

    # The head in float32 (as UNet), its last conv zero-initialised: a fresh network
    # outputs 0.
    h = nn.silu(group_norm(h.shape[-1], self.num_groups, dtype=jnp.float32)(h))
    return nn.Conv(self.out_channels, kernel(3, self.dims), kernel_init=zeros_init,
                   dtype=jnp.float32, name="head")(h)
