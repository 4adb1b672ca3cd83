r"""T1w → T2w (or → CT) on the built-in phantom with pix2pix (U-Net G, 70×70 PatchGAN D).

  medjax train --config experiments/phantom_pix2pix.py --workdir runs/phantom_pix2pix
  medjax train --config experiments/phantom_pix2pix.py:ct --workdir runs/phantom_pix2pix_ct

The discriminator is sized for a CPU (32 base channels; Isola et al. use 64).
"""

import ml_collections

from medjax import config as config_lib


def get_config(variant: str = "t2w"):
  """`variant`: the target modality, 't2w' or 'ct'."""
  config = config_lib.base_config()
  config.data.source = ("t1w",)
  config.data.target = variant
  config.translator = ml_collections.ConfigDict({
      "name": "pix2pix",
      "gan_loss": "lsgan",  # 'lsgan' | 'hinge'
      "lambda_l1": 100.0,
      "discriminator": {"channels": 32, "num_layers": 3, "norm": "instance"},
      "steps": 1,
  })
  config.train.learning_rate = 5e-4
  config.eval.samples = 1
  return config
