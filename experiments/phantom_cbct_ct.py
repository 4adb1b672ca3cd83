r"""CBCT → CT on the phantom (SynthRAD Task 2's problem, with the truth known).

  medjax train --config experiments/phantom_cbct_ct.py --workdir runs/cbct_regression
  medjax train --config experiments/phantom_cbct_ct.py:method=flow --workdir runs/cbct_flow
  medjax train --config experiments/phantom_cbct_ct.py:registration=deformable,misalign=4 \
      --workdir runs/cbct_reg4     # CT 4 mm off the CBCT, registration-aware training

The phantom's CBCT (docs/design.md, "The phantom") has a truncated cylindrical field of
view, cupping, streaks from bone, 25–40 HU noise and a per-subject HU gain/offset; the
model must undo all of them. Scored in HU (`synthrad2023`) inside the head mask.

Arguments: method (regression by default, or any of experiments/phantom.py's),
registration = none | deformable, misalign = mm, size = small | tiny | base.
"""

import importlib.util
import pathlib

from medjax import config as config_lib

_PHANTOM = pathlib.Path(__file__).with_name("phantom.py")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="regression", registration="none", misalign=0.0,
                             size="small")
  spec = importlib.util.spec_from_file_location("medjax_experiment_phantom", _PHANTOM)
  phantom = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(phantom)
  return phantom.get_config(
      f"method={arg.method},source=cbct,target=ct,size={arg.size},misalign={arg.misalign},"
      f"registration={arg.registration}")
