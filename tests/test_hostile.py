"""Hostile inputs by example (issue 15): memory bombs, subject ids that try to leave the
output folder, symlink loops, and the damaged tables, manifests and shards users meet.

The property-based side (thousands of generated inputs per reader) is tests/test_fuzz.py.
"""

import csv
import gzip
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fuzz_inputs  # noqa: E402
from conftest import tiny_config  # noqa: E402
from conftest_data import mr_volume, save  # noqa: E402

from medjax import cli, files, score  # noqa: E402
from medjax.data import layouts, phantom, pipeline, prepare, preprocess, shards, volumes  # noqa: E402
from medjax.errors import UserError  # noqa: E402

BOMB = "10000×10000×10000 = 1.0e12 voxels (4.0 TB as float32), more than --max-voxels 268435456"
SPACING = (5.0, 5.0, 8.0)  # tiny_config's phantom grid: 32 × 32 × 12 voxels


# --- memory bombs -------------------------------------------------------------------------

def bomb_header(shape=(10000, 10000, 10000)) -> bytes:
  header = nib.Nifti1Header()
  header.set_data_shape(shape)
  header.set_data_dtype(np.float32)
  header["vox_offset"] = 352
  return header.binaryblock + b"\x00" * 4


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_tiny_nifti_claiming_a_terabyte_is_refused_before_allocating(tmp_path, suffix):
  raw = bomb_header()
  path = tmp_path / f"bomb{suffix}"
  path.write_bytes(gzip.compress(raw, mtime=0) if suffix == ".nii.gz" else raw)
  if suffix == ".nii.gz":
    assert path.stat().st_size < 100  # the "100-byte NIfTI" of the issue
  tracemalloc.start()
  start = time.perf_counter()
  try:
    with pytest.raises(volumes.VolumeError) as refused:
      volumes.load(path)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert str(refused.value) == f"{path}: claims {BOMB}"
  assert seconds < 1.0 and peak < 4 << 20, (seconds, peak)  # nothing near 4 TB was asked for


def test_a_metaimage_claiming_a_terabyte_is_refused_from_its_header(tmp_path):
  path = tmp_path / "bomb.mha"
  path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 10000 10000 10000\n"
                   b"ElementType = MET_FLOAT\nElementDataFile = LOCAL\n" + bytes(64))
  with pytest.raises(volumes.VolumeError, match="claims 10000×10000×10000 = 1.0e12 voxels"):
    volumes.load(path)


def test_the_limit_is_a_choice(tmp_path):
  path = save(tmp_path / "small.nii.gz", np.ones((10, 10, 10)))
  with pytest.raises(volumes.VolumeError, match=r"claims 10×10×10 = 1.0e3 voxels \(4.0 kB as "
                     r"float32\), more than --max-voxels 999"):
    volumes.load(path, max_voxels=999)
  assert volumes.load(path, max_voxels=1000)[0].shape == (10, 10, 10)
  assert volumes.load(path, max_voxels=None)[0].shape == (10, 10, 10)


def test_a_header_promising_more_bytes_than_the_file_holds_is_truncated(tmp_path):
  path = save(tmp_path / "cut.nii", np.ones((10, 10, 10)))
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(volumes.VolumeError, match="truncated file: its header promises 4000 "
                     "bytes of voxels from byte 352, the file holds 4252 bytes"):
    volumes.load(path)


def test_coarse_voxels_resampled_to_a_fine_grid_are_refused_before_resampling(tmp_path):
  """8³ voxels of 100 mm are a small file but 8000³ voxels at 0.1 mm."""
  path = save(tmp_path / "t1w.nii.gz", np.ones((8, 8, 8)), np.diag([100.0, 100, 100, 1]))
  recipe = preprocess.Recipe(sources=["t1w"], targets=["t2w"], spacing=(0.1, 0.1, 0.1),
                             size=(32, 32))
  start = time.perf_counter()
  with pytest.raises(volumes.VolumeError, match=r"resampled to 0.1×0.1×0.1 mm, it would be "
                     r"8000×8000×8000 = 5.1e11 voxels"):
    preprocess.preprocess({"t1w": path}, recipe, targets=False)
  assert time.perf_counter() - start < 2.0


def small_dataset(root: Path, subjects=("s0", "s1")) -> Path:
  rng = np.random.default_rng(0)
  for sid in subjects:
    for modality in ("t1w", "t2w"):
      save(root / sid / f"{modality}.nii.gz", mr_volume(rng))
  return root


