r"""BraTS 2021: T1w → T2w with conditional flow matching.

  medjax prepare --layout brats2021 --root /data/BraTS2021 --out data/brats_t1_t2 \
      --source t1w --target t2w --spacing 1,1,1 --size 240 --context 1
  medjax train --config experiments/brats_t1_t2_flow.py --workdir runs/brats_t1_t2 \
      --config.data.dir=data/brats_t1_t2

Scored with the `mri` protocol (volumes on [0, 1]; PSNR, Gaussian SSIM, MAE in the brain mask).
"""

from medjax import config as config_lib


def get_config():
  return config_lib.shards_config(source=("t1w",), target="t2w")
