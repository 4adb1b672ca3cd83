r"""T1w → T2w (or → CT) on the built-in phantom with CycleGAN, trained on unpaired slices.

  medjax train --config experiments/phantom_cyclegan.py --workdir runs/phantom_cyclegan
  medjax train --config experiments/phantom_cyclegan.py:ct --workdir runs/phantom_cyclegan_ct

Source and target slices come from disjoint halves of the training subjects
(`data.unpaired`). ResNet generators with 9 blocks as Zhu et al., but 16 base channels
(not 64) so it trains on a CPU; raise `model.channels` on an accelerator.
"""

import ml_collections

from medjax import config as config_lib


def get_config(variant: str = "t2w"):
  """`variant`: the target modality, 't2w' or 'ct'."""
  config = config_lib.base_config()
  config.data.source = ("t1w",)
  config.data.target = variant
  config.data.unpaired = True
  config.model = ml_collections.ConfigDict({"name": "resnet", "channels": 16, "num_blocks": 9})
  config.translator = ml_collections.ConfigDict({
      "name": "cyclegan",
      "gan_loss": "lsgan",  # 'lsgan' | 'hinge'
      "lambda_cycle": 10.0,
      "lambda_identity": 0.5,  # times lambda_cycle, as Zhu et al.
      "pool_size": 50,
      "discriminator": {"channels": 32, "num_layers": 3, "norm": "instance"},
      "steps": 1,
  })
  config.train.learning_rate = 2e-4
  config.eval.samples = 1
  return config