def test_max_voxels_reaches_prepare_and_its_command_line(tmp_path, capsys):
  root = small_dataset(tmp_path / "data")
  out = tmp_path / "out"
  status = cli.main(["medjax", "prepare", "--layout", "phantom", "--input-dir", str(root),
                     "--output-dir", str(out), "--source", "t1w", "--target", "t2w",
                     "--size", "24", "--max-voxels", "1000"])
  assert status == 0  # skipped subjects are reported (--strict makes them an error)
  manifest = shards.load_manifest(out)
  reasons = [s["reason"] for s in manifest["skipped"]]
  assert len(reasons) == 2 and all("claims 24×24×12 = 6.9e3 voxels" in r and
                                   "more than --max-voxels 1000" in r for r in reasons)
  assert "--max-voxels 1000" in manifest["command"]


def test_max_voxels_reaches_score(tmp_path, capsys):
  root = small_dataset(tmp_path / "data", ["s0"])
  (tmp_path / "pred").mkdir()
  (tmp_path / "pred" / "s0.nii.gz").write_bytes((root / "s0" / "t2w.nii.gz").read_bytes())
  status = cli.main(["medjax", "score", "--pred-dir", str(tmp_path / "pred"), "--target-dir",
                     str(root), "--layout", "phantom", "--target", "t2w", "--protocol", "mri",
                     "--max-voxels", "1000"])
  err = capsys.readouterr().err
  assert status == 2 and "more than --max-voxels 1000" in err, err


@pytest.mark.parametrize("command", ["prepare", "translate", "score"])
def test_max_voxels_is_documented(command, capsys):
  assert cli.main(["medjax", command, "--help"]) == 0
  text = " ".join(capsys.readouterr().out.split())
  assert "--max-voxels N" in text and "default 268435456" in text and "10^12" in text


# --- subject ids that try to leave the output folder --------------------------------------

HOSTILE_IDS = ["../../escape", "/abs/path", "a\nb", "..", "x" * 300, "a/../../b", "-rf",
               ".hidden", "translations"]


def snapshot(root: Path) -> set[str]:
  found = set()
  for folder, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      found.add(os.path.relpath(os.path.join(folder, name), root))
  return found


def assert_only_under(root: Path, before: set[str], after: set[str], *outputs: Path):
  allowed = [os.path.relpath(out, root) for out in outputs]
  # The output folders, what is in them and the folders made to hold them.
  strays = sorted(p for p in after - before
                  if not any(p == a or p.startswith(a + os.sep) or a.startswith(p + os.sep)
                             for a in allowed))
  assert not strays, strays
  assert not Path("/abs/path").exists() and not Path("/abs").exists()


def hostile_table(folder: Path, ids, t1w: Path, t2w: Path) -> Path:
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / "subjects.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["subject", "t1w", "t2w"])
    for sid in ids:
      writer.writerow([sid, str(t1w), str(t2w)])
  return folder / "subjects.csv"


def test_prepare_writes_hostile_ids_inside_its_output_folder(tmp_path):
  rng = np.random.default_rng(0)
  t1w, t2w = save(tmp_path / "images" / "t1w.nii.gz", mr_volume(rng)), save(
      tmp_path / "images" / "t2w.nii.gz", mr_volume(rng))
  table = hostile_table(tmp_path / "data", HOSTILE_IDS, t1w, t2w)
  out = tmp_path / "work" / "out"
  parent = set(os.listdir(tmp_path.parent))
  before = snapshot(tmp_path)
  manifest = prepare.prepare("csv", table, out, ["t1w"], "t2w", size=24,
                             fractions=(1, 0, 0), progress=False)
  assert_only_under(tmp_path, before, snapshot(tmp_path), out)
  assert set(os.listdir(tmp_path.parent)) == parent
  assert manifest["counts"]["prepared"] == len(HOSTILE_IDS)
  assert sorted(v.subject for v in shards.split_volumes(out, "train")) == sorted(HOSTILE_IDS)
  assert all(len(p.name) <= 255 for p in out.rglob("*"))


@pytest.mark.parametrize("cell", ["a\x00b", "ok"])
def test_a_table_with_nul_characters_is_refused_before_anything_is_written(tmp_path, cell,
                                                                         capsys):
  save(tmp_path / "t1w.nii.gz", mr_volume(np.random.default_rng(0)))
  table = tmp_path / "data" / "subjects.csv"
  table.parent.mkdir()
  text = f"subject,t1w,t2w\n{cell},{tmp_path / 't1w.nii.gz'},{tmp_path / 't1w.nii.gz'}\n"
  table.write_bytes(text.replace("ok", "\x00").encode())
  status = cli.main(["medjax", "prepare", "--layout", "csv", "--input-dir", str(table),
                     "--output-dir", str(tmp_path / "out"), "--source", "t1w",
                     "--target", "t2w"])
  err = capsys.readouterr().err.strip()
  assert status == 2 and len(err.splitlines()) == 1, err
  assert str(table) in err and "NUL" in err
  assert not (tmp_path / "out").exists()


