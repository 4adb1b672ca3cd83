r"""An autoencoder of one phantom modality: the first stage of latent and token translators.

A run here is an ordinary run whose source and target are the same modality (data.source
= data.target): it learns decode(encode(x)) ≈ x, its `medjax evaluate` scores that
reconstruction, the ceiling of every second stage built on it (docs/design.md,
"Autoencoders and latent translators").

  medjax train --config experiments/phantom_vae.py --workdir runs/phantom_vae
  medjax train --config experiments/phantom_vae.py:kind=vq --workdir runs/phantom_vqvae
  medjax train --config experiments/phantom_vae.py:target=ct --workdir runs/phantom_vae_ct
  medjax train --config experiments/phantom_latent.py --workdir runs/phantom_latent_flow

Arguments (FILE.py:NAME=VALUE,…):
  kind    kl (default: `vae`, L1 + 1e-6 KL, latents for latent flow/diffusion/bridge) | vq
          (`vqvae`, 128 l2-normalised codes, tokens for the autoregressive translator;
          at size=small 1500 steps, 6.4 min on a 2-core CPU: reconstruction val PSNR 20.3
          dB, SSIM 0.838, perplexity 50, 7 dead codes. 512 codes reach the same ceiling
          with 160 dead codes, and the translator on their tokens is 0.7 dB worse)
  target  t2w (default) | t1w | pd | flair | ct: the modality encoded (the second stage's
          target)
  dims    2 (default: axial slices) | 3 (16×32×32 patches, tiny: 8×16×16; sliding-window
          evaluation)
  factor  4 (default: three levels) | 8 (four levels): latents 4× or 8× smaller per axis
  adversarial  0 (default) | w: add w × a PatchGAN's hinge loss (VQGAN)
  size    small (default: 48×48×32 phantom, widths 32-64-64, batch 16, 1000 steps: 13
          minutes on a busy 2-core CPU; T2w reconstruction val PSNR 21.6 dB, SSIM 0.878) | tiny (32×32×12, widths 8-16-16, 6 steps: seconds,
          the tests) | base (160×160×96, widths 64-128-256, an accelerator)
"""

from medjax import config as config_lib

PHANTOM_IMAGES = ("t1w", "t2w", "pd", "flair", "ct")
KINDS = {"kl": "vae", "vq": "vqvae"}
PATCH = {"tiny": (8, 16, 16), "small": (16, 32, 32), "base": (64, 96, 96)}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, kind="kl", target="t2w", dims=2, factor=4,
                             adversarial=0.0, size="small")
  config_lib.choose("kind", arg.kind, tuple(KINDS))
  config_lib.choose("target", arg.target, PHANTOM_IMAGES)
  config_lib.choose("dims", arg.dims, (2, 3))
  config_lib.choose("factor", arg.factor, (4, 8))
  config = config_lib.base_config()
  config.data.source = (arg.target,)
  config.data.target = arg.target
  config.model = config_lib.model_config("autoencoder")
  config.translator = config_lib.translator_config(KINDS[arg.kind],
                                                   adversarial=float(arg.adversarial))
  config_lib.apply_size(config, arg.size)
  if arg.kind == "vq":
    # The phantom's tissues need few codes: the autoregressive translator predicts 128
    # codes' tokens better than 512 (most of which stay unused) at the same ceiling.
    config.translator.codebook_size = 128
    if arg.size == "small":  # the codes settle later than a vae's latents
      config.train.total_steps = 1500
  if arg.factor == 8:  # one more level, as wide as the last
    config.model.channels = (*config.model.channels, config.model.channels[-1])
  # Reconstruction is easier than translation: a higher rate, no augmentation needed.
  config.train.learning_rate = 2e-3
  config.data.augment = False
  if arg.dims == 3:
    config.model.dims = 3
    config.data.patch = PATCH[arg.size]
    config.train.batch_size = {"tiny": 4, "small": 4, "base": 2}[arg.size]
    config.eval.batch_size = 4
    config.translator.discriminator.num_layers = {"tiny": 1, "small": 2, "base": 3}[arg.size]
  return config
