"""Translators by name: a config picks its method with `translator.name`."""

from medjax.errors import ConfigError
from medjax.translators.autoregressive import Autoregressive
from medjax.translators.autoencoder import VAE, VQVAE
from medjax.translators.base import Translator, TrainState
from medjax.translators.bridge import Bridge
from medjax.translators.cyclegan import CycleGAN
from medjax.translators.diffusion import Diffusion
from medjax.translators.flow import Flow
from medjax.translators.latent import wrap as latent_wrap
from medjax.translators.pix2pix import Pix2Pix
from medjax.translators.regression import Regression

TRANSLATORS = {cls.name: cls for cls in (Regression, Flow, Diffusion, Bridge, Pix2Pix, CycleGAN,
                                          VAE, VQVAE, Autoregressive)}


def build(config) -> Translator:
  """The config's translator; a ConfigError for an unknown method, model or option value."""
  name = config.translator.name
  if name not in TRANSLATORS:
    raise ConfigError(f"translator.name={name!r}; known: {', '.join(sorted(TRANSLATORS))}")
  cls = TRANSLATORS[name]
  try:
    if config.translator.get("latent_vae"):  # in a VAE's latent space (translators/latent.py)
      cls = latent_wrap(cls)
    return cls(config)
  except ValueError as error:
    raise ConfigError(str(error)) from None


__all__ = ["TRANSLATORS", "Translator", "TrainState", "build"]
