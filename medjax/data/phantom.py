"""The built-in multimodal head phantom: (seed, subject) → T1w, T2w, PD, FLAIR, CT, CBCT.

Anatomy is drawn once per subject in millimetres, in a head frame (u: left → right,
v: posterior → anterior, w: inferior → superior) that is rotated and shifted into the
scanner's RAS+ frame, so one subject renders identically on any grid. Every tissue
boundary is a signed-distance-like field in mm; a linear ramp one voxel wide turns it into
a tissue fraction (partial volume). Images are then physics, not paint: each voxel mixes
the per-tissue MR signal equations (or HU for CT) by its tissue fractions, before a coil
bias field and Rician noise (MR) or Gaussian noise (CT). Bone and air are both dark on MR,
so MR → CT has to use context, as with real data. The CBCT is the same anatomy's CT
through a cone-beam scanner's faults (field-of-view truncation, scatter cupping, bone
streaks, more noise, a miscalibrated HU scale), from its own random stream so that adding
it changed no other image; `misalign` warps a volume as a second session's scan would lie
(docs/design.md, "The phantom").

Speed: smooth fields (head shape, skull thickness, cortical folding, bias, bone density)
are evaluated on a coarse 3 mm lattice and upsampled by separable linear interpolation
(three matrix products); only the sharp boundaries are computed per voxel, and small
structures (ventricles, deep grey matter, sinus, lesion) only inside their bounding boxes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from medjax import files

MODALITIES = ("t1w", "t2w", "pd", "flair", "ct", "cbct")
MR_SEQUENCES = MODALITIES[:4]
DEFAULT_SHAPE = (160, 160, 96)
DEFAULT_SPACING = (1.0, 1.0, 1.0)
DEFAULT_FOV_MM = (160.0, 160.0, 96.0)  # the head, with an air margin; the cranium in z
SPLITS = ("train", "val", "test")

TISSUES = {"air": 0, "fat": 1, "bone": 2, "csf": 3, "gm": 4, "wm": 5, "lesion": 6, "oedema": 7}


class Tissue(NamedTuple):
  t1: float  # ms, at 1.5 T
  t2: float  # ms
  pd: float  # proton density, relative to water
  hu: float


TISSUE_PARAMS = {
    "air": Tissue(t1=1.0, t2=1.0, pd=0.0, hu=-1000.0),  # no protons: T1, T2 never matter
    "fat": Tissue(t1=260.0, t2=80.0, pd=0.90, hu=-100.0),  # scalp: skin and fat
    "bone": Tissue(t1=300.0, t2=1.0, pd=0.05, hu=1250.0),  # HU: mean of the 700-1800 skull
    "csf": Tissue(t1=4000.0, t2=2000.0, pd=1.0, hu=10.0),
    "gm": Tissue(t1=1200.0, t2=100.0, pd=0.80, hu=38.0),
    "wm": Tissue(t1=790.0, t2=80.0, pd=0.70, hu=28.0),
    "lesion": Tissue(t1=1400.0, t2=150.0, pd=0.85, hu=35.0),  # tumour core
    "oedema": Tissue(t1=1300.0, t2=200.0, pd=0.90, hu=20.0),
}
assert list(TISSUE_PARAMS) == list(TISSUES)


class Sequence(NamedTuple):
  tr: float  # ms
  te: float  # ms
  ti: float | None = None  # inversion time (ms); None for a spin echo


SEQUENCES = {
    "t1w": Sequence(tr=500.0, te=15.0),
    "t2w": Sequence(tr=4000.0, te=100.0),
    "pd": Sequence(tr=3000.0, te=15.0),
    "flair": Sequence(tr=9000.0, te=120.0, ti=2500.0),
}

BIAS_AMPLITUDE = 0.15  # the coil bias field stays within 1 ± this
NOISE_FRACTION = 0.025  # Rician sigma, as a fraction of each sequence's WM signal
CT_NOISE_HU = 10.0
BONE_HU_RANGE = (700.0, 1800.0)
COARSE_MM = 3.0  # lattice of the smooth fields

# Random streams of np.random.default_rng([seed, subject, stream]): a new stream never
# moves the draws of an old one, so old images stay bit-identical.
ANATOMY_STREAM, NOISE_STREAM, CBCT_STREAM, MISALIGN_STREAM, CBCT_NOISE_STREAM = range(5)


def signal(tissue_params: Tissue | str, sequence: Sequence | str) -> float:
  """Signal of one pure tissue: spin echo PD·(1 − e^(−TR/T1))·e^(−TE/T2), or inversion
  recovery PD·|1 − 2e^(−TI/T1) + e^(−TR/T1)|·e^(−TE/T2) (magnitude image)."""
  tissue = TISSUE_PARAMS[tissue_params] if isinstance(tissue_params, str) else tissue_params
  seq = SEQUENCES[sequence] if isinstance(sequence, str) else sequence
  if seq.ti is None:
    recovery = 1.0 - math.exp(-seq.tr / tissue.t1)
  else:
    recovery = abs(1.0 - 2.0 * math.exp(-seq.ti / tissue.t1) + math.exp(-seq.tr / tissue.t1))
  return tissue.pd * recovery * math.exp(-seq.te / tissue.t2)


# --------------------------------------------------------------------------- anatomy


class Waves(NamedTuple):
  """A smooth random field: Σ amp·cos(k·x + phase)."""
  k: np.ndarray  # (K, 3), rad per unit of x
  phase: np.ndarray
  amp: np.ndarray

  # Coefficients go in as Python floats so that float32 arrays stay float32.
  def __call__(self, x, y, z):
    total = 0.0
    for (kx, ky, kz), phase, amp in zip(self.k.tolist(), self.phase.tolist(), self.amp.tolist()):
      total = total + amp * np.cos(kx * x + ky * y + kz * z + phase)
    return total

  def gradient(self, x, y, z):
    parts = [0.0, 0.0, 0.0]
    for k, phase, amp in zip(self.k.tolist(), self.phase.tolist(), self.amp.tolist()):
      slope = -amp * np.sin(k[0] * x + k[1] * y + k[2] * z + phase)
      parts = [p + slope * ki for p, ki in zip(parts, k)]
    return parts


def _waves(rng, count, wavelength, amplitude=1.0, rms=False) -> Waves:
  """`count` plane waves of random direction, wavelength in [lo, hi]; the sum is bounded
  by `amplitude` (or has that root mean square when rms=True)."""
  direction = rng.normal(size=(count, 3))
  direction /= np.linalg.norm(direction, axis=1, keepdims=True)
  k = direction * (2 * np.pi / rng.uniform(*wavelength, size=(count, 1)))
  phase = rng.uniform(0, 2 * np.pi, count)
  amp = np.full(count, amplitude * (math.sqrt(2 / count) if rms else 1 / count))
  return Waves(k, phase, amp)


def _rotation(yaw, pitch, roll):
  cz, sz, cx, sx, cy, sy = (f(math.radians(a)) for a in (yaw, pitch, roll) for f in (math.cos, math.sin))
  rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
  rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  return rz @ rx @ ry


class Head(NamedTuple):
  """One subject's anatomy, in mm. Head frame: origin at the skull's equator."""
  centre: np.ndarray  # head-frame origin in scanner coordinates
  rotation: np.ndarray  # head frame → scanner
  axes: tuple  # semi-axes of the scalp: left-right, anterior-posterior, up, down
  shape: Waves  # relative bumps of the scalp, on the unit sphere
  skin: float  # scalp (skin and fat) thickness
  bone: float  # mean skull thickness
  bone_waves: Waves
  sinus_dir: np.ndarray  # the frontal sinus: where the frontal bone thickens
  sinus_extra: float
  sinus_lobes: tuple  # ((u offset, (lr, ap, si) semi-axes), ...)
  csf: float  # subarachnoid CSF above the cortex
  gm: float  # cortical thickness
  folds: Waves  # cortical folding pattern, on a sphere of radius FOLD_RADIUS
  sulcus_width: float  # half-width (mm) of a sulcus' CSF cleft at the brain surface
  sulcus_depth: float
  fissure_depth: float  # the interhemispheric fissure
  ventricles: dict
  lesion: dict | None
  bone_hu: tuple  # (mean, Waves of the deviation, on the unit sphere)
  bias: Waves  # coil sensitivity, in scanner mm


FISSURE_HALF_WIDTH = 1.0  # mm, at the brain surface
LESION_LUMPINESS = 0.6  # bound on a lesion's relative radius deviation
SINUS_OUTWARD = 0.4  # share of the frontal bone's thickening that bulges out
FOLD_RADIUS = 55.0  # mm: folds are drawn on this sphere and projected radially


def draw_head(seed: int, subject: int) -> Head:
  """The anatomy of one subject; independent of the grid it is rendered on."""
  rng = np.random.default_rng([seed, subject, ANATOMY_STREAM])
  u = rng.uniform
  axes = (u(55, 63), u(65, 71), u(66, 74), 3 * u(66, 74))
  # The scalp's top stays ~4 mm under z = 48 (the top of the default field of view).
  centre = np.array([u(-3, 3), u(-2, 2), 44.0 - axes[2] - u(0, 3)])
  rotation = _rotation(u(-10, 10), u(-8, 8), u(-5, 5))
  elevation = math.radians(u(-12, 0))
  sinus_dir = np.array([0.0, math.cos(elevation), math.sin(elevation)])
  sinus_lobes = tuple((side * u(5, 9), (u(6, 11), u(3, 5), u(6, 11))) for side in (-1, 1))
  size = u(0.1, 1.0)  # ventricle enlargement (age, atrophy)
  ventricles = {
      "centre": (0.0, u(-8, -2), u(22, 28)), "size": size,
      "axes": (3 + 5 * size, 22 + 6 * size, 4 + 5 * size),
      "curve": (u(0.004, 0.008), u(0.006, 0.012)), "spread": u(0.1, 0.2),
  }
  lesion_dir = rng.normal(size=3)
  lesion = {
      "present": rng.random() < 0.5,
      "depth": u(0.2, 0.6), "dir": lesion_dir / np.linalg.norm(lesion_dir),
      "height": u(8, 45), "core": u(5, 13), "oedema": u(5, 14),
      "core_waves": _waves(rng, 4, (15, 30), LESION_LUMPINESS / 2),
      "oedema_waves": _waves(rng, 5, (15, 30), LESION_LUMPINESS),
  }
  return Head(
      centre=centre, rotation=rotation, axes=axes,
      shape=_waves(rng, 4, (2.5, 5.0), 0.04),
      skin=u(4, 7), bone=u(5, 7), bone_waves=_waves(rng, 4, (2.0, 4.0), 1.5),
      sinus_dir=sinus_dir, sinus_extra=u(8, 12), sinus_lobes=sinus_lobes,
      csf=u(1.0, 2.5), gm=u(2.5, 3.2),
      folds=_waves(rng, 10, (16, 26), rms=True), sulcus_width=u(1.5, 2.5),
      sulcus_depth=u(8, 13), fissure_depth=u(20, 26),
      ventricles=ventricles, lesion=lesion if lesion["present"] else None,
      bone_hu=(u(1150, 1350), _waves(rng, 4, (1.5, 4.0), 400.0)),
      bias=_waves(rng, 3, (200, 350), BIAS_AMPLITUDE))


def _to_head(head: Head, x, y, z):
  """Scanner mm → head-frame mm (broadcasting)."""
  (cx, cy, cz), r = head.centre.tolist(), head.rotation.tolist()
  x, y, z = x - cx, y - cy, z - cz
  return (r[0][0] * x + r[1][0] * y + r[2][0] * z,
          r[0][1] * x + r[1][1] * y + r[2][1] * z,
          r[0][2] * x + r[1][2] * y + r[2][2] * z)


def _smoothstep(t):
  t = np.clip(t, 0.0, 1.0)
  return t * t * (3 - 2 * t)


def _sinus_bump(head: Head, nu, nv, nw):
  """1 where the frontal bone thickens around the sinus, falling to 0 ~40° away."""
  su, sv, sw = head.sinus_dir.tolist()
  cosine = nu * su + nv * sv + nw * sw
  return _smoothstep((cosine - math.cos(math.radians(40))) / (1 - math.cos(math.radians(40))))


def _scalp_radius(head: Head, nu, nv, nw):
  """Distance from the head-frame origin to the scalp along the unit direction n."""
  lr, ap, up, down = head.axes
  vertical = np.where(nw > 0, np.float32(1 / up**2), np.float32(1 / down**2))
  radius = 1.0 / np.sqrt((nu / lr) ** 2 + (nv / ap) ** 2 + nw * nw * vertical)
  # The frontal sinus bulges the brow outwards more than it dents the brain.
  brow = SINUS_OUTWARD * head.sinus_extra * _sinus_bump(head, nu, nv, nw)
  return radius * (1.0 + head.shape(nu, nv, nw)) + brow


def _smooth_fields(head: Head, x, y, z):
  """The slowly varying fields, at scanner points (x, y, z) (broadcast):
  depth under the scalp, depth under the inner skull table (both mm, along the ray from
  the head centre, which for a near-sphere is the distance to the surface), the signed
  distance (mm) to the nearest sulcus' line, the sulcal depth (mm), the coil bias and
  the bone density (HU)."""
  u, v, w = _to_head(head, x, y, z)
  rho = np.sqrt(u * u + v * v + w * w) + 1e-6
  nu, nv, nw = u / rho, v / rho, w / rho
  depth = _scalp_radius(head, nu, nv, nw) - rho
  bump = _sinus_bump(head, nu, nv, nw)
  bone = head.bone + head.bone_waves(nu, nv, nw) + head.sinus_extra * bump
  inner_table = depth - head.skin - np.maximum(bone, 2.0)
  # Sulci: the zero set of a random field on a sphere, projected radially so that they
  # cut into the brain like real sulci. Field / tangential gradient is the distance to
  # that line (first order), signed so it stays smooth enough to interpolate.
  q = [FOLD_RADIUS * nu, FOLD_RADIUS * nv, FOLD_RADIUS * nw]
  gradient = head.folds.gradient(*q)
  radial = gradient[0] * nu + gradient[1] * nv + gradient[2] * nw
  tangential = [g - radial * n for g, n in zip(gradient, (nu, nv, nw))]
  slope = np.sqrt(sum(t * t for t in tangential))
  sulcus = head.folds(*q) / np.maximum(slope, 0.05) * (rho / FOLD_RADIUS)
  # The interhemispheric fissure is one more sulcus (see tissue_fractions), deeper.
  midline = np.exp(-(u / 8.0) ** 2) * _smoothstep((nw + 0.3) / 0.2)
  sulcal_depth = head.sulcus_depth + (head.fissure_depth - head.sulcus_depth) * midline
  bias = 1.0 + head.bias(x, y, z)
  mean_hu, hu_waves = head.bone_hu
  bone_hu = np.clip(mean_hu + hu_waves(nu, nv, nw), *BONE_HU_RANGE)
  return [depth, inner_table, sulcus, sulcal_depth, bias, bone_hu]


# --------------------------------------------------------------------------- grid


class Grid(NamedTuple):
  shape: tuple
  spacing: tuple
  axes: tuple  # scanner mm of voxel centres, one array per axis
  edge: float  # width (mm) of the partial-volume ramp

  @classmethod
  def make(cls, shape, spacing):
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 1:
      raise ValueError(f"shape must be three positive integers, got {shape}")
    if len(spacing) != 3 or not min(spacing) > 0:
      raise ValueError(f"spacing must be three positive millimetre values, got {spacing}")
    axes = tuple(((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing))
    return cls(shape, spacing, axes, float(np.prod(spacing) ** (1 / 3)))

  @property
  def affine(self) -> np.ndarray:
    affine = np.diag([*self.spacing, 1.0])
    affine[:3, 3] = [float(a[0]) for a in self.axes]
    return affine

  def box(self, head: Head, lo, hi):
    """Index slices of the voxels inside a head-frame box (lo, hi corners), or None."""
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    world = corners @ head.rotation.T + head.centre
    slices = []
    for axis, spacing, low, high in zip(self.axes, self.spacing, world.min(0), world.max(0)):
      start = max(0, int(math.floor((low - axis[0]) / spacing)))
      stop = min(len(axis), int(math.ceil((high - axis[0]) / spacing)) + 1)
      if start >= stop:
        return None
      slices.append(slice(start, stop))
    return tuple(slices)

  def points(self, slices):
    x, y, z = (a[s] for a, s in zip(self.axes, slices))
    return x[:, None, None], y[None, :, None], z[None, None, :]


def _interpolation(fine, step):
  """(fine, coarse) linear interpolation matrix, and the coarse axis covering `fine`."""
  if len(fine) < 2 or fine[1] - fine[0] >= step:
    return np.eye(len(fine), dtype=np.float32), fine
  count = int(math.ceil((fine[-1] - fine[0]) / step)) + 2
  coarse = (fine[0] + step * (np.arange(count) - 0.5)).astype(np.float32)
  position = (fine - coarse[0]) / step
  lower = np.clip(np.floor(position).astype(int), 0, count - 2)
  t = position - lower
  matrix = np.zeros((len(fine), count), np.float32)
  matrix[np.arange(len(fine)), lower] = 1 - t
  matrix[np.arange(len(fine)), lower + 1] = t
  return matrix, coarse


def _upsampled_fields(head: Head, grid: Grid) -> np.ndarray:
  """_smooth_fields on the coarse lattice, linearly interpolated to the grid: (F, X, Y, Z)."""
  (mx, cx), (my, cy), (mz, cz) = (_interpolation(a, COARSE_MM) for a in grid.axes)
  fields = np.stack(np.broadcast_arrays(
      *_smooth_fields(head, cx[:, None, None], cy[None, :, None], cz[None, None, :]))).astype(np.float32)
  count = len(fields)
  fields = (mx @ fields.reshape(count, len(cx), -1)).reshape(count, len(grid.axes[0]), len(cy), len(cz))
  fields = my @ fields
  fields = fields.reshape(-1, len(cz)) @ mz.T
  return fields.reshape(count, *grid.shape)


def _ramp(distance, edge):
  """Partial volume from a signed distance (mm, > 0 inside): the inside fraction of a
  voxel cut by a plane at that distance from its centre."""
  out = np.multiply(distance, 1.0 / edge, dtype=np.float32)
  out += 0.5
  return np.clip(out, 0.0, 1.0, out=out)


def _ellipsoid(du, dv, dw, axes):
  """Signed distance (mm, > 0 inside) to an ellipsoid, first-order accurate at its surface."""
  a, b, c = axes
  r = np.sqrt((du / a) ** 2 + (dv / b) ** 2 + (dw / c) ** 2)
  gradient = np.sqrt((du / a**2) ** 2 + (dv / b**2) ** 2 + (dw / c**2) ** 2)
  scale = np.full(r.shape, min(axes), np.float32)  # r/|∇r²/2| ∈ [min, max] axes; centre: any
  np.divide(r, gradient, out=scale, where=gradient > 0)
  return (1.0 - r) * scale


def _head_frame(head: Head, distance):
  """A head-frame (u, v, w) distance function as a scanner (x, y, z) one."""
  return lambda x, y, z: distance(*_to_head(head, x, y, z))


def _carve(fractions, grid, head, box, distance, into, sources):
  """Move the part of `sources` tissues inside a shape to tissue `into`. `distance` maps
  scanner (x, y, z) (broadcast) to a signed distance; only the head-frame `box` is evaluated."""
  slices = grid.box(head, *box)
  if slices is None:
    return
  inside = _ramp(distance(*grid.points(slices)), grid.edge)
  target = fractions[(TISSUES[into], *slices)]
  for name in sources:
    source = fractions[(TISSUES[name], *slices)]
    moved = source * inside
    source -= moved
    target += moved


def _add_sinus(fractions, grid, head):
  radius = float(_scalp_radius(head, *head.sinus_dir))
  centre = (radius - head.skin - (head.bone + head.sinus_extra) / 2) * head.sinus_dir
  for offset, axes in head.sinus_lobes:
    c = centre + (offset, 0.0, 0.0)
    box = (c - axes, c + axes)
    lobe = lambda u, v, w, c=c, axes=axes: _ellipsoid(u - c[0], v - c[1], w - c[2], axes)
    _carve(fractions, grid, head, box, _head_frame(head, lobe), "air", ["bone"])


def _add_deep_grey_and_ventricles(fractions, grid, head):
  vent = head.ventricles
  _, vc, wc = vent["centre"]
  au, av, aw = vent["axes"]
  curve_u, curve_w = vent["curve"]
  septum = au + 1.5  # lateral ventricles sit either side of the septum pellucidum

  def mirrored(centre, axes):
    cu, cv, cw = centre
    box = ((-cu - axes[0], cv - axes[1], cw - axes[2]), (cu + axes[0], cv + axes[1], cw + axes[2]))
    return box, _head_frame(head, lambda u, v, w: _ellipsoid(np.abs(u) - cu, v - cv, w - cw, axes))

  deep_grey = [
      ((9.0, vc - 6, wc - 12), (7.0, 12.0, 8.0)),  # thalami
      ((septum + au + 3.0, vc + 15, wc - 1), (4.0, 9.0, 7.0)),  # caudate heads
      ((23.0, vc + 4, wc - 10), (5.0, 13.0, 9.0)),  # putamina
  ]
  for centre, axes in deep_grey:
    _carve(fractions, grid, head, *mirrored(centre, axes), "gm", ["wm"])

  def lateral(u, v, w):
    # A C-shaped tube: bodies diverge posteriorly and arch upwards.
    dv = v - vc
    du = np.abs(u) - (septum + curve_u * dv * dv - vent["spread"] * dv)
    dw = w - (wc - curve_w * dv * dv)
    return _ellipsoid(du, dv, dw, (au, av, aw))

  reach = septum + au + curve_u * av * av + vent["spread"] * av
  box = ((-reach, vc - av, wc - aw - curve_w * av * av), (reach, vc + av, wc + aw))
  _carve(fractions, grid, head, box, _head_frame(head, lateral), "csf", ["wm", "gm"])
  third = ((0.0, vc - 2, wc - aw - 6), (1.5 + vent["size"], 10.0, 7.0))
  _carve(fractions, grid, head, *mirrored(*third), "csf", ["wm", "gm"])


def _add_lesion(fractions, grid, head):
  lesion = head.lesion
  lr, ap, up, _ = head.axes
  brain = np.array([lr - 15, ap - 15, up - 15])
  # Inside the brain, and at a height inside the rendered slab of the cranium.
  height = lesion["height"]
  across = lesion["dir"][:2] / np.linalg.norm(lesion["dir"][:2])
  reach_uv = brain[:2] * lesion["depth"] * math.sqrt(max(0.0, 1 - (height / brain[2]) ** 2))
  centre = np.array([*(across * reach_uv), height])
  cx, cy, cz = (head.rotation @ centre + head.centre).tolist()

  def blob(radius, waves):
    # Lumpy sphere; its waves live in scanner axes, where they broadcast cheaply.
    def distance(x, y, z):
      dx, dy, dz = x - cx, y - cy, z - cz
      return radius * (1.0 + waves(dx, dy, dz)) - np.sqrt(dx * dx + dy * dy + dz * dz)
    reach = radius * (1.0 + LESION_LUMPINESS) + 2 * grid.edge
    return (centre - reach, centre + reach), distance

  # Oedema spreads along white matter and spares the cortex; the core takes over anything.
  oedema = blob(lesion["core"] + lesion["oedema"], lesion["oedema_waves"])
  _carve(fractions, grid, head, *oedema, "oedema", ["wm"])
  core = blob(lesion["core"], lesion["core_waves"])
  _carve(fractions, grid, head, *core, "lesion", ["wm", "gm", "oedema"])


def tissue_fractions(head: Head, grid: Grid):
  """(fractions (tissues, X, Y, Z) summing to 1, head mask, bias field, bone HU)."""
  depth, inner_table, sulcus, sulcal_depth, bias, bone_hu = _upsampled_fields(head, grid)
  edge = grid.edge
  head_fraction = _ramp(depth, edge)
  outer_table = _ramp(depth - head.skin, edge)
  # The cortex: at a sulcus the pial surface dips into a V-shaped cleft; the grey-white
  # surface dips under the same cleft widened by the cortical thickness, so grey matter
  # lines both walls. The interhemispheric fissure is the sulcus along the midline u = 0.
  u = _to_head(head, *grid.points((slice(None),) * 3))[0]
  np.abs(u, out=u)
  u *= head.sulcus_width / FISSURE_HALF_WIDTH
  distance = np.minimum(np.abs(sulcus, out=sulcus), u, out=u)
  distance *= -1.0 / head.sulcus_width
  pial_dip = np.clip(distance + 1.0, 0.0, 1.0)
  distance += head.gm / head.sulcus_width
  white_dip = np.clip(distance + 1.0, 0.0, 1.0, out=distance)
  brain_depth = inner_table - head.csf
  pial = _ramp(brain_depth - sulcal_depth * pial_dip, edge)
  white = _ramp(brain_depth - head.gm - sulcal_depth * white_dip, edge)
  inner = _ramp(inner_table, edge)

  fractions = np.empty((len(TISSUES), *grid.shape), np.float32)
  t = TISSUES
  np.subtract(1.0, head_fraction, out=fractions[t["air"]])
  np.subtract(head_fraction, outer_table, out=fractions[t["fat"]])
  np.subtract(outer_table, inner, out=fractions[t["bone"]])
  np.subtract(inner, pial, out=fractions[t["csf"]])
  np.subtract(pial, white, out=fractions[t["gm"]])
  fractions[t["wm"]] = white
  fractions[t["lesion"]] = 0.0
  fractions[t["oedema"]] = 0.0

  _add_sinus(fractions, grid, head)
  _add_deep_grey_and_ventricles(fractions, grid, head)
  if head.lesion is not None:
    _add_lesion(fractions, grid, head)
  mask = (head_fraction >= 0.5).astype(np.float32)
  return fractions, mask, bias, bone_hu


# --------------------------------------------------------------------------- images


def _gaussian_pair(rng, shape):
  """Two independent N(0, 1) float32 fields by Box–Muller: for float32 it is about twice
  as fast as Generator.standard_normal, and a pair is just what complex noise needs."""
  radius = rng.random(shape, dtype=np.float32)
  np.log1p(-radius, out=radius)  # 1 − U ∈ (0, 1]: never log(0)
  radius *= -2.0
  np.sqrt(radius, out=radius)
  angle = rng.random(shape, dtype=np.float32)
  angle *= 2 * np.pi
  return radius * np.cos(angle), np.multiply(radius, np.sin(angle, out=angle), out=radius)


def _labels(fractions):
  """Dominant tissue per voxel (a loop: np.argmax over the tissue axis is ~10× slower)."""
  best = fractions[0].copy()
  labels = np.zeros(best.shape, np.uint8)
  for index in range(1, len(fractions)):
    wins = fractions[index] > best
    labels[wins] = index
    np.maximum(best, fractions[index], out=best)
  return labels


# --------------------------------------------------------------------------- CBCT

CBCT_FOV_RADIUS_MM = 64.0  # the detector's reach: 0.4 × the 160 mm field; the head is longer
CBCT_LENGTH_MM = 80.0  # cone-beam z coverage, shorter than the 96 mm slab
CBCT_NOISE_HU = (25.0, 40.0)  # fewer photons per projection than CT (CT_NOISE_HU)
CBCT_GAIN = (0.9, 1.1)
CBCT_OFFSET_HU = (-60.0, 60.0)


class Streak(NamedTuple):
  angle: float  # rad, direction of the line's normal in the axial plane
  offset: float  # mm, from the head's centre: the ray crosses the skull twice, obliquely
  z: float  # mm, height of the dense bone that casts it
  reach: float  # mm, half-height (1/e) of the slab it shows in
  width: float  # mm, Gaussian sigma across the line
  hu: float  # amplitude: mostly dark (photon starvation), sometimes bright


class Cbct(NamedTuple):
  """One subject's cone-beam scan: where it looked and how it failed (scanner mm, HU)."""
  fov_centre: tuple  # (x, y) of the rotation axis
  fov_z: tuple  # (lo, hi) covered along z
  cupping: float  # HU, depression at the head's centre
  shading: Waves  # low-frequency scatter shading, HU
  streaks: tuple  # Streak, ...
  noise: float  # HU, Gaussian sigma
  gain: float  # HU' = gain·HU + offset
  offset: float


