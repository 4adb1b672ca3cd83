"""One subject's files → normalised axial slices on the model's grid, and back.

This is the only preprocessing path (docs/design.md, "Preprocessing"): `medjax prepare`
runs it on every subject of a dataset (sources, targets and mask), `medjax translate` on a
new file (sources only, a mask if one is given), with the same `Recipe`, which a trained
run keeps in its workdir. Steps, each of the kind `to_original` can undo:

1. load (`volumes.load`) and refuse what is broken, naming the file;
2. reorient to RAS: a pure permutation/flip of voxels, no interpolation;
3. the grid: the first source modality's RAS grid with voxels resized to `spacing`,
   keeping its field of view (outer voxel corners) and its direction cosines;
4. every modality is resampled onto that grid through its own affine (`register="rigid"`
   first corrects the scanner with a SimpleITK rigid registration, as IXI's T1 needs);
5. the body mask: the subject's mask file, else `mask.body_mask` of the reference image;
6. intensities to [-1, 1] (`intensity.py`): CT fixed HU window, MR per-volume robust range
   inside the body mask;
7. crop or pad in-plane to `size`, centred on the body;
8. `context` neighbouring slices each side as extra source channels (2.5D).

Slices are axial: array axes (Z, H, W, C) with H along RAS x and W along RAS y.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping

import nibabel.orientations as nio
import numpy as np

from medjax import modalities
from medjax.data import inputs, intensity, volumes
from medjax.data.mask import body_mask
from medjax.data.volumes import VolumeError

MAX_CONTEXT = 64  # 2.5D neighbours each side; real recipes use 0 to 3
MAX_SIZE = 16384  # in-plane voxels per side of a slice


def _is_integer(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _names(field: str, value) -> tuple[str, ...]:
  if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
    raise ValueError(f"{field}={value!r}: expected a non-empty list of modality names")
  unknown = [m for m in value if not isinstance(m, str) or m not in modalities.ALL]
  if unknown:
    raise ValueError(f"{field}: {unknown[0]!r} is not a modality ({', '.join(modalities.ALL)})")
  return tuple(value)


def _numbers(field: str, value, count: int, kind) -> tuple:
  if isinstance(value, (str, bytes)):
    value = None
  try:
    values = list(value)
  except TypeError:
    values = None
  ok = values is not None and len(values) == count and all(
      isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0
      and (kind is float or (float(v).is_integer() and v <= MAX_SIZE)) for v in values)
  if not ok:
    what = "whole numbers from 1 to " + str(MAX_SIZE) if kind is int else "finite numbers > 0"
    raise ValueError(f"{field}={value!r}: expected {count} {what}")
  return tuple(kind(v) for v in values)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How a run's slices were made: what `medjax translate` repeats on a new file."""
  sources: tuple[str, ...]
  targets: tuple[str, ...]
  spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
  size: tuple[int, int] = (256, 256)
  context: int = 0
  register: str | None = None
  # How the training masks were made: 'file' (the dataset's mask files), 'auto'
  # (`mask.body_mask`), 'phantom' (the phantom's true head), 'mixed' (files where given).
  mask: str = "auto"

  def __post_init__(self):
    # A recipe also comes from files (manifest.json, a run's preprocessing.json) that may
    # be damaged: every field is checked here, so a bad one is a ValueError saying which.
    object.__setattr__(self, "sources", _names("sources", self.sources))
    object.__setattr__(self, "targets", _names("targets", self.targets))
    object.__setattr__(self, "spacing", _numbers("spacing", self.spacing, 3, float))
    object.__setattr__(self, "size", _numbers("size", self.size, 2, int))
    context = 0 if self.context is None else self.context
    if not _is_integer(context) or not 0 <= context <= MAX_CONTEXT:
      raise ValueError(f"context={context!r}: expected a whole number from 0 to {MAX_CONTEXT}")
    object.__setattr__(self, "context", int(context))
    if self.register not in (None, "rigid"):
      raise ValueError(f"register={self.register!r}: expected None or 'rigid'")
    if not isinstance(self.mask, str):
      raise ValueError(f"mask={self.mask!r}: expected a word (file, auto, phantom, mixed)")

  @property
  def source_channels(self) -> int:
    return len(self.sources) * (2 * self.context + 1)

  @property
  def centre_channel(self) -> int:
    """The channel holding the first source modality's own slice (2.5D context aside)."""
    return self.context

  def to_dict(self) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, values: Mapping) -> Recipe:
    if not isinstance(values, Mapping):
      raise ValueError(f"a recipe is a mapping of its fields, not {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
      raise ValueError(f"recipe without {', '.join(missing)}")
    return cls(**{k: v for k, v in values.items() if k in known})

  @classmethod
  def of_phantom(cls, config) -> Recipe:
    """A phantom run's slices are the phantom grid itself: no crop, no context."""
    phantom = config.data.phantom
    return cls(sources=modalities.as_tuple(config.data.source), targets=(config.data.target,),
               spacing=tuple(phantom.spacing), size=tuple(phantom.shape)[:2], context=0,
               mask="phantom")

  def example_record(self, patch: tuple[int, ...] = ()) -> dict:
    """One record of this recipe's shapes (zeros): all a model's `init` needs. A slice
    (H, W, C), or with `patch` = (D, H, W) a 3D patch (D, H, W, C)."""
    shape = tuple(patch) if patch else tuple(self.size)
    plane = lambda channels: np.zeros((*shape, channels), np.float32)
    return {"source": plane(self.source_channels), "target": plane(len(self.targets)),
            "mask": plane(1), "subject": np.int32(0), "slice": np.int32(0)}


@dataclasses.dataclass
class PreparedSubject:
  """Normalised volumes on the subject's grid, as axial slices: (Z, H, W, C)."""
  id: str
  source: np.ndarray  # (Z, H, W, Cs), one channel per source modality
  target: np.ndarray | None  # (Z, H, W, Ct), None when only sources were asked for
  mask: np.ndarray  # (Z, H, W, 1) float32 0/1
  geometry: dict  # what `to_original` needs to go back
  normalisation: dict  # modality → intensity.fit parameters
  inputs: dict | None = None  # `inputs.describe` of the sources (what the model is fed)
  # (Z, H, W) uint8 segmentation labels on the grid (a `seg` file, nearest neighbour), or
  # None: what segmentation-based evaluation trains and scores on (prepare only).
  labels: np.ndarray | None = None

  def foreground_slices(self) -> np.ndarray:
    return np.flatnonzero(self.mask.reshape(self.mask.shape[0], -1).any(1))

  def model_source(self, context: int) -> np.ndarray:
    return with_context(self.source, context)

  def records(self, context: int = 0, subject_index: int = 0):
    """Slice-pair records (docs/design.md, "Batch"), slices without foreground left out."""
    source = self.model_source(context)
    for z in self.foreground_slices():
      yield {"source": source[z], "target": self.target[z], "mask": self.mask[z],
             "subject": np.int32(subject_index), "slice": np.int32(z)}


@dataclasses.dataclass
class Volume:
  """One held-out subject as evaluation sees it: model-scale (Z, H, W, C) arrays."""
  subject: str
  source: np.ndarray  # the model's input channels (2.5D context included)
  target: np.ndarray
  mask: np.ndarray
  target_params: dict  # intensity.denormalise parameters of the target modality
  # The target where it truly lies, when `target` is misaligned (the phantom's
  # data.phantom.misalign); scaled with target_params. None: the pair is aligned.
  target_aligned: np.ndarray | None = None
  # (Z, H, W) uint8 segmentation labels (the phantom's tissues, a dataset's `seg`), or None:
  # what segmentation-based evaluation scores (docs/design.md, "Segmentation-based evaluation").
  labels: np.ndarray | None = None


def with_context(source: np.ndarray, context: int) -> np.ndarray:
  """(Z, H, W, Cs) → (Z, H, W, Cs·(2K+1)), neighbours edge-clamped, modality-major
  channels [m0(z-K) … m0(z+K), m1(z-K) …]."""
  if not context:
    return source
  depth = source.shape[0]
  near = np.clip(np.arange(depth)[:, None] + np.arange(-context, context + 1), 0, depth - 1)
  stack = source[near]  # (Z, 2K+1, H, W, Cs)
  return np.ascontiguousarray(stack.transpose(0, 2, 3, 4, 1).reshape(*source.shape[:3], -1))


def _axial(volume: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.moveaxis(volume, 2, 0))  # (X, Y, Z…) → (Z, X, Y…)


def refuse_constant(path, data: np.ndarray) -> None:
  """A volume of one value (all zeros: a failed export, a blank series) has no body to
  find and no contrast to scale or translate: a `VolumeError` saying so, before the
  body mask would call it an empty mask."""
  lo, hi = float(data.min()), float(data.max())
  if lo == hi:
    raise VolumeError(path, f"constant image: every voxel is {lo:g} (no body, no contrast)")


def preprocess(files: Mapping, recipe: Recipe, *, subject_id: str = "",
               targets: bool = True,
               max_voxels: int | None = volumes.DEFAULT_MAX_VOXELS) -> PreparedSubject:
  """`files` ({modality: path}, optionally 'mask') → a `PreparedSubject`.

  With `targets=False` only the recipe's sources are read (translating a new file).
  A missing or broken file is a `VolumeError` naming it, and so is a volume of more than
  `max_voxels` voxels, on disk or on the recipe's grid (None: no limit).
  """
  wanted = recipe.sources + (tuple(m for m in recipe.targets if m not in recipe.sources)
                             if targets else ())
  missing = [m for m in wanted if m not in files]
  if missing:
    raise VolumeError(subject_id or next(iter(files.values()), "?"),
                      f"missing modality {', '.join(missing)}")
  reference = recipe.sources[0]
  original, original_affine = volumes.load(files[reference], max_voxels)
  ras, ras_affine = volumes.to_ras(original, original_affine)
  grid_affine, grid_shape = volumes.resized_grid(ras_affine, ras.shape, recipe.spacing)
  # Coarse voxels on disk resampled to a fine --spacing multiply: checked before every
  # modality is resampled onto that grid.
  volumes.check_size(files[reference], grid_shape, max_voxels,
                     f"resampled to {'×'.join(f'{s:g}' for s in recipe.spacing)} mm, it "
                     "would be")

  on_grid, off_grid, registered = {}, [], []
  has_mask = files.get("mask") is not None
  for modality in wanted + (("mask",) if has_mask else ()):
    data, affine = (ras, ras_affine) if modality == reference else volumes.to_ras(
        *volumes.load(files[modality], max_voxels))
    if modality != "mask":
      refuse_constant(files[modality], data)
    world = None
    if modality != reference and not volumes.same_grid(data.shape, affine, ras.shape,
                                                       ras_affine):
      off_grid.append(modality)
      if recipe.register == "rigid" and modality != "mask":
        world = volumes.register_rigid(on_grid[reference], grid_affine, data, affine)
        registered.append(modality)
    if modality == "mask":
      on_grid["mask"] = volumes.resample(data > 0, affine, grid_affine, grid_shape, order=1,
                                         world=world) >= 0.5
    else:
      on_grid[modality] = volumes.resample(data, affine, grid_affine, grid_shape, order=1,
                                           cval=float(data.min()), world=world)

  mask = on_grid.pop("mask", None)
  if mask is None:
    image = on_grid[reference]
    # CT padded outside the scanned circle (-3024 HU after many DICOM exports) would
    # stretch the mask's robust range; air is air from the window's floor down.
    mask = body_mask(np.maximum(image, intensity.HU_MIN) if modalities.is_ct(reference)
                     else image)
  if not mask.any():
    raise VolumeError(files["mask"] if has_mask else files[reference], "empty body mask")

  description = inputs.describe({m: on_grid[m] for m in recipe.sources}, mask,
                                ras_shape=ras.shape, ras_spacing=volumes.voxel_spacing(ras_affine),
                                grid_spacing=volumes.voxel_spacing(grid_affine))
  try:
    normalisation = {m: intensity.fit(on_grid[m], m, mask) for m in wanted}
  except ValueError as error:  # e.g. a constant image that cannot be scaled
    raise VolumeError(files[reference], str(error)) from None
  start = volumes.crop_start(mask, recipe.size)
  kept = volumes.window(mask, start, recipe.size, False).sum()

  def stack(names):
    unit = [volumes.window(intensity.normalise(on_grid[m], normalisation[m]), start,
                           recipe.size, -1.0) for m in names]
    return _axial(np.stack(unit, -1))

  geometry = {
      "reference": reference,
      "original_shape": list(original.shape),
      "original_affine": original_affine.tolist(),
      "original_spacing": volumes.voxel_spacing(original_affine).tolist(),
      "ras_shape": list(ras.shape),
      "ras_affine": ras_affine.tolist(),
      "grid_shape": list(grid_shape),
      "grid_affine": grid_affine.tolist(),
      "spacing": volumes.voxel_spacing(grid_affine).tolist(),
      "crop_start": list(start),
      "size": list(recipe.size),
      "off_grid": off_grid,
      "registered": registered,
      "mask": "file" if has_mask else "auto",
      # The share of the body mask the in-plane crop to `size` cut away (0 when it fits).
      "body_cropped": round(1.0 - float(kept) / float(mask.sum()), 6),
  }
  labels = None
  if targets and files.get("seg") is not None:  # prepare: the dataset's labels, if any
    seg, seg_affine = volumes.to_ras(*volumes.load(files["seg"], max_voxels))
    values = np.rint(seg)
    if values.min() < 0 or values.max() > 255:
      raise VolumeError(files["seg"], f"labels {values.min():g}..{values.max():g} outside "
                        "0..255: not a label map")
    # Nearest neighbour: a label is a class, never a blend of two.
    labels = _axial(volumes.window(
        volumes.resample(values, seg_affine, grid_affine, grid_shape, order=0, cval=0.0),
        start, recipe.size, 0.0)).astype(np.uint8)
  return PreparedSubject(
      id=subject_id, source=stack(recipe.sources),
      target=stack(recipe.targets) if targets else None,
      mask=_axial(volumes.window(mask.astype(np.float32), start, recipe.size, 0.0)[..., None]),
      geometry=geometry, normalisation=normalisation, inputs=description, labels=labels)


def to_original(volume: np.ndarray, geometry: dict, *, order: int = 1,
                fill: float = -1.0) -> np.ndarray:
  """Undo crop/pad, resampling and reorientation: (Z, H, W) → the reference file's grid.

  Save the result with `geometry["original_affine"]` to get a volume aligned with the input.
  """
  volume = np.asarray(volume, np.float32)
  if volume.ndim == 4:
    volume = volume[..., 0]
  in_plane = np.moveaxis(volume, 0, 2)  # (H, W, Z)
  grid_shape = tuple(geometry["grid_shape"])
  start = geometry["crop_start"]
  uncropped = volumes.window(in_plane, [-s for s in start], grid_shape[:2], fill)
  ras = volumes.resample(uncropped, np.asarray(geometry["grid_affine"]),
                         np.asarray(geometry["ras_affine"]), tuple(geometry["ras_shape"]),
                         order=order, cval=fill)
  original_affine = np.asarray(geometry["original_affine"])
  back = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.io_orientation(original_affine))
  return np.ascontiguousarray(nio.apply_orientation(ras, back))
