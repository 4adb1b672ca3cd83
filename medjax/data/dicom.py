"""DICOM series in, synthetic-CT DICOM series out (pydicom; docs/design.md, "DICOM").

`read_series` turns a folder of single-frame DICOM images into the (volume, affine) pair
every other reader gives: NIfTI voxel order (i along a row, j down the columns, k along
the slice normal), float32 after RescaleSlope/Intercept, a voxel-to-RAS affine. Slices
are ordered by ImagePositionPatient projected on the normal (the cross product of the
ImageOrientationPatient cosines), never by InstanceNumber or file name. Refused, each
with the folder and the reason, before any pixel is decoded: an empty folder, no image
series, several series without `series_uid` (they are listed), multi-frame objects,
slices of different orientation or size, duplicate positions and uneven spacing (a
missing slice, a gap: resampling it would invent anatomy, so it is a refusal).

`write_ct_series` writes a volume on a read series' grid as a new CT Image Storage
series in that series' frame of reference: fresh Series/SOP Instance UIDs, the source's
patient, study and FrameOfReferenceUID, each slice's ImagePositionPatient and the
orientation, spacing and thickness of the source slice it replaces, int16 pixels with
RescaleIntercept −1024, ImageType DERIVED\\SECONDARY\\AXIAL and a SeriesDescription naming
the model. The folder appears whole or not at all (`files.atomic_directory`).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections import Counter
from pathlib import Path

import numpy as np

from medjax.data.volumes import VolumeError, check_size

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# Where slice positions along the normal may differ from an even grid (mm), relative to
# the slice step: scanners write positions with ~1e-3 mm of rounding.
SPACING_TOLERANCE = 0.01
ORIENTATION_ATOL = 1e-4
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MAX_FILES = 100_000  # a folder of more files than any series is not walked to the end


@dataclasses.dataclass
class Series:
  """One DICOM image series, read: what `volumes.load` returns, plus its headers."""
  path: Path  # the folder
  uid: str
  modality: str  # the DICOM Modality (MR, CT, …)
  description: str
  data: np.ndarray  # (I, J, K) float32, rescaled
  affine: np.ndarray  # voxel → RAS mm
  headers: list  # pydicom Datasets without pixel data, in slice order (k)

  def __str__(self) -> str:
    return str(self.path)

  def __fspath__(self) -> str:
    return str(self.path)


@dataclasses.dataclass
class _Found:
  """What a folder holds, before any pixel is read."""
  series: dict  # uid → [(path, header)]
  not_dicom: int
  non_image: Counter  # SOP class / modality name → count


def _pydicom():
  import pydicom
  return pydicom


def scan(folder) -> _Found:
  """Every DICOM file under `folder` (recursively), headers only, grouped by series."""
  pydicom = _pydicom()
  folder = Path(folder)
  if not folder.is_dir():
    raise VolumeError(folder, "not a folder of DICOM files")
  series, not_dicom, non_image = {}, 0, Counter()
  paths = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
  if len(paths) > MAX_FILES:
    raise VolumeError(folder, f"{len(paths)} files: more than a DICOM series has "
                      f"({MAX_FILES}); point --input at one series folder")
  for path in paths:
    try:
      header = pydicom.dcmread(path, stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, EOFError, OSError, ValueError, KeyError,
            TypeError, AttributeError, IndexError, OverflowError):
      not_dicom += 1
      continue
    if "SOPClassUID" not in header and "Rows" not in header:
      not_dicom += 1  # e.g. a DICOMDIR
      continue
    if "Rows" not in header or "ImagePositionPatient" not in header:
      kind = str(getattr(header, "Modality", "") or "") or _sop_name(header)
      non_image[kind or "non-image"] += 1
      continue
    uid = str(getattr(header, "SeriesInstanceUID", "") or "(no SeriesInstanceUID)")
    series.setdefault(uid, []).append((path, header))
  return _Found(series, not_dicom, non_image)


def _sop_name(header) -> str:
  uid = getattr(header, "SOPClassUID", None)
  return getattr(uid, "name", str(uid or ""))


def _summary(found: _Found) -> str:
  parts = [f"{len(items)} image(s) of series {uid} ({_describe(items[0][1])})"
           for uid, items in found.series.items()]
  parts += [f"{n} {kind} object(s)" for kind, n in found.non_image.items()]
  if found.not_dicom:
    parts.append(f"{found.not_dicom} file(s) that are not DICOM")
  return "; ".join(parts) or "nothing"


def _describe(header) -> str:
  words = [str(getattr(header, "Modality", "") or "?"),
           str(getattr(header, "SeriesDescription", "") or "").strip()]
  return " ".join(w for w in words if w)


def list_series(folder) -> list[dict]:
  """The image series of a folder: uid, modality, description, number of files."""
  found = scan(folder)
  return [{"uid": uid, "modality": str(getattr(items[0][1], "Modality", "")),
           "description": str(getattr(items[0][1], "SeriesDescription", "")),
           "files": len(items)} for uid, items in found.series.items()]


def read_series(folder, series_uid=None, *, max_voxels: int | None = None) -> Series:
  """The image series in `folder` (the one with `series_uid`, or its only one).

  `series_uid` may be one UID or several (the first one the folder holds is taken), so
  one `--series-uid` list serves several input folders.
  """
  folder = Path(folder)
  found = scan(folder)
  if not found.series:
    if not found.not_dicom and not found.non_image:
      raise VolumeError(folder, "empty folder: no DICOM files")
    raise VolumeError(folder, f"no DICOM image series; found {_summary(found)}")
  wanted = [series_uid] if isinstance(series_uid, str) else list(series_uid or ())
  if wanted:
    chosen = [uid for uid in wanted if uid in found.series]
    if not chosen:
      raise VolumeError(folder, f"no series with UID {', '.join(wanted)}; found "
                        f"{_summary(found)}")
    uid = chosen[0]
  elif len(found.series) > 1:
    raise VolumeError(folder, f"{len(found.series)} series: choose one with --series-uid. "
                      f"Found {_summary(found)}")
  else:
    uid = next(iter(found.series))
  return _read(folder, uid, found.series[uid], max_voxels)


def _float_list(header, keyword, count, path) -> np.ndarray:
  value = getattr(header, keyword, None)
  try:
    values = np.array([float(v) for v in value], np.float64)
  except (TypeError, ValueError):
    values = np.array([])
  if values.shape != (count,) or not np.isfinite(values).all():
    raise VolumeError(path, f"{keyword} is missing or not {count} numbers ({value!r})")
  return values


def _read(folder: Path, uid: str, items: list, max_voxels) -> Series:
  first_path, first = items[0]
  frames = {int(getattr(h, "NumberOfFrames", 1) or 1) for _, h in items}
  if max(frames) > 1:
    raise VolumeError(folder, f"series {uid} is multi-frame ({max(frames)} frames in one "
                      "object, e.g. enhanced MR/CT): not supported; export it as single-"
                      "frame images, or convert it to NIfTI (dcm2niix) and give that file")
  orientation = _float_list(first, "ImageOrientationPatient", 6, first_path)
  row, column = orientation[:3], orientation[3:]
  if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(column) - 1) > 1e-3 \
      or abs(row @ column) > 1e-3:
    raise VolumeError(first_path, f"ImageOrientationPatient {orientation.tolist()} is not "
                      "two orthogonal unit vectors")
  normal = np.cross(row, column)
  rows, columns = int(first.Rows), int(first.Columns)
  pixel = _float_list(first, "PixelSpacing", 2, first_path)  # (between rows, between columns)
  positions = []
  for path, header in items:
    other = _float_list(header, "ImageOrientationPatient", 6, path)
    if not np.allclose(other, orientation, atol=ORIENTATION_ATOL):
      raise VolumeError(path, f"ImageOrientationPatient {other.tolist()} differs from "
                        f"{orientation.tolist()} of {first_path.name}: the series is not one "
                        "stack of parallel slices")
    if (int(header.Rows), int(header.Columns)) != (rows, columns) or not np.allclose(
        _float_list(header, "PixelSpacing", 2, path), pixel, rtol=1e-4):
      raise VolumeError(path, f"{int(header.Rows)}×{int(header.Columns)} pixels of "
                        f"{list(header.PixelSpacing)} mm differ from {first_path.name}'s "
                        f"{rows}×{columns} of {pixel.tolist()} mm")
    positions.append(_float_list(header, "ImagePositionPatient", 3, path))
  positions = np.array(positions)
  along = positions @ normal
  order = np.argsort(along, kind="stable")
  items, positions, along = [items[i] for i in order], positions[order], along[order]
  steps = np.diff(along)
  if len(steps) and steps.min() < 1e-3:
    k = int(np.argmin(steps))
    raise VolumeError(folder, f"two slices at the same position {along[k]:.3f} mm along the "
                      f"normal ({items[k][0].name}, {items[k + 1][0].name}): a duplicate "
                      "or a second series with the same SeriesInstanceUID")
  if len(steps) > 1:
    step = np.median(steps)
    worst = int(np.argmax(np.abs(steps - step)))
    if abs(steps[worst] - step) > SPACING_TOLERANCE * step:
      raise VolumeError(folder, f"uneven slice spacing: {steps[worst]:.3f} mm between "
                        f"{items[worst][0].name} and {items[worst + 1][0].name} where the "
                        f"others are {step:.3f} mm (a missing slice?). medjax does not "
                        "resample uneven series: export the whole series again")
  check_size(folder, (columns, rows, len(items)), max_voxels)
  # Voxel (i, j, k) sits at IPP_k + i·Δc·row + j·Δr·column (PS3.3 C.7.6.2.1.1), in LPS.
  lps = np.eye(4)
  lps[:3, 0] = row * pixel[1]
  lps[:3, 1] = column * pixel[0]
  # The mean step between first and last position: exact for a tilted (sheared) stack too.
  lps[:3, 2] = ((positions[-1] - positions[0]) / (len(items) - 1) if len(items) > 1
                else normal * float(getattr(first, "SliceThickness", 1.0) or 1.0))
  lps[:3, 3] = positions[0]
  data = np.empty((columns, rows, len(items)), np.float32)
  headers = []
  pydicom = _pydicom()
  for k, (path, _) in enumerate(items):
    try:
      full = pydicom.dcmread(path)
    except Exception as error:
      raise VolumeError(path, f"unreadable DICOM ({str(error).splitlines()[0][:200]})") \
          from None
    try:
      pixels = full.pixel_array
    except Exception as error:  # decoders raise RuntimeError, NotImplementedError, …
      syntax = getattr(getattr(full, "file_meta", None), "TransferSyntaxUID", None)
      name = f" {syntax.name} ({syntax})" if syntax is not None else ""
      raise VolumeError(path, f"pixel data in transfer syntax{name} cannot be decoded "
                        f"here ({str(error).splitlines()[0][:200]}); decompress the series "
                        "(e.g. gdcmconv --raw) or convert it to NIfTI") from None
    if pixels.shape != (rows, columns):
      raise VolumeError(path, f"pixel data of shape {pixels.shape}, expected "
                        f"{rows}×{columns} (one grey-level frame)")
    slope = float(getattr(full, "RescaleSlope", 1) or 1)
    intercept = float(getattr(full, "RescaleIntercept", 0) or 0)
    data[:, :, k] = (pixels.astype(np.float32) * slope + intercept).T
    del full.PixelData
    headers.append(full)
  return Series(folder, uid, str(getattr(first, "Modality", "") or ""),
                str(getattr(first, "SeriesDescription", "") or ""),
                data, LPS_TO_RAS @ lps, headers)


def write_ct_series(volume: np.ndarray, reference: Series, out_dir, *, description: str,
                    intercept: float = -1024.0, series_number: int | None = None,
                    derivation: str = "") -> Path:
  """`volume` (on `reference`'s voxel grid, in HU) → a CT series in `out_dir`.

  Stored values are rint(HU) − intercept as int16 with slope 1; values the int16 range
  cannot hold are clipped to it. Returns the folder.
  """
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.sequence import Sequence
  from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

  from medjax import files

  volume = np.asarray(volume, np.float32)
  if volume.shape != reference.data.shape:
    raise ValueError(f"volume {volume.shape} is not on the series' grid "
                     f"{reference.data.shape}")
  stored = np.clip(np.rint(volume) - intercept, -32768, 32767).astype(np.int16)
  series_uid = generate_uid()
  now = datetime.datetime.now()
  date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
  number = series_number if series_number is not None else \
      int(getattr(reference.headers[0], "SeriesNumber", 0) or 0) + 1000
  with files.atomic_directory(out_dir) as tmp:
    for k, source in enumerate(reference.headers):
      ds = Dataset()
      ds.file_meta = FileMetaDataset()
      ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
      ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
      ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
      ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
      ds.SpecificCharacterSet = getattr(source, "SpecificCharacterSet", None) or "ISO_IR 100"
      # Patient and study: the source's, so the planning system files the sCT beside it.
      for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                      "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
                      "StudyID", "AccessionNumber", "StudyDescription"):
        value = getattr(source, keyword, None)
        setattr(ds, keyword, value if value is not None else "")
      if not ds.StudyInstanceUID:
        raise VolumeError(reference.path, "the series has no StudyInstanceUID to file the "
                          "synthetic CT under")
      ds.SOPClassUID = CT_IMAGE_STORAGE
      ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
      ds.Modality = "CT"
      ds.SeriesInstanceUID = series_uid
      ds.SeriesNumber = number
      ds.SeriesDescription = description[:64]
      ds.SeriesDate, ds.SeriesTime = date, time
      ds.ContentDate, ds.ContentTime = date, time
      ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
      ds.Manufacturer = "medjax"
      ds.ManufacturerModelName = "medjax translate"
      ds.InstanceNumber = k + 1
      ds.AcquisitionNumber = 1
      ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
      ds.DerivationDescription = (derivation or description)[:1024]
      ds.BurnedInAnnotation = "NO"
      # Frame of reference and geometry: the source slice this one replaces.
      ds.FrameOfReferenceUID = source.FrameOfReferenceUID
      ds.PositionReferenceIndicator = getattr(source, "PositionReferenceIndicator", "") or ""
      ds.ImagePositionPatient = list(source.ImagePositionPatient)
      ds.ImageOrientationPatient = list(source.ImageOrientationPatient)
      ds.PixelSpacing = list(source.PixelSpacing)
      if getattr(source, "SliceThickness", None) not in (None, ""):
        ds.SliceThickness = source.SliceThickness
      else:
        ds.SliceThickness = ""
      if getattr(source, "SliceLocation", None) not in (None, ""):
        ds.SliceLocation = source.SliceLocation
      ds.PatientPosition = getattr(source, "PatientPosition", "") or ""
      # Laterality is type 2C: asked for unless the body part is known to be unpaired.
      body_part = getattr(source, "BodyPartExamined", "") or ""
      if body_part:
        ds.BodyPartExamined = body_part
      laterality = getattr(source, "Laterality", "") or ""
      if laterality or not body_part:
        ds.Laterality = laterality
      ds.KVP = ""
      ref = Dataset()
      ref.ReferencedSOPClassUID = source.SOPClassUID
      ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
      ds.SourceImageSequence = Sequence([ref])
      ds.SamplesPerPixel = 1
      ds.PhotometricInterpretation = "MONOCHROME2"
      ds.Rows, ds.Columns = int(source.Rows), int(source.Columns)
      ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
      ds.PixelRepresentation = 1
      ds.RescaleIntercept = f"{intercept:g}"
      ds.RescaleSlope = "1"
      ds.RescaleType = "HU"
      ds.WindowCenter, ds.WindowWidth = "40", "400"
      ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
      ds.save_as(tmp / f"CT_{k + 1:04d}.dcm", enforce_file_format=True)
  return Path(out_dir)


def series_description(kind: str, run) -> str:
  """'sCT medjax flow t1w→ct step 1000' within DICOM's 64 characters."""
  sources = "+".join(run.recipe.sources)
  text = f"{kind} medjax {run.translator.name} {sources}>{run.target} step {run.step}"
  return text[:64]

