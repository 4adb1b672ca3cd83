"""The phantom against the physics it claims: closed-form signal equations and the HU
table, written out here rather than taken from the module."""

import argparse
import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medjax import cli
from medjax.commands import common
from medjax.data import phantom

SHAPE, SPACING = (80, 80, 48), (2.0, 2.0, 2.0)
SEED, SUBJECT = 0, 1  # a subject with a lesion

# 1.5 T: (T1 ms, T2 ms, PD); sequences: (TR, TE, TI or None).
RELAXATION = {"wm": (790, 80, 0.70), "gm": (1200, 100, 0.80), "csf": (4000, 2000, 1.0)}
SEQUENCES = {"t1w": (500, 15, None), "t2w": (4000, 100, None), "pd": (3000, 15, None),
             "flair": (9000, 120, 2500)}
HU = {"csf": 10, "gm": 38, "wm": 28}


def closed_form(tissue, sequence):
  t1, t2, pd = RELAXATION[tissue]
  tr, te, ti = SEQUENCES[sequence]
  if ti is None:
    return pd * (1 - math.exp(-tr / t1)) * math.exp(-te / t2)
  return pd * abs(1 - 2 * math.exp(-ti / t1) + math.exp(-tr / t1)) * math.exp(-te / t2)


@pytest.fixture(scope="module")
def subject():
  return phantom.generate(SEED, SUBJECT, SHAPE, SPACING)


@pytest.fixture(scope="module")
def clean():
  return phantom.generate(SEED, SUBJECT, SHAPE, SPACING, bias=False, noise=False)


def interior(volumes, tissue):
  """Voxels whose whole 3×3×3 neighbourhood has this dominant tissue: free of partial volume."""
  region = ndimage.binary_erosion(volumes["labels"] == phantom.TISSUES[tissue], np.ones((3, 3, 3)))
  assert region.sum() >= 20, f"too few pure {tissue} voxels to test"
  return region


def test_outputs(subject):
  assert set(subject) == {*phantom.MODALITIES, "mask", "cbct_mask", "labels", "affine"}
  # The CBCT's mask: the head, cut to the scanner's field of view.
  assert subject["cbct_mask"].dtype == bool
  assert not (subject["cbct_mask"] & (subject["mask"] == 0)).any()
  assert (subject["cbct"][subject["cbct_mask"]] > -900).mean() > 0.99
  for name in (*phantom.MODALITIES, "mask"):
    assert subject[name].shape == SHAPE and subject[name].dtype == np.float32
  assert subject["labels"].dtype == np.uint8
  assert set(np.unique(subject["mask"])) == {0.0, 1.0}
  assert set(np.unique(subject["labels"])) == set(phantom.TISSUES.values())  # lesion and all
  affine = subject["affine"]
  assert np.allclose(np.diag(affine)[:3], SPACING)
  centre = affine @ [*((np.array(SHAPE) - 1) / 2), 1]
  assert np.allclose(centre[:3], 0)
  for name in phantom.MODALITIES[:4]:
    assert subject[name].min() >= 0 and subject[name].max() < 2


def test_signal_matches_closed_form():
  for tissue in RELAXATION:
    for sequence in SEQUENCES:
      assert phantom.signal(tissue, sequence) == pytest.approx(closed_form(tissue, sequence), rel=1e-12)


def test_pure_voxels_equal_the_signal_equations(clean):
  for tissue in ("wm", "csf"):
    region = interior(clean, tissue)
    for sequence in SEQUENCES:
      np.testing.assert_allclose(clean[sequence][region], closed_form(tissue, sequence), rtol=1e-5)
    np.testing.assert_allclose(clean["ct"][region], HU[tissue], atol=1e-3)


def test_contrasts(subject):
  wm, csf = interior(subject, "wm"), interior(subject, "csf")
  mean = {name: (subject[name][wm].mean(), subject[name][csf].mean()) for name in SEQUENCES}
  assert mean["t2w"][1] > mean["t2w"][0]  # CSF bright on T2w
  assert mean["t1w"][1] < mean["t1w"][0]  # and dark on T1w
  assert mean["flair"][1] < mean["flair"][0]  # FLAIR suppresses CSF
  # Bias (±15 %, shared) and Rician noise (2.5 % of WM) only perturb the physics.
  ratio = mean["t2w"][1] / mean["t2w"][0]
  assert ratio == pytest.approx(closed_form("csf", "t2w") / closed_form("wm", "t2w"), rel=0.15)


def test_ct(subject):
  ct = subject["ct"]
  assert ct[interior(subject, "bone")].mean() > 500
  outside = ndimage.binary_erosion(subject["mask"] == 0, np.ones((3, 3, 3)))
  assert ct[outside].mean() < -900
  for tissue, hu in HU.items():
    assert abs(ct[interior(subject, tissue)].mean() - hu) < 15


def test_anatomy(subject):
  labels, t = subject["labels"], phantom.TISSUES
  extent = np.ptp(np.argwhere(subject["mask"] > 0), axis=0) * SPACING
  assert 120 <= extent[1] <= 158 and 100 <= extent[0] <= 135  # AP, LR in mm
  assert not subject["mask"][[0, -1]].any() and not subject["mask"][:, [0, -1]].any()
  assert (labels[subject["mask"] > 0] == t["air"]).any()  # sinus air inside the head