def draw_cbct(seed: int, subject: int) -> Cbct:
  """The CBCT scan of one subject, from its own random stream (CBCT_STREAM)."""
  rng = np.random.default_rng([int(seed), int(subject), CBCT_STREAM])
  u = rng.uniform
  centre = (u(-3, 3), u(-3, 3))
  z = u(-4, 4)
  cupping = u(50, 100)
  shading = _waves(rng, 3, (150, 300), 10.0)
  streaks = tuple(Streak(angle=u(0, 2 * np.pi), offset=u(10, 45), z=u(-35, 25),
                         reach=u(8, 20), width=u(1.5, 3.0),
                         hu=u(60, 150) * (-1 if rng.random() < 0.75 else 1))
                  for _ in range(int(rng.integers(2, 5))))
  return Cbct(fov_centre=centre, fov_z=(z - CBCT_LENGTH_MM / 2, z + CBCT_LENGTH_MM / 2),
              cupping=cupping, shading=shading, streaks=streaks, noise=u(*CBCT_NOISE_HU),
              gain=u(*CBCT_GAIN), offset=u(*CBCT_OFFSET_HU))


def cbct_field_of_view(scan: Cbct, grid: Grid) -> np.ndarray:
  """Fraction of each voxel the scan reconstructed: a cylinder about the S axis (the
  detector is narrower than the head, so its sides are truncated) cut to the cone's
  shorter z coverage. Partial volume at its edges, like every boundary here."""
  x, y, z = grid.points((slice(None),) * 3)
  cx, cy = scan.fov_centre
  radial = CBCT_FOV_RADIUS_MM - np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
  lo, hi = scan.fov_z
  along = np.minimum(z - lo, hi - z)
  return _ramp(np.minimum(radial, along), grid.edge)


