"""One subject's files → normalised source/target/mask volumes on one grid.

Steps (each is the inverse-friendly kind, so `to_original` can undo them for
volume-in/volume-out translation):
1. load (nibabel; SimpleITK for .mha) and refuse what is broken, naming the file;
2. reorient to RAS: a pure permutation/flip of voxels, no interpolation;
3. the grid: the first source modality's RAS grid with voxels resized to `spacing`,
   keeping its field of view (outer voxel corners) and its direction cosines;
4. every modality is resampled onto that grid through its own affine (a modality on
   another grid lands where the scanner says it is; `register="rigid"` first corrects
   the scanner with a SimpleITK rigid registration, as IXI's T1 needs);
5. the body mask comes from the dataset's mask file, else Otsu + largest component +
   hole filling on the reference image;
6. intensities to [-1, 1] (`intensity.py`): CT fixed HU window, MR per-volume robust range;
7. crop or pad in-plane to `size`, centred on the body.

Slices are axial: array axes (Z, H, W, C) with H along RAS x and W along RAS y.
"""

from __future__ import annotations

import dataclasses
import gzip
import zlib
from pathlib import Path

import nibabel as nib
import nibabel.orientations as nio
import numpy as np
from scipy import ndimage

from medjax.data import intensity

AFFINE_ATOL = 1e-3  # rotation/zoom part; NIfTI stores affines in float32
ORIGIN_ATOL_MM = 1e-2


class VolumeError(Exception):
  """A file that cannot be used, with the reason in words."""

  def __init__(self, path, reason: str):
    self.path, self.reason = Path(path), reason
    super().__init__(f"{self.path.name}: {reason}")


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


def body_mask(volume: np.ndarray) -> np.ndarray:
  """Otsu foreground, its largest connected component, holes filled (3D, then per slice)."""
  from skimage.filters import threshold_otsu
  if np.ptp(volume) == 0:
    return np.zeros(volume.shape, bool)
  foreground = volume > threshold_otsu(volume)
  labels, count = ndimage.label(foreground)
  if count > 1:
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    foreground = labels == np.argmax(sizes)
  foreground = ndimage.binary_fill_holes(foreground)
  for z in range(foreground.shape[2]):  # holes open to the top/bottom of the volume
    foreground[:, :, z] = ndimage.binary_fill_holes(foreground[:, :, z])
  return foreground


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


# --- one subject -----------------------------------------------------------------------

@dataclasses.dataclass
class PreparedSubject:
  """Normalised volumes on the subject's grid, as axial slices: (Z, H, W, C)."""
  id: str
  sources: tuple[str, ...]
  targets: tuple[str, ...]
  source: np.ndarray
  target: np.ndarray
  mask: np.ndarray
  geometry: dict
  normalisation: dict  # modality → intensity.fit parameters

  def foreground_slices(self) -> np.ndarray:
    return np.flatnonzero(self.mask.reshape(self.mask.shape[0], -1).any(1))

  def context_source(self, z: int, context: int) -> np.ndarray:
    """Source channels of slice z with `context` neighbours each side, edge-clamped.

    Channel order: modality-major, i.e. [m0(z-K) … m0(z+K), m1(z-K) …].
    """
    if context == 0:
      return self.source[z]
    depth = self.source.shape[0]
    near = np.clip(np.arange(z - context, z + context + 1), 0, depth - 1)
    stack = self.source[near]  # (2K+1, H, W, Cs)
    return np.ascontiguousarray(stack.transpose(1, 2, 3, 0).reshape(
        stack.shape[1], stack.shape[2], -1))

  def records(self, context: int = 0, subject_index: int = 0):
    """Slice-pair records (DESIGN.md "Batch"), slices without foreground left out."""
    for z in self.foreground_slices():
      yield {"source": self.context_source(int(z), context), "target": self.target[z],
             "mask": self.mask[z], "subject": np.int32(subject_index), "slice": np.int32(z)}


def _axial(volume: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.moveaxis(volume, 2, 0))  # (X, Y, Z) → (Z, X, Y)


