r"""Latent translators on the phantom: flow, diffusion or a bridge in a trained VAE's latents.

Train the VAE first (experiments/phantom_vae.py, same target and size), then a second
stage that trains and samples in its latent space (translator.latent_vae) and decodes at
the end. Its evaluation reports the VAE's reconstruction ceiling (`ceiling`, decode(encode(
real target))) beside the model and the baseline (docs/design.md, "Autoencoders and
latent translators").

  medjax train --config experiments/phantom_vae.py --workdir runs/phantom_vae
  medjax train --config experiments/phantom_latent.py --workdir runs/phantom_latent_flow
  medjax train --config experiments/phantom_latent.py:method=bridge --workdir runs/latent_bbdm
  medjax train --config experiments/phantom_latent.py:vae=runs/vae_ct,target=ct --workdir …

Arguments (FILE.py:NAME=VALUE,…):
  vae     the `vae` run directory (default runs/phantom_vae); its target, grid and
          model.dims must be this run's
  method  flow (default) | diffusion | bridge (BBDM, starting from the VAE's encoding of
          the source) | i2sb
  target  t2w (default) | ct | pd | flair: the VAE's modality
  source  t1w (default) | t2w | pd | flair
  dims    2 (default) | 3: a 3D U-Net on the latents of a 3D VAE (phantom_vae.py:dims=3),
          trained on the VAE's patches, sliding-window evaluation
  size    small (default: the 48×48×32 phantom, a 32-channel two-level U-Net on the 12×12
          latents, batch 16, 4000 steps: about 10 minutes on a busy 2-core CPU, the latent
          grid being 16× smaller; on the 1000-step VAE, val PSNR 19.9 dB against the
          intensity map's 18.4 and the VAE's ceiling 21.6) | tiny (32×32×12, 8 channels, 6
          steps: the tests); the VAE's size
"""

from medjax import config as config_lib

PHANTOM_IMAGES = ("t1w", "t2w", "pd", "flair", "ct")
PATCH = {"tiny": (8, 16, 16), "small": (16, 32, 32)}  # phantom_vae.py's


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, vae="runs/phantom_vae", method="flow", target="t2w",
                             source="t1w", dims=2, size="small")
  config_lib.choose("method", arg.method, ("flow", "diffusion", "bridge", "i2sb"))
  config_lib.choose("target", arg.target, PHANTOM_IMAGES)
  config_lib.choose("source", arg.source, PHANTOM_IMAGES)
  config_lib.choose("size", arg.size, ("tiny", "small"))
  config_lib.choose("dims", arg.dims, (2, 3))
  config = config_lib.base_config()
  config.data.source = (arg.source,)
  config.data.target = arg.target
  config_lib.apply_method(config, arg.method)
  config_lib.apply_size(config, arg.size)
  # The latent grid is 4-8× smaller per axis: two levels suffice (and 6×6 latents, 8×,
  # divide by 2 only), attention on the lower one.
  config.model.update(channel_mult=(1, 2), attention_levels=() if arg.size == "tiny" else (1,))
  config.translator.latent_vae = arg.vae
  if arg.size == "small":  # ~10 steps/s on the 12×12 latents: more steps, same minutes
    config.train.total_steps = 4000
    config.eval.every = 2000
    config.checkpoint.every = 1000
  if arg.dims == 3:
    config.model.update(dims=3, attention_levels=())
    config.data.patch = PATCH[arg.size]
    config.train.batch_size = 4
    config.eval.batch_size = 4
  return config
