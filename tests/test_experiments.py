"""Every experiment variant and every command the README documents exists and builds.

Experiment files are loaded the way `medjax train --config FILE.py:ARG` loads them; each
variant must validate, build its translator, and give every key a one-line meaning. The
README's commands are parsed by the commands' own parsers (nothing runs), its `--config`
specs and overrides loaded, and every config key it names must exist.
"""

import importlib
import re
import shlex

import pytest

from medjax import config as config_lib
from medjax import translators
from medjax.commands import COMMANDS, common

from conftest import ROOT

EXPERIMENTS = ROOT / "experiments"
VARIANTS = (
    [f"phantom.py:method={m},target={t}" for m in config_lib.METHODS for t in ("t2w", "ct")]
    + [f"phantom.py:size={s}" for s in config_lib.SIZES]
    + ["phantom.py", "phantom.py:method=cyclegan,size=tiny", "phantom.py:source=pd,target=flair"]
    + ["phantom.py:model=uvit", "phantom.py:method=cyclegan,model=uvit,size=tiny"]
    + ["phantom.py:model=mamba", "phantom.py:method=flow,model=mamba,size=tiny"]
    + [f"{name}.py:method={m}" for name in ("synthrad2023_mr_ct", "synthrad2023_cbct_ct",
                                            "brats_t1_t2", "ixi_t1_t2")
       for m in config_lib.METHODS]
    + ["synthrad2023_cbct_ct.py:method=regression,size=tiny", "phantom_cbct_ct.py",
       "phantom_cbct_ct.py:method=flow", "phantom_cbct_ct.py:registration=deformable,misalign=4",
       "phantom.py:target=ct,misalign=2,registration=deformable"]
    + ["phantom_any2any.py", "phantom_any2any.py:method=bridge,model=uvit,size=tiny",
       "phantom.py:source=t1w+t2w+pd,target=flair", "brats_any2any.py",
       "brats_any2any.py:method=i2sb"]
    + ["phantom_vae.py", "phantom_vae.py:kind=vq,dims=3,factor=8,adversarial=0.1",
       "phantom_vae.py:target=ct,size=tiny,adversarial=0.1"])


def load(spec: str):
  config = config_lib.load(str(EXPERIMENTS / spec))
  if config.data.kind == "shards":
    config.data.dir = "data/somewhere"  # given on the command line in real use
  return config


@pytest.mark.parametrize("spec", VARIANTS)
def test_experiment_variant_validates_builds_and_is_described(spec):
  config = load(spec)
  config_lib.validate(config)
  assert translators.build(config).name == config.translator.name
  undescribed = [k for k in config_lib.flatten(config.to_dict())
                 if not config_lib.meaning(config, k)]
  assert not undescribed


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.py")), ids=lambda p: p.stem)
def test_experiment_docstring_commands_name_the_file(path):
  assert f"--config experiments/{path.name}" in path.read_text()


def test_a_wrong_experiment_argument_is_one_clear_error():
  with pytest.raises(config_lib.ConfigError, match="method=.*choose one of"):
    load("phantom.py:method=unet")
  with pytest.raises(config_lib.ConfigError, match="unknown experiment argument 'methd'"):
    load("phantom.py:methd=flow")


def all_keys() -> set[str]:
  return {k for spec in VARIANTS for k in config_lib.flatten(load(spec).to_dict())}


def readme_commands() -> list[list[str]]:
  """Every `medjax …` command line in the README's code blocks and inline code."""
  text = (ROOT / "README.md").read_text()
  lines = []
  for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
    block = block.replace("\\\n", " ")
    lines += [line.strip() for line in block.splitlines()]
  lines += re.findall(r"`(medjax [^`]+)`", text)
  commands = []
  for line in lines:
    if "medjax " not in line:
      continue
    for part in re.split(r"&&|;|\|", line):
      words = shlex.split(part.split("#")[0])  # a quoted '' stays: an empty value
      # `medjax translate` alone in prose names the command; with flags it is one to run.
      placeholder = any(re.match(r"^[A-Z_]{3,}([.:\[=].*)?$", w) for w in words)
      if len(words) >= 3 and words[0].endswith("medjax") and words[1] in COMMANDS \
          and not placeholder:
        commands.append(words[1:])
  return commands


def test_every_readme_command_parses_and_its_configs_load():
  commands = readme_commands()
  assert len(commands) >= 10 and {c[0] for c in commands} >= {"train", "translate", "score",
                                                              "prepare", "phantom"}
  for words in commands:
    module = importlib.import_module(f"medjax.commands.{words[0]}")
    parser = common.Parser(prog=f"medjax {words[0]}", renamed=getattr(module, "RENAMED", {}))
    module.add_arguments(parser)
    if getattr(module, "OVERRIDES", False):
      args, extra = parser.parse_known_args(words[1:])
      overrides = common.split_overrides(extra, parser.prog)
    else:
      args, overrides = parser.parse_args(words[1:]), []
    spec = getattr(args, "config", None) or getattr(args, "experiment", None)
    if spec:
      config_lib.load(str(ROOT / spec), overrides)
    for spec in getattr(args, "experiments", None) or ():
      config_lib.load(str(ROOT / spec))


def test_every_config_key_the_readme_names_exists():
  text = (ROOT / "README.md").read_text()
  named = {key for key in re.findall(r"\b((?:data|model|translator|train|eval|checkpoint|"
                                     r"logging)\.[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*)", text)
           if not key.endswith((".py", ".md", ".json", ".csv", ".png"))}
  assert named
  assert not sorted(named - all_keys() - {"data.phantom"})


def test_a_phantom_too_thin_for_the_ssim_window_is_refused_before_training():
  config = load("phantom.py:size=tiny")
  config.data.phantom.shape = (32, 32, 8)
  with pytest.raises(config_lib.ConfigError, match="at least 11 voxels"):
    config_lib.validate(config)
