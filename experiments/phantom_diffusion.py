r"""T1w → T2w (or → CT) on the built-in phantom with conditional diffusion (DDPM / DDIM).

  medjax train --config experiments/phantom_diffusion.py --workdir runs/phantom_diffusion
  medjax train --config experiments/phantom_diffusion.py:ct --workdir runs/phantom_diffusion_ct

v-prediction on the cosine schedule (Salimans & Ho 2022) keeps the few-step DDIM sampler
usable; the number of sampling steps is chosen at sampling time (`eval.steps`). Try
`--config.translator.prediction=eps --config.translator.schedule=linear
--config.translator.sampler=ddpm` for the original DDPM.
"""

import ml_collections

from medjax import config as config_lib


def get_config(variant: str = "t2w"):
  """`variant`: the target modality, 't2w' or 'ct'."""
  config = config_lib.base_config()
  config.data.source = ("t1w",)
  config.data.target = variant
  config.translator = ml_collections.ConfigDict({
      "name": "diffusion",
      "prediction": "v",  # 'eps' | 'x0' | 'v'
      "schedule": "cosine",  # 'linear' | 'cosine'
      "timesteps": 1000,  # length of the training chain
      "sampler": "ddim",  # 'ddpm' | 'ddim'
      "eta": 0.0,  # DDIM noise: 0 deterministic, 1 ancestral
      "steps": 8,  # sampling steps when none are asked for
  })
  return config