def ellipsoid_radius(head: Head, grid: Grid) -> np.ndarray:
  """Each voxel's radius in the scalp's ellipsoid (bumps and brow aside): 0 at the
  head-frame origin, 1 at the scalp."""
  u, v, w = _to_head(head, *grid.points((slice(None),) * 3))
  lr, ap, up, down = head.axes
  height = np.where(w > 0, np.float32(up), np.float32(down))
  return np.sqrt((u / lr) ** 2 + (v / ap) ** 2 + (w / height) ** 2)


def cbct_cupping(scan: Cbct, head: Head, grid: Grid) -> np.ndarray:
  """Scatter adds a smooth background to every projection, largest where the ray crosses
  the most head, so reconstructed HU sag towards the centre: a paraboloid over the
  scalp's ellipsoid, −cupping at its centre, 0 at the scalp; plus a gentle shading."""
  cup = np.clip(1.0 - ellipsoid_radius(head, grid) ** 2, 0.0, 1.0)
  cup *= -scan.cupping
  cup += scan.shading(*grid.points((slice(None),) * 3))
  return cup.astype(np.float32)


def cbct_streaks(scan: Cbct, head: Head, grid: Grid) -> np.ndarray:
  """Beam hardening and photon starvation along the rays that run longest through dense
  bone (tangent to the skull): straight lines across the axial plane, fading smoothly
  above and below the bone that casts them."""
  x, y, z = grid.axes
  cx, cy = head.centre[:2].tolist()
  out = np.zeros(grid.shape, np.float32)
  for streak in scan.streaks:
    across = (x[:, None] - cx) * math.cos(streak.angle) + (y[None, :] - cy) * math.sin(streak.angle)
    line = np.exp(-0.5 * ((across - streak.offset) / streak.width) ** 2)
    slab = np.exp(-(((z - streak.z) / streak.reach) ** 2))
    out += (streak.hu * line)[:, :, None] * slab[None, None, :]
  return out


