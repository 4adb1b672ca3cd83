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
  size    small (default: 48×48 slices, a 4-layer encoder and decoder of width 128, a
          64-channel convolutional stem, dropout 0.1, batch 16, 4000 steps; a 4×
          tokenizer gives 144 tokens) | tiny (32×32, width 32, stem 8, 2 layers, 6 steps:
          seconds, the tests) | base (160×160, width 512, 8 layers, context 1600: an
          accelerator); as the tokenizer's size
Every size evaluates and translates with mirror TTA (eval.tta='flip'): the mirrored
source's token rows are generated last to first, and the two orders' errors differ.

Measured on this project's 2-core CPU (T1w → T2w, size=small; val 2 subjects, test 2):
the vq tokenizer (phantom_vae.py:kind=vq: 128 codes, 1500 steps) 5.6 min, its
reconstruction ceiling val 20.27 dB / SSIM 0.838, test 19.39 / 0.821 / MAE 0.0636; this
run ~26 min alone (2.7 steps/s):
  val   19.95 dB, SSIM 0.825, MAE 0.0580
  test  18.45 dB, SSIM 0.775, MAE 0.0692
against the intensity map's val 18.44, 0.802, 0.0631 and test 17.56, 0.765, 0.0718.
What each piece gives (test; 4 draws, or 4 draws × 2 orders with TTA):
  patch embedding, no TTA      17.92 / 0.750 / 0.0752   (16 draws: 18.04 / 0.756 / 0.0738)
  patch embedding, TTA         18.22 / 0.762 / 0.0715
  stem 32, no TTA              18.08 / 0.761 / 0.0735   (16 draws: 18.16 / 0.765 / 0.0724)
  stem 32, TTA                 18.46 / 0.774 / 0.0692
  stem 64, no TTA              18.07 / 0.763 / 0.0731   (16 draws: 18.14 / 0.764 / 0.0723)
  stem 64, TTA (this file)     18.45 / 0.775 / 0.0692   (val without TTA 19.47 / 0.809)
16 draws in one order stay level with the map in SSIM at best and below it in MAE; 8
draws in two orders are above it in all three. Without dropout (1500 steps, 10 min) the
patch-embedding model reached val 19.09 / 0.790 / 0.0665, and trained longer it levelled
off from step 2000 while its training token accuracy climbed from 0.83 to 0.95: it learnt
the training subjects by heart. Dropout keeps validation rising to ~2500 steps. Not
better: dropout 0.2 or 0.3, translator.token_noise=0.1, train.weight_decay=0.05 (val
18.85 / 0.776 at step 1000 against 18.90 / 0.779), sampling at temperature 0.7 or top-k
8, and a tokenizer trained 3000 steps (ceiling val 20.42 / 0.850, test 19.57 / 0.830, yet
the translator on it reached val 19.30 / 0.807 at step 2500 against 19.49 / 0.809 on this
one). On a tokenizer of 512 codes it reached only 18.40 / 0.745: fewer codes, more of
them used, are easier to predict.
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
  # Without dropout the transformer learns the training subjects' tokens by heart from
  # step 2000 on (module docstring); with it, validation keeps rising to ~2500 steps.
  config.model.dropout = 0.1
  # A convolutional stem reads overlapping cells of the source (docs/design.md,
  # "Autoregressive translator"): on T2w test 18.07 dB / SSIM 0.763 against the patch
  # embedding's 17.92 / 0.750 (module docstring).
  config.model.stem = 8 if arg.size == "tiny" else 64
  # Mirror TTA predicts from the mirrored source too, whose token rows are generated last
  # to first: the mean averages two generation orders, whose errors differ (on T2w test,
  # 4 draws × 2 orders beat 16 draws in one order: SSIM 0.775 against 0.764).
  # `medjax translate` takes the same default (eval.tta), so the user's path is this one.
  config.eval.tta = "flip"
  if arg.size == "small":
    config.train.total_steps = 4000
  return config
