r"""T1w → CT in 3D on the built-in phantom: the nnsyn recipe in miniature.

A 3D U-Net (model.dims=3) trained on random 16×32×32 patches — a third of them centred on
the head (nnU-Net's foreground oversampling) — with an L1 loss inside the body mask
(train.masked_loss), and evaluated by Gaussian-weighted sliding-window inference over each
held-out volume (eval.overlap). The slice-consistency metric `through_plane_mae` in its
summary is the number to hold against the 2D run (experiments/phantom.py:target=ct).

  medjax train --config experiments/phantom_mr_ct_3d.py --workdir runs/ct_3d
  medjax train --config experiments/phantom_mr_ct_3d.py:method=flow --workdir runs/ct_3d_flow
  medjax translate --workdir runs/ct_3d --input t1w.nii.gz --output sct.nii.gz --tta flip

Arguments (FILE.py:NAME=VALUE,…):
  method  regression (default: masked L1) | flow | diffusion | bridge | i2sb | pix2pix |
          cyclegan — every translator runs in 3D
  target  ct (default) | t2w | pd | flair
  model   unet (default) | uvit (the transformer backbone)
  size    small (default: the 48×48×32 phantom, 16×32×32 patches, a 16-channel 3D U-Net,
          batch 4, 450 steps: about 14 minutes on a 2-core CPU) | tiny (32×32×12, 8×16×16 patches, 8 channels:
          seconds, the tests)
"""

from medjax import config as config_lib

PATCH = {"tiny": (8, 16, 16), "small": (16, 32, 32)}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="regression", target="ct", model="unet",
                             size="small")
  config_lib.choose("target", arg.target, ("ct", "t2w", "pd", "flair"))
  config_lib.choose("model", arg.model, ("unet", "uvit"))
  config_lib.choose("size", arg.size, tuple(PATCH))
  config = config_lib.base_config()
  config.data.source = ("t1w",)
  config.data.target = arg.target
  config_lib.apply_method(config, arg.method)
  config_lib.apply_size(config, arg.size)
  config.data.patch = PATCH[arg.size]
  config.train.masked_loss = True
  if config.model.name == "unet" and arg.model == "unet":
    width = {"tiny": 8, "small": 16}[arg.size]
    config.model.update(channels=width, channel_mult=(1, 2) if arg.size == "tiny" else (1, 2, 2),
                        attention_levels=())
  elif arg.model == "uvit":
    config.model = config_lib.model_config("uvit", **config_lib.SIZES[arg.size]["uvit"])
  config.model.dims = 3
  if arg.size == "small":
    # 0.54 steps/s on the idle 2-core CPU: 450 steps and two evaluations in < 15 minutes
    config.train.update(batch_size=4, total_steps=450, learning_rate=1e-3, warmup_steps=50)
    config.eval.update(every=225, batch_size=4)
    config.checkpoint.every = 250
  else:
    config.eval.batch_size = 4
  if config.translator.name in ("pix2pix", "cyclegan"):
    # a PatchGAN's logit needs room along D: 8-deep patches take one strided layer,
    # 16-deep ones two
    config.translator.discriminator.num_layers = {"tiny": 1, "small": 2}[arg.size]
  return config
