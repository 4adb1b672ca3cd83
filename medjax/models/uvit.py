"""U-ViT (Bao et al. 2023, "All are worth words") for image-to-image translation, 2D and 3D.

A plain transformer over patches with U-Net-style long skips (docs/design.md, "Translator
protocol", U-ViT):
x and source concatenated on channels → patch embedding (a convolution, kernel = stride =
patch) → tokens plus a fixed N-D sin-cos position embedding, the time as one extra token →
depth pre-LN blocks (depth//2 in, one mid, depth//2 out; out-block i also takes in-block
depth//2 − 1 − i's output) → LayerNorm → Dense to a patch of pixels → unpatchify → a
3×3(×3) convolution. Same call as the U-Net: `(x, t, source, *, train)`, `x` and `t` may
be None (regression and GANs: the source alone).

The position embedding is computed from the token grid at call time, so any input whose
sides are multiples of the patch works (sliding-window inference feeds other sizes than
training). `dtype` is the compute dtype of the blocks; parameters, LayerNorm statistics, the
softmax, the time MLP and the head (last norm, Dense, convolution) and so the output are
float32. `remat` recomputes each block's activations in the backward pass.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from medjax.models.layers import compute_dtype, maybe_remat, timestep_embedding, zeros_init


def sincos_position_embedding(grid: Sequence[int], width: int, max_period: float = 10_000.0):
  """(prod(grid), width) fixed embedding of a row-major token grid (MAE's 2D sin-cos, N-D).

  Axis a gets channels [a·2F, (a+1)·2F), F = width // (2·len(grid)): [sin(p ω_k), cos(p ω_k)]
  of its coordinate p, ω_k = max_period^(−k/F); the width − 2F·len(grid) channels left
  over are zero (e.g. width 32 in 3D: 5 frequencies per axis, 2 zero channels).
  """
  dims = len(grid)
  freqs = width // (2 * dims)
  if freqs < 1:
    raise ValueError(f"model.width={width} too small for a {dims}-D position embedding "
                     f"(needs ≥ {2 * dims})")
  omega = max_period ** (-np.arange(freqs, dtype=np.float64) / freqs)
  coords = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in grid], indexing="ij")
  parts = []
  for coord in coords:
    args = coord.reshape(-1, 1) * omega[None, :]
    parts += [np.sin(args), np.cos(args)]
  embedding = np.concatenate(parts, axis=1)
  embedding = np.pad(embedding, ((0, 0), (0, width - embedding.shape[1])))
  return embedding.astype(np.float32)


class TransformerBlock(nn.Module):
  """Pre-LN block: [long skip: Dense(concat(x, skip))], x + MHA(LN(x)), x + MLP(LN(x)).

  Each residual branch ends in a zero-initialised projection (as layers.ResBlock), so a
  fresh block is the identity."""
  width: int
  num_heads: int
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, skip, train: bool):
    # `train` is positional: nn.remat marks it static by position (static_argnums=(3,)).
    if skip is not None:
      x = nn.Dense(self.width, dtype=self.dtype, name="skip")(jnp.concatenate([x, skip], -1))
    # LayerNorm statistics in float32 (force_float32_reductions); the result in `dtype`.
    h = nn.LayerNorm(dtype=self.dtype)(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, out_kernel_init=zeros_init, deterministic=True,
        dtype=self.dtype, force_fp32_for_softmax=True)(h)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.LayerNorm(dtype=self.dtype)(x)
    h = nn.gelu(nn.Dense(int(self.width * self.mlp_ratio), dtype=self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Dense(self.width, kernel_init=zeros_init, dtype=self.dtype)(h)
    return x + h


class UViT(nn.Module):
  out_channels: int
  dims: int = 2
  patch_size: int | Sequence[int] = 4  # one int for every axis, or one per axis
  width: int = 128
  depth: int = 7
  num_heads: int = 4
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  time_scale: float = 1000.0  # as UNet: frequencies tuned for steps in [0, 1000]
  dtype: str = "float32"
  remat: bool = False

  def patch(self) -> tuple[int, ...]:
    if isinstance(self.patch_size, int):
      return (self.patch_size,) * self.dims
    if len(self.patch_size) != self.dims:
      raise ValueError(f"model.patch_size={tuple(self.patch_size)} needs one size per axis "
                       f"(model.dims={self.dims})")
    return tuple(int(p) for p in self.patch_size)

  def _check(self, shape):
    if self.dims not in (2, 3):
      raise ValueError(f"model.dims={self.dims}; known: 2, 3")
    if len(shape) != self.dims + 2:
      layout = "(B, H, W, C)" if self.dims == 2 else "(B, D, H, W, C)"
      raise ValueError(f"model.dims={self.dims} expects {layout} inputs, got shape {shape}")
    if self.width % self.num_heads:
      raise ValueError(f"model.width={self.width} not divisible by "
                       f"model.num_heads={self.num_heads}")
    if self.depth < 1 or self.depth % 2 == 0:
      raise ValueError(f"model.depth={self.depth} must be odd (in-blocks, mid, out-blocks)")
    patch = self.patch()
    sides = shape[1:-1]
    if any(p < 1 for p in patch) or any(s % p for s, p in zip(sides, patch)):
      raise ValueError(f"uvit: spatial sides {'x'.join(map(str, sides))} must be multiples "
                       f"of model.patch_size={'x'.join(map(str, patch))}")

  @nn.compact
  def __call__(self, x, t, source, *, train: bool, cond=None):
    self._check(source.shape)
    batch, sides = source.shape[0], source.shape[1:-1]
    patch = self.patch()
    grid = tuple(s // p for s, p in zip(sides, patch))
    dtype = compute_dtype(self.dtype)
    if t is None:
      t = jnp.zeros((batch,), jnp.float32)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))

    h = source if x is None else jnp.concatenate([x, source], axis=-1)
    h = nn.Conv(self.width, patch, strides=patch, padding="VALID", dtype=dtype,
                name="patch_embed")(h)
    h = h.reshape(batch, -1, self.width)
    h = h + jnp.asarray(sincos_position_embedding(grid, self.width), dtype)[None]

    # The time token, as U-ViT: sinusoid → MLP, float32 (B × width is tiny).
    emb = timestep_embedding(t * self.time_scale, self.width)
    emb = nn.Dense(4 * self.width, dtype=jnp.float32, name="time_embed_0")(emb)
    emb = nn.Dense(self.width, dtype=jnp.float32, name="time_embed_1")(nn.silu(emb))
    if cond is not None:  # (B, K): e.g. any-to-any's one-hot target, a learned embedding
      emb = emb + nn.Dense(self.width, use_bias=False, dtype=jnp.float32,
                           name="cond_embed")(jnp.asarray(cond, jnp.float32))
    h = jnp.concatenate([emb.astype(dtype)[:, None, :], h], axis=1)

    # Named explicitly, so remat leaves the parameter tree as is (layers.maybe_remat).
    block_class = maybe_remat(TransformerBlock, self.remat, static_argnums=(3,))
    block = lambda i: block_class(self.width, self.num_heads, self.mlp_ratio, self.dropout,
                                  dtype, name=f"Block_{i}")
    half = self.depth // 2
    skips = []
    for i in range(half):
      h = block(i)(h, None, train)
      skips.append(h)
    h = block(half)(h, None, train)
    for i in range(half):
      h = block(half + 1 + i)(h, skips.pop(), train)  # in-block half − 1 − i's output

    # The head in float32: the output (velocity, noise, image) is what losses consume.
    h = nn.LayerNorm(dtype=jnp.float32, name="norm")(h[:, 1:].astype(jnp.float32))
    h = nn.Dense(int(np.prod(patch)) * self.out_channels, dtype=jnp.float32,
                 name="unpatch")(h)
    h = unpatchify(h, grid, patch, self.out_channels)
    # Only this last layer is zero-initialised (as ADM): a fresh network outputs 0, and the
    # Dense before it still gets gradients once this kernel moves (two zero layers in
    # series would both see a zero gradient forever).
    return nn.Conv(self.out_channels, (3,) * self.dims, kernel_init=zeros_init,
                   dtype=jnp.float32, name="out_conv")(h)


def unpatchify(tokens, grid: Sequence[int], patch: Sequence[int], channels: int):
  """(B, prod(grid), prod(patch)·C) → (B, grid_0·patch_0, …, C): token (i, j, …) fills
  the patch at (i·patch_0, j·patch_1, …), row-major as the patch embedding's grid."""
  batch, dims = tokens.shape[0], len(grid)
  h = tokens.reshape(batch, *grid, *patch, channels)
  # (B, g0, g1, …, p0, p1, …, C) → (B, g0, p0, g1, p1, …, C)
  order = [0] + [a for i in range(dims) for a in (1 + i, 1 + dims + i)] + [1 + 2 * dims]
  h = h.transpose(order)
  return h.reshape(batch, *(g * p for g, p in zip(grid, patch)), channels)
