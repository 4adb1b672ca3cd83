"""`medjax config FILE.py[:ARG] [--config.KEY=VALUE …]`: the resolved config, explained."""

from __future__ import annotations

HELP = "print an experiment's resolved config with every key's meaning"
OVERRIDES = True


def add_arguments(parser) -> None:
  parser.description = (
      "Print the config `medjax train` would run: every key with its value and a one-line\n"
      "meaning, after the experiment's argument and any --config.KEY=VALUE overrides.")
  parser.epilog = "example:\n  medjax config experiments/phantom.py:method=diffusion,target=ct"
  parser.add_argument("experiment", metavar="FILE.py[:ARG]")
  parser.add_argument("--json", action="store_true", help="print it as JSON instead")


def run(args) -> int:
  from medjax import config as config_lib
  config = config_lib.load(args.experiment, args.overrides)
  config_lib.validate(config)
  print(config_lib.to_json(config) if args.json else config_lib.describe(config))
  return 0
