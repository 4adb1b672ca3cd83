r"""T1w → T2w on the built-in phantom with direct L1 regression (the U-Net alone).

  medjax train --config experiments/phantom_regression.py --workdir runs/phantom_regression
  medjax train --config experiments/phantom_regression.py --workdir runs/phantom_regression_ct \
      --config.data.target=ct
"""

from medjax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.data.source = ("t1w",)
  config.data.target = "t2w"
  config.translator.name = "regression"
  config.eval.samples = 1
  return config
