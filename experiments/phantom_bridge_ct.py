r"""T1w → CT (synthetic CT) on the built-in phantom with a bridge: phantom_bridge.py, target 'ct'.

  medjax train --config experiments/phantom_bridge_ct.py --workdir runs/phantom_bridge_ct
  medjax train --config experiments/phantom_bridge_ct.py:i2sb --workdir runs/phantom_i2sb_ct
"""

import os
import runpy


def get_config(bridge: str = "brownian"):
  base = runpy.run_path(os.path.join(os.path.dirname(__file__), "phantom_bridge.py"))
  return base["get_config"](f"ct,{bridge}")