def test_safe_stems_stay_in_their_folder():
  for name in HOSTILE_IDS + ["a\x00b", "", ".", "é" * 300, "a\\..\\b"]:
    stem = files.safe_stem(name)
    assert stem and "/" not in stem and "\x00" not in stem and "\n" not in stem
    assert not stem.startswith(".") and len(stem) <= files.STEM_MAX, (name, stem)
  assert files.safe_stem("x" * 300) != files.safe_stem("x" * 301)  # the hash tells them apart


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  from medjax import train
  workdir = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(tiny_config("regression"), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def phantom_pair(tmp_path_factory):
  folder = tmp_path_factory.mktemp("images")
  data = phantom.generate(0, 1, shape=(32, 32, 12), spacing=SPACING)
  affine = np.diag([*SPACING, 1.0])
  return (save(folder / "t1w.nii.gz", data["t1w"], affine),
          save(folder / "t2w.nii.gz", data["t2w"], affine))


def test_translate_and_score_write_hostile_ids_inside_their_folders(run, phantom_pair, tmp_path,
                                                                    capsys):
  table = hostile_table(tmp_path / "data", HOSTILE_IDS, *phantom_pair)
  out, results = tmp_path / "work" / "out", tmp_path / "work" / "results"
  parent = set(os.listdir(tmp_path.parent))
  before = snapshot(tmp_path)
  assert cli.main(["medjax", "translate", "--workdir", str(run), "--input-dir",
                   str(table.parent), "--layout", "csv", "--output-dir", str(out),
                   "--samples", "2"]) == 0, capsys.readouterr().err
  assert_only_under(tmp_path, before, snapshot(tmp_path), out)
  index = json.loads((out / "translations.json").read_text())
  assert sorted(index["subjects"]) == sorted(HOSTILE_IDS)
  before = snapshot(tmp_path)
  assert cli.main(["medjax", "score", "--pred-dir", str(out), "--target-dir", str(table.parent),
                   "--layout", "csv", "--target", "t2w", "--protocol", "mri",
                   "--output", str(results / "scores.csv"),
                   "--report-dir", str(results / "report")]) == 0, capsys.readouterr().err
  assert_only_under(tmp_path, before, snapshot(tmp_path), results)
  assert set(os.listdir(tmp_path.parent)) == parent
  assert len(list((results / "report").glob("*.png"))) == len(HOSTILE_IDS)
  assert all(len(p.name) <= 255 for p in tmp_path.rglob("*"))


def test_translate_refuses_an_id_whose_volume_would_be_anothers_std(run, phantom_pair, tmp_path,
                                                                    capsys):
  table = hostile_table(tmp_path / "data", ["a", "a_std"], *phantom_pair)
  status = cli.main(["medjax", "translate", "--workdir", str(run), "--input-dir",
                     str(table.parent), "--layout", "csv", "--output-dir",
                     str(tmp_path / "out"), "--samples", "2"])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and "'a' and 'a_std'" in err[-1], err
  assert not list((tmp_path / "out").glob("*.nii.gz")) if (tmp_path / "out").exists() else True


def test_translate_max_voxels(run, phantom_pair, tmp_path, capsys):
  status = cli.main(["medjax", "translate", "--workdir", str(run), "--input",
                     str(phantom_pair[0]), "--output", str(tmp_path / "out.nii.gz"),
                     "--max-voxels", "1000"])
  err = capsys.readouterr().err.strip()
  assert status == 2 and "claims 32×32×12 = 1.2e4 voxels" in err and len(err.splitlines()) == 1
  assert not (tmp_path / "out.nii.gz").exists()


# --- symlink loops ------------------------------------------------------------------------

def touch(path: Path) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"")
  return path


LAYOUT_FILES = {
    "synthrad2023": ["Task1/brain/1BA001/mr.nii.gz", "Task1/brain/1BA001/ct.nii.gz",
                     "Task1/brain/1BA001/mask.nii.gz"],
    "synthrad2025": ["Task1/HN/1HNA001/mr.mha", "Task1/HN/1HNA001/ct.mha"],
    "brats2021": ["BraTS2021_00001/BraTS2021_00001_t1.nii.gz"],
    "brats2023": ["BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1n.nii.gz"],
    "ixi": ["IXI-T1/IXI002-Guys-0828-T1.nii.gz"],
    "bids": ["sub-01/anat/sub-01_T1w.nii.gz"],
    "phantom": ["phantom_000/t1w.nii.gz"],
    "csv": ["a_t1w.nii.gz"],
}


