"""Backbones by name, so an experiment config picks one with a string.

`OPTIONS[name]` declares the `model.*` keys a backbone takes: default and one-line
meaning (printed by `medjax config`).
"""

import dataclasses

import flax.linen as nn

from medjax.models.patchgan import PatchGAN
from medjax.models.resnet import ResNetGenerator
from medjax.models.unet import UNet

MODELS = {"unet": UNet, "resnet": ResNetGenerator, "patchgan": PatchGAN}

OPTIONS = {
    "unet": {
        "channels": (32, "width of the first level (ADM U-Net)"),
        "channel_mult": ((1, 2, 2), "width multiplier per level; one downsampling between levels"),
        "num_res_blocks": (1, "residual blocks per level"),
        "attention_levels": ((2,), "levels (indices into channel_mult) with self-attention"),
        "num_heads": (4, "attention heads"),
        "dropout": (0.0, "dropout inside residual blocks while training"),
    },
    "resnet": {
        "channels": (64, "width of the first convolution (CycleGAN ResNet generator)"),
        "num_blocks": (9, "residual blocks at the lowest resolution"),
    },
    "patchgan": {
        "channels": (64, "width of the first discriminator layer (70×70 PatchGAN)"),
        "num_layers": (3, "strided layers; sets the patch each logit judges"),
        "norm": ("instance", "'instance' | 'none' (logits that depend on their patch only)"),
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
  try:
    return cls(**kwargs)
  except TypeError as error:  # e.g. a required field such as out_channels is missing
    raise ValueError(f"cannot build model {name!r} from {sorted(kwargs)}: {error}") from error


__all__ = ["MODELS", "OPTIONS", "PatchGAN", "ResNetGenerator", "UNet", "build"]