def preprocess_subject(subject, sources, target, *, spacing=(1.0, 1.0, 1.0), size=(256, 256),
                       context: int = 0, register: str | None = None) -> PreparedSubject:
  """`subject` (a `layouts.Subject`) → `PreparedSubject`; `VolumeError` if a file is bad.

  `context` is accepted for symmetry with `prepare` and only used by `records`.
  """
  del context
  sources = tuple(sources)
  targets = (target,) if isinstance(target, str) else tuple(target)
  size = (size, size) if np.isscalar(size) else tuple(size)
  missing = [m for m in sources + targets if m not in subject.files]
  if missing:
    raise VolumeError(subject.id, f"missing modality {', '.join(missing)}")
  reference = sources[0]
  original, original_affine = load(subject.files[reference])
  ras, ras_affine = to_ras(original, original_affine)
  grid_affine, grid_shape = resized_grid(ras_affine, ras.shape, spacing)

  on_grid, off_grid, registered = {}, [], []
  wanted = sources + tuple(m for m in targets if m not in sources)
  for modality in wanted + (("mask",) if "mask" in subject.files else ()):
    data, affine = (ras, ras_affine) if modality == reference else to_ras(
        *load(subject.files[modality]))
    world = None
    if modality != reference and not same_grid(data.shape, affine, ras.shape, ras_affine):
      off_grid.append(modality)
      if register == "rigid" and modality != "mask":
        world = register_rigid(on_grid[reference], grid_affine, data, affine)
        registered.append(modality)
    if modality == "mask":
      on_grid["mask"] = resample(data > 0, affine, grid_affine, grid_shape, order=1,
                                 world=world) >= 0.5
    else:
      on_grid[modality] = resample(data, affine, grid_affine, grid_shape, order=1,
                                   cval=float(data.min()), world=world)

  mask = on_grid.pop("mask", None)
  if mask is None:
    mask = body_mask(on_grid[reference])
  if not mask.any():
    raise VolumeError(subject.files[reference], "empty body mask")

  normalisation = {m: intensity.fit(on_grid[m], m, mask) for m in wanted}
  start = crop_start(mask, size)

  def stack(modalities):
    unit = [window(intensity.normalise(on_grid[m], normalisation[m]), start, size, -1.0)
            for m in modalities]
    return _axial(np.stack(unit, -1))

  geometry = {
      "reference": reference,
      "original_shape": list(original.shape),
      "original_affine": original_affine.tolist(),
      "original_spacing": voxel_spacing(original_affine).tolist(),
      "ras_shape": list(ras.shape),
      "ras_affine": ras_affine.tolist(),
      "grid_shape": list(grid_shape),
      "grid_affine": grid_affine.tolist(),
      "spacing": voxel_spacing(grid_affine).tolist(),
      "crop_start": list(start),
      "size": list(size),
      "off_grid": off_grid,
      "registered": registered,
  }
  return PreparedSubject(
      id=subject.id, sources=sources, targets=targets,
      source=stack(sources), target=stack(targets),
      mask=_axial(window(mask.astype(np.float32), start, size, 0.0)[..., None]),
      geometry=geometry, normalisation=normalisation)


def to_original(volume: np.ndarray, geometry: dict, *, order: int = 1,
                fill: float = -1.0) -> np.ndarray:
  """Undo crop/pad, resampling and reorientation: (Z, H, W) → the reference file's grid.

  Save the result with `geometry["original_affine"]` to get a NIfTI aligned with the input.
  """
  volume = np.asarray(volume, np.float32)
  if volume.ndim == 4:
    volume = volume[..., 0]
  in_plane = np.moveaxis(volume, 0, 2)  # (H, W, Z)
  grid_shape = tuple(geometry["grid_shape"])
  start = geometry["crop_start"]
  uncropped = window(in_plane, [-s for s in start], grid_shape[:2], fill)
  ras_shape = tuple(geometry["ras_shape"])
  ras = resample(uncropped, np.asarray(geometry["grid_affine"]), np.asarray(geometry["ras_affine"]),
                 ras_shape, order=order, cval=fill)
  original_affine = np.asarray(geometry["original_affine"])
  back = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.io_orientation(original_affine))
  return np.ascontiguousarray(nio.apply_orientation(ras, back))
