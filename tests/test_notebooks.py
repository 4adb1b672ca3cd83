"""The notebooks execute top to bottom with small budgets, and their plots show.

Each `notebooks/*.py` is a jupytext "percent" file: read into a notebook, executed by a
fresh Jupyter kernel (nbclient) in a temporary folder, as a person would run it. A cell
that raises fails the test with that cell's traceback.
"""

import pathlib

import pytest

import jupytext
import nbclient

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Notebook → the plots it must show (a figure per `plt.show()` that has to come out).
NOTEBOOKS = {"01_quickstart": 3, "02_data": 3, "03_compare_translators": 2}


def kernel_name() -> str:
  """The kernel of this interpreter: Jupyter's native `python3` spec runs sys.executable
  when ipykernel is importable here, so the notebook sees the same medjax."""
  from jupyter_client.kernelspec import NATIVE_KERNEL_NAME
  return NATIVE_KERNEL_NAME


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_executes_and_shows_its_plots(name, tmp_path, monkeypatch):
  monkeypatch.setenv("MEDJAX_NOTEBOOK_STEPS", "12")
  monkeypatch.setenv("MEDJAX_NOTEBOOK_SIZE", "tiny")
  # One method that samples (the sampling-steps curve) and one that does not; every
  # method has its own train-and-translate test in test_translators.py.
  monkeypatch.setenv("MEDJAX_NOTEBOOK_METHODS", "flow,regression")
  monkeypatch.setenv("MEDJAX_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  notebook = jupytext.read(ROOT / "notebooks" / f"{name}.py")
  client = nbclient.NotebookClient(notebook, timeout=240, kernel_name=kernel_name(),
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= NOTEBOOKS[name], f"{name} showed {len(images)} plots"
