"""Modality names: every spelling the supported datasets use, mapped to one name.

CT-like modalities (`ct`, `cbct`) carry physical units (HU) and keep a fixed intensity
window; the others are MR contrasts without an absolute unit (docs/design.md,
"Intensities").
"""

from __future__ import annotations

ALIASES = {
    "t1": "t1w", "t1n": "t1w", "t1w": "t1w",
    "t1ce": "t1c", "t1c": "t1c", "t1gd": "t1c",
    "t2": "t2w", "t2w": "t2w",
    "flair": "flair", "t2f": "flair",
    "pd": "pd", "pdw": "pd",
    "mr": "mr", "cbct": "cbct", "ct": "ct", "mask": "mask", "seg": "seg",
}
CT = ("ct", "cbct")
MR = ("t1w", "t1c", "t2w", "pd", "flair", "mr")
IMAGES = MR + CT  # what a translator can read or write
ALL = tuple(sorted(set(ALIASES.values())))  # images and their masks / segmentations


def canonical(name: str) -> str:
  key = str(name).strip().lower()
  if key not in ALIASES:
    raise ValueError(f"unknown modality {name!r}; known: {', '.join(sorted(ALIASES))}")
  return ALIASES[key]


def is_ct(modality: str) -> bool:
  return modality in CT


def as_tuple(modalities) -> tuple[str, ...]:
  """A config's `data.source` (one name or several) as a tuple."""
  return (modalities,) if isinstance(modalities, str) else tuple(modalities)