def cbct_image(ct: np.ndarray, scan: Cbct, head: Head, grid: Grid, rng, noise: bool = True):
  """The CBCT of a noiseless CT (HU): cupping and streaks, the HU scale miscalibrated
  (gain, offset), noise, then air (−1000 HU) outside the field of view."""
  image = ct + cbct_cupping(scan, head, grid)
  image += cbct_streaks(scan, head, grid)
  image *= scan.gain
  image += scan.offset
  if noise:
    gaussian, _ = _gaussian_pair(rng, grid.shape)
    gaussian *= scan.noise
    image += gaussian
  inside = cbct_field_of_view(scan, grid)
  image *= inside
  image -= 1000.0 * (1.0 - inside)
  return image.astype(np.float32)


def generate(seed: int, subject: int, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING, *,
             bias: bool = True, noise: bool = True) -> dict[str, np.ndarray]:
  """One phantom subject on a grid centred on 0 mm.

  Returns float32 volumes "t1w", "t2w", "pd", "flair" (arbitrary units, WM ≈ 0.1-0.3),
  "ct" and "cbct" (HU), "mask" (0/1 head), "cbct_mask" (bool: the head inside the
  CBCT's field of view), uint8 "labels" (dominant tissue, see TISSUES),
  and the RAS+ "affine". Deterministic in (seed, subject, shape, spacing); the anatomy
  depends on (seed, subject) only. bias=False, noise=False give the noiseless, bias-free
  images (the CBCT keeps its artefacts: they are the scanner's, not noise).
  """
  if int(seed) < 0 or int(subject) < 0:
    raise ValueError(f"seed and subject must be non-negative, got seed={seed}, subject={subject}")
  grid = Grid.make(shape, spacing)
  head = draw_head(int(seed), int(subject))
  fractions, mask, bias_field, bone_hu = tissue_fractions(head, grid)

  table = np.array([[signal(p, s) for p in TISSUE_PARAMS.values()] for s in MR_SEQUENCES]
                   + [[p.hu for p in TISSUE_PARAMS.values()]], np.float32)
  images = (table @ fractions.reshape(len(TISSUES), -1)).reshape(len(table), *grid.shape)
  bone = fractions[TISSUES["bone"]]
  bone_hu -= TISSUE_PARAMS["bone"].hu
  bone_hu *= bone
  images[-1] += bone_hu
  clean_ct = images[-1].copy()

  rng = np.random.default_rng([int(seed), int(subject), NOISE_STREAM])
  # One bias field for all sequences: it is mostly the receive coil's sensitivity, which
  # is the same for every sequence of a session (same coil, same head position).
  for index, sequence in enumerate(MR_SEQUENCES):
    image = images[index]
    if bias:
      image *= bias_field
    if noise:  # magnitude of complex Gaussian noise: Rician, Rayleigh in the air
      sigma = NOISE_FRACTION * signal("wm", sequence)
      real, imaginary = _gaussian_pair(rng, grid.shape)
      real *= sigma
      real += image
      imaginary *= sigma
      np.sqrt(real * real + imaginary * imaginary, out=image)
  if noise:
    ct_noise, _ = _gaussian_pair(rng, grid.shape)
    ct_noise *= CT_NOISE_HU
    images[-1] += ct_noise

  out = {name: images[index] for index, name in enumerate((*MR_SEQUENCES, "ct"))}
  # Last, from its own stream: the CBCT changes none of the draws above.
  scan = draw_cbct(seed, subject)
  cbct_rng = np.random.default_rng([int(seed), int(subject), CBCT_NOISE_STREAM])
  out["cbct"] = cbct_image(clean_ct, scan, head, grid, cbct_rng, noise=noise)
  # SynthRAD Task 2's masks are the body inside the CBCT's field of view: what a CBCT →
  # CT model can see, and where it is scored.
  out["cbct_mask"] = (mask > 0) & (cbct_field_of_view(scan, grid) >= 0.5)
  out.update(mask=mask, labels=_labels(fractions), affine=grid.affine)
  return out


