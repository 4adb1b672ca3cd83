r"""T1w → T2w on the built-in phantom with conditional flow matching (the default experiment).

  medjax train --config experiments/phantom_flow.py --workdir runs/phantom_flow

Sized to train and evaluate on a 2-core CPU in a few minutes (64×64 slices at 2.5 mm);
on an accelerator raise the resolution, e.g.
  --config.data.phantom.shape='(160,160,96)' --config.data.phantom.spacing='(1.,1.,1.)'
  --config.model.channels=64 --config.train.steps=20000
"""

from medjax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.data.source = ("t1w",)
  config.data.target = "t2w"
  config.translator.name = "flow"
  config.translator.sampler = "euler"
  return config
