"""Reading and writing volumes, and the voxel geometry between them.

`load` reads NIfTI (nibabel) or .mha (SimpleITK) and refuses what is broken with a
`VolumeError` naming the file; `to_ras` reorients without interpolation; `resized_grid`,
`resample`, `crop_start` and `window` are the steps `preprocess.py` composes and inverts;
`save_like` writes a result with the header of the file it came from.
"""

from __future__ import annotations

import gzip
import logging
import math
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import nibabel.orientations as nio
import numpy as np
from scipy import ndimage

from medjax.errors import UserError

AFFINE_ATOL = 1e-3  # rotation/zoom part; NIfTI stores affines in float32
ORIGIN_ATOL_MM = 1e-2


class VolumeError(UserError):
  """A file that cannot be used, with the reason in words."""

  def __init__(self, path, reason: str):
    self.path, self.reason = Path(path), reason
    super().__init__(f"{self.path}: {reason}")


# --- loading ---------------------------------------------------------------------------

# The largest volume `load` reads unless told otherwise (`--max-voxels`). 2**28 voxels are
# 1 GiB as float32: a 512×512×1024 CT, 16 times a 256³ brain MR, more than any scan of
# the datasets medjax reads. Preprocessing holds a few copies of a volume (RAS, resampled,
# normalised), so this keeps one subject within a few GiB of memory. A header claiming
# more is damaged or hostile (a 100-byte .nii.gz can claim 10^12 voxels): it is refused
# from the header alone, before anything of that size is allocated.
DEFAULT_MAX_VOXELS = 2 ** 28
# Beyond the voxels a NIfTI header promises, a .nii.gz is read on (and thrown away) this
# far to reach its CRC, so that a flipped bit that still inflates is caught; more trailing
# data than this is left unchecked rather than decompressed without bound.
_GZIP_TAIL = 64 << 20
# Header extensions (DICOM fields, CIFTI XML) take kB to MB; a vox_offset beyond this is
# a damaged header, not a place to look for voxels.
_MAX_VOX_OFFSET = 1 << 28
# Voxel sizes (mm) a scan can have: a finite, non-degenerate affine with 1e-9 mm voxels
# would still make `resized_grid` ask for astronomically many voxels.
SPACING_RANGE_MM = (1e-4, 1e5)

_TRUNCATED = ("expected", "ended before", "mmap length", "not read completely")


def _describe(error: Exception) -> str:
  """One line saying what is wrong; readers phrase the same damage many ways."""
  text = " ".join(f"{type(error).__name__}: {error}".split())
  if len(text) > 240:
    text = text[:120] + " … " + text[-100:]
  lowered = text.lower()
  if isinstance(error, (gzip.BadGzipFile, zlib.error)) or "gzip" in lowered:
    return f"corrupt gzip ({text})"
  if isinstance(error, EOFError) or any(words in lowered for words in _TRUNCATED):
    return f"truncated file ({text})"
  return f"unreadable ({text})"


def _scientific(value: float) -> str:
  mantissa, exponent = f"{value:.1e}".split("e")
  return f"{mantissa}e{int(exponent)}"


def _bytes(count: float) -> str:
  for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
    if count < 1000 or unit == "PB":
      return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
    count /= 1000


def check_size(path, shape, max_voxels: int | None, what: str = "claims") -> None:
  """A `VolumeError` giving the size if `shape` holds more voxels than `max_voxels`."""
  voxels = math.prod(int(n) for n in shape)
  if max_voxels is not None and voxels > max_voxels:
    raise VolumeError(path, f"{what} {'×'.join(str(int(n)) for n in shape)} = "
                      f"{_scientific(voxels)} voxels ({_bytes(4 * voxels)} as float32), "
                      f"more than --max-voxels {max_voxels}")


def _shape(path, dims) -> tuple[int, ...]:
  """The header's shape without trailing singleton axes: 3D or a `VolumeError`."""
  shape = tuple(int(n) for n in dims)
  if any(n < 1 for n in shape):
    raise VolumeError(path, f"header gives the size {'×'.join(map(str, shape))}: "
                      "no voxels along some axis")
  kept = list(shape)
  while len(kept) > 3 and kept[-1] == 1:
    kept.pop()
  if len(kept) != 3:
    raise VolumeError(path, f"{len(kept)}D volume of shape {tuple(shape)}; expected 3D")
  return shape


