"""One module per `medjax` subcommand: each parses its arguments and calls the library.

Every module has `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`; a
command that takes `--config.KEY=VALUE` overrides sets `OVERRIDES = True` and gets them
as `args.overrides`. Nothing in the library imports this package.
"""

# name → one line, in the order `medjax --help` lists them
COMMANDS = {
    "phantom": "write phantom subjects as NIfTI files",
    "prepare": "dataset folder → subject-split ArrayRecord shards + manifest",
    "train": "train an experiment config (resumes a workdir)",
    "evaluate": "score a trained run on its held-out subjects",
    "translate": "NIfTI in → NIfTI out with a trained run (input geometry, HU for CT)",
    "export": "a trained run → a self-contained model folder (translate --model)",
    "score": "metrics of predicted volumes against their targets, per subject",
    "compare": "train several methods at one budget, one table",
    "sweep": "one config over a grid of overrides, one process per point",
    "config": "print an experiment's resolved config with every key's meaning",
}
