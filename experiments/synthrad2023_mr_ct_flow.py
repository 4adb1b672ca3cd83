r"""SynthRAD 2023 Task 1 (brain): MR → synthetic CT with conditional flow matching.

  medjax prepare --layout synthrad2023 --root /data/SynthRAD2023 --out data/synthrad_brain \
      --source mr --target ct --spacing 1,1,2.5 --size 256 --context 1
  medjax train --config experiments/synthrad2023_mr_ct_flow.py --workdir runs/synthrad_mr_ct \
      --config.data.dir=data/synthrad_brain

Scored with the challenge's protocol (`synthrad2023`: MAE / PSNR / SSIM in HU inside the mask).
"""

from medjax import config as config_lib


def get_config():
  return config_lib.shards_config(source=("mr",), target="ct")