def _nifti_header(path: Path, head: bytes):
  """The raw (unchecked) NIfTI-1/2 header at the start of `head`, or a `VolumeError`."""
  if len(head) < 4:
    raise VolumeError(path, f"truncated file ({len(head)} bytes, no NIfTI header)")
  sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
  klass = (nib.Nifti1Header if nib.Nifti1Header.sizeof_hdr in sizes
           else nib.Nifti2Header if nib.Nifti2Header.sizeof_hdr in sizes else None)
  if klass is None:
    raise VolumeError(path, "not a NIfTI-1/2 file (its first 4 bytes give a header size of "
                      f"{min(sizes)}, neither 348 nor 540)")
  if len(head) < klass.sizeof_hdr:
    raise VolumeError(path, f"truncated file ({len(head)} bytes, shorter than its "
                      f"{klass.sizeof_hdr}-byte header)")
  try:
    return klass(head[:klass.sizeof_hdr], check=False)
  except Exception as error:
    raise VolumeError(path, _describe(error)) from error


def _nifti_layout(path: Path, header, max_voxels) -> int:
  """Bytes from the file's start to the end of its voxels, from the header fields alone."""
  dim = [int(d) for d in header["dim"]]
  if not 1 <= dim[0] <= 7:
    raise VolumeError(path, f"header dim[0] = {dim[0]}: not a number of axes (1 to 7)")
  shape = _shape(path, dim[1:dim[0] + 1])
  check_size(path, shape, max_voxels)
  try:
    dtype = header.get_data_dtype()
  except Exception:
    raise VolumeError(path, f"unknown NIfTI datatype code {int(header['datatype'])}") from None
  if dtype.kind not in "biuf":
    raise VolumeError(path, f"datatype {dtype} (code {int(header['datatype'])}) is not a "
                      "scalar real image")
  offset = float(header["vox_offset"])
  if not math.isfinite(offset) or not header.sizeof_hdr + 4 <= offset <= _MAX_VOX_OFFSET:
    raise VolumeError(path, f"header vox_offset = {offset:g}: the voxels cannot start there")
  return int(offset) + math.prod(shape) * dtype.itemsize


def _gunzip(path: Path, size: int) -> bytes:
  """The first `size` bytes of a gzip stream (fewer if it ends first), the rest read
  through to check the CRC. `size` is bounded by the checks on the header (`--max-voxels`,
  `_MAX_VOX_OFFSET`); one read fills one buffer, in small inflated pieces."""
  with gzip.open(path, "rb") as f:
    data = f.read(size)
    drained = 0
    while drained < _GZIP_TAIL and (chunk := f.read(1 << 20)):
      drained += len(chunk)
  return data


def _load_nifti(path: Path, max_voxels):
  compressed = path.name.lower().endswith(".gz")
  try:
    # Only the header first: its sizes are checked before the voxels are read, and read
    # with a bound (a negative extension size would make nibabel read a .gz to its end).
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
      head = f.read(nib.Nifti2Header.sizeof_hdr)
  except Exception as error:
    raise VolumeError(path, _describe(error)) from error
  header = _nifti_header(path, head)
  needed = _nifti_layout(path, header, max_voxels)
  try:
    if compressed:
      raw = _gunzip(path, needed)
      size = len(raw)
    else:
      size = path.stat().st_size
      with open(path, "rb") as f:
        raw = f.read(needed) if needed <= size else b""
  except Exception as error:
    raise VolumeError(path, _describe(error)) from error
  if size < needed:
    offset = int(header["vox_offset"])
    raise VolumeError(path, f"truncated file: its header promises {needed - offset} bytes of "
                      f"voxels from byte {offset}, the {'decompressed ' * compressed}file "
                      f"holds {size} bytes")
  image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
  # What nibabel warns and logs about as it fixes a header (zero pixdims, invalid codes,
  # odd magic…) would be lines on stderr; what matters is checked by `load` in one line.
  nibabel_log = logging.getLogger("nibabel.global")
  disabled, nibabel_log.disabled = nibabel_log.disabled, True
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      image = image_class.from_bytes(raw)
      data = np.asarray(image.get_fdata(dtype=np.float32))
      affine = np.asarray(image.affine, np.float64)
  except Exception as error:  # nibabel raises many types for damaged headers
    raise VolumeError(path, _describe(error)) from error
  finally:
    nibabel_log.disabled = disabled
  return data, affine


