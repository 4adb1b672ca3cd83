r"""T1w → CT (synthetic CT) on the built-in phantom with cyclegan: phantom_cyclegan.py, target 'ct'.

  medjax train --config experiments/phantom_cyclegan_ct.py --workdir runs/phantom_cyclegan_ct
"""

import os
import runpy


def get_config():
  base = runpy.run_path(os.path.join(os.path.dirname(__file__), "phantom_cyclegan.py"))
  return base["get_config"]("ct")
