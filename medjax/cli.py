"""`medjax` command line: train, evaluate, phantom, prepare.

`train` takes an ml-collections config file with `--config.KEY=VALUE` overrides (absl
config_flags, as big_vision and the flax examples); the other subcommands are plain
argparse. A user mistake ends in one line, `medjax: error: …`, and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

USAGE = """usage: medjax <command> [options]

commands:
  train      train an experiment config:  medjax train --config experiments/phantom_flow.py --workdir runs/NAME
  evaluate   score a run's latest checkpoint on its held-out test subjects:  medjax evaluate --workdir runs/NAME
  phantom    write phantom subjects as NIfTI:  medjax phantom --out DIR --subjects N
  prepare    turn a dataset folder into ArrayRecord shards:  medjax prepare --layout L --root DIR --out DIR ...
  translate  NIfTI in, NIfTI out (input geometry, HU for CT):  medjax translate --workdir RUN --input IN.nii.gz --output OUT.nii.gz
  compare    methods side by side at one budget:  medjax compare --configs experiments/phantom_flow.py experiments/phantom_pix2pix.py --workdir ROOT
  sweep      one config over a grid of overrides:  medjax sweep --config C --sweep experiments/sweeps/S.py --workdir ROOT --parallel 2
  score      per-volume metrics of predictions against targets:  medjax score --pred DIR --target DIR --protocol synthrad2023

`medjax <command> --help` for a command's options."""


# name, module, stem of its add_<stem>_args / <stem>_main, help
SUBCOMMANDS = (
    ("prepare", "medjax.data.shards", "prepare", "dataset folder → subject-split ArrayRecord shards"),
    ("translate", "medjax.infer", "translate", "NIfTI in → NIfTI out with a trained run"),
    ("score", "medjax.score", "score", "metrics of predicted volumes against their targets"),
    ("sweep", "medjax.sweep", "sweep", "run a grid of overrides, one process per point"),
    ("compare", "medjax.compare", "compare", "train several methods at one budget, one table"),
)


class UserError(Exception):
  """A mistake in what the user asked for: reported in one line, no traceback."""