def _load_other(path: Path, max_voxels):
  """What nibabel reads besides single-file NIfTI (a NIfTI or Analyze .hdr/.img pair, MGH…):
  its own header checks, the size checked before the voxels are read."""
  try:
    image = nib.load(path, mmap=False)
    shape = tuple(image.shape)
  except Exception as error:
    raise VolumeError(path, _describe(error)) from error
  _shape(path, shape)
  check_size(path, shape, max_voxels)
  try:
    return (np.asarray(image.get_fdata(dtype=np.float32)),
            np.asarray(image.affine, np.float64))
  except Exception as error:
    raise VolumeError(path, _describe(error)) from error


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# Bytes per element of the scalar MetaImage element types (MetaIO's table; MET_LONG is
# 4 there, the smallest it can be).
_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
              "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8,
              "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _metaimage_header(path: Path, max_voxels) -> None:
  """Check a MetaImage header before ITK reads it: what ITK would misread, wait on or
  allocate without bound is refused here in one line (ITK's own complaints are pages on
  stderr). The header is `Key = Value` lines up to `ElementDataFile`, then the pixels
  (`LOCAL`) or the name of the file holding them."""
  with open(path, "rb") as f:
    head = f.read(1 << 16)
  fields, header_end = {}, None
  position = 0
  for line in head.split(b"\n"):
    position += len(line) + 1
    key, sep, value = line.decode("latin-1").partition("=")
    if not sep:
      continue
    key, value = key.strip(), value.strip()
    fields.setdefault(key, value)
    if key == "ElementDataFile":
      header_end = position
      break
  if header_end is None:
    raise VolumeError(path, "not a MetaImage: no ElementDataFile line in its first 64 KiB")

  def numbers(key, kind):
    try:
      return [kind(v) for v in fields[key].split()]
    except KeyError:
      raise VolumeError(path, f"not a MetaImage: no {key} line") from None
    except ValueError:
      raise VolumeError(path, f"{key} = {fields[key][:60]}: not {kind.__name__} numbers") from None

  ndims = numbers("NDims", int)
  dims = numbers("DimSize", int)
  if len(ndims) != 1 or not 1 <= ndims[0] <= 16 or len(dims) != ndims[0]:
    raise VolumeError(path, f"NDims = {fields['NDims'][:20]} with DimSize = "
                      f"{fields['DimSize'][:60]}: not one size per axis")
  shape = _shape(path, dims)
  check_size(path, shape, max_voxels)
  channels = fields.get("ElementNumberOfChannels", "1")
  if channels != "1":
    raise VolumeError(path, f"ElementNumberOfChannels = {channels[:20]}; expected a scalar "
                      "3D volume")
  element = fields.get("ElementType", "")
  if element not in _MET_SIZES:
    raise VolumeError(path, f"ElementType = {element[:30]}: not a scalar number type")
  compressed = fields.get("CompressedData", "False").lower()
  if compressed not in ("true", "false"):
    raise VolumeError(path, f"CompressedData = {compressed[:20]}: expected True or False")
  value = fields["ElementDataFile"]
  if value.upper() == "LOCAL":
    data_file, offset = path, header_end
  elif value.upper() == "LIST" or "%" in value or len(value.split()) > 1:
    raise VolumeError(path, f"ElementDataFile = {value[:60]}: pixels spread over several "
                      "files are not read; convert it to one .mha")
  else:
    # `ElementDataFile = /dev/stdin` (or a pipe) would make ITK wait forever.
    data_file, offset = path.parent / value, 0
    if not data_file.is_file():
      raise VolumeError(path, f"ElementDataFile = {value[:60]}: {data_file} is not a regular "
                        "file")
  skip = numbers("HeaderSize", int) if "HeaderSize" in fields else [0]
  if len(skip) != 1 or skip[0] < -1:
    raise VolumeError(path, f"HeaderSize = {fields['HeaderSize'][:20]}: not a byte count")
  stored = (numbers("CompressedDataSize", int) if compressed == "true"
            and "CompressedDataSize" in fields else None)
  if stored is not None and (len(stored) != 1 or stored[0] < 1):
    raise VolumeError(path, f"CompressedDataSize = {fields['CompressedDataSize'][:20]}: not "
                      "a byte count")
  # HeaderSize -1: the pixels are the file's last bytes; otherwise they follow `skip` bytes.
  offset = offset + max(skip[0], 0)
  needed = offset + (stored[0] if stored else math.prod(shape) * _MET_SIZES[element])
  size = data_file.stat().st_size
  if (compressed == "false" or stored) and skip[0] != -1 and size < needed:
    where = "the file" if data_file == path else f"its data file {data_file}"
    raise VolumeError(path, f"truncated file: its header promises {needed - offset} bytes "
                      f"of voxels from byte {offset}, {where} holds {size} bytes")


