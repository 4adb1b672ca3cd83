"""DICOM series for the tests, written with pydicom alone (not with medjax's writer).

`write_mr_series` stores a RAS-ordered volume under a RAS affine the way a scanner does:
one MR Image Storage file per slice, LPS patient coordinates, ImagePositionPatient per
slice, int16 pixels with a rescale slope/intercept. File names and InstanceNumbers are
shuffled, so a reader that sorts by either gets the volume wrong.
"""

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def quantise(volume, slope=0.5, intercept=-100.0):
  """The int16 stored values a volume is kept as, and the values they stand for."""
  stored = np.clip(np.rint((volume - intercept) / slope), -32768, 32767).astype(np.int16)
  return stored, stored.astype(np.float32) * slope + intercept


def write_mr_series(folder, volume, affine_ras, *, slope=0.5, intercept=-100.0,
                    modality="MR", study_uid=None, frame_uid=None, series_uid=None,
                    patient_id="PHANTOM-001", seed=0, skip=(), transfer_syntax=None,
                    description="T1w phantom"):
  """Slices k of `volume` (i, j, k voxel order) → folder/*.dcm. Returns the UIDs used."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  lps = LPS @ np.asarray(affine_ras, float)
  spacing = np.linalg.norm(lps[:3, :3], axis=0)
  row, column = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
  stored, _ = quantise(volume, slope, intercept)
  uids = {"study": study_uid or generate_uid(), "frame": frame_uid or generate_uid(),
          "series": series_uid or generate_uid(), "sop": []}
  depth = volume.shape[2]
  numbers = rng.permutation(depth) + 1
  for k in range(depth):
    if k in skip:
      continue
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    uids["sop"].append(ds.SOPInstanceUID)
    ds.PatientName, ds.PatientID = "Phantom^Head", patient_id
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = uids["study"], "20261126", "101500"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "A1", ""
    ds.SeriesInstanceUID, ds.SeriesNumber = uids["series"], 3
    ds.SeriesDescription = description
    ds.Modality, ds.BodyPartExamined = modality, "HEAD"
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uids["frame"], ""
    ds.InstanceNumber = int(numbers[k])
    ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, 3] + k * lps[:3, 2]]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *column)]
    ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]
    ds.SliceThickness = f"{spacing[2]:.6f}"
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    if transfer_syntax is None:
      ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
    else:  # a compressed syntax: encapsulated bytes no installed decoder can read
      from pydicom.encaps import encapsulate
      ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])
      ds["PixelData"].VR = "OB"
    name = f"IM{rng.integers(1 << 30):010d}.dcm"
    ds.save_as(folder / name, enforce_file_format=True)
  return uids
