"""DICOM series in, synthetic-CT DICOM series out: geometry, UIDs, HU and refusals.

References independent of medjax's reader and writer: the input series is written by
pydicom alone (`dicom_series.py`), the same voxels under the same affine by nibabel; the
output series is read back by SimpleITK (GDCM) and validated by dicom3tools' `dciodvfy`.
"""

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_series import quantise, write_mr_series
from medjax import cli
from medjax.data import dicom, phantom, volumes

SPACING = (4.0, 4.5, 7.0)  # not the run's 5 × 5 × 8 mm grid: translate resamples


def oblique_affine(shape, spacing, degrees=(15.0, -10.0)):
  a, b = np.deg2rad(degrees)
  rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
  ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
  affine = np.diag([*spacing, 1.0])
  affine[:3, :3] = rx @ ry @ affine[:3, :3]
  affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) - 1) / 2
  return affine


@pytest.fixture(scope="module")
def mr(tmp_path_factory):
  """An oblique phantom T1w as a DICOM MR series and, voxel for voxel, as a NIfTI."""
  root = tmp_path_factory.mktemp("dicom")
  volume = phantom.generate(0, 17, shape=(40, 36, 14), spacing=SPACING)["t1w"] * 1000
  affine = oblique_affine(volume.shape, SPACING)
  uids = write_mr_series(root / "mr", volume, affine)
  _, values = quantise(volume)
  nib.save(nib.Nifti1Image(values, affine), root / "t1w.nii.gz")
  return {"root": root, "folder": root / "mr", "nifti": root / "t1w.nii.gz", "uids": uids,
          "affine": affine, "values": values}


def sitk_series(folder):
  """(voxels in NIfTI i, j, k order, voxel → RAS affine) as SimpleITK/GDCM reads them."""
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
  image = reader.Execute()
  return sitk.GetArrayFromImage(image).transpose(2, 1, 0), volumes.itk_affine(image)


def test_reader_gives_nibabel_and_simpleitk_geometry(mr):
  series = dicom.read_series(mr["folder"])
  data, affine = volumes.load(mr["nifti"])
  np.testing.assert_array_equal(series.data, data)
  np.testing.assert_allclose(series.affine, mr["affine"], atol=1e-5)
  itk_data, itk_affine = sitk_series(mr["folder"])
  np.testing.assert_array_equal(series.data, itk_data)
  np.testing.assert_allclose(series.affine, itk_affine, atol=1e-5)
  assert series.modality == "MR" and series.uid == mr["uids"]["series"]


def dciodvfy(path) -> str:
  tool = shutil.which("dciodvfy")
  if tool is None:
    pytest.fail("dciodvfy (Debian's dicom3tools) is not installed: the README's test "
                "command installs it")
  done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
  return done.stdout + done.stderr


@pytest.fixture(scope="module")
def translated(ct_run, mr):
  out = mr["root"] / "out"
  assert cli.main(["medjax", "translate", "--workdir", str(ct_run), "--input",
                   str(mr["folder"]), "--output-dicom", str(out / "sct"), "--output",
                   str(out / "sct_from_dicom.nii.gz")]) == 0
  assert cli.main(["medjax", "translate", "--workdir", str(ct_run), "--input",
                   str(mr["nifti"]), "--output", str(out / "sct.nii.gz")]) == 0
  return out


def test_sct_series_passes_dciodvfy(translated):
  files = sorted((translated / "sct").iterdir())
  assert len(files) == 14
  for path in files[:: len(files) - 1]:  # the first and the last slice
    report = dciodvfy(path)
    assert "CTImage" in report and "Error" not in report and "Warning" not in report, report