def _load_itk(path: Path, max_voxels):
  try:
    import SimpleITK as sitk
  except ImportError as error:
    raise VolumeError(path, "reading .mha needs SimpleITK: pip install 'medjax[itk]'") from error
  if path.suffix.lower() in (".mha", ".mhd"):
    try:
      _metaimage_header(path, max_voxels)
    except OSError as error:
      raise VolumeError(path, _describe(error)) from error
  warn = sitk.ProcessObject.GetGlobalWarningDisplay()
  sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's warnings are pages, not lines
  try:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    # The header alone first: the size is checked before the pixels are allocated.
    reader.ReadImageInformation()
    size, components = tuple(reader.GetSize()), reader.GetNumberOfComponents()
    if components > 1:
      raise VolumeError(path, f"{components} components per voxel; expected a scalar 3D volume")
    if "complex" in sitk.GetPixelIDValueAsString(reader.GetPixelID()).lower():
      raise VolumeError(path, "complex voxels; expected a scalar real volume")
    _shape(path, size)
    check_size(path, size, max_voxels)
    image = reader.Execute()
    data = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x)
    affine = itk_affine(image)
  except VolumeError:
    raise
  except Exception as error:
    raise VolumeError(path, _describe(error)) from error
  finally:
    sitk.ProcessObject.SetGlobalWarningDisplay(warn)
  return data.transpose(tuple(reversed(range(data.ndim)))), affine


def itk_affine(image) -> np.ndarray:
  """RAS voxel-to-world affine of a SimpleITK image (ITK's physical space is LPS)."""
  dim = image.GetDimension()
  direction = np.asarray(image.GetDirection()).reshape(dim, dim)
  affine = np.eye(4)
  if dim > 3:  # a 4D image with one frame: its spatial part
    direction = direction[:3, :3]
  dim = min(dim, 3)
  affine[:dim, :dim] = direction * np.asarray(image.GetSpacing())[None, :dim]
  affine[:dim, 3] = image.GetOrigin()[:dim]
  return LPS_TO_RAS @ affine


def check_affine(path, affine: np.ndarray) -> None:
  """A `VolumeError` unless `affine` maps voxels to world plausibly: finite, voxel sizes
  within `SPACING_RANGE_MM`, axes not (nearly) parallel."""
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise VolumeError(path, f"degenerate affine {np.asarray(affine).tolist()} (not finite)")
  spacing = voxel_spacing(affine)
  low, high = SPACING_RANGE_MM
  if not np.all((spacing >= low) & (spacing <= high)):
    raise VolumeError(path, f"degenerate affine {affine.tolist()}: voxel size "
                      f"{'×'.join(f'{s:.3g}' for s in spacing)} mm is outside {low:g}–{high:g} mm")
  # |det| of the unit axis directions: 1 when orthogonal, 0 when two axes coincide.
  if abs(np.linalg.det(affine[:3, :3] / spacing)) < 1e-3:
    raise VolumeError(path, f"degenerate affine {affine.tolist()}: its axes are (nearly) "
                      "parallel")