# --------------------------------------------------------------------------- misalignment

MISALIGN_NODE_MM = 20.0  # spacing of the random displacement lattice
MISALIGN_REACH_MM = 140.0  # the lattice covers ±this about the volume's centre; beyond, it fades
MISALIGN_LEVER_MM = 80.0  # rotation angle = magnitude / this: the head's edge moves ~magnitude


def _bspline(t):
  """The cubic B-spline kernel: C² smooth, support |t| < 2."""
  t = np.abs(t)
  return np.where(t < 1, 2 / 3 - t * t + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def displacement(shape, spacing, seed: int, subject: int, magnitude_mm: float) -> np.ndarray:
  """(3, X, Y, Z) mm: where each voxel of the misaligned volume samples the aligned one,
  minus its own position. A second session never lies where the first did: the head
  moves rigidly (a shift of `magnitude_mm`, a rotation of magnitude/80 mm rad about the
  volume's centre) and soft tissue, neck and positioning deform it smoothly (a random
  lattice every 20 mm, cubic B-spline, node RMS `magnitude_mm`). In mm about the centre,
  so one subject's warp is the same on any grid covering it."""
  rng = np.random.default_rng([int(seed), int(subject), MISALIGN_STREAM])
  count = int(round(2 * MISALIGN_REACH_MM / MISALIGN_NODE_MM)) + 1
  nodes = rng.normal(size=(3, count, count, count))
  nodes *= magnitude_mm / np.sqrt((nodes**2).sum(0).mean())
  direction = rng.normal(size=3)
  shift = magnitude_mm * direction / np.linalg.norm(direction)
  axis = rng.normal(size=3)
  axis /= np.linalg.norm(axis)
  angle = magnitude_mm / MISALIGN_LEVER_MM * rng.choice((-1.0, 1.0))
  cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
  rotation = np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross

  mm = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
  lattice = (np.arange(count) - (count - 1) / 2) * MISALIGN_NODE_MM
  bx, by, bz = (_bspline((a[:, None] - lattice[None]) / MISALIGN_NODE_MM) for a in mm)
  field = np.einsum("cijk,xi,yj,zk->cxyz", nodes, bx, by, bz, optimize=True)
  points = np.stack(np.meshgrid(*mm, indexing="ij"))
  rigid = np.einsum("ab,bxyz->axyz", rotation - np.eye(3), points) + shift[:, None, None, None]
  return (field + rigid).astype(np.float32)


def misalign(volume: np.ndarray, spacing, seed: int, subject: int, magnitude_mm: float,
             order: int = 1, cval: float | None = None) -> np.ndarray:
  """`volume` as a second session would see the same head: warped through
  `displacement` (deterministic per seed and subject). cval None repeats the edge voxels
  (air stays air); magnitude 0 returns `volume` itself."""
  if not (math.isfinite(magnitude_mm) and magnitude_mm >= 0):
    raise ValueError(f"magnitude_mm must be finite and ≥ 0, got {magnitude_mm}")
  if magnitude_mm == 0:
    return volume
  from scipy import ndimage
  shift = displacement(volume.shape, spacing, seed, subject, magnitude_mm)
  shift /= np.asarray(spacing, np.float32)[:, None, None, None]
  shift += np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in volume.shape),
                                indexing="ij"))
  mode = "nearest" if cval is None else "constant"
  out = ndimage.map_coordinates(volume, shift, order=order, mode=mode,
                                cval=0.0 if cval is None else cval, prefilter=order > 1)
  return out.astype(volume.dtype)