def test_deterministic(subject):
  again = phantom.generate(SEED, SUBJECT, SHAPE, SPACING)
  for name in (*phantom.MODALITIES, "mask", "labels", "affine"):
    np.testing.assert_array_equal(again[name], subject[name])
  for seed, number in ((SEED, SUBJECT + 1), (SEED + 1, SUBJECT)):
    other = phantom.generate(seed, number, SHAPE, SPACING)
    assert not np.array_equal(other["labels"], subject["labels"])
    assert not np.array_equal(other["t1w"], subject["t1w"])


def test_same_anatomy_on_any_grid():
  coarse = phantom.generate(SEED, SUBJECT, (40, 40, 24), (4.0, 4.0, 4.0), noise=False)
  fine = phantom.generate(SEED, SUBJECT, (80, 80, 48), (2.0, 2.0, 2.0), noise=False)
  # Average 2×2×2 blocks of the fine grid: the same field of view, the same voxel centres' cells.
  pooled = fine["mask"].reshape(40, 2, 40, 2, 24, 2).mean((1, 3, 5))
  assert np.abs(pooled - coarse["mask"]).mean() < 0.03


def test_split_subjects():
  for n in (3, 5, 20, 101):
    split = phantom.split_subjects(n)
    ids = [i for name in ("train", "val", "test") for i in split[name]]
    assert sorted(ids) == list(range(n)) and all(split.values())
    assert split == phantom.split_subjects(n)
  assert [len(v) for v in phantom.split_subjects(100).values()] == [80, 10, 10]
  with pytest.raises(ValueError):
    phantom.split_subjects(10, (0.5, 0.5, 0.5))


def test_shape_and_spacing_are_read_by_the_command_line(tmp_path, capsys):
  shape, spacing = common.numbers(int, 3), common.numbers(float, 3)
  assert shape("160x160x96") == shape("160,160,96") == [160, 160, 96]
  assert spacing("1,1,2.5") == spacing("1x1x2.5") == [1.0, 1.0, 2.5]
  assert spacing("2") == [2.0, 2.0, 2.0]  # one number: isotropic
  for bad in ("160x160", "axbxc", "0x1x1", "", "1.5x2x2", "1x1x1x1"):
    with pytest.raises(argparse.ArgumentTypeError, match="expected 3"):
      shape(bad)
  # Through `medjax phantom`: one line, exit status 2, nothing written.
  out = tmp_path / "refused"
  assert cli.main(["medjax", "phantom", "--output-dir", str(out), "--subjects", "2",
                   "--shape", "160x160"]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("medjax phantom: error:"), lines
  assert "--shape" in lines[0] and "160x160" in lines[0]
  assert not out.exists()


def test_spacing_refuses_nan_and_inf():
  spacing = common.numbers(float, 3)
  for bad in ("nan", "1x1xinf", "-1x1x1"):
    with pytest.raises(argparse.ArgumentTypeError):
      spacing(bad)


def test_default_spacing_spans_the_head(tmp_path, capsys):
  # 160 x 160 x 96 mm (the head and an air margin) over the voxels asked for.
  assert phantom.fov_spacing((48, 48, 32)) == pytest.approx((160 / 48, 160 / 48, 3.0))
  assert cli.main(["medjax", "phantom", "--output-dir", str(tmp_path), "--subjects", "1",
                   "--shape", "16x20x8", "--seed", "4"]) == 0
  image = nib.load(tmp_path / "phantom_000" / "t1w.nii.gz")
  assert image.shape == (16, 20, 8)
  np.testing.assert_allclose(image.header.get_zooms(), (10.0, 8.0, 12.0), rtol=1e-6)
  expected = phantom.generate(4, 0, (16, 20, 8), (10.0, 8.0, 12.0))
  np.testing.assert_array_equal(np.asarray(image.dataobj), expected["t1w"])
  assert "wrote 1 phantom subjects" in capsys.readouterr().out


def test_write_subjects(tmp_path):
  shape, spacing = (24, 24, 12), (6.0, 6.0, 8.0)
  folders = phantom.write_subjects(tmp_path, 3, shape=shape, spacing=spacing, seed=2, progress=False)
  assert [f.name for f in folders] == ["phantom_000", "phantom_001", "phantom_002"]
  split = json.loads((tmp_path / "split.json").read_text())
  assert split == {"train": ["phantom_000"], "val": ["phantom_001"], "test": ["phantom_002"]}
  expected = phantom.generate(2, 1, shape, spacing)
  expected["cbct_mask"] = expected["cbct_mask"].astype(np.float32)
  for name in (*phantom.MODALITIES, "mask", "cbct_mask", "labels"):
    image = nib.load(folders[1] / f"{name}.nii.gz")
    dtype = np.uint8 if name == "labels" else np.float32  # labels: the tissue of each voxel
    assert image.shape == shape and image.get_data_dtype() == dtype
    np.testing.assert_array_equal(image.affine, expected["affine"])
    assert image.header.get_zooms() == spacing
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
    assert image.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_array_equal(np.asarray(image.dataobj), expected[name])
  leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name.startswith(".")]
  assert not leftovers and sorted(p.name for p in folders[0].iterdir()) == sorted(
      f"{m}.nii.gz" for m in (*phantom.MODALITIES, "mask", "cbct_mask", "labels"))