@pytest.mark.parametrize("layout", list(LAYOUT_FILES))
def test_symlink_loops_do_not_hang_a_scan(layout, tmp_path, capsys):
  root = tmp_path / "data"
  for name in LAYOUT_FILES[layout]:
    touch(root / name)
  if layout == "csv":
    (root / "subjects.csv").write_text("subject,t1w\na,a_t1w.nii.gz\n")
  deepest = (root / LAYOUT_FILES[layout][0]).parent
  os.symlink(root, deepest / "loop")  # back to the top
  os.symlink("..", deepest / "up")  # back to the parent
  os.symlink(deepest, root / "again")  # a second way into the subject's folder
  with fuzz_inputs.time_limit(20):
    subjects = layouts.find_subjects(layout, root)
  assert len(subjects) == 1, subjects
  if layout not in ("bids", "csv"):  # these two do not walk folders
    err = capsys.readouterr().err
    assert "a symlink loop back to" in err and "not followed" in err, err


def test_symlinked_subject_folders_are_followed(tmp_path):
  elsewhere = touch(tmp_path / "store" / "phantom_007" / "t1w.nii.gz").parent
  touch(tmp_path / "data" / "phantom_000" / "t1w.nii.gz")
  os.symlink(elsewhere, tmp_path / "data" / "phantom_007")
  assert [s.id for s in layouts.find_subjects("phantom", tmp_path / "data")] == [
      "phantom_000", "phantom_007"]


def test_score_folder_scan_survives_a_symlink_loop(tmp_path, capsys):
  touch(tmp_path / "pred" / "sub" / "a.nii.gz")
  os.symlink(tmp_path / "pred", tmp_path / "pred" / "sub" / "loop")
  with fuzz_inputs.time_limit(20):
    found = score.image_files(tmp_path / "pred")
  assert list(found) == ["sub/a"]
  assert "symlink loop" in capsys.readouterr().err


# --- subject tables -----------------------------------------------------------------------

def table(tmp_path, raw: bytes) -> Path:
  touch(tmp_path / "a.nii.gz")
  path = tmp_path / "subjects.csv"
  path.write_bytes(raw)
  return path


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
def test_tables_in_utf8_with_or_without_bom_and_utf16_read_alike(tmp_path, encoding):
  path = table(tmp_path, "subject,T1,site\r\na,a.nii.gz,Zürich\n".encode(encoding))
  (subject,) = layouts.find_subjects("csv", path)
  assert (subject.id, subject.files, subject.group) == ("a", {"t1w": tmp_path / "a.nii.gz"},
                                                        "Zürich")


@pytest.mark.parametrize("raw, words", [
    ("subject,t1w\né,a.nii.gz\n".encode("latin-1"), "not UTF-8 text (byte e9 at offset 12)"),
    ("subject,t1w\na,a.nii.gz\n".encode("utf-16-le"), "NUL characters"),
    (b"", "empty table"),
    (b"\n\n", "empty table"),
    (b"name,t1w\na,a.nii.gz\n", "no subject column"),
    (b"subject,t1w\na,a.nii.gz\na,a.nii.gz\n", "subject id 'a' appears twice"),
    (b"subject,t1w\na,a.nii.gz,extra\n", "line 2 has 3 cells, the header 2"),
    (b"subject,t1w\n,a.nii.gz\n", "line 2 has no subject id"),
    (b"subject,t1w,T1\na,a.nii.gz,a.nii.gz\n", "two columns give the t1w file"),
    (b'subject,t1w\n"a,a.nii.gz\n' + b"x" * 140000, "not a readable CSV table"),
])
def test_broken_tables_are_one_line_naming_the_file(tmp_path, raw, words):
  path = table(tmp_path, raw)
  with pytest.raises(ValueError) as refused:
    layouts.find_subjects("csv", path)
  message = str(refused.value)
  assert words in message and str(tmp_path) in message and "\n" not in message, message


def test_short_rows_and_odd_paths_are_missing_modalities(tmp_path):
  path = table(tmp_path, b"subject,t1w,t2w\na,a.nii.gz\nb,/dev/null,.\nc," + b"x" * 5000
               + b",\n")
  subjects = {s.id: s for s in layouts.find_subjects("csv", path)}
  assert subjects["a"].files == {"t1w": tmp_path / "a.nii.gz"}
  assert subjects["a"].issues == ("missing t2w",)
  assert subjects["b"].files == {} and "is not a file" in subjects["b"].issues[0]
  assert "cannot be looked up" in subjects["c"].issues[0]