# --------------------------------------------------------------------------- subjects on disk


def split_subjects(num_subjects: int, fractions=(0.8, 0.1, 0.1)) -> dict[str, list[int]]:
  """Subject ids 0..N-1 → train / val / test, contiguous (phantom subjects are i.i.d.).
  Every split with a positive fraction gets at least one subject when N ≥ 3. Note that
  changing N moves the boundaries."""
  fractions = tuple(float(f) for f in fractions)
  if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
    raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
  if num_subjects < 1:
    raise ValueError(f"num_subjects must be positive, got {num_subjects}")
  counts = [0, 0, 0]
  for index in (2, 1):
    if fractions[index] > 0:
      counts[index] = max(1 if num_subjects >= 3 else 0, round(num_subjects * fractions[index]))
  counts[0] = num_subjects - counts[1] - counts[2]
  if counts[0] < 1:
    raise ValueError(f"{num_subjects} subjects leave none to train on with fractions {fractions}")
  ids = list(range(num_subjects))
  bounds = np.cumsum([0, *counts])
  return {name: ids[bounds[i]:bounds[i + 1]] for i, name in enumerate(SPLITS)}


def fov_spacing(shape, fov_mm=DEFAULT_FOV_MM) -> tuple[float, float, float]:
  """The spacing at which `shape` covers the field of view (default: the whole head)."""
  return tuple(float(f) / int(n) for f, n in zip(fov_mm, shape))


