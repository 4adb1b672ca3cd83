"""Convolutional autoencoders: the first stage of latent and token translators.

`Encoder` maps an image (B, H, W, C) or volume (B, D, H, W, C) to a latent grid
`factor` = 2^(len(channels) - 1) times smaller along every spatial axis (channels (32, 64,
64): 4×; four levels: 8×), `Decoder` maps it back. `AutoEncoder` pairs them: with
`codebook_size` = 0 the encoder gives the (mean, log-variance) of a diagonal Gaussian
(the KL-regularised VAE of latent diffusion, Rombach et al. 2022), with `codebook_size`
= K it gives pre-quantisation features and holds a (K, latent_channels) codebook that
`vector_quantize` snaps them to (VQ-VAE, van den Oord et al. 2017) (docs/design.md,
"Autoencoders and latent translators").

The blocks are the backbones' (GroupNorm + SiLU residual blocks, strided-conv down,
nearest + conv up) without time conditioning; `dtype` is the compute dtype of the
blocks, while parameters, the latent head, the decoder's output head and so the latents
and the output are float32; `remat` recomputes each block's activations in the backward
pass.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.layers import (Downsample, Upsample, check_input, compute_dtype,
                                  group_norm, kernel, maybe_remat, zeros_init)


class Block(nn.Module):
  """GroupNorm, SiLU, conv, twice, around a residual (ADM's block without FiLM); the last
  conv starts at zero, so a fresh block is the identity."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dims = x.ndim - 2
    conv = lambda **k: nn.Conv(self.channels, kernel(3, dims), dtype=self.dtype, **k)
    h = conv()(nn.silu(group_norm(x.shape[-1], dtype=self.dtype)(x)))
    h = conv(kernel_init=zeros_init)(nn.silu(group_norm(self.channels, dtype=self.dtype)(h)))
    if x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, kernel(1, dims), dtype=self.dtype, name="skip")(x)
    return x + h


def _head(h, features: int, dims: int, name: str):
  """GroupNorm + SiLU + conv in float32: latents and images leave the network float32."""
  h = nn.silu(group_norm(h.shape[-1], dtype=jnp.float32, name=f"{name}_norm")(
      h.astype(jnp.float32)))
  return nn.Conv(features, kernel(3, dims), dtype=jnp.float32, name=name)(h)


class Encoder(nn.Module):
  channels: Sequence[int] = (32, 64, 64)  # one level per entry, downsampling between
  num_res_blocks: int = 1
  out_channels: int = 8  # 2 × latent channels for a Gaussian, latent channels for VQ
  dtype: str = "float32"
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    dims = x.ndim - 2
    dtype = compute_dtype(self.dtype)
    block = maybe_remat(Block, self.remat)
    count = iter(range(10_000))
    h = nn.Conv(self.channels[0], kernel(3, dims), dtype=dtype)(x)
    for level, width in enumerate(self.channels):
      for _ in range(self.num_res_blocks):
        h = block(width, dtype, name=f"Block_{next(count)}")(h)
      if level != len(self.channels) - 1:
        h = Downsample(width, dtype)(h)
    h = block(h.shape[-1], dtype, name=f"Block_{next(count)}")(h)
    return _head(h, self.out_channels, dims, "latent")


class Decoder(nn.Module):
  channels: Sequence[int] = (32, 64, 64)  # the encoder's; walked from the last
  num_res_blocks: int = 1
  out_channels: int = 1
  dtype: str = "float32"
  remat: bool = False

  @nn.compact
  def __call__(self, z):
    dims = z.ndim - 2
    dtype = compute_dtype(self.dtype)
    block = maybe_remat(Block, self.remat)
    count = iter(range(10_000))
    h = nn.Conv(self.channels[-1], kernel(3, dims), dtype=dtype)(z.astype(dtype))
    h = block(h.shape[-1], dtype, name=f"Block_{next(count)}")(h)
    for level in reversed(range(len(self.channels))):
      for _ in range(self.num_res_blocks):
        h = block(self.channels[level], dtype, name=f"Block_{next(count)}")(h)
      if level:
        h = Upsample(self.channels[level - 1], dtype)(h)
    return _head(h, self.out_channels, dims, "output")


