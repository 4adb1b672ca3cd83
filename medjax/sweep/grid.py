"""Sweeps as data (big_vision's habit): axes of overrides, combined, named, checked.

`experiments/sweeps/NAME.py` defines `get_sweep()`, a list of override dicts built with
`sweep`, `product` and `zipped`:

  def get_sweep():
    return product(sweep("train.learning_rate", [3e-4, 1e-3]), sweep("seed", [0, 1]))

Each point becomes a readable workdir name (`lr0.001_seed1`) and `--config.KEY=VALUE`
flags for `medjax train`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import runpy

import ml_collections

from medjax import config as config_lib
from medjax.errors import ConfigError, UserError


class SweepError(UserError):
  """A sweep file or sweep request that cannot run; the message says why."""


# Short names for the keys sweeps vary most, so point names stay readable.
ABBREVIATIONS = {"learning_rate": "lr", "batch_size": "bs", "weight_decay": "wd",
                 "warmup_steps": "warmup", "ema_decay": "ema", "channels": "ch",
                 "num_res_blocks": "blocks", "channel_mult": "mult"}


# --- building sweeps -------------------------------------------------------------------

def sweep(key: str, values) -> list[dict]:
  """One axis: [{key: v} for v in values]."""
  return [{key: value} for value in values]


def product(*axes: list[dict]) -> list[dict]:
  """Every combination of the axes' points (the first axis varies slowest)."""
  return [_merge(points) for points in itertools.product(*axes)]


def zipped(*axes: list[dict]) -> list[dict]:
  """The axes' points taken together, i-th with i-th; they must be equally long."""
  lengths = {len(axis) for axis in axes}
  if len(lengths) > 1:
    raise SweepError(f"zipped axes differ in length: {sorted(lengths)}")
  return [_merge(points) for points in zip(*axes)]


def _merge(points) -> dict:
  merged = {}
  for point in points:
    clash = merged.keys() & point.keys()
    if clash:
      raise SweepError(f"key {sorted(clash)[0]!r} is set by two axes of one point")
    merged.update(point)
  return merged


def load_sweep(path: str) -> list[dict]:
  if not os.path.isfile(path):
    raise SweepError(f"sweep file {path} does not exist")
  module = runpy.run_path(path)
  if "get_sweep" not in module:
    raise SweepError(f"{path} defines no get_sweep()")
  points = list(module["get_sweep"]())
  if not points or not all(isinstance(p, dict) and p for p in points):
    raise SweepError(f"{path}: get_sweep() must return a non-empty list of non-empty dicts")
  keys = list(points[0])
  for point in points:
    if set(point) != set(keys):
      # A missing key would silently mean "the config's value" in some points only.
      raise SweepError(f"{path}: points set different keys ({sorted(keys)} vs {sorted(point)})")
  if len({json.dumps(p, sort_keys=True, default=list) for p in points}) != len(points):
    raise SweepError(f"{path}: get_sweep() lists a point twice")
  return points


def check_points(config, points: list[dict]) -> None:
  """Every point's keys exist and its values parse: refused before anything runs."""
  for point in points:
    trial = ml_collections.ConfigDict(config.to_dict())
    try:  # the very text `medjax train` will parse
      config_lib.override(trial, [flag[len("--config."):] for flag in override_flags(point)])
    except ConfigError as error:
      raise SweepError(f"the sweep: {error}") from None


def value_text(value) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (list, tuple)):
    return "x".join(value_text(v) for v in value)
  return str(value)


def _labels(keys) -> dict[str, str]:
  """Each key's last part (abbreviated where common), or the whole dotted key where two
  keys would read the same."""
  short = {k: ABBREVIATIONS.get(k.rsplit(".", 1)[-1], k.rsplit(".", 1)[-1]) for k in keys}
  taken = list(short.values())
  return {k: label if taken.count(label) == 1 else k.replace(".", "-")
          for k, label in short.items()}


def point_name(point: dict) -> str:
  """`{"train.learning_rate": 0.001, "seed": 1}` → `lr0.001_seed1`: a readable slug."""
  labels = _labels(point)
  name = "_".join(f"{labels[k]}{value_text(v)}" for k, v in point.items())
  return re.sub(r"[^A-Za-z0-9._+=-]+", "-", name).strip("-") or "point"


def point_names(points: list[dict]) -> list[str]:
  names = [point_name(p) for p in points]
  if len(set(names)) < len(names):  # sanitising merged two values: number them
    names = [f"{i:03d}_{name}" for i, name in enumerate(names)]
  return names


def override_flags(point: dict) -> list[str]:
  """`--config.KEY=VALUE` as `config.override` parses it for the key's type."""
  def text(value):
    if isinstance(value, (list, tuple)):
      return str(tuple(value))
    return repr(value) if isinstance(value, float) else str(value)  # repr: every digit
  return [f"--config.{key}={text(value)}" for key, value in point.items()]
