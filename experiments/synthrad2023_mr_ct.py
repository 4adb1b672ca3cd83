r"""SynthRAD 2023 Task 1 (brain): MR → synthetic CT, sized for one accelerator.

  medjax prepare --layout synthrad2023 --input-dir /data/SynthRAD2023 --output-dir data/synthrad_brain \
      --source mr --target ct --spacing 1x1x2.5 --size 256x256 --context 1
  medjax train --config experiments/synthrad2023_mr_ct.py --workdir runs/synthrad_mr_ct \
      --config.data.dir=data/synthrad_brain
  medjax train --config experiments/synthrad2023_mr_ct.py:method=i2sb ...

Scored with the challenge's protocol (`synthrad2023`: MAE / PSNR / SSIM in HU inside the
mask). Argument: method = flow (default) or any of experiments/phantom.py's methods.
"""

from medjax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="flow")
  return config_lib.shards_config(source=("mr",), target="ct", method=arg.method)