class AutoEncoder(nn.Module):
  """`encode(x)`: (mean, logvar) with codebook_size 0, else pre-quantisation features;
  `decode(z)`: the image; `__call__(x)`: the decoded mean (or features), for init."""
  out_channels: int = 1
  channels: Sequence[int] = (32, 64, 64)
  num_res_blocks: int = 1
  latent_channels: int = 4
  codebook_size: int = 0
  dims: int = 2
  dtype: str = "float32"
  remat: bool = False

  @property
  def factor(self) -> int:
    return 2 ** (len(self.channels) - 1)

  def setup(self):
    if len(self.channels) < 2:
      raise ValueError(f"model.channels={tuple(self.channels)}: an autoencoder needs two or "
                       "more levels (one downsampling between levels)")
    if self.latent_channels < 1:
      raise ValueError(f"model.latent_channels={self.latent_channels} must be positive")
    moments = self.latent_channels * (1 if self.codebook_size else 2)
    self.encoder = Encoder(tuple(self.channels), self.num_res_blocks, moments, self.dtype,
                           self.remat)
    self.decoder = Decoder(tuple(self.channels), self.num_res_blocks, self.out_channels,
                           self.dtype, self.remat)
    if self.codebook_size:
      self.codebook = self.param("codebook", nn.initializers.normal(1.0),
                                 (self.codebook_size, self.latent_channels), jnp.float32)

  def encode(self, x):
    check_input(x, self.dims, self.factor, f"an autoencoder with {len(self.channels)} levels")
    h = self.encoder(x)
    if self.codebook_size:
      return h
    mean, logvar = jnp.split(h, 2, axis=-1)
    # LDM's clamp: exp(logvar) stays finite whatever a young encoder outputs.
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    return self.decoder(z)

  def __call__(self, x):
    h = self.encode(x)
    return self.decode(h if self.codebook_size else h[0])


def l2_normalize(x, eps: float = 1e-6):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps * eps))


def vector_quantize(z, codebook, *, beta: float = 0.25, normalize: bool = True):
  """z (..., C) snapped to its nearest code of `codebook` (K, C).

  Returns (z_q, indices, terms): z_q carries the straight-through estimator (its forward
  value is the code, its gradient with respect to z that of the identity, through the
  normalisation when `normalize`); indices (...) int32; terms holds `codebook_loss` =
  |sg(z) - q|², `commitment_loss` = |z - sg(q)|², `loss` = codebook + β · commitment
  (VQ-VAE), codebook usage `perplexity` = exp(entropy of the batch's code histogram) (K
  when every code is used equally, 1 when one code takes all) and `dead_codes`, the codes
  no vector of the batch chose. With `normalize` z and the codes are l2-normalised first
  (ViT-VQGAN, Yu et al. 2022): the distance is the cosine one, codes cannot drift away
  in norm and die, and the latents have a fixed scale for a second stage.
  """
  z = z.astype(jnp.float32)
  codes = codebook.astype(jnp.float32)
  if normalize:
    z, codes = l2_normalize(z), l2_normalize(codes)
  flat = z.reshape(-1, z.shape[-1])
  distance = (jnp.sum(flat ** 2, -1, keepdims=True) - 2.0 * flat @ codes.T
              + jnp.sum(codes ** 2, -1)[None, :])
  indices = jnp.argmin(distance, axis=-1).astype(jnp.int32)
  q = codes[indices]
  codebook_loss = jnp.mean((jax.lax.stop_gradient(flat) - q) ** 2)
  commitment_loss = jnp.mean((flat - jax.lax.stop_gradient(q)) ** 2)
  z_q = flat + jax.lax.stop_gradient(q - flat)
  counts = jnp.zeros((codes.shape[0],), jnp.float32).at[indices].add(1.0)
  p = counts / flat.shape[0]
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  terms = {"loss": codebook_loss + beta * commitment_loss, "codebook_loss": codebook_loss,
           "commitment_loss": commitment_loss, "perplexity": jnp.exp(entropy),
           "dead_codes": jnp.sum(counts == 0).astype(jnp.float32)}
  return z_q.reshape(z.shape), indices.reshape(z.shape[:-1]), terms


def lookup(codebook, indices, *, normalize: bool = True):
  """The codes of `indices` (...) → (..., C), as `vector_quantize` gives them."""
  codes = codebook.astype(jnp.float32)
  return (l2_normalize(codes) if normalize else codes)[indices]
