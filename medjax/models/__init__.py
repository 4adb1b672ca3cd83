"""Backbones by name, so an experiment config picks one with a string.

`OPTIONS[name]` declares the `model.*` keys a backbone takes: default and one-line
meaning (printed by `medjax config`).
"""

import dataclasses

import flax.linen as nn

from medjax.models.ar_transformer import ARTransformer
from medjax.models.autoencoder import AutoEncoder
from medjax.models.layers import DTYPES
from medjax.models.mamba import MambaUNet
from medjax.models.patchgan import PatchGAN
from medjax.models.resnet import ResNetGenerator
from medjax.models.unet import UNet
from medjax.models.uvit import UViT

MODELS = {"unet": UNet, "resnet": ResNetGenerator, "patchgan": PatchGAN, "uvit": UViT,
          "mamba": MambaUNet, "autoencoder": AutoEncoder, "ar_transformer": ARTransformer}

DTYPE = ("float32", "compute dtype (a GAN's discriminator too): "
                    + " | ".join(map(repr, DTYPES)) + "; parameters, norm statistics, "
                    "softmax, output and loss stay float32 (float16: no loss scaling)")
DIMS = (2, "spatial axes of the inputs: 2 (B, H, W, C) slices | 3 (B, D, H, W, C) volumes, "
           "3^dims kernels")
REMAT = (False, "recompute each residual/attention/state-space block's activations in the "
                "backward pass (less memory; ~17 % more FLOPs per step)")

OPTIONS = {
    "unet": {
        "channels": (32, "width of the first level (ADM U-Net)"),
        "channel_mult": ((1, 2, 2), "width multiplier per level; one downsampling between levels"),
        "num_res_blocks": (1, "residual blocks per level"),
        "attention_levels": ((2,), "levels (indices into channel_mult) with self-attention"),
        "num_heads": (4, "attention heads"),
        "dropout": (0.0, "dropout inside residual blocks while training"),
        "dtype": DTYPE,
        "remat": REMAT,
        "dims": DIMS,
        "decoder_blocks": (None, "None: ADM decoder (num_res_blocks + 1 blocks per level, "
                                 "each taking a skip) | N: N blocks per level after one skip "
                                 "per level (nnU-Net ResEnc: the encoder is deeper)"),
    },
    "resnet": {
        "channels": (64, "width of the first convolution (CycleGAN ResNet generator)"),
        "num_blocks": (9, "residual blocks at the lowest resolution"),
        "dtype": DTYPE,
        "remat": REMAT,
        "dims": DIMS,
    },
    "patchgan": {
        "channels": (64, "width of the first discriminator layer (70×70 PatchGAN)"),
        "num_layers": (3, "strided layers; sets the patch each logit judges"),
        "norm": ("instance", "'instance' | 'none' (logits that depend on their patch only)"),
        "dtype": ("float32", "compute dtype (as 'unet'); a GAN's discriminator takes "
                             "model.dtype"),
        "dims": (2, "spatial axes (as 'unet'); a GAN's discriminator takes model.dims"),
    },
    "uvit": {
        "dims": (2, "2: slices (B, H, W, C) | 3: volumes (B, D, H, W, C)"),
        "patch_size": (4, "side of the square/cubic patch each token covers; input sides "
                          "must be multiples of it"),
        "width": (128, "token width (hidden size) of the U-ViT transformer"),
        "depth": (7, "transformer blocks, odd: depth//2 in, one mid, depth//2 out, "
                     "long skips between in and out"),
        "num_heads": (4, "attention heads (dividing width)"),
        "mlp_ratio": (4.0, "MLP hidden width over the token width"),
        "dropout": (0.0, "dropout on each block's attention and MLP branch while training"),
        "dtype": DTYPE,
        "remat": REMAT,
    },
    "mamba": {
        "channels": (32, "width of the first level (U-Net of residual and state-space blocks)"),
        "channel_mult": ((1, 2, 2), "width multiplier per level; one downsampling between "
                                    "levels"),
        "num_res_blocks": (1, "residual blocks per level, each followed by a state-space "
                              "block on the levels of ssm_levels"),
        "ssm_levels": (None, "levels (indices into channel_mult) with state-space blocks; "
                             "None: every level but the first (full resolution)"),
        "d_state": (16, "state size N of each channel's selective scan (Mamba)"),
        "expand": (2, "inner width of a Mamba block over its input width"),
        "d_conv": (4, "width of the causal depthwise convolution along each scan"),
        "scan_chunk": (16, "steps per chunk of the selective scan (an associative scan in "
                           "each, the state carried between them; only one chunk's states "
                           "in memory) | 0: one associative scan over the whole sequence"),
        "dropout": (0.0, "dropout inside residual blocks while training"),
        "dtype": DTYPE,
        "remat": REMAT,
        "dims": DIMS,
    },
    "ar_transformer": {  # translator 'autoregressive' only: it sets codebook and factor
        "dims": (2, "2: slices | 3: volumes; the tokenizer's (translator.tokenizer) dims"),
        "width": (128, "token width of the encoder–decoder transformer"),
        "depth": (4, "layers of the encoder and, as many, of the decoder"),
        "heads": (4, "attention heads (dividing width)"),
        "mlp_ratio": (4.0, "MLP hidden width over the token width"),
        "dropout": (0.0, "dropout on each layer's attention and MLP branch while training "
                         "(teacher forcing; the sampler never drops)"),
        "stem": (0, "source encoder's input: 0, one linear embedding of each token's "
                    "factor×factor patch | C, a convolutional stem: 3×3 stride-2 "
                    "convolutions of C, 2C, … channels down to the token grid (overlapping "
                    "receptive fields)"),
        "context": (256, "the most tokens a grid may hold (learned positions): the image "
                         "sides over the tokenizer's factor, multiplied"),
        "dtype": DTYPE,
        "remat": REMAT,
    },
    "autoencoder": {
        "channels": ((32, 64, 64), "width per level, one downsampling between levels: 3 "
                                   "levels = 4×, 4 levels = 8× smaller latents (vae, vqvae)"),
        "num_res_blocks": (1, "residual blocks per level, encoder and decoder"),
        "latent_channels": (4, "channels of the latent grid (the codes' dimension for vqvae)"),
        "dtype": DTYPE,
        "remat": REMAT,
        "dims": DIMS,
    },
}


def build(name: str, **kwargs) -> nn.Module:
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
  cls = MODELS[name]
  # checked here, not left to the dataclass TypeError, so a config typo names its key.
  fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "parent"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"unknown argument(s) {unknown} for model {name!r}; "
                     f"it takes: {', '.join(sorted(fields - {'name'}))}")
  if "dtype" in kwargs and kwargs["dtype"] not in DTYPES:
    raise ValueError(f"model dtype {kwargs['dtype']!r}; known: {', '.join(DTYPES)}")
  try:
    return cls(**kwargs)
  except TypeError as error:  # e.g. a required field such as out_channels is missing
    raise ValueError(f"cannot build model {name!r} from {sorted(kwargs)}: {error}") from error


__all__ = ["ARTransformer", "AutoEncoder", "DTYPES", "MODELS", "OPTIONS", "MambaUNet", "PatchGAN",
           "ResNetGenerator", "UNet",
           "UViT", "build"]
