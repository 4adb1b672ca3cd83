r"""SynthRAD 2023 Task 1 (brain): MR → synthetic CT with conditional flow matching.

  medjax prepare --layout synthrad2023 --root /data/SynthRAD2023 --out data/synthrad_brain \
      --source mr --target ct --spacing 1,1,2.5 --size 256 --context 1
  medjax train --config experiments/synthrad2023_mr_ct_flow.py --workdir runs/synthrad_mr_ct \
      --config.data.dir=data/synthrad_brain

Scored with the challenge's protocol (`synthrad2023`: MAE / PSNR / SSIM in HU inside the mask).
"""

from medjax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.data.kind = "shards"
  config.data.source = ("mr",)
  config.data.target = "ct"
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