def _enable_compilation_cache() -> None:
  import jax
  cache = os.environ.get("MEDJAX_COMPILATION_CACHE",
                         os.path.join(os.path.expanduser("~"), ".cache", "medjax", "jax"))
  if cache and cache != "0":
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _train(argv: list[str]) -> int:
  from absl import flags
  from ml_collections import config_flags

  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/*.py)",
                                  flag_values=flag_values, lock_config=True)
  flags.DEFINE_string("workdir", None, "run directory (resumed if it exists)",
                      flag_values=flag_values)
  flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 for multi-host runs",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "processes in a multi-host run",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "this process's index", flag_values=flag_values)
  if any(a in ("-h", "--help", "--helpshort") for a in argv[1:]):
    print("usage: medjax train --config experiments/NAME.py --workdir DIR [--config.KEY=VALUE ...]\n"
          "       [--coordinator HOST:PORT --num_processes P --process_id I]")
    return 0
  path = _config_path(argv)
  if path and not os.path.isfile(path):
    raise UserError(f"config file {path} does not exist")
  try:
    flag_values(argv)
    config = flag_values.config
    if config is not None:
      config.to_dict()  # config_flags defers load errors to the first access
  except (flags.UnrecognizedFlagError, KeyError, AttributeError) as e:
    raise UserError(_unknown_key_message(argv, e)) from None
  except (flags.Error, OSError, ValueError, TypeError) as e:
    raise UserError(_flag_message(str(e))) from None
  if config is None:
    raise UserError("--config is required, e.g. --config experiments/phantom_flow.py")
  if not flag_values.workdir:
    raise UserError("--workdir is required, e.g. --workdir runs/phantom_flow")

  from medjax import parallel
  parallel.maybe_initialize_distributed(flag_values.coordinator, flag_values.num_processes,
                                        flag_values.process_id)
  _enable_compilation_cache()
  import jax
  from medjax import train
  summary = train.train_and_evaluate(config, flag_values.workdir)
  if jax.process_index() == 0:
    step_dir = os.path.join(flag_values.workdir, "eval", str(summary["step"]))
    print(f"results: {step_dir}/summary.json, per subject: {step_dir}/subjects.csv, "
          f"pictures: {os.path.join(flag_values.workdir, 'images')}/ and {step_dir}/report/")
  return 0


def _config_path(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":")[0]
  return None


def _unknown_key_message(argv: list[str], error: Exception) -> str:
  """Name the override whose key the config file does not have."""
  import runpy
  try:
    base = runpy.run_path(_config_path(argv))["get_config"]()
  except Exception:  # the config file itself is broken: say what the parser said
    return _flag_message(str(error))
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    node = base
    for part in arg[len("--config."):].split("=")[0].split("."):
      if not hasattr(node, "keys") or part not in node:
        known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else ""
        return (f"unknown config key {part!r} in {arg.split('=')[0]}"
                + (f" (keys here: {known})" if known else ""))
      node = node[part]
  return _flag_message(str(error))


def _flag_message(message: str) -> str:
  message = message.replace("\\n", "\n").strip().strip("'\"")
  return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _evaluate(args) -> int:
  _enable_compilation_cache()
  from medjax import train
  summary = train.evaluate_checkpoint(args.workdir, split=args.split, step=args.checkpoint)
  print(train.format_summary(summary))
  return 0


def _phantom(args) -> int:
  from medjax.data import phantom
  try:
    shape = phantom.parse_shape(args.shape)
    spacing = (phantom.parse_spacing(args.spacing) if args.spacing
               else phantom.fov_spacing(shape))
  except ValueError as e:
    raise UserError(str(e)) from None
  paths = phantom.write_subjects(args.out, args.subjects, shape=shape, spacing=spacing,
                                 seed=args.seed)
  print(f"wrote {len(paths)} phantom subjects ({'x'.join(map(str, shape))} voxels of "
        f"{'x'.join(f'{s:g}' for s in spacing)} mm) to {args.out}")
  return 0


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="medjax")
  sub = parser.add_subparsers(dest="command")
  p = sub.add_parser("evaluate", help="score the latest checkpoint on held-out subjects")
  p.add_argument("--workdir", required=True)
  p.add_argument("--split", default="test", choices=("val", "test"))
  p.add_argument("--checkpoint", type=int, default=None, help="step (default: the latest)")
  p.set_defaults(run=_evaluate)
  p = sub.add_parser("phantom", help="write phantom subjects as NIfTI folders")
  p.add_argument("--out", required=True)
  p.add_argument("--subjects", type=int, required=True)
  p.add_argument("--shape", default="160x160x96")
  p.add_argument("--spacing", default=None,
                 help="voxel size in mm, e.g. 1,1,1 (default: the shape covers the whole head)")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(run=_phantom)
  for name, module, stem, help_text in SUBCOMMANDS:
    module = importlib.import_module(module)
    p = sub.add_parser(name, help=help_text)
    getattr(module, f"add_{stem}_args")(p)
    p.set_defaults(run=lambda args, main=getattr(module, f"{stem}_main"): main(args) or 0)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help"):
    print(USAGE)
    return 0 if len(argv) >= 2 else 2
  from medjax import config as config_lib
  known = (UserError, config_lib.ConfigError, FileNotFoundError, NotADirectoryError)
  try:
    from medjax.sweep import SweepError
    from medjax.train import NonFiniteError, WorkdirError
    known += (NonFiniteError, WorkdirError, SweepError)
    if argv[1] == "train":
      return _train(argv[1:])
    args = _parser().parse_args(argv[1:])
    if not getattr(args, "run", None):
      print(USAGE)
      return 2
    return args.run(args)
  except known as e:
    print(f"medjax: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("medjax: interrupted; the last complete checkpoint is kept", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
