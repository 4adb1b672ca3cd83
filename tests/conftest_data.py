"""Tiny fake datasets for the data tests: NIfTI writers and the broken files real data has.

A plain module (the lead owns conftest.py): `from conftest_data import ...`.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (24, 24, 12)


def rotation(angle_deg: float, axis: int = 2) -> np.ndarray:
  a = np.deg2rad(angle_deg)
  c, s = np.cos(a), np.sin(a)
  i, j = [k for k in range(3) if k != axis]
  r = np.eye(3)
  r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
  return r


def affine(spacing=(1.0, 1.0, 1.0), angle_deg=0.0, origin=None, flips=(1, 1, 1),
           shape=SHAPE) -> np.ndarray:
  """Voxel → world; by default the volume's centre sits at the world origin."""
  a = np.eye(4)
  a[:3, :3] = rotation(angle_deg) @ np.diag(np.asarray(spacing) * np.asarray(flips))
  a[:3, 3] = origin if origin is not None else -a[:3, :3] @ ((np.asarray(shape) - 1) / 2)
  return a


def body(shape=SHAPE, radius=0.7) -> np.ndarray:
  """An ellipsoid that leaves the first and last slices empty."""
  x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
  return (x / radius) ** 2 + (y / radius) ** 2 + (z / 0.8) ** 2 < 1


def mr_volume(rng, shape=SHAPE, mask=None) -> np.ndarray:
  mask = body(shape) if mask is None else mask
  return np.where(mask, 300 + 100 * rng.random(shape), 0).astype(np.float32)


def ct_volume(rng, shape=SHAPE, mask=None) -> np.ndarray:
  mask = body(shape) if mask is None else mask
  return np.where(mask, rng.uniform(-200, 1500, shape), -1000).astype(np.float32)


def save(path: Path, data, affine_=None, dtype=np.float32) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(np.asarray(data, dtype), np.eye(4) if affine_ is None else affine_),
           path)
  return path


def corrupt_gzip(path: Path):
  """Keep the gzip header, scramble the deflate stream."""
  raw = bytearray(path.read_bytes())
  raw[20:] = bytes((b * 7 + 13) % 256 for b in raw[20:])
  path.write_bytes(bytes(raw))


def truncate(path: Path):
  """A download that stopped: a valid gzip prefix with half of the voxels."""
  raw = gzip.decompress(path.read_bytes())
  with gzip.open(path, "wb") as f:
    f.write(raw[: 352 + (len(raw) - 352) // 2])


def touch(path: Path):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"")