def load(path, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, np.ndarray]:
  """A 3D float32 volume and its voxel-to-RAS-world affine, or a `VolumeError`.

  `path` is a file, or a `dicom.Series` already read from a DICOM folder.

  A header claiming more than `max_voxels` voxels is refused before the voxels are read
  (None: no limit).
  """
  if hasattr(path, "headers"):  # a `dicom.Series` read already (and checked there)
    data, affine = path.data, path.affine
    check_affine(path.path, affine)
    return data, affine
  path = Path(path)
  if not path.exists():
    raise VolumeError(path, "file does not exist")
  if not path.is_file():  # a folder (DICOM: `dicom.read_series` first), a pipe, a device
    raise VolumeError(path, "not a regular file")
  name = path.name.lower()
  if name.endswith((".mha", ".mhd")):
    data, affine = _load_itk(path, max_voxels)
  elif name.endswith(NIFTI_SUFFIXES):
    data, affine = _load_nifti(path, max_voxels)
  else:
    data, affine = _load_other(path, max_voxels)
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise VolumeError(path, f"{data.ndim}D volume of shape {data.shape}; expected 3D")
  bad = int(np.count_nonzero(~np.isfinite(data)))
  if bad:
    raise VolumeError(path, f"{bad} NaN/inf voxels")
  check_affine(path, affine)
  return np.ascontiguousarray(data, np.float32), affine


# --- geometry --------------------------------------------------------------------------

def to_ras(data: np.ndarray, affine: np.ndarray):
  """Permute/flip voxel axes so they run closest to R, A, S (exact: no interpolation)."""
  transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt("RAS"))
  return (np.ascontiguousarray(nio.apply_orientation(data, transform)),
          affine @ nio.inv_ornt_aff(transform, data.shape))


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
  return np.sqrt((affine[:3, :3] ** 2).sum(0))


def resized_grid(affine: np.ndarray, shape, spacing):
  """The grid covering the same field of view with voxels of `spacing` (mm)."""
  zooms = voxel_spacing(affine)
  spacing = np.asarray(spacing, np.float64)
  if np.allclose(zooms, spacing, rtol=1e-4):
    return affine.copy(), tuple(int(s) for s in shape)
  new_shape = np.maximum(1, np.round(np.asarray(shape) * zooms / spacing)).astype(int)
  new_affine = affine.copy()
  new_affine[:3, :3] = affine[:3, :3] / zooms * spacing
  # Keep the outer corner of voxel 0 where it was: its centre moves by half a voxel change.
  new_affine[:3, 3] = affine[:3, 3] + (new_affine[:3, :3] - affine[:3, :3]) @ np.full(3, 0.5)
  return new_affine, tuple(int(s) for s in new_shape)


def same_grid(shape_a, affine_a, shape_b, affine_b) -> bool:
  return (tuple(shape_a) == tuple(shape_b)
          and np.allclose(affine_a[:3, :3], affine_b[:3, :3], atol=AFFINE_ATOL)
          and np.allclose(affine_a[:3, 3], affine_b[:3, 3], atol=ORIGIN_ATOL_MM))


def resample(data, affine, grid_affine, grid_shape, *, order: int = 1, cval: float = 0.0,
             world: np.ndarray | None = None) -> np.ndarray:
  """`data` (on `affine`) sampled on the grid; `world` maps grid-world → data-world points."""
  voxel_map = np.linalg.inv(affine) @ (world if world is not None else np.eye(4)) @ grid_affine
  if tuple(data.shape) == tuple(grid_shape) and np.allclose(voxel_map, np.eye(4), atol=1e-6):
    return np.asarray(data, np.float32)
  return ndimage.affine_transform(
      np.asarray(data, np.float32), voxel_map[:3, :3], voxel_map[:3, 3],
      output_shape=tuple(grid_shape), order=order, mode="constant", cval=cval,
      prefilter=False)


def _itk_image(data: np.ndarray, affine: np.ndarray):
  import SimpleITK as sitk
  image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
  lps = LPS_TO_RAS @ affine
  zooms = voxel_spacing(lps)
  image.SetSpacing([float(z) for z in zooms])
  image.SetDirection([float(v) for v in (lps[:3, :3] / zooms).ravel()])
  image.SetOrigin([float(v) for v in lps[:3, 3]])
  return image


