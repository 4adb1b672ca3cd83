r"""BraTS 2021: T1w → T2w with conditional flow matching.

  medjax prepare --layout brats2021 --root /data/BraTS2021 --out data/brats_t1_t2 \
      --source t1w --target t2w --spacing 1,1,1 --size 240 --context 1
  medjax train --config experiments/brats_t1_t2_flow.py --workdir runs/brats_t1_t2 \
      --config.data.dir=data/brats_t1_t2

Scored with the `mri` protocol (volumes on [0, 1]; PSNR, Gaussian SSIM, MAE in the brain mask).
"""

from medjax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.data.kind = "shards"
  config.data.source = ("t1w",)
  config.data.target = "t2w"
  config.data.workers = 2
  config.model.channels = 64
  config.model.channel_mult = (1, 2, 2, 4)
  config.model.num_res_blocks = 2
  config.model.attention_levels = (3,)
  config.train.steps = 100_000
  config.train.batch_size = 32
  config.train.learning_rate = 2e-4
  config.train.warmup_steps = 1000
  config.eval.every = 5000
  config.eval.steps = 16
  config.checkpoint.every = 2500
  return config
