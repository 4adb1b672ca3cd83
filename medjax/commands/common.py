"""The grammar every `medjax` command shares (docs/design.md, "Command line").

- Long flags are hyphenated (`--batch-size`); the underscore spelling (`--batch_size`) is
  accepted everywhere as the same flag, and `--help` shows only the hyphenated one.
- A flag means one thing in every command: `--X` names a file or a modality, `--X-dir` a
  folder; `--train-steps` and `--sample-steps` never share a name; sizes and spacings are
  written `160x160x96` and `1x1x2.5` (commas are read too).
- A mistake is one line, `medjax <command>: error: …`, and exit status 2 (`medjax.cli`).
"""

from __future__ import annotations

import argparse
import math

from medjax.errors import UserError


class Parser(argparse.ArgumentParser):
  """argparse with one-line errors and underscore spellings of hyphenated flags."""

  def __init__(self, *args, renamed: dict | None = None, **kwargs):
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    kwargs.setdefault("allow_abbrev", False)  # a flag is spelled out: no guessing
    super().__init__(*args, **kwargs)
    # Old flags whose meaning moved: {old: why and what to use}, refused with that hint.
    self.renamed = dict(renamed or {})
    self.required_dests = {}  # required flags that also have an old spelling (`alias`)

  def error(self, message: str):
    raise UserError(f"{message} (see {self.prog} --help)")

  def normalise(self, argv):
    """`--batch_size=8` → `--batch-size=8`; `--config.key_name=…` overrides stay as they are."""
    out = []
    for arg in argv:
      if arg.startswith("--") and not arg.startswith("--config."):
        name, sep, value = arg.partition("=")
        if name in self.renamed:
          raise UserError(f"{name}: {self.renamed[name]}")
        arg = name.replace("_", "-") + sep + value
      out.append(arg)
    return out

  def parse_known_args(self, args=None, namespace=None):
    parsed, extra = super().parse_known_args(self.normalise(args or []), namespace)
    missing = [flag for dest, flag in self.required_dests.items()
               if getattr(parsed, dest, None) is None]
    if missing:
      self.error(f"the following arguments are required: {', '.join(missing)}")
    return parsed, extra


def alias(parser, old: str, dest: str, **kwargs) -> None:
  """An old spelling of a flag, still read, not shown in --help. Either spelling
  satisfies a required flag."""
  for action in parser._actions:
    if action.dest == dest and action.required:
      action.required = False
      parser.required_dests[dest] = action.option_strings[0]
  parser.add_argument(old, dest=dest, help=argparse.SUPPRESS, **kwargs)


def numbers(kind, count: int, *, zero: bool = False):
  """`160x160x96` / `160,160,96` (or one number, repeated) → a list of `count` finite
  values, positive (or, with `zero`, non-negative with a positive sum)."""
  def parse(text: str):
    parts = [p for p in text.lower().replace("×", "x").replace(",", "x").split("x")
             if p.strip()]
    try:
      values = [kind(p) for p in parts]
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r}: expected {count} numbers such as "
                                       + "x".join(["160", "160", "96"][:count])) from None
    if len(values) == 1:
      values *= count
    finite = all(math.isfinite(v) for v in values)
    ok = (all(v >= 0 for v in values) and sum(values) > 0) if zero else all(
        v > 0 for v in values)
    if len(values) != count or not finite or not ok:
      raise argparse.ArgumentTypeError(
          f"{text!r}: expected {count} {'non-negative' if zero else 'positive'} numbers "
          f"written AxB{'xC' * (count > 2)}")
    return values
  parse.__name__ = f"{count} numbers"
  return parse


def modality_list(text: str) -> list[str]:
  from medjax import modalities
  try:
    return [modalities.canonical(m) for m in text.split(",") if m.strip()]
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from None


def positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value} must be at least 1")
  return value


def positive_float(text: str) -> float:
  value = non_negative_float(text)
  if value == 0:
    raise argparse.ArgumentTypeError(f"{text} must be more than 0")
  return value


def non_negative_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not (math.isfinite(value) and value >= 0):
    raise argparse.ArgumentTypeError(f"{text} must be a finite number ≥ 0")
  return value


def fraction(text: str) -> float:
  """A number in [0, 1) (an overlap)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not 0.0 <= value < 1.0:
    raise argparse.ArgumentTypeError(f"{value} is not a fraction in [0, 1)")
  return value


def add_max_voxels(parser) -> None:
  """`--max-voxels N`: the one limit on the size of a volume a command reads."""
  from medjax.data.volumes import DEFAULT_MAX_VOXELS
  parser.add_argument(
      "--max-voxels", type=positive_int, default=DEFAULT_MAX_VOXELS, metavar="N",
      help=f"refuse a volume of more than N voxels, on disk or resampled to the model's "
           f"grid, before it is read (default {DEFAULT_MAX_VOXELS} = 2**28, 1 GiB as "
           "float32: a 512x512x1024 CT). Protects against damaged or hostile headers "
           "(a 100-byte file can claim 10^12 voxels) exhausting memory")


def split_overrides(extra: list[str], prog: str) -> list[str]:
  """`--config.KEY=VALUE` or `--config.KEY VALUE` among unparsed args → ["KEY=VALUE", …]."""
  overrides, i = [], 0
  while i < len(extra):
    arg = extra[i]
    if not arg.startswith("--config."):
      raise UserError(f"unrecognised argument {arg} (see {prog} --help)")
    key, sep, value = arg[len("--config."):].partition("=")
    if not sep:
      if i + 1 >= len(extra):
        raise UserError(f"{arg} needs a value: {arg}=VALUE")
      value, i = extra[i + 1], i + 1
    overrides.append(f"{key}={value}")
    i += 1
  return overrides


def add_window_options(parser, recorded: str = "") -> None:
  """--overlap and --tta: how a run infers (docs/design.md, "Sliding windows, TTA and
  ensembles"); `recorded` says where the choice is written down."""
  parser.add_argument("--overlap", type=fraction,
                      help="3D runs: overlap of neighbouring windows, in [0, 1) (default: "
                           f"the run's eval.overlap){recorded}")
  parser.add_argument("--tta", choices=("none", "flip"),
                      help="flip: also predict on the input mirrored as training mirrors, "
                           f"and average (default: the run's eval.tta){recorded}")