def _nifti(volume: np.ndarray, affine: np.ndarray, dtype=np.float32):
  import nibabel as nib
  image = nib.Nifti1Image(volume.astype(dtype), affine)
  image.header.set_data_dtype(dtype)
  image.header.set_xyzt_units("mm", "sec")
  image.set_qform(affine, code=1)
  image.set_sform(affine, code=1)
  return image


SECOND_SESSION = ("ct", "cbct")  # scanned apart from the one MR session: misaligned


def write_subjects(out_dir, num_subjects: int, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING,
                   seed: int = 0, progress: bool = True, misalign_mm: float = 0.0) -> list[Path]:
  """Write subjects 0..N-1 as out_dir/phantom_XXX/{modality}.nii.gz, mask.nii.gz and
  labels.nii.gz (uint8 `TISSUES`: the phantom layout's `seg`), and out_dir/split.json
  naming the folders of each split. Returns the subject folders.

  misalign_mm > 0: CT and CBCT come from other sessions than the MR sequences (which
  stay aligned to each other and to the mask): ct and cbct are written through `misalign`,
  and ct_aligned, cbct_aligned keep where they truly lie."""
  import nibabel as nib
  from tqdm.auto import tqdm

  out_dir = Path(out_dir)
  split = split_subjects(num_subjects)  # validates num_subjects first
  width = max(3, len(str(num_subjects - 1)))
  names = [f"phantom_{i:0{width}d}" for i in range(num_subjects)]
  folders = []
  for subject in tqdm(range(num_subjects), desc="phantom", unit="subject", disable=not progress):
    volumes = generate(seed, subject, shape, spacing)
    folder = out_dir / names[subject]
    folder.mkdir(parents=True, exist_ok=True)
    aligned = [f"{m}_aligned" for m in SECOND_SESSION] if misalign_mm > 0 else []
    for name in SECOND_SESSION if misalign_mm > 0 else ():
      volumes[f"{name}_aligned"] = volumes[name]
      volumes[name] = misalign(volumes[name], spacing, seed, subject, misalign_mm)
    for name in (*MODALITIES, "mask", "cbct_mask", *aligned, "labels"):
      dtype = np.uint8 if name == "labels" else np.float32
      with files.atomic_write(folder / f"{name}.nii.gz") as tmp:
        nib.save(_nifti(volumes[name], volumes["affine"], dtype), tmp)
    folders.append(folder)
  text = json.dumps({k: [names[i] for i in v] for k, v in split.items()}, indent=1)
  files.write_text(out_dir / "split.json", text + "\n")
  return folders
