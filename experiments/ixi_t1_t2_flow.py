r"""IXI: T1w → T2w with conditional flow matching. IXI T1 lies on another grid than T2: `--register rigid` co-registers them (SimpleITK, `pip install medjax[itk]`).

  medjax prepare --layout ixi --root /data/IXI --out data/ixi_t1_t2 \
      --source t1w --target t2w --spacing 1,1,1.2 --size 256 --context 1 --register rigid
  medjax train --config experiments/ixi_t1_t2_flow.py --workdir runs/ixi_t1_t2 \
      --config.data.dir=data/ixi_t1_t2

Scored with the `mri` protocol (volumes on [0, 1]; PSNR, Gaussian SSIM, MAE in the brain mask).
"""

from medjax import config as config_lib


def get_config():
  return config_lib.shards_config(source=("t1w",), target="t2w")
