r"""T1w → CT (synthetic CT) on the built-in phantom with diffusion: phantom_diffusion.py, target 'ct'.

  medjax train --config experiments/phantom_diffusion_ct.py --workdir runs/phantom_diffusion_ct
"""

import os
import runpy


def get_config():
  base = runpy.run_path(os.path.join(os.path.dirname(__file__), "phantom_diffusion.py"))
  return base["get_config"]("ct")
