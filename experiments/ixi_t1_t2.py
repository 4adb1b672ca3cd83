r"""IXI: T1w → T2w, sized for one accelerator. IXI's T1 lies on another grid than its T2:
`--register rigid` co-registers them (SimpleITK, `pip install 'medjax[itk]'`).

  medjax prepare --layout ixi --input-dir /data/IXI --output-dir data/ixi_t1_t2 \
      --source t1w --target t2w --spacing 1x1x1.2 --size 256x256 --context 1 --register rigid
  medjax train --config experiments/ixi_t1_t2.py --workdir runs/ixi_t1_t2 \
      --config.data.dir=data/ixi_t1_t2

Scored with the `mri` protocol (volumes on [0, 1]; PSNR, Gaussian SSIM, MAE in the brain
mask). Argument: method = flow (default) or any of experiments/phantom.py's methods.
"""

from medjax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="flow")
  return config_lib.shards_config(source=("t1w",), target="t2w", method=arg.method)
