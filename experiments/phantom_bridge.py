r"""T1w → T2w (or → CT) on the built-in phantom with a diffusion bridge from the source.

  medjax train --config experiments/phantom_bridge.py --workdir runs/phantom_bridge
  medjax train --config experiments/phantom_bridge.py:i2sb --workdir runs/phantom_i2sb
  medjax train --config experiments/phantom_bridge.py:ct,i2sb --workdir runs/phantom_i2sb_ct

Sampling starts from the source image. 'brownian' is BBDM's bridge (peak variance ½,
residual prediction, L1); 'i2sb' is I2SB's Schrödinger bridge (small noise, few steps).
"""

import ml_collections

from medjax import config as config_lib

# Peak variance at mid-bridge: BBDM's s = 1; I2SB's β_max = 0.3 over 1000 steps (σ²_1 ≈ 0.137).
BRIDGE_VARIANCE = {"brownian": 0.5, "i2sb": 0.034}


def get_config(variant: str = ""):
  """`variant`: comma-separated, a target modality ('t2w' | 'ct') and/or a bridge
  ('brownian' | 'i2sb'), e.g. 'ct,i2sb'."""
  words = [w for w in variant.split(",") if w]
  target = next((w for w in words if w in ("t2w", "ct")), "t2w")
  bridge = next((w for w in words if w in BRIDGE_VARIANCE), "brownian")
  unknown = set(words) - {target, bridge}
  if unknown:
    raise ValueError(f"unknown variant word(s) {sorted(unknown)}: expected t2w|ct, brownian|i2sb")
  config = config_lib.base_config()
  config.data.source = ("t1w",)
  config.data.target = target
  config.translator = ml_collections.ConfigDict({
      "name": "bridge",
      "bridge": bridge,  # 'brownian' | 'i2sb'
      "bridge_variance": BRIDGE_VARIANCE[bridge],
      "eta": 1.0,  # 1: sample the bridge posterior (BBDM, I2SB); 0: deterministic
      "steps": 8,
  })
  return config
