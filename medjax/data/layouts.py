"""Find the subjects of a dataset folder and their modality files.

Each public dataset names its files its own way; this module turns any of them into
`Subject`s with canonical modality names (t1w, t1c, t2w, flair, pd, mr, cbct, ct, mask,
seg), so that nothing downstream knows which layout the files came from.

Scanning never stops on a bad subject: what looks wrong (a modality that the layout
promises but is absent, a second candidate file) is noted in `Subject.issues`; whether it
matters depends on the modalities a run asks for, which `prepare.prepare` decides.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import errno
import io
import os
import re
import sys
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


def walk(root, notes: list[str] | None = None):
  """`os.walk(root, followlinks=True)`, sorted, that enters each real folder once.

  Datasets are often assembled from symlinked folders, so links are followed; a link
  back to a folder already scanned (a loop such as `sub/up -> ..`, or a second link to
  one folder) is not entered again, and `notes` gets a line saying so. Folders that
  cannot be listed are noted and skipped too. Yields (folder, dirnames, filenames).
  """
  notes = [] if notes is None else notes
  seen: dict[tuple[int, int], Path] = {}
  stack = [Path(root)]
  while stack:
    folder = stack.pop()
    try:
      info = folder.stat()
      entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as error:
      notes.append(f"{folder}: not scanned ({error.strerror or error})")
      continue
    key = (info.st_dev, info.st_ino)
    if key in seen:
      first = seen[key]
      kind = ("a symlink loop back to" if folder.is_relative_to(first)
              else "a second link to")
      notes.append(f"{folder}: {kind} {first}, not followed")
      continue
    seen[key] = folder
    dirnames, filenames = [], []
    for entry in entries:
      try:
        is_dir = entry.is_dir()  # follows symlinks; a broken link is a (missing) file
      except OSError:
        is_dir = False
      (dirnames if is_dir else filenames).append(entry.name)
    yield folder, dirnames, filenames
    stack.extend(folder / name for name in reversed(dirnames))


def _folders_of_modality_files(root: Path, names: dict[str, str], notes=None):
  """Folders that hold files named `<modality><suffix>`: {folder: {modality: path}}."""
  found: dict[Path, dict[str, Path]] = {}
  for folder, _, filenames in walk(root, notes):
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


def _synthrad(root: Path, notes) -> list[Subject]:
  # Task1 pairs MR with CT, Task2 CBCT with CT; ids (1BA001, 2PA017…) are unique per task.
  names = {m: m for m in ("mr", "cbct", "ct", "mask")}
  subjects = []
  for folder, files in _folders_of_modality_files(root, names, notes).items():
    relative = folder.relative_to(root).parts
    group = "/".join(relative[:-1]) or None
    task = next((p.lower() for p in relative if p.lower() in ("task1", "task2")), None)
    expected = {"task1": ("mr", "ct", "mask"), "task2": ("cbct", "ct", "mask")}.get(
        task, ("ct",))
    subjects.append(Subject(folder.name, files, group, issues=_note_missing(files, expected)))
  return _unique_ids(subjects)


def _brats(root: Path, notes, folder_pattern: str, separator: str,
           modalities) -> list[Subject]:
  folder_re = re.compile(folder_pattern)
  subjects = []
  for folder, _, filenames in walk(root, notes):
    if not folder_re.fullmatch(folder.name):
      continue
    files, issues = {}, []
    for path in (folder / name for name in filenames):
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


def _brats2021(root: Path, notes) -> list[Subject]:
  return _brats(root, notes, r"BraTS2021_\d+", "_", ("t1", "t1ce", "t2", "flair", "seg"))


def _brats2023(root: Path, notes) -> list[Subject]:
  # GLI, MEN, MET, PED and SSA share one naming scheme; the tumour type becomes the group.
  return _brats(root, notes, r"BraTS-[A-Z]+-\d+-\d+", "-", ("t1n", "t1c", "t2w", "t2f", "seg"))


def _brasyn(root: Path, notes) -> list[Subject]:
  # BraSyn (BraTS 2023's missing-MRI challenge): BraTS 2023 folders in which each
  # validation subject lacks one of t1n/t1c/t2w/t2f (and its seg); an any-to-any run's
  # `medjax translate --layout brasyn` fills the gap (docs/design.md, "Any-to-any synthesis").
  return _brats(root, notes, r"BraTS-[A-Z]+-\d+-\d+", "-", ("t1n", "t1c", "t2w", "t2f", "seg"))


_IXI_RE = re.compile(r"(IXI\d+)-([A-Za-z]+)-(\d+)-(T1|T2|PD)", re.IGNORECASE)


def _ixi(root: Path, notes) -> list[Subject]:
  # IXI ships one folder per contrast (IXI-T1/, IXI-T2/, IXI-PD/) or everything in one.
  files: dict[str, dict[str, Path]] = {}
  sites: dict[str, str] = {}
  for folder, _, filenames in walk(root, notes):
    for filename in filenames:
      stem = _strip_suffix(filename)
      match = _IXI_RE.fullmatch(stem or "")
      if match:
        subject = f"{match[1]}-{match[2]}-{match[3]}"
        files.setdefault(subject, {})[ALIASES[match[4].lower()]] = Path(folder) / filename
        sites[subject] = match[2]
  return [Subject(s, files[s], sites[s], issues=_note_missing(files[s], ("t1w", "t2w", "pd")))
          for s in sorted(files)]


_BIDS_SUFFIXES = {"T1w": "t1w", "T2w": "t2w", "FLAIR": "flair", "PDw": "pd"}


def _bids(root: Path, notes) -> list[Subject]:
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


def _phantom(root: Path, notes) -> list[Subject]:
  # `medjax phantom --misalign` also writes ct_aligned / cbct_aligned (the truth behind a
  # misaligned pair): not modalities, so not listed here, and ignored like any other file.
  # labels.nii.gz (the tissue labels) is the `seg` that segmentation-based scoring reads.
  names = {m: m for m in ("t1w", "t2w", "pd", "flair", "ct", "cbct", "mask")} | {"labels": "seg"}
  return [Subject(folder.name, files, None)
          for folder, files in _folders_of_modality_files(root, names, notes).items()]


_CSV_SUBJECT_COLUMNS = ("subject", "subject_id", "id", "participant_id")
_CSV_GROUP_COLUMNS = ("group", "site", "center", "centre")
# A subjects table is text of a few kB per thousand subjects; anything far larger is not
# one, and is refused before it is read into memory.
CSV_MAX_BYTES = 64 << 20


def _csv_text(path: Path) -> str:
  """The table's text. UTF-8 (with or without a BOM) or UTF-16 with a BOM (what
  spreadsheet programs write as "Unicode text"); anything else is refused in one line
  rather than guessed: paths read in the wrong encoding would name files that are not
  there."""
  try:
    size = path.stat().st_size
    if size > CSV_MAX_BYTES:
      raise ValueError(f"{path}: {size} bytes is not a subjects table (the limit is "
                       f"{CSV_MAX_BYTES} bytes)")
    raw = path.read_bytes()
  except OSError as error:
    raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from None
  if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
    encoding = "utf-16"
  else:
    encoding = "utf-8-sig"
  try:
    text = raw.decode(encoding)
  except UnicodeDecodeError as error:
    raise ValueError(f"{path}: not {encoding.upper().replace('-SIG', '')} text (byte "
                     f"{raw[error.start:error.start + 1].hex()} at offset {error.start}); "
                     "save the table as UTF-8") from None
  if "\x00" in text:
    raise ValueError(f"{path}: contains NUL characters at offset {text.index(chr(0))}: "
                     "not a text table (UTF-16 without a byte-order mark?)")
  return text


def _csv_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
  """The header and the (line number, cells) of each non-blank row."""
  try:
    reader = csv.reader(io.StringIO(_csv_text(path), newline=""))
    rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
  except csv.Error as error:
    raise ValueError(f"{path}: not a readable CSV table (line {reader.line_num}: "
                     f"{error})") from None
  if not rows:
    raise ValueError(f"{path}: empty table; expected a header row such as "
                     "`subject,t1w,t2w` and one row per subject")
  (_, header), body = rows[0], rows[1:]
  return [cell.strip() for cell in header], body


def _cell_path(table: Path, cell: str, modality: str):
  """(path, None) for an existing file, else (None, the issue)."""
  path = Path(cell) if os.path.isabs(cell) else table.parent / cell
  try:
    if path.is_file():
      return path, None
    reason = "is not a file" if path.exists() else "does not exist"
  except (OSError, ValueError) as error:  # a name too long for the file system
    reason = f"cannot be looked up ({getattr(error, 'strerror', None) or error})"
  shown = str(path) if len(str(path)) <= 200 else str(path)[:200] + "…"
  return None, f"missing {modality}: {shown} {reason}"


def _csv(root: Path, notes=None) -> list[Subject]:
  """A manifest: one row per subject, a subject column and one path column per modality
  (named like any modality spelling: T1, t2w, FLAIR, ct…), optionally a group/site column.

  `root` is the CSV file, or a folder holding exactly one. Relative paths are relative
  to the CSV's folder; an empty cell (or a row shorter than the header) is a missing
  modality; blank rows are skipped. The text is UTF-8 or UTF-16 with a BOM (`_csv_text`);
  a row with more cells than the header, a row without a subject id and a column named
  twice are refused with a `ValueError` naming the file and line.
  """
  if root.is_dir():
    tables = sorted(p for p in root.glob("*.csv") if p.is_file())
    if len(tables) != 1:
      raise ValueError(f"csv layout: expected one .csv file in {root}, found {len(tables)}")
    root = tables[0]
  header, body = _csv_rows(root)
  lowered = [c.lower() for c in header]
  id_index = next((i for i, c in enumerate(lowered) if c in _CSV_SUBJECT_COLUMNS), None)
  if id_index is None:
    shown = header if len(str(header)) <= 200 else str(header)[:200] + "…"
    raise ValueError(f"{root}: no subject column (one of {', '.join(_CSV_SUBJECT_COLUMNS)})"
                     f" among {shown}")
  group_index = next((i for i, c in enumerate(lowered) if c in _CSV_GROUP_COLUMNS), None)
  modality_columns: dict[int, str] = {}
  for i, column in enumerate(lowered):
    if i != id_index and column in ALIASES:
      modality = ALIASES[column]
      if modality in modality_columns.values():
        raise ValueError(f"{root}: two columns give the {modality} file "
                         f"({', '.join(header[j] for j, m in modality_columns.items() if m == modality)}"
                         f" and {header[i]}); keep one")
      modality_columns[i] = modality
  subjects = []
  for line, row in body:
    if len(row) > len(header):
      raise ValueError(f"{root}: line {line} has {len(row)} cells, the header {len(header)}"
                       " (an unquoted comma in a path?)")
    row = [cell.strip() for cell in row] + [""] * (len(header) - len(row))
    if not row[id_index]:
      raise ValueError(f"{root}: line {line} has no subject id (column {header[id_index]})")
    files, issues = {}, []
    for i, modality in modality_columns.items():
      if not row[i]:
        issues.append(f"missing {modality}")
        continue
      path, issue = _cell_path(root, row[i], modality)
      if path is not None:
        files[modality] = path
      else:
        issues.append(issue)
    group = row[group_index] or None if group_index is not None else None
    subjects.append(Subject(row[id_index], files, group, issues=tuple(issues)))
  return subjects


LAYOUTS = {
    "synthrad2023": _synthrad,
    "synthrad2025": _synthrad,  # the same folders, with .mha files
    "brats2021": _brats2021,
    "brats2023": _brats2023,
    "brasyn": _brasyn,
    "ixi": _ixi,
    "bids": _bids,
    "phantom": _phantom,
    "csv": _csv,
}


def find_subjects(layout: str, root) -> list[Subject]:
  """The subjects under `root`, sorted by id.

  Folders the scan did not enter (`walk`: symlink loops, second links, unreadable
  folders) are noted in the issues of the subjects beside them and on stderr.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
  root = Path(root)
  if not root.exists():
    raise FileNotFoundError(errno.ENOENT, "dataset root does not exist", str(root))
  notes: list[str] = []
  subjects = LAYOUTS[layout](root, notes)
  seen = set()
  for s in subjects:
    if s.id in seen:
      raise ValueError(f"{layout}: subject id {s.id!r} appears twice under {root}")
    seen.add(s.id)
  for note in notes:
    print(f"medjax: {note}", file=sys.stderr)
  if notes:
    subjects = [_with_notes(s, notes) for s in subjects]
  return sorted(subjects, key=lambda s: s.id)


def _with_notes(subject: Subject, notes: list[str]) -> Subject:
  folders = {str(path.parent) for path in subject.files.values()}
  mine = tuple(note for note in notes
               if any(note.startswith(folder + os.sep) for folder in folders))
  return dataclasses.replace(subject, issues=subject.issues + mine) if mine else subject
