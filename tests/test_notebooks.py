"""The notebooks execute top to bottom with tiny budgets, show their plots, and clean up.

Each `notebooks/*.py` is a jupytext "percent" file: read into a notebook, executed by a
fresh Jupyter kernel (nbclient) in a temporary folder, as a person would run it. Its
budgets live in one cell tagged `parameters`; like papermill, the test replaces that
cell's source with tiny values before executing. A cell that raises fails the test with
that cell's traceback.
"""

import pathlib

import jupytext
import nbclient
import pytest

from conftest import XLA_TEST_FLAGS

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Notebook → the plots it must show (image/png outputs), and its tiny parameters.
NOTEBOOKS = {
    "01_quickstart": (5, {"SIZE": "tiny", "STEPS": 12}),
    "02_data": (3, {"SIZE": "tiny"}),
    # One method that samples (the sampling-steps curve) and one that does not; every
    # method has its own train-and-translate test in test_translators.py.
    "03_compare_translators": (2, {"SIZE": "tiny", "STEPS": 12,
                                   "METHODS": ["flow", "regression"],
                                   "SAMPLING_STEPS": [1, 2]}),
}


def kernel_name() -> str:
  """The kernel of this interpreter: Jupyter's native `python3` spec runs sys.executable
  when ipykernel is importable here, so the notebook sees the same medjax."""
  from jupyter_client.kernelspec import NATIVE_KERNEL_NAME
  return NATIVE_KERNEL_NAME


def inject_parameters(notebook, values: dict) -> None:
  """Replace the source of the cell tagged `parameters` (papermill's convention) with
  `values`, which must name every parameter the cell sets."""
  cells = [c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
  assert len(cells) == 1, f"expected one cell tagged 'parameters', found {len(cells)}"
  names = {line.split("=")[0].strip() for line in cells[0].source.splitlines()
           if "=" in line and not line.startswith(("#", " "))}
  assert set(values) == names, f"parameters cell sets {sorted(names)}, test gives {sorted(values)}"
  cells[0].source = "\n".join(f"{name} = {value!r}" for name, value in values.items())


def test_every_notebook_is_tested():
  assert sorted(NOTEBOOKS) == sorted(p.stem for p in (ROOT / "notebooks").glob("*.py"))


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_executes_and_shows_its_plots(name, tmp_path, monkeypatch):
  plots, parameters = NOTEBOOKS[name]
  # The kernel inherits this environment: its temporary folders land where we can look.
  scratch = tmp_path / "tmp"
  scratch.mkdir()
  monkeypatch.setenv("TMPDIR", str(scratch))
  # The kernel compiles as the tests do (conftest.TEST_FLAGS), with no device-count flag.
  monkeypatch.setenv("XLA_FLAGS", XLA_TEST_FLAGS)
  notebook = jupytext.read(ROOT / "notebooks" / f"{name}.py")
  inject_parameters(notebook, {**parameters, "WORKDIR": None})
  client = nbclient.NotebookClient(notebook, timeout=240, kernel_name=kernel_name(),
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= plots, f"{name} showed {len(images)} plots"
  # The issue: three folders, 160 MB, left behind by the notebooks.
  left = sorted(p.name for p in scratch.iterdir() if p.name.startswith("medjax"))
  assert not left, f"{name} left {left} in its temporary folder"
