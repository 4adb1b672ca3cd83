"""Inputs checked against what the model was trained on: each check fires on an input
made to break it, and an input like the training data draws no warning."""

import json

import nibabel as nib
import numpy as np
import pytest

from dicom_series import write_mr_series
from medjax import cli, infer
from medjax.data import inputs, phantom, preprocess
from medjax.run import Run

GRID = {"shape": (32, 32, 12), "spacing": (5.0, 5.0, 8.0)}  # the tiny run's phantom grid
HELD_OUT = 4  # a phantom subject the tiny run never trained on


def nifti(path, volume, spacing):
  affine = np.diag([*spacing, 1.0])
  affine[:3, 3] = -np.asarray(spacing) * (np.array(volume.shape) - 1) / 2
  nib.save(nib.Nifti1Image(np.asarray(volume, np.float32), affine), path)
  return path


def render(shape=GRID["shape"], spacing=GRID["spacing"], subject=HELD_OUT):
  return phantom.generate(0, subject, shape=shape, spacing=spacing)


def _stack_of_three(vols):
  t1w = vols["t1w"].copy()
  t1w[..., :5] = 0
  t1w[..., 8:] = 0
  return t1w


# case → (the t1w input volume and its spacing, the words its warning must hold)
CASES = {
    "spacing": (lambda: (render((80, 80, 32), (2.0, 2.0, 3.0))["t1w"], (2.0, 2.0, 3.0)),
                "input voxel spacing"),
    "field of view": (lambda: (render((64, 64, 12))["t1w"], GRID["spacing"]),
                      "input field of view"),
    "body extent": (lambda: (_stack_of_three(render()), GRID["spacing"]), "input body extent"),
    "contrast": (lambda: (render()["pd"], GRID["spacing"]), "t1w contrast unlike training"),
    "a CT given to an MR model": (lambda: (render()["ct"], GRID["spacing"]),
                                  "t1w input looks like a CT in HU"),
}


@pytest.fixture(scope="module")
def model(ct_run):
  return Run.load(ct_run)


def _translate(model, path, tmp_path, **kwargs):
  return infer.translate_file(model, [path], tmp_path / "out.nii.gz", progress=False, **kwargs)


def test_an_input_like_the_training_data_draws_no_warning(model, tmp_path, capsys):
  path = nifti(tmp_path / "t1w.nii.gz", render()["t1w"], GRID["spacing"])
  result = _translate(model, path, tmp_path)
  assert result["warnings"] == [] and "warning" not in capsys.readouterr().err
  sidecar = json.loads((tmp_path / "out.json").read_text())
  assert sidecar["input_check"]["warnings"] == []
  assert sidecar["input_check"]["thresholds"] == inputs.THRESHOLDS
  assert sidecar["input_check"]["trained"]["subjects"] == 3  # tiny: 5 subjects, 3 train


@pytest.mark.parametrize("case", list(CASES))
def test_each_check_names_what_is_out_of_range(model, tmp_path, capsys, case):
  make, words = CASES[case]
  volume, spacing = make()
  path = nifti(tmp_path / "t1w.nii.gz", volume, spacing)
  result = _translate(model, path, tmp_path)
  err = capsys.readouterr().err
  assert any(words in w for w in result["warnings"]), result["warnings"]
  assert f"medjax translate: warning: t1w.nii.gz: {words}" in err
  sidecar = json.loads((tmp_path / "out.json").read_text())
  assert sidecar["input_check"]["warnings"] == result["warnings"]


def test_a_dicom_series_of_another_modality_is_named(model, tmp_path, capsys):
  volume = render()["t1w"] * 1000
  write_mr_series(tmp_path / "series", volume, np.diag([*GRID["spacing"], 1.0]),
                  modality="CT")
  result = infer.translate_file(model, [tmp_path / "series"], tmp_path / "out.nii.gz",
                                progress=False)
  assert any("input is a DICOM CT series; the model was trained on t1w (MR)" in w
             for w in result["warnings"]), result["warnings"]


def test_strict_inputs_refuses_and_writes_nothing(ct_run, tmp_path, capsys):
  path = nifti(tmp_path / "t1w.nii.gz", render((64, 64, 12))["t1w"], GRID["spacing"])
  status = cli.main(["medjax", "translate", "--workdir", str(ct_run), "--input", str(path),
                     "--output", str(tmp_path / "out.nii.gz"), "--strict-inputs"])
  err = capsys.readouterr().err.strip()
  assert status == 2 and len(err.splitlines()) == 1
  assert "--strict-inputs: input field of view" in err and "Nothing was written" in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["t1w.nii.gz"]


def _describe(path, recipe):
  return preprocess.preprocess({recipe.sources[0]: path}, recipe, targets=False).inputs


def test_ct_intensities_are_compared_in_hu(tmp_path):
  """A CT-source model: training CTs set the HU range; a CBCT-like input (gain and
  offset off, as an uncalibrated CBCT) and an MR (no air in HU) are each named."""
  recipe = preprocess.Recipe(sources=("ct",), targets=("t1w",), spacing=GRID["spacing"],
                             size=GRID["shape"][:2])
  trained = inputs.envelope([
      _describe(nifti(tmp_path / f"ct{s}.nii.gz", render(subject=s)["ct"], GRID["spacing"]),
                recipe) for s in range(3)])
  held_out = render()
  like = _describe(nifti(tmp_path / "ct.nii.gz", held_out["ct"], GRID["spacing"]), recipe)
  assert inputs.check(like, trained, ("ct",)) == []
  cbct = np.where(held_out["mask"] > 0, held_out["ct"] * 1.8 + 300, held_out["ct"])
  warnings = inputs.check(_describe(nifti(tmp_path / "cbct.nii.gz", cbct, GRID["spacing"]),
                                    recipe), trained, ("ct",))
  assert any(w.startswith("ct intensity range unlike training: 99.5th percentile")
             for w in warnings), warnings
  mr = _describe(nifti(tmp_path / "mr.nii.gz", held_out["t1w"] * 1000, GRID["spacing"]), recipe)
  assert any("ct input has no air in HU" in w for w in inputs.check(mr, trained, ("ct",)))
