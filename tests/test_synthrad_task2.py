"""SynthRAD Task 2 (CBCT → CT) folders, 2023 (.nii.gz) and 2025 (.mha) layouts, from
`medjax prepare` to a trained, evaluated run with experiments/synthrad2023_cbct_ct.py.
The two layouts hold the same heads, so they must prepare to the same shards (nibabel
reads one, SimpleITK the other); training reads shards alone, so one layout trains."""

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT
from medjax import cli
from medjax.data import phantom, shards

SHAPE, SPACING = (32, 32, 16), (5.0, 5.0, 6.0)
IDS = ("2BA001", "2BA002", "2BA003", "2BA004", "2BA005")


def write_task2(root, layout):
  """Phantom heads as SynthRAD Task 2 subjects: cbct, ct and mask of each."""
  for index, sid in enumerate(IDS):
    vols = phantom.generate(0, index, shape=SHAPE, spacing=SPACING)
    folder = root / "Task2" / "brain" / sid
    folder.mkdir(parents=True)
    vols["mask"] = vols["cbct_mask"]  # Task 2's masks: the body inside the CBCT's view
    for name in ("cbct", "ct", "mask"):
      image = nib.Nifti1Image(vols[name].astype(np.float32), vols["affine"])
      if layout == "synthrad2023":
        nib.save(image, folder / f"{name}.nii.gz")
      else:  # 2025 ships MetaImage
        import SimpleITK as sitk
        nib.save(image, folder / f"{name}.nii.gz")
        sitk.WriteImage(sitk.ReadImage(str(folder / f"{name}.nii.gz")), str(folder / f"{name}.mha"))
        (folder / f"{name}.nii.gz").unlink()
  return root / "Task2"


@pytest.mark.slow
def test_task2_folders_prepare_and_train(tmp_path, capsys):
  prepared = {}
  for layout in ("synthrad2023", "synthrad2025"):
    root = write_task2(tmp_path / layout, layout)
    out = prepared[layout] = tmp_path / f"shards_{layout}"
    assert cli.main(["medjax", "prepare", "--layout", layout, "--input-dir", str(root),
                     "--output-dir", str(out), "--source", "cbct", "--target", "ct",
                     "--spacing", "5x5x6", "--size", "32x32"]) == 0
    manifest = shards.load_manifest(out)
    assert manifest["counts"]["prepared"] == len(IDS) and not manifest["skipped"]
    assert manifest["recipe"]["sources"] == ["cbct"] and manifest["recipe"]["mask"] == "file"
    # CBCT keeps the fixed HU window of CT (a miscalibration is not normalised away).
    assert manifest["normalisation"][IDS[0]]["cbct"]["kind"] == "ct"
  for split in ("train", "val", "test"):
    ours, theirs = (shards.split_volumes(prepared[layout], split) for layout in prepared)
    assert [v.subject for v in ours] == [v.subject for v in theirs] != []
    for a, b in zip(ours, theirs):
      for field in ("source", "target", "mask"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-6,
                                   err_msg=f"{split} {a.subject} {field}")
  workdir = tmp_path / "run"
  assert cli.main(["medjax", "train", "--config",
                   f"{ROOT}/experiments/synthrad2023_cbct_ct.py:method=regression,size=tiny",
                   "--workdir", str(workdir),
                   f"--config.data.dir={prepared['synthrad2025']}"]) == 0
  summary = json.loads((workdir / "eval" / "6" / "summary.json").read_text())
  assert summary["protocol"] == "synthrad2023" and summary["subjects"] == 1
  assert np.isfinite(summary["model"]["mae"]) and summary["model"]["mae"] > 0
  assert (workdir / "inputs.json").is_file()
  assert json.loads((workdir / "inputs.json").read_text())["subjects"] == 3
