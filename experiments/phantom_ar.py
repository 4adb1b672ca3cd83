r"""Autoregressive translation on the phantom: a transformer predicts the target's VQ tokens.

Two runs (docs/design.md, "Autoregressive translator"): first the VQ tokenizer, an
autoencoder of the target images, then the translator on top of it (its frozen
parameters are copied into the second run, so the first may be deleted afterwards):

  medjax train --config experiments/phantom_vae.py:kind=vq --workdir runs/phantom_vq
  medjax train --config experiments/phantom_ar.py --workdir runs/phantom_ar
  medjax train --config experiments/phantom_ar.py:tokenizer=runs/vq_ct,target=ct --workdir runs/ar_ct
  medjax config experiments/phantom_ar.py   # every key, its value and meaning

Arguments (FILE.py:NAME=VALUE,…):
  tokenizer  runs/phantom_vq (default): the vqvae run directory (translator.tokenizer); its
          target, grid and intensity window must be this run's (a one-line error says
          which differs)
  target  t2w (default) | ct | pd | flair: as the tokenizer's
  source  t1w (default) | t2w | pd | flair | cbct
  size    small (default: 48×48 slices, a 4-layer encoder and decoder of width 128, batch
          16, 1500 steps; a 4× tokenizer gives 144 tokens) | tiny (32×32, width 32, 2
          layers, 6 steps: seconds, the tests) | base (160×160, width 512, 8 layers,
          context 1600: an accelerator); as the tokenizer's size

Measured on this project's 2-core CPU (T1w → T2w, size=small, val split, 2 subjects;
the machine shared with a test run part of the time): the vq tokenizer
(phantom_vae.py:kind=vq: 128 codes, 1500 steps) 6.4 min, its reconstruction ceiling PSNR
20.27 dB, SSIM 0.838; this run 10 min, PSNR 19.09 dB, SSIM 0.790, MAE 0.0665 against
the intensity map's 18.44 dB, 0.802, 0.0631: above the map in PSNR, still a little
below it in SSIM and MAE (8 draws: 19.23 dB, 0.794, 0.0652; temperature 0.7 or 0.5 no
better). On the tokenizer of 512 codes it reached 18.40 dB, 0.745: fewer codes, more of
them used, are easier to predict. Trained 3000 steps (16 min) it levels off from step
2000 at 19.2 dB, 0.795 while its training token accuracy climbs from 0.83 (step 1500)
to 0.95 (2500): more steps overfit the training subjects; regularisation (dropout, augmentation of the token
model) is what is left to try.
"""

from medjax import config as config_lib

PHANTOM_IMAGES = ("t1w", "t2w", "pd", "flair", "ct", "cbct")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, tokenizer="runs/phantom_vq", target="t2w", source="t1w",
                             size="small")
  config_lib.choose("target", arg.target, PHANTOM_IMAGES)
  config_lib.choose("source", arg.source, PHANTOM_IMAGES)
  config = config_lib.base_config()
  config.data.source = (arg.source,)
  config.data.target = arg.target
  config.model = config_lib.model_config("ar_transformer")
  config.translator = config_lib.translator_config("autoregressive", tokenizer=arg.tokenizer)
  config_lib.apply_size(config, arg.size)
  if arg.size == "small":  # 1000 steps leave the token accuracy still rising (0.62 → 0.67)
    config.train.total_steps = 1500
  return config
