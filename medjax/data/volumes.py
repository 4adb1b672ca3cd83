"""Reading and writing volumes, and the voxel geometry between them.

`load` reads NIfTI (nibabel) or .mha (SimpleITK) and refuses what is broken with a
`VolumeError` naming the file; `to_ras` reorients without interpolation; `resized_grid`,
`resample`, `crop_start` and `window` are the steps `preprocess.py` composes and inverts;
`save_like` writes a result with the header of the file it came from.
"""

from __future__ import annotations

import gzip
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


def _load_nifti(path: Path):
  try:
    image = nib.load(path, mmap=False)
    # Reading the header alone misses damage in the voxel stream: read everything now.
    data = np.asarray(image.get_fdata(dtype=np.float32))
  except Exception as error:  # nibabel raises many types for damaged files
    raise VolumeError(path, _describe(error)) from error
  return data, np.asarray(image.affine, np.float64)


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _load_itk(path: Path):
  try:
    import SimpleITK as sitk
  except ImportError as error:
    raise VolumeError(path, "reading .mha needs SimpleITK: pip install 'medjax[itk]'") from error
  try:
    image = sitk.ReadImage(str(path))
    data = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x[, components])
  except Exception as error:
    raise VolumeError(path, _describe(error)) from error
  if image.GetNumberOfComponentsPerPixel() > 1:
    raise VolumeError(path, f"{image.GetNumberOfComponentsPerPixel()} components per voxel;"
                      " expected a scalar 3D volume")
  data = data.transpose(tuple(reversed(range(data.ndim))))
  return data, itk_affine(image)


def itk_affine(image) -> np.ndarray:
  """RAS voxel-to-world affine of a SimpleITK image (ITK's physical space is LPS)."""
  dim = image.GetDimension()
  direction = np.asarray(image.GetDirection()).reshape(dim, dim)
  affine = np.eye(4)
  affine[:dim, :dim] = direction * np.asarray(image.GetSpacing())[None, :]
  affine[:dim, 3] = image.GetOrigin()
  return LPS_TO_RAS @ affine


def load(path) -> tuple[np.ndarray, np.ndarray]:
  """A 3D float32 volume and its voxel-to-RAS-world affine, or a `VolumeError`."""
  path = Path(path)
  if not path.exists():
    raise VolumeError(path, "file does not exist")
  data, affine = _load_itk(path) if path.suffix.lower() in (".mha", ".mhd") else _load_nifti(path)
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise VolumeError(path, f"{data.ndim}D volume of shape {data.shape}; expected 3D")
  bad = int(np.count_nonzero(~np.isfinite(data)))
  if bad:
    raise VolumeError(path, f"{bad} NaN/inf voxels")
  if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
    raise VolumeError(path, f"degenerate affine {affine.tolist()}")
  return data, affine


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
  path, reference = Path(path), Path(reference)
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
