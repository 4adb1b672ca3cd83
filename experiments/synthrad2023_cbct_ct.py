r"""SynthRAD 2023/2025 Task 2: CBCT → synthetic CT, sized for one accelerator.

  medjax prepare --layout synthrad2023 --input-dir /data/SynthRAD2023/Task2 --output-dir data/synthrad_cbct \
      --source cbct --target ct --spacing 1x1x2.5 --size 256x256 --context 1
  medjax train --config experiments/synthrad2023_cbct_ct.py --workdir runs/synthrad_cbct_ct \
      --config.data.dir=data/synthrad_cbct
  medjax train --config experiments/synthrad2023_cbct_ct.py:method=regression,size=tiny ...

The same folders in SynthRAD 2025's .mha layout: `--layout synthrad2025`. CBCT is CT-like
(`modalities.is_ct`): its intensities keep the fixed HU window, so a miscalibrated CBCT
stays miscalibrated on the way in — what the model must learn to correct. Scored with the
challenge's protocol (`synthrad2023`: MAE / PSNR / SSIM in HU inside the mask).

Arguments: method = flow (default) or any of experiments/phantom.py's methods;
size = full (default: 256² slices, 64-channel U-Net) or tiny (the tests: an 8-channel
U-Net, a few steps); dims = 2 (default) | 3 (96³ patches with a 3D U-Net, bf16, remat:
prepare with --spacing 1.5x1.5x1.5 --size 160x160 --context 0).
"""

from medjax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="flow", size="full", dims=2)
  config_lib.choose("size", arg.size, ("full", "tiny"))
  config_lib.choose("dims", arg.dims, (2, 3))
  config = config_lib.shards_config(source=("cbct",), target="ct", method=arg.method)
  if arg.dims == 3:
    config_lib.apply_volumetric(config)
  if arg.size == "tiny":
    config_lib.apply_size(config, "tiny")
    if arg.dims == 3:
      config.data.patch = (8, 16, 16)
      config.model.update(remat=False, dtype="float32", channel_mult=(1, 2), decoder_blocks=None)
  return config