def register_rigid(fixed, fixed_affine, moving, moving_affine, *, seed: int = 1) -> np.ndarray:
  """4×4 RAS world map (fixed point → moving point) from a rigid mutual-information fit."""
  import SimpleITK as sitk
  fixed_image = _itk_image(fixed, fixed_affine)
  moving_image = _itk_image(moving, moving_affine)
  initial = sitk.CenteredTransformInitializer(
      fixed_image, moving_image, sitk.Euler3DTransform(),
      sitk.CenteredTransformInitializerFilter.GEOMETRY)
  method = sitk.ImageRegistrationMethod()
  method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
  # A fixed seed (0 would mean "the wall clock" to ITK): the same inputs, the same transform.
  method.SetMetricSamplingStrategy(method.REGULAR)
  method.SetMetricSamplingPercentage(0.25, max(int(seed), 1))
  method.SetInterpolator(sitk.sitkLinear)
  method.SetOptimizerAsRegularStepGradientDescent(
      learningRate=2.0, minStep=1e-3, numberOfIterations=200)
  method.SetOptimizerScalesFromPhysicalShift()
  method.SetShrinkFactorsPerLevel([4, 2, 1])
  method.SetSmoothingSigmasPerLevel([2, 1, 0])
  method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
  method.SetInitialTransform(initial, inPlace=False)
  transform = method.Execute(fixed_image, moving_image)
  euler = sitk.Euler3DTransform(sitk.CompositeTransform(transform).GetNthTransform(0))
  rotation = np.asarray(euler.GetMatrix()).reshape(3, 3)
  center, translation = np.asarray(euler.GetCenter()), np.asarray(euler.GetTranslation())
  lps_map = np.eye(4)
  lps_map[:3, :3] = rotation
  lps_map[:3, 3] = center + translation - rotation @ center
  return LPS_TO_RAS @ lps_map @ LPS_TO_RAS


def crop_start(mask: np.ndarray, size) -> tuple[int, int]:
  """In-plane window start per axis: centred on the body, inside the volume when it fits.

  Negative starts mean padding: the output's voxel i is the volume's voxel i + start.
  """
  starts = []
  for axis, (extent, want) in enumerate(zip(mask.shape[:2], size)):
    if extent <= want:
      starts.append(-((want - extent) // 2))
      continue
    other = tuple(a for a in range(mask.ndim) if a != axis)
    hits = np.flatnonzero(mask.any(axis=other))
    centre = (hits[0] + hits[-1] + 1) / 2 if hits.size else extent / 2
    starts.append(int(np.clip(round(centre - want / 2), 0, extent - want)))
  return tuple(starts)


def window(volume: np.ndarray, start, size, fill: float) -> np.ndarray:
  """volume[start:start+size] on the first two axes, `fill` where that leaves the volume."""
  out = np.full(tuple(size) + volume.shape[2:], fill, volume.dtype)
  src, dst = [], []
  for s, n, extent in zip(start, size, volume.shape[:2]):
    lo, hi = max(s, 0), min(s + n, extent)
    src.append(slice(lo, max(hi, lo)))
    dst.append(slice(lo - s, lo - s + max(hi - lo, 0)))
  out[tuple(dst)] = volume[tuple(src)]
  return out


NIFTI_SUFFIXES = (".nii.gz", ".nii")


def save_like(volume: np.ndarray, reference, path) -> None:
  """Write float32 `volume` with the reference file's header: affine, qform/sform and their
  codes, zooms and units survive. A non-NIfTI reference (.mha) gives its RAS affine."""
  from medjax import files
  path = Path(path)
  if not hasattr(reference, "headers"):  # not a `dicom.Series`
    reference = Path(reference)
  if not str(path).endswith(NIFTI_SUFFIXES):
    raise UserError(f"{path}: output must be a .nii or .nii.gz file")
  volume = np.asarray(volume, np.float32)
  if str(reference).endswith(NIFTI_SUFFIXES):
    ref = nib.load(reference)
    if int(np.prod(ref.shape)) == volume.size:
      volume = volume.reshape(ref.shape)  # e.g. a trailing singleton axis
    header = ref.header.copy()
    header.set_data_dtype(np.float32)
    image = type(ref)(volume, ref.affine, header)
    image.set_qform(ref.header.get_qform(), code=int(ref.header["qform_code"]))
    image.set_sform(ref.header.get_sform(), code=int(ref.header["sform_code"]))
    image.header.set_slope_inter(1.0, 0.0)
  else:
    _, affine = load(reference)
    image = nib.Nifti1Image(volume, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
  with files.atomic_write(path) as tmp:
    nib.save(image, tmp)
