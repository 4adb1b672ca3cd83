r"""BraTS 2023 (BraSyn): one model for every missing contrast of T1n, T1c, T2w, T2-FLAIR.

  medjax prepare --layout brats2023 --input-dir /data/BraTS2023-GLI --output-dir data/brats4 \
      --source t1w,t1c,t2w --target flair --spacing 1x1x1 --size 240x240
  medjax train --config experiments/brats_any2any.py --workdir runs/brats_any2any \
      --config.data.dir=data/brats4
  medjax translate --workdir runs/brats_any2any --input-dir /data/BraSyn-val \
      --layout brasyn --output-dir out/brasyn        # writes each subject's missing file

The shards of a dedicated T1n+T1c+T2w → FLAIR run carry all four contrasts; the
any-to-any run reads them all (data.modalities = data.source + data.target) and draws a
target and an available set per example. Scored with the `mri` protocol per direction.
Argument: method = flow (default) | regression | diffusion | bridge | i2sb.
"""

from medjax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="flow")
  config_lib.choose("method", arg.method, ("flow", "regression", "diffusion", "bridge", "i2sb"))
  config = config_lib.shards_config(source=("t1w", "t1c", "t2w"), target="flair",
                                    method=arg.method)
  config.data.any2any = True
  config.eval.directions = "missing_one"  # 4 directions per evaluation during training
  return config
