"""Find the subjects of a dataset folder and their modality files.

Each public dataset names its files its own way; this module turns any of them into
`Subject`s with canonical modality names (t1w, t1c, t2w, flair, pd, mr, cbct, ct, mask,
seg), so that nothing downstream knows which layout the files came from.

Scanning never stops on a bad subject: what looks wrong (a modality that the layout
promises but is absent, a second candidate file) is noted in `Subject.issues`; whether it
matters depends on the modalities a run asks for, which `prepare.prepare` decides.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from pathlib import Path

from medjax import modalities

ALIASES = modalities.ALIASES
MODALITIES = modalities.ALL
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha")


@dataclasses.dataclass(frozen=True)
class Subject:
  """One subject (or one session of one) and its modality files.

  `patient` groups several entries of one person (BIDS sessions): the split keeps them
  together. None means the subject is its own patient.
  """
  id: str
  files: dict[str, Path]
  group: str | None = None
  patient: str | None = None
  issues: tuple[str, ...] = ()

  @property
  def split_key(self) -> str:
    return self.patient or self.id

  def missing(self, modalities) -> list[str]:
    return [m for m in modalities if m not in self.files]


def _strip_suffix(name: str) -> str | None:
  for suffix in IMAGE_SUFFIXES:
    if name.lower().endswith(suffix):
      return name[: -len(suffix)]
  return None


def _note_missing(files, expected) -> tuple[str, ...]:
  return tuple(f"missing {m}" for m in expected if m not in files)


def _folders_of_modality_files(root: Path, names: dict[str, str]):
  """Folders that hold files named `<modality><suffix>`: {folder: {modality: path}}."""
  found: dict[Path, dict[str, Path]] = {}
  for folder, _, filenames in os.walk(root):
    for filename in sorted(filenames):
      stem = _strip_suffix(filename)
      if stem is not None and stem.lower() in names:
        found.setdefault(Path(folder), {})[names[stem.lower()]] = Path(folder) / filename
  return dict(sorted(found.items()))


def _unique_ids(subjects: list[Subject]) -> list[Subject]:
  """Qualify ids that repeat across groups (`group/id`) so that every id is unique."""
  counts: dict[str, int] = {}
  for s in subjects:
    counts[s.id] = counts.get(s.id, 0) + 1
  return [dataclasses.replace(s, id=f"{s.group}/{s.id}") if counts[s.id] > 1 and s.group
          else s for s in subjects]


def _synthrad(root: Path) -> list[Subject]:
  # Task1 pairs MR with CT, Task2 CBCT with CT; ids (1BA001, 2PA017…) are unique per task.
  names = {m: m for m in ("mr", "cbct", "ct", "mask")}
  subjects = []
  for folder, files in _folders_of_modality_files(root, names).items():
    relative = folder.relative_to(root).parts
    group = "/".join(relative[:-1]) or None
    task = next((p.lower() for p in relative if p.lower() in ("task1", "task2")), None)
    expected = {"task1": ("mr", "ct", "mask"), "task2": ("cbct", "ct", "mask")}.get(
        task, ("ct",))
    subjects.append(Subject(folder.name, files, group, issues=_note_missing(files, expected)))
  return _unique_ids(subjects)


def _brats(root: Path, folder_pattern: str, separator: str, modalities) -> list[Subject]:
  folder_re = re.compile(folder_pattern)
  subjects = []
  for folder, dirnames, _ in os.walk(root):
    dirnames.sort()
    folder = Path(folder)
    if not folder_re.fullmatch(folder.name):
      continue
    files, issues = {}, []
    for path in sorted(folder.iterdir()):
      stem = _strip_suffix(path.name)
      if stem is None or not stem.startswith(folder.name + separator):
        continue
      tag = stem[len(folder.name) + 1:].lower()
      if tag in modalities:
        files[ALIASES[tag]] = path
      else:
        issues.append(f"unrecognised file {path.name}")
    expected = [ALIASES[m] for m in modalities]
    group = folder.name.split("-")[1] if separator == "-" else None
    subjects.append(Subject(folder.name, files, group,
                            issues=_note_missing(files, expected) + tuple(issues)))
  return subjects


def _brats2021(root: Path) -> list[Subject]:
  return _brats(root, r"BraTS2021_\d+", "_", ("t1", "t1ce", "t2", "flair", "seg"))


def _brats2023(root: Path) -> list[Subject]:
  # GLI, MEN, MET, PED and SSA share one naming scheme; the tumour type becomes the group.
  return _brats(root, r"BraTS-[A-Z]+-\d+-\d+", "-", ("t1n", "t1c", "t2w", "t2f", "seg"))


_IXI_RE = re.compile(r"(IXI\d+)-([A-Za-z]+)-(\d+)-(T1|T2|PD)", re.IGNORECASE)


def _ixi(root: Path) -> list[Subject]:
  # IXI ships one folder per contrast (IXI-T1/, IXI-T2/, IXI-PD/) or everything in one.
  files: dict[str, dict[str, Path]] = {}
  sites: dict[str, str] = {}
  for folder, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for filename in sorted(filenames):
      stem = _strip_suffix(filename)
      match = _IXI_RE.fullmatch(stem or "")
      if match:
        subject = f"{match[1]}-{match[2]}-{match[3]}"
        files.setdefault(subject, {})[ALIASES[match[4].lower()]] = Path(folder) / filename
        sites[subject] = match[2]
  return [Subject(s, files[s], sites[s], issues=_note_missing(files[s], ("t1w", "t2w", "pd")))
          for s in sorted(files)]


_BIDS_SUFFIXES = {"T1w": "t1w", "T2w": "t2w", "FLAIR": "flair", "PDw": "pd"}


def _bids(root: Path) -> list[Subject]:
  subjects = []
  for participant in sorted(p for p in root.glob("sub-*") if p.is_dir()):
    sessions = sorted(p for p in participant.glob("ses-*") if p.is_dir()) or [participant]
    for session in sessions:
      anat = session / "anat"
      candidates: dict[str, list[Path]] = {}
      for path in sorted(anat.glob(f"{participant.name}_*")) if anat.is_dir() else []:
        stem = _strip_suffix(path.name)
        suffix = stem.rsplit("_", 1)[-1] if stem else None
        if suffix in _BIDS_SUFFIXES:
          candidates.setdefault(_BIDS_SUFFIXES[suffix], []).append(path)
      files, issues = {}, []
      for modality, paths in candidates.items():
        # The fewest BIDS entities (no acq-/run-) is the plain acquisition.
        paths.sort(key=lambda p: (p.name.count("_"), p.name))
        files[modality] = paths[0]
        if len(paths) > 1:
          issues.append(f"{len(paths)} {modality} files, using {paths[0].name}")
      sid = participant.name if session is participant else f"{participant.name}_{session.name}"
      subjects.append(Subject(sid, files, None, patient=participant.name,
                              issues=tuple(issues) + (() if files else ("no anat images",))))
  return subjects


def _phantom(root: Path) -> list[Subject]:
  names = {m: m for m in ("t1w", "t2w", "pd", "flair", "ct", "mask")}
  return [Subject(folder.name, files, None)
          for folder, files in _folders_of_modality_files(root, names).items()]


_CSV_SUBJECT_COLUMNS = ("subject", "subject_id", "id", "participant_id")
_CSV_GROUP_COLUMNS = ("group", "site", "center", "centre")


def _csv(root: Path) -> list[Subject]:
  """A manifest: one row per subject, a subject column and one path column per modality
  (named like any modality spelling: T1, t2w, FLAIR, ct…), optionally a group/site column.

  `root` is the CSV file, or a folder holding exactly one. Relative paths are relative
  to the CSV's folder; an empty cell is a missing modality.
  """
  if root.is_dir():
    tables = sorted(root.glob("*.csv"))
    if len(tables) != 1:
      raise ValueError(f"csv layout: expected one .csv file in {root}, found {len(tables)}")
    root = tables[0]
  with open(root, newline="") as f:
    rows = list(csv.DictReader(f))
  header = list(rows[0]) if rows else []
  id_column = next((c for c in header if c.strip().lower() in _CSV_SUBJECT_COLUMNS), None)
  if id_column is None:
    raise ValueError(f"{root}: no subject column (one of {', '.join(_CSV_SUBJECT_COLUMNS)})"
                     f" among {header}")
  group_column = next((c for c in header if c.strip().lower() in _CSV_GROUP_COLUMNS), None)
  modality_columns = {}
  for column in header:
    if column != id_column and column.strip().lower() in ALIASES:
      modality_columns[column] = ALIASES[column.strip().lower()]
  subjects = []
  for row in rows:
    files, issues = {}, []
    for column, modality in modality_columns.items():
      cell = (row.get(column) or "").strip()
      if not cell:
        issues.append(f"missing {modality}")
        continue
      path = Path(cell) if os.path.isabs(cell) else root.parent / cell
      if path.exists():
        files[modality] = path
      else:
        issues.append(f"missing {modality}: {path} does not exist")
    group = (row.get(group_column) or "").strip() or None if group_column else None
    subjects.append(Subject(row[id_column].strip(), files, group, issues=tuple(issues)))
  return subjects


LAYOUTS = {
    "synthrad2023": _synthrad,
    "synthrad2025": _synthrad,  # the same folders, with .mha files
    "brats2021": _brats2021,
    "brats2023": _brats2023,
    "ixi": _ixi,
    "bids": _bids,
    "phantom": _phantom,
    "csv": _csv,
}


def find_subjects(layout: str, root) -> list[Subject]:
  """The subjects under `root`, sorted by id."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
  root = Path(root)
  if not root.exists():
    raise FileNotFoundError(f"dataset root {str(root)!r} does not exist")
  subjects = LAYOUTS[layout](root)
  seen = set()
  for s in subjects:
    if s.id in seen:
      raise ValueError(f"{layout}: subject id {s.id!r} appears twice under {root}")
    seen.add(s.id)
  return sorted(subjects, key=lambda s: s.id)
