"""The byte layout of one slice record in the ArrayRecord shards.

Storage: int16, value = round(unit · 32767). Intensities are bounded to [-1, 1], so a
fixed-point code spends all 16 bits on that range: its error is ≤ 1.5e-5 everywhere
(0.03 HU on the CT window), where float16 would lose up to 2.4e-4 near ±1 (0.5 HU) for
the same two bytes. The mask is one uint8 per pixel. A header carries the shapes, the
subject index and the slice, so a record decodes on its own.
"""

from __future__ import annotations

import struct

import numpy as np

SCALE = 32767.0
MAGIC = b"MJX1"
_HEADER = struct.Struct("<4sHHHHii")  # magic, H, W, Cs, Ct, subject, slice
STORAGE = "int16 = round(unit * 32767); mask uint8"


def _quantise(unit: np.ndarray) -> bytes:
  return np.round(np.clip(unit, -1.0, 1.0) * SCALE).astype("<i2").tobytes()


def encode(record: dict) -> bytes:
  source, target = record["source"], record["target"]
  height, width, source_channels = source.shape
  header = _HEADER.pack(MAGIC, height, width, source_channels, target.shape[-1],
                        int(record["subject"]), int(record["slice"]))
  mask = (np.asarray(record["mask"]) > 0.5).astype(np.uint8).tobytes()
  return header + _quantise(source) + _quantise(target) + mask


def decode(data: bytes) -> dict:
  """A record (docs/design.md, "Batch") from its bytes; ValueError if they are not one."""
  if len(data) < _HEADER.size:
    raise ValueError(f"a slice record of {len(data)} bytes is shorter than its header")
  magic, height, width, cs, ct, subject, z = _HEADER.unpack_from(data)
  if magic != MAGIC:
    raise ValueError(f"not a medjax slice record (magic {magic!r})")
  if not (height and width and cs and ct):
    raise ValueError(f"a slice record of shape {height}×{width} with {cs} source and {ct} "
                     "target channels holds nothing")
  pixels = height * width
  expected = _HEADER.size + 2 * pixels * (cs + ct) + pixels
  if len(data) != expected:
    raise ValueError(f"slice record of {len(data)} bytes, its header promises {expected}")
  offset = _HEADER.size

  def unit(channels):
    nonlocal offset
    codes = np.frombuffer(data, "<i2", pixels * channels, offset)
    offset += 2 * pixels * channels
    values = codes.astype(np.float32)
    values *= np.float32(1.0 / SCALE)
    return values.reshape(height, width, channels)

  source, target = unit(cs), unit(ct)
  codes = np.frombuffer(data, np.uint8, pixels, offset)
  if codes.max() > 1:  # `encode` writes 0 or 1: anything else is damage
    raise ValueError(f"mask byte {int(codes.max())} in a slice record (0 or 1 expected)")
  mask = codes.astype(np.float32)
  return {"source": source, "target": target, "mask": mask.reshape(height, width, 1),
          "subject": np.int32(subject), "slice": np.int32(z)}
