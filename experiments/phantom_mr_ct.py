r"""T1w → CT (synthetic CT) on the built-in phantom with conditional flow matching.

  medjax train --config experiments/phantom_mr_ct.py --workdir runs/phantom_mr_ct

Bone and air are both dark on T1w: the model has to place the skull and the sinuses from
context, which the intensity-mapping baseline cannot. Scored with the SynthRAD 2023
protocol in HU.
"""

from medjax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.data.source = ("t1w",)
  config.data.target = "ct"
  config.translator.name = "flow"
  return config