def test_sct_series_has_fresh_uids_and_the_mrs_frame(translated, mr):
  headers = [pydicom.dcmread(p, stop_before_pixels=True)
             for p in sorted((translated / "sct").iterdir())]
  source = pydicom.dcmread(next(mr["folder"].iterdir()), stop_before_pixels=True)
  assert {h.SeriesInstanceUID for h in headers} == {headers[0].SeriesInstanceUID}
  assert headers[0].SeriesInstanceUID != mr["uids"]["series"]
  sops = {h.SOPInstanceUID for h in headers}
  assert len(sops) == len(headers) and not sops & set(mr["uids"]["sop"])
  for h in headers:
    assert h.StudyInstanceUID == mr["uids"]["study"]
    assert h.FrameOfReferenceUID == mr["uids"]["frame"]
    assert h.PatientID == source.PatientID and h.PatientName == source.PatientName
    assert h.SOPClassUID == dicom.CT_IMAGE_STORAGE and h.Modality == "CT"
    assert list(h.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert float(h.RescaleIntercept) == -1024 and float(h.RescaleSlope) == 1
    assert "sCT" in h.SeriesDescription and "regression" in h.SeriesDescription


def test_sct_series_is_the_nifti_paths_hu_on_the_inputs_grid(translated, mr):
  data, affine = sitk_series(translated / "sct")
  nifti = nib.load(translated / "sct.nii.gz")
  np.testing.assert_allclose(affine, mr["affine"], atol=1e-4)  # the MR's geometry
  np.testing.assert_allclose(nifti.affine, mr["affine"], atol=1e-4)
  # HU voxel for voxel: the DICOM path's NIfTI equals the NIfTI path's (to float32
  # rounding: DICOM keeps positions as decimal strings, NIfTI as float32), and the stored
  # series is that volume rounded to whole HU.
  from_dicom = nib.load(translated / "sct_from_dicom.nii.gz").get_fdata()
  np.testing.assert_allclose(from_dicom, nifti.get_fdata(), rtol=0, atol=1e-2)
  np.testing.assert_array_equal(data, np.rint(from_dicom))
  np.testing.assert_allclose(data, nifti.get_fdata(), rtol=0, atol=0.5 + 1e-2)
  assert data.min() < -500 and data.max() > 0  # air and tissue in HU


def _series(root, name, **kwargs):
  volume = phantom.generate(0, 3, shape=(24, 24, 8), spacing=(6.0, 6.0, 10.0))["t1w"] * 1000
  return write_mr_series(root / name, volume, np.diag([6.0, 6.0, 10.0, 1.0]), **kwargs)


def _non_image(folder):
  folder.mkdir(parents=True)
  ds = pydicom.Dataset()
  ds.file_meta = pydicom.dataset.FileMetaDataset()
  ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
  ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
  ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
  ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
  ds.Modality = "SR"
  ds.save_as(folder / "report.dcm", enforce_file_format=True)


def _multi_frame(root):
  _series(root, "in")
  for path in (root / "in").iterdir():
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 2
    ds.save_as(path)


BAD = {
    "empty folder": (lambda root: (root / "in").mkdir(), "empty folder"),
    "two series": (lambda root: (_series(root, "in", seed=1), _series(root, "in", seed=2)),
                   "2 series: choose one with --series-uid"),
    "missing slice": (lambda root: _series(root, "in", skip=(4,)), "uneven slice spacing"),
    "non-image": (lambda root: _non_image(root / "in"), "no DICOM image series"),
    "compressed": (lambda root: _series(root, "in", transfer_syntax="1.2.840.10008.1.2.4.90"),
                   "cannot be decoded"),
    "multi-frame": (_multi_frame, "multi-frame"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_series_is_one_line_and_writes_nothing(ct_run, tmp_path, capsys, case):
  build, words = BAD[case]
  build(tmp_path)
  out = tmp_path / "out"
  status = cli.main(["medjax", "translate", "--workdir", str(ct_run), "--input",
                     str(tmp_path / "in"), "--output-dicom", str(out / "sct"), "--output",
                     str(out / "sct.nii.gz")])
  err = capsys.readouterr().err.strip()
  assert status == 2 and len(err.splitlines()) == 1, err
  assert err.startswith("medjax translate: error:") and words in err
  assert str(tmp_path / "in") in err
  assert not out.exists()


def test_series_uid_picks_one_of_several(ct_run, tmp_path, capsys):
  first = _series(tmp_path, "in", seed=1)
  _series(tmp_path, "in", seed=2)
  assert dicom.read_series(tmp_path / "in", first["series"]).uid == first["series"]
  assert cli.main(["medjax", "translate", "--workdir", str(ct_run), "--input",
                   str(tmp_path / "in"), "--series-uid", first["series"], "--output-dicom",
                   str(tmp_path / "sct")]) == 0
  header = pydicom.dcmread(sorted((tmp_path / "sct").iterdir())[0])
  assert header.FrameOfReferenceUID == first["frame"]
  assert (tmp_path / "sct.json").is_file()  # the sidecar, beside the series


def test_an_existing_output_folder_is_refused_before_any_work(ct_run, mr, tmp_path, capsys):
  (tmp_path / "sct").mkdir()
  (tmp_path / "sct" / "keep.dcm").write_bytes(b"x")
  assert cli.main(["medjax", "translate", "--workdir", str(ct_run), "--input",
                   str(mr["folder"]), "--output-dicom", str(tmp_path / "sct")]) == 2
  assert "not an empty folder" in capsys.readouterr().err
  assert [p.name for p in (tmp_path / "sct").iterdir()] == ["keep.dcm"]


def test_the_std_is_a_second_valid_series(ct_run, mr, tmp_path):
  """--uncertainty-dicom: its own series in the same frame; the regression run's draws
  are identical, so its std is exactly 0 HU (stored with intercept 0)."""
  assert cli.main(["medjax", "translate", "--workdir", str(ct_run), "--input",
                   str(mr["folder"]), "--output-dicom", str(tmp_path / "sct"),
                   "--uncertainty-dicom", str(tmp_path / "std"), "--samples", "2"]) == 0
  sct, std = (pydicom.dcmread(sorted((tmp_path / n).iterdir())[0]) for n in ("sct", "std"))
  assert std.SeriesInstanceUID != sct.SeriesInstanceUID
  assert std.FrameOfReferenceUID == mr["uids"]["frame"] and "std" in std.SeriesDescription
  report = dciodvfy(sorted((tmp_path / "std").iterdir())[0])
  assert "Error" not in report and "Warning" not in report, report
  data, affine = sitk_series(tmp_path / "std")
  assert data.shape == mr["values"].shape and not data.any()
  np.testing.assert_allclose(affine, mr["affine"], atol=1e-4)
