r"""One model for every missing contrast on the phantom (any-to-any, BraSyn's task).

  medjax train --config experiments/phantom_any2any.py --workdir runs/any2any
  medjax translate --workdir runs/any2any --input t1w=t1w.nii.gz --input t2w=t2w.nii.gz \
      --input pd=pd.nii.gz --target flair --output flair_synth.nii.gz

The model sees all four MR contrasts as channels with an availability mask (missing ones
zeroed) and a learned embedding of the target; training draws a target and a non-empty
set of the others per example (data.any2any). Evaluation scores every direction: each
contrast missing given the other three, and every one-input direction.

Arguments (FILE.py:NAME=VALUE,…):
  method      flow (default) | regression | diffusion | bridge | i2sb
  modalities  t1w+t2w+pd+flair (default): the set, joined by '+' (two or more of the
              phantom's t1w, t2w, pd, flair)
  model       unet (default) | uvit | mamba
  size        small (default: 1000 steps) | tiny | base, as experiments/phantom.py
"""

from medjax import config as config_lib

MR = ("t1w", "t2w", "pd", "flair")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="flow", modalities="t1w+t2w+pd+flair",
                             model="unet", size="small")
  names = tuple(arg.modalities.split("+"))
  for name in names:
    config_lib.choose("modalities", name, MR)
  config_lib.choose("method", arg.method, ("flow", "regression", "diffusion", "bridge", "i2sb"))
  config = config_lib.base_config()
  config.data.source, config.data.target = names[:-1], names[-1]
  config.data.any2any = True
  config.data.modalities = names
  config_lib.apply_method(config, arg.method)
  config_lib.choose("model", arg.model, ("unet", "uvit", "mamba"))
  config.model = config_lib.model_config(arg.model)
  config_lib.apply_size(config, arg.size)
  # Every evaluation scores each direction (16 for four contrasts): once, at the end.
  config.eval.every = config.train.total_steps
  return config
