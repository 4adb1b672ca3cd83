"""`medjax train --config FILE.py[:ARG] --workdir DIR [--config.KEY=VALUE …]`."""

from __future__ import annotations

import os

from medjax import config as config_lib

HELP = "train an experiment config (resumes a workdir)"
OVERRIDES = True
MAIN_KEYS = ("data.source", "data.target", "data.kind", "data.dir", "translator.name",
             "model.name", "train.total_steps", "train.batch_size", "train.learning_rate",
             "translator.sample_steps", "translator.samples", "eval.every",
             "checkpoint.every", "seed")


def add_arguments(parser) -> None:
  parser.description = (
      "Train an experiment in a run directory; running it again resumes from the last\n"
      "checkpoint. Any config key can be overridden with --config.KEY=VALUE (a mistyped\n"
      "key is an error naming the keys there are).")
  width = max(map(len, MAIN_KEYS))
  parser.epilog = (
      "main config keys (all of them, with their values: medjax config FILE.py[:ARG]):\n"
      + "\n".join(f"  {k:{width}s}  {config_lib.HELP.get(k) or _meaning(k)}" for k in MAIN_KEYS)
      + "\n\nexamples:\n"
      "  medjax train --config experiments/phantom.py --workdir runs/phantom_flow\n"
      "  medjax train --config experiments/phantom.py:method=diffusion,target=ct \\\n"
      "      --workdir runs/diffusion_ct --config.train.total_steps=3000 --config.seed=1\n"
      "  several hosts: add --coordinator HOST:PORT --num-processes P --process-id I\n"
      "  (SLURM and TPU pods are detected without them)")
  parser.add_argument("--config", required=True, metavar="FILE.py[:ARG]",
                      help="experiment file, optionally with its argument "
                           "(experiments/phantom.py:method=flow,target=ct)")
  parser.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
  parser.add_argument("--coordinator", metavar="HOST:PORT",
                      help="address of process 0 in a multi-host run")
  parser.add_argument("--num-processes", type=int, help="processes in a multi-host run")
  parser.add_argument("--process-id", type=int, help="this process's index (0 … P-1)")


def _meaning(key: str) -> str:
  config = config_lib.base_config()
  return config_lib.meaning(config, key) or ""


def run(args) -> int:
  config = config_lib.load(args.config, args.overrides)
  from medjax import host, parallel
  host.configure(multi_process=bool(args.coordinator) or parallel.cluster_environment())
  parallel.initialize(args.coordinator, args.num_processes, args.process_id)
  parallel.enable_compilation_cache()
  import jax
  from medjax import train
  summary = train.train_and_evaluate(config, args.workdir)
  if jax.process_index() == 0:
    step_dir = os.path.join(args.workdir, "eval", str(summary["step"]))
    print(f"results: {step_dir}/summary.json, per subject: {step_dir}/subjects.csv, "
          f"pictures: {os.path.join(args.workdir, 'images')}/ and {step_dir}/report/")
  return 0
