"""Every experiment file yields a config that validates and builds its translator."""

import pathlib
import runpy

import pytest

from medjax import config as config_lib
from medjax import translators

EXPERIMENTS = sorted((pathlib.Path(__file__).parent.parent / "experiments").glob("*.py"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_config_is_valid(path):
  config = runpy.run_path(str(path))["get_config"]()
  if config.data.kind == "shards":
    config.data.dir = "data/somewhere"  # given on the command line in real use
  config_lib.validate(config)
  translator = translators.build(config)
  assert translator.name == config.translator.name
  assert f"--config {path.relative_to(path.parent.parent)}" in path.read_text()  # docstring command