# --- manifests, subject json, shards ------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = small_dataset(tmp_path_factory.mktemp("data"), ["s0", "s1", "s2"])
  out = root.parent / "shards"
  prepare.prepare("phantom", root, out, ["t1w"], "t2w", size=24, fractions=(1, 1, 1),
                  progress=False)
  return root, out


def copy_of(prepared, tmp_path) -> tuple[Path, Path]:
  import shutil
  root, out = prepared
  shutil.copytree(out, tmp_path / "shards")
  return root, tmp_path / "shards"


@pytest.mark.parametrize("damage, words", [
    (lambda text: text[:len(text) // 2], "not readable JSON"),
    (lambda text: json.dumps({**json.loads(text), "subjects": "s0"}), "'subjects' is str"),
    (lambda text: json.dumps({**json.loads(text), "settings": [1]}), "'settings' is list"),
    (lambda text: json.dumps([json.loads(text)]), "expected a JSON object, found list"),
])
def test_a_damaged_manifest_is_named_wherever_it_is_read(prepared, tmp_path, damage, words):
  root, out = copy_of(prepared, tmp_path)
  manifest = out / prepare.MANIFEST
  manifest.write_text(damage(manifest.read_text()))
  config = tiny_config()
  config.data.kind, config.data.dir = "shards", str(out)
  for read in (lambda: shards.load_manifest(out), lambda: shards.recipe(out),
               lambda: pipeline.check_shards(config),
               lambda: prepare.prepare("phantom", root, out, ["t1w"], "t2w", size=24,
                                       fractions=(1, 1, 1), progress=False)):
    with pytest.raises(UserError) as refused:
      read()
    assert str(refused.value).startswith(f"{manifest}: ") and words in str(refused.value)


def test_a_recipe_with_wrong_values_is_named(prepared, tmp_path):
  _, out = copy_of(prepared, tmp_path)
  manifest = json.loads((out / prepare.MANIFEST).read_text())
  manifest["recipe"]["spacing"] = [1.0, float("nan"), 1.0]
  (out / prepare.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(UserError, match=r"manifest.json: its recipe is not valid \(spacing="):
    shards.recipe(out)


def test_a_damaged_subject_json_is_named(prepared, tmp_path):
  root, out = copy_of(prepared, tmp_path)
  meta = next((out / "train").glob("*.json"))
  meta.write_text(meta.read_text()[:40])
  for read in (lambda: shards.split_volumes(out, "train"),
               lambda: shards.split_metadata(out, "train"),
               lambda: prepare.prepare("phantom", root, out, ["t1w"], "t2w", size=24,
                                       fractions=(1, 1, 1), progress=False)):
    with pytest.raises(UserError, match=f"^{meta}: not readable JSON"):
      read()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_shard_is_named_by_every_reader(prepared, tmp_path, damage):
  _, out = copy_of(prepared, tmp_path)
  shard = next((out / "train").glob("*.array_record"))
  raw = bytearray(shard.read_bytes())
  if damage == "truncate":
    raw = raw[:len(raw) // 2]
  else:
    raw[100] ^= 0x10  # inside the first chunk: its hash no longer matches
  shard.write_bytes(bytes(raw))
  for read in (lambda: shards.read_shard(shard), lambda: shards.split_volumes(out, "train"),
               lambda: [s for source in [shards.ShardSlices(out, "train")]
                        for s in (source[i] for i in range(len(source)))]):
    with pytest.raises(UserError, match=f"^{shard}: .*damaged"):
      read()


def test_an_altered_record_is_named_with_its_index(prepared, tmp_path):
  from medjax.data import records
  _, out = copy_of(prepared, tmp_path)
  shard = next((out / "train").glob("*.array_record"))
  payloads = [records.encode(r) for r in shards.read_shard(shard)]
  payloads[1] = payloads[1][:-7]
  shard.unlink()
  fuzz_inputs._write_shard(shard, payloads)
  with pytest.raises(UserError, match=f"^{shard}: record 1: slice record of"):
    shards.read_shard(shard)
  source = shards.ShardSlices(out, "train")
  with pytest.raises(UserError, match=f"^{shard}: record 1: damaged"):
    [source[i] for i in range(len(source))]
  with pytest.raises(UserError, match=f"^{shard}: record 1: damaged"):
    source.__getitems__(list(range(len(source))))
