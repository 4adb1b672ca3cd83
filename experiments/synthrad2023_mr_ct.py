r"""SynthRAD 2023 Task 1 (brain): MR → synthetic CT, sized for one accelerator.

  medjax prepare --layout synthrad2023 --input-dir /data/SynthRAD2023 --output-dir data/synthrad_brain \
      --source mr --target ct --spacing 1x1x2.5 --size 256x256 --context 1
  medjax train --config experiments/synthrad2023_mr_ct.py --workdir runs/synthrad_mr_ct \
      --config.data.dir=data/synthrad_brain
  medjax train --config experiments/synthrad2023_mr_ct.py:method=i2sb ...

3D (the nnsyn recipe: a 3D U-Net on 96³ patches, masked L1, sliding-window inference):

  medjax prepare --layout synthrad2023 --input-dir /data/SynthRAD2023 --output-dir data/synthrad_brain_3d \
      --source mr --target ct --spacing 1.5x1.5x1.5 --size 160x160 --context 0
  medjax train --config experiments/synthrad2023_mr_ct.py:method=regression,dims=3 \
      --workdir runs/synthrad_mr_ct_3d --config.data.dir=data/synthrad_brain_3d

Scored with the challenge's protocol (`synthrad2023`: MAE / PSNR / SSIM in HU inside the
mask). Arguments: method = flow (default) or any of experiments/phantom.py's methods;
dims = 2 (default: 256² slices) | 3 (96³ patches, bf16, remat: one accelerator).
"""

from medjax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="flow", dims=2)
  config_lib.choose("dims", arg.dims, (2, 3))
  config = config_lib.shards_config(source=("mr",), target="ct", method=arg.method)
  if arg.dims == 3:
    config_lib.apply_volumetric(config)
  return config
