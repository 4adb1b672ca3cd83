"""The `medjax` command line outside training: phantom files, usage, argument errors."""

import nibabel as nib
import numpy as np

from medjax import cli
from medjax.data import phantom


def test_phantom_command_writes_nifti_subjects(tmp_path, capsys):
  out = tmp_path / "phantom"
  assert cli.main(["medjax", "phantom", "--out", str(out), "--subjects", "3",
                   "--shape", "24x24x12", "--seed", "5"]) == 0
  folders = sorted(p.name for p in out.iterdir() if p.is_dir())
  assert folders == ["phantom_000", "phantom_001", "phantom_002"]
  spacing = (160 / 24, 160 / 24, 96 / 12)  # the whole head, whatever the shape
  expected = phantom.generate(5, 1, shape=(24, 24, 12), spacing=spacing)
  for name in ("t1w", "t2w", "pd", "flair", "ct", "mask"):
    image = nib.load(out / "phantom_001" / f"{name}.nii.gz")
    assert image.shape == (24, 24, 12) and image.get_data_dtype() == np.float32
    np.testing.assert_allclose(image.header.get_zooms(), spacing, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(image.dataobj), expected[name])
  assert "wrote 3 phantom subjects" in capsys.readouterr().out


def test_bad_phantom_shape_is_one_line(tmp_path, capsys):
  assert cli.main(["medjax", "phantom", "--out", str(tmp_path), "--subjects", "2",
                   "--shape", "64by64"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("medjax: error:") and "64by64" in err and len(err.strip().splitlines()) == 1


def test_usage_lists_the_commands(capsys):
  assert cli.main(["medjax", "--help"]) == 0
  out = capsys.readouterr().out
  for command in ("train", "evaluate", "phantom", "prepare"):
    assert command in out
