r"""Every method on the built-in phantom: T1w → T2w (the default experiment), → CT, …

  medjax train --config experiments/phantom.py --workdir runs/phantom_flow
  medjax train --config experiments/phantom.py:method=diffusion,target=ct --workdir runs/diffusion_ct
  medjax train --config experiments/phantom.py:method=i2sb --workdir runs/phantom_i2sb
  medjax train --config experiments/phantom.py:size=tiny --workdir runs/tiny   # seconds
  medjax config experiments/phantom.py:method=pix2pix   # every key, its value and meaning

Arguments (FILE.py:NAME=VALUE,…):
  method  flow (default: conditional flow matching) | regression (L1) | diffusion (DDPM/DDIM,
          v-prediction, cosine) | bridge (BBDM) | i2sb (I2SB's Schrödinger bridge) |
          pix2pix | cyclegan (unpaired slices from disjoint subjects)
  target  t2w (default) | ct (synthetic CT, scored in HU) | pd | flair
  source  t1w (default) | t2w | pd | flair | cbct (experiments/phantom_cbct_ct.py); several
          joined by '+' (t1w+t2w+pd: three input channels, the first sets the grid)
  misalign  0 (default) | mm: the target is rendered through a per-subject smooth
          deformation and rigid shift of this size (data.phantom.misalign); evaluation
          scores against it and against the aligned truth (aligned_mae, …)
  registration  none (default) | deformable: RegGAN-style registration-aware training
          (train.registration; regression, flow, pix2pix)
  model   the method's backbone (default: U-Net; cyclegan: ResNet generator) | unet |
          uvit (U-ViT transformer; `size` sets its width, depth and patch) | mamba
          (state-space U-Net: Mamba blocks scanning the slice in four directions)
  size    small (default: 48×48×32 phantom at 3.3 mm, 32-channel U-Net, batch 16, 1000
          steps: minutes on a 2-core CPU) | tiny (32×32×12 at 5 mm, 8 channels, 6 steps:
          seconds, what the tests and notebooks in CI run) | base (160×160×96 at 1 mm,
          64 channels, batch 32, 100k steps: an accelerator)
"""

from medjax import config as config_lib

PHANTOM_IMAGES = ("t1w", "t2w", "pd", "flair", "ct", "cbct")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="flow", target="t2w", source="t1w", size="small",
                             misalign=0.0, registration="none", model="")
  config_lib.choose("target", arg.target, PHANTOM_IMAGES)
  sources = tuple(arg.source.split("+"))
  for source in sources:
    config_lib.choose("source", source, PHANTOM_IMAGES)
  config = config_lib.base_config()
  config.data.source = sources
  config.data.target = arg.target
  config_lib.apply_method(config, arg.method)
  if arg.model:
    config_lib.choose("model", arg.model, ("unet", "uvit", "mamba"))
    config.model = config_lib.model_config(arg.model)
  config_lib.apply_size(config, arg.size)
  config.data.phantom.misalign = arg.misalign
  config.train.registration = arg.registration
  return config
