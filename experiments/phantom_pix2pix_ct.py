r"""T1w → CT (synthetic CT) on the built-in phantom with pix2pix: phantom_pix2pix.py, target 'ct'.

  medjax train --config experiments/phantom_pix2pix_ct.py --workdir runs/phantom_pix2pix_ct
"""

import os
import runpy


def get_config():
  base = runpy.run_path(os.path.join(os.path.dirname(__file__), "phantom_pix2pix.py"))
  return base["get_config"]("ct")
