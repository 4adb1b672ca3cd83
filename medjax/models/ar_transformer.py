"""Encoder–decoder transformer over a VQ token grid (docs/design.md, "Autoregressive
translator").

Encoder: the source image → one vector per token of the target's grid: a convolution with
kernel = stride = the tokenizer's `factor` (`stem=0`), or a convolutional stem (`stem=C`:
3×3 convolutions of stride 2, C, 2C, … channels, GELU between, halving the image
log2(factor) times, then a 1×1 convolution to the width; Xiao et al. 2021, "Early
convolutions help transformers see better": overlapping receptive fields, where the
patch embedding cuts the image into disjoint squares) → learned positions → `depth`
bidirectional pre-LN layers → LayerNorm: the memory. Decoder: the target tokens in raster (row-major)
order shifted right behind a BOS token (id `codebook_size`) → token + learned position
embeddings + a projection (zero-initialised) of the memory vector of the same grid cell
(the source and target grids are aligned: position i, which predicts token i, reads the
source where token i lies) →
`depth` pre-LN layers (causal self-attention, cross-attention to the whole memory, GELU
MLP) → LayerNorm → logits over the codebook.

Three entry points share the parameters (`setup`), all pure:
  `__call__(source, tokens)`        teacher forcing: (B, N, V) logits, every position at once;
  `encode(source)`                  the memory and the cross-attention keys/values of every
                                    decoder layer, computed once per sample;
  `decode_step(token, i, cache, context)` position i's logits from token i−1 and the explicit
                                    self-attention KV cache (`empty_cache`), which it returns
                                    updated: what the sampler scans over.
Attention is written out (not flax's MultiHeadDotProductAttention) so the cache is a plain
pytree. Parameters are float32; projections compute in `dtype`; LayerNorm statistics, the
softmax and the logits are float32. Each residual branch's last projection is
zero-initialised (a fresh layer is the identity, as the U-ViT's blocks).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.models.layers import compute_dtype, maybe_remat, zeros_init

NEG_INF = -1e30  # a masked logit: exp underflows to exactly 0 in float32


def attention(q, k, v, mask, dtype):
  """Scaled dot-product attention, softmax in float32. q (B, Q, H, D), k/v (B, K, H, D),
  mask broadcastable to (B, H, Q, K) (True: attend) or None."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
  logits = logits / np.sqrt(q.shape[-1]).astype(np.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, NEG_INF)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class Attention(nn.Module):
  """Multi-head attention whose keys/values the caller supplies (a cache or the memory)."""
  width: int
  heads: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    head = (self.heads, self.width // self.heads)
    self.query = nn.DenseGeneral(head, dtype=self.dtype)
    self.key = nn.DenseGeneral(head, dtype=self.dtype)
    self.value = nn.DenseGeneral(head, dtype=self.dtype)
    self.out = nn.DenseGeneral(self.width, axis=(-2, -1), kernel_init=zeros_init,
                               dtype=self.dtype)

  def keys_values(self, x):
    return self.key(x), self.value(x)

  def __call__(self, x, k, v, mask=None):
    return self.out(attention(self.query(x), k, v, mask, self.dtype))


class MLP(nn.Module):
  width: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(int(self.width * self.mlp_ratio), dtype=self.dtype)(x))
    return nn.Dense(self.width, kernel_init=zeros_init, dtype=self.dtype)(h)


class EncoderLayer(nn.Module):
  width: int
  heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  dropout: float = 0.0

  def setup(self):
    self.norm_attn = nn.LayerNorm(dtype=self.dtype)
    self.attn = Attention(self.width, self.heads, self.dtype)
    self.norm_mlp = nn.LayerNorm(dtype=self.dtype)
    self.mlp = MLP(self.width, self.mlp_ratio, self.dtype)
    self.drop = nn.Dropout(self.dropout)

  def __call__(self, x, train: bool = False):
    # `train` is positional: nn.remat marks it static by position (static_argnums=(2,)).
    h = self.norm_attn(x)
    x = x + self.drop(self.attn(h, *self.attn.keys_values(h)), deterministic=not train)
    return x + self.drop(self.mlp(self.norm_mlp(x)), deterministic=not train)


