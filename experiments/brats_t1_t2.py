r"""BraTS 2021: T1w → T2w, sized for one accelerator.

  medjax prepare --layout brats2021 --input-dir /data/BraTS2021 --output-dir data/brats_t1_t2 \
      --source t1w --target t2w --spacing 1x1x1 --size 240x240 --context 1
  medjax train --config experiments/brats_t1_t2.py --workdir runs/brats_t1_t2 \
      --config.data.dir=data/brats_t1_t2

Scored with the `mri` protocol (volumes on [0, 1]; PSNR, Gaussian SSIM, MAE in the brain
mask). Argument: method = flow (default) or any of experiments/phantom.py's methods.
"""

from medjax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="flow")
  return config_lib.shards_config(source=("t1w",), target="t2w", method=arg.method)
