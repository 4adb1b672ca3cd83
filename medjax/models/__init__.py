"""Backbones by name, so an experiment config picks one with a string."""

import dataclasses

import flax.linen as nn

from medjax.models.patchgan import PatchGAN
from medjax.models.resnet import ResNetGenerator
from medjax.models.unet import UNet

MODELS = {"unet": UNet, "resnet": ResNetGenerator, "patchgan": PatchGAN}


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


__all__ = ["MODELS", "PatchGAN", "ResNetGenerator", "UNet", "build"]