class DecoderLayer(nn.Module):
  width: int
  heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  dropout: float = 0.0

  def setup(self):
    self.norm_self = nn.LayerNorm(dtype=self.dtype)
    self.self_attn = Attention(self.width, self.heads, self.dtype)
    self.norm_cross = nn.LayerNorm(dtype=self.dtype)
    self.cross_attn = Attention(self.width, self.heads, self.dtype)
    self.norm_mlp = nn.LayerNorm(dtype=self.dtype)
    self.mlp = MLP(self.width, self.mlp_ratio, self.dtype)
    self.drop = nn.Dropout(self.dropout)

  def cross_keys_values(self, memory):
    return self.cross_attn.keys_values(memory)

  def __call__(self, x, memory, train: bool = False):
    """Every position at once under the causal mask (teacher forcing); residual dropout
    while training (`step`, the sampler's path, never drops)."""
    drop = lambda h: self.drop(h, deterministic=not train)
    h = self.norm_self(x)
    causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    x = x + drop(self.self_attn(h, *self.self_attn.keys_values(h), causal))
    x = x + drop(self.cross_attn(self.norm_cross(x), *self.cross_keys_values(memory)))
    return x + drop(self.mlp(self.norm_mlp(x)))

  def step(self, x, position, cache, cross):
    """One position: x (B, 1, W); cache = (k, v), each (B, N, H, D), holds positions
    < `position`; its slot `position` is written here. Keys past it are masked."""
    h = self.norm_self(x)
    k, v = self.self_attn.keys_values(h)
    k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), position, 1)
    v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), position, 1)
    seen = jnp.arange(k.shape[1]) <= position
    x = x + self.self_attn(h, k, v, seen)
    x = x + self.cross_attn(self.norm_cross(x), *cross)
    return x + self.mlp(self.norm_mlp(x)), (k, v)


class ARTransformer(nn.Module):
  codebook_size: int  # V: the tokenizer's codes; the BOS token is id V
  factor: int  # the tokenizer's downsampling: source pixels per token along each axis
  dims: int = 2
  width: int = 128
  depth: int = 4
  heads: int = 4
  mlp_ratio: float = 4.0
  context: int = 256  # the most tokens a grid may have (learned positions)
  dtype: str = "float32"
  remat: bool = False
  dropout: float = 0.0  # residual-branch dropout while training (teacher forcing only)
  stem: int = 0  # 0: the linear patch embedding; C: a stride-2 conv stem from C channels

  def setup(self):
    dtype = compute_dtype(self.dtype)
    if self.width % self.heads:
      raise ValueError(f"model.width={self.width} not divisible by model.heads={self.heads}")
    if min(self.depth, self.context, self.codebook_size, self.factor) < 1:
      raise ValueError("model.depth, model.context, the codebook size and the factor must be "
                       f"≥ 1, got {self.depth}, {self.context}, {self.codebook_size}, "
                       f"{self.factor}")
    if self.stem:
      halvings = self.factor.bit_length() - 1
      if self.stem < 0 or self.factor != 2 ** halvings:
        raise ValueError(f"model.stem={self.stem} needs stem ≥ 0 and a tokenizer factor that "
                         f"is a power of 2, got factor {self.factor}")
      kernel, stride = (3,) * self.dims, (2,) * self.dims
      self.stem_convs = [nn.Conv(self.stem * 2 ** i, kernel, strides=stride, dtype=dtype)
                         for i in range(halvings)]
      self.patch_embed = nn.Conv(self.width, (1,) * self.dims, dtype=dtype)
    else:
      patch = (self.factor,) * self.dims
      self.patch_embed = nn.Conv(self.width, patch, strides=patch, padding="VALID",
                                 dtype=dtype)
    init = nn.initializers.normal(0.02)
    self.source_position = self.param("source_position", init, (self.context, self.width))
    self.token_position = self.param("token_position", init, (self.context, self.width))
    self.token_embed = nn.Embed(self.codebook_size + 1, self.width, embedding_init=init)
    # Zero-initialised: the unit-scale memory would otherwise drown the 0.02-scale token
    # embedding at the start (the decoder then learns the previous token slowly).
    self.source_in = nn.Dense(self.width, kernel_init=zeros_init, dtype=dtype)
    # Named by attribute (encoder_0, …), so remat leaves the parameter tree as is.
    encoder = maybe_remat(EncoderLayer, self.remat, static_argnums=(2,))
    decoder = maybe_remat(DecoderLayer, self.remat, static_argnums=(3,))
    self.encoder = [encoder(self.width, self.heads, self.mlp_ratio, dtype, self.dropout)
                    for _ in range(self.depth)]
    self.decoder = [decoder(self.width, self.heads, self.mlp_ratio, dtype, self.dropout)
                    for _ in range(self.depth)]
    self.encoder_norm = nn.LayerNorm(dtype=dtype)
    self.decoder_norm = nn.LayerNorm(dtype=jnp.float32)
    self.logits = nn.Dense(self.codebook_size, dtype=jnp.float32)

  def grid(self, source_shape: Sequence[int]) -> tuple[int, ...]:
    """The token grid of a source of this shape; a ValueError if it does not fit."""
    return token_grid(source_shape, self.dims, self.factor, self.context)

  def embed_source(self, source):
    """(B, N, W): one vector per token cell, raster order, before positions and layers."""
    n = int(np.prod(self.grid(source.shape)))
    h = source
    for conv in self.stem_convs if self.stem else ():
      h = nn.gelu(conv(h))  # 'SAME' padding, stride 2: each side halves exactly
    return self.patch_embed(h).reshape(source.shape[0], n, self.width)

  def memory(self, source, train: bool = False):
    h = self.embed_source(source)
    h = h + self.source_position[:h.shape[1]].astype(h.dtype)
    for layer in self.encoder:
      h = layer(h, train)
    return self.encoder_norm(h)

  def embed(self, tokens, start: int | jax.Array = 0):
    """Token ids (B, L) at positions start … start+L−1 → (B, L, W)."""
    positions = jax.lax.dynamic_slice_in_dim(self.token_position, start, tokens.shape[1])
    h = self.token_embed(tokens) + positions
    return h.astype(compute_dtype(self.dtype))

  def head(self, h):
    return self.logits(self.decoder_norm(h.astype(jnp.float32)))

  def __call__(self, source, tokens, train: bool = False):
    """Teacher forcing: logits (B, N, V) of each target token given the tokens before it
    (raster order) and the source. tokens (B, N) int. `train`: dropout on (the caller
    passes a 'dropout' rng)."""
    memory = self.memory(source, train)
    if tokens.shape[1] != memory.shape[1]:
      raise ValueError(f"{tokens.shape[1]} target tokens for a source grid of "
                       f"{memory.shape[1]}")
    bos = jnp.full((tokens.shape[0], 1), self.codebook_size, tokens.dtype)
    h = self.embed(jnp.concatenate([bos, tokens[:, :-1]], axis=1)) + self.source_in(memory)
    for layer in self.decoder:
      h = layer(h, memory, train)
    return self.head(h)

  def encode(self, source):
    """(memory, every decoder layer's cross-attention (k, v)): once per sample."""
    memory = self.memory(source)
    return memory, tuple(layer.cross_keys_values(memory) for layer in self.decoder)

  def decode_step(self, token, position, cache, context):
    """Logits (B, V) of the token at `position` given token `position` − 1 (BOS at 0),
    with the cache of positions before it and `encode`'s context; returns (logits,
    updated cache)."""
    memory, cross = context
    h = self.embed(token[:, None], position)
    h = h + self.source_in(jax.lax.dynamic_slice_in_dim(memory, position, 1, axis=1))
    new_cache = []
    for layer, layer_cache, layer_cross in zip(self.decoder, cache, cross):
      h, layer_cache = layer.step(h, position, layer_cache, layer_cross)
      new_cache.append(layer_cache)
    return self.head(h)[:, 0], tuple(new_cache)


def token_grid(source_shape: Sequence[int], dims: int, factor: int, context: int):
  """(h, w[, d]) tokens of a (B, H, W[, D], C) source: each side over `factor`. A
  ValueError names what is wrong: the rank, a side not divisible, a grid longer than the
  transformer's context."""
  if len(source_shape) != dims + 2:
    raise ValueError(f"model.dims={dims} expects {dims + 2}-D inputs, got shape "
                     f"{tuple(source_shape)}")
  sides = tuple(source_shape[1:-1])
  if any(s % factor for s in sides):
    raise ValueError(f"the tokenizer's factor {factor} does not divide the image sides "
                     f"{'x'.join(map(str, sides))}")
  grid = tuple(s // factor for s in sides)
  if int(np.prod(grid)) > context:
    raise ValueError(f"the token grid {'x'.join(map(str, grid))} ({int(np.prod(grid))} "
                     f"tokens) is longer than model.context={context}")
  return grid


def empty_cache(model: ARTransformer, batch: int, length: int):
  """The decoder's self-attention KV cache for `length` positions: per layer (k, v),
  zeros of (B, length, heads, width/heads) in the compute dtype."""
  shape = (batch, length, model.heads, model.width // model.heads)
  zeros = jnp.zeros(shape, compute_dtype(model.dtype))
  return tuple((zeros, zeros) for _ in range(model.depth))
