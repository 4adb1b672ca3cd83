"""`medjax prepare` on a small, partly broken dataset: skips, split, records, resume, the
command line, and the one preprocessing path it shares with `medjax translate`."""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import grain
import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import ROOT  # noqa: E402
from conftest_data import SHAPE, affine, body, corrupt_gzip, mr_volume, save, truncate  # noqa: E402

from medjax import cli, files  # noqa: E402
from medjax.data import prepare, records, shards  # noqa: E402
from medjax.data.preprocess import preprocess  # noqa: E402
from medjax.errors import MedjaxError  # noqa: E402

SIZE = (20, 28)  # crops x (24 → 20), pads y (24 → 28)
BAD = {"bad_corrupt": "corrupt gzip", "bad_truncated": "truncated", "bad_4d": "4D",
       "bad_nan": "NaN", "bad_missing": "missing modality t2w"}


def cylinder():
  """A body in every slice, so that 2.5D context has to clamp at both ends."""
  return np.broadcast_to(body()[:, :, SHAPE[2] // 2, None], SHAPE)


def write_dataset(root: Path, good: int = 6):
  rng = np.random.default_rng(1)
  for s in range(good):
    folder = root / f"s{s:02d}"
    mask = cylinder() if s == 0 else body()
    a = affine(angle_deg=15, flips=(-1, 1, 1)) if s == 1 else affine()
    save(folder / "t1w.nii.gz", mr_volume(rng, mask=mask), a)
    save(folder / "mask.nii.gz", mask, a, np.uint8)
    if s == 2:  # t2w on its own, coarser grid
      save(folder / "t2w.nii.gz", mr_volume(rng, (16, 16, 12)), affine((1.5, 1.5, 1.0), 5))
    else:
      save(folder / "t2w.nii.gz", mr_volume(rng, mask=mask), a)
  for name in BAD:
    folder = root / name
    save(folder / "t1w.nii.gz", mr_volume(rng))
    save(folder / "mask.nii.gz", body(), None, np.uint8)
    if name != "bad_missing":
      save(folder / "t2w.nii.gz", mr_volume(rng))
  corrupt_gzip(root / "bad_corrupt" / "t2w.nii.gz")
  truncate(root / "bad_truncated" / "t1w.nii.gz")
  save(root / "bad_4d" / "t2w.nii.gz", np.stack([mr_volume(rng)] * 2, -1))
  nan = mr_volume(rng)
  nan[5, 5, 5] = np.nan
  save(root / "bad_nan" / "t1w.nii.gz", nan)


def run(root, out, **kw):
  kw = {"spacing": (1.0, 1.0, 1.0), "size": SIZE, "context": 1, "fractions": (0.6, 0.2, 0.2),
        "seed": 3, "progress": False, **kw}
  return prepare.prepare("phantom", root, out, ["t1w"], "t2w", **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("data") / "phantom"
  write_dataset(root)
  return root


@pytest.fixture(scope="module")
def prepared(dataset, tmp_path_factory):
  out = tmp_path_factory.mktemp("out") / "shards"
  return run(dataset, out), out


def all_shards(out) -> list[Path]:
  return [p for name in prepare.SPLITS for p in shards.shard_paths(out, name)]


def temporaries(out) -> list[Path]:
  """Every `files.atomic_write` temporary under `out`, hidden ones included."""
  return sorted(p for p in Path(out).rglob("*") if p.name.startswith(files.TMP_PREFIX))


def test_bad_subjects_are_reported_and_the_rest_prepared(prepared):
  manifest, out = prepared
  assert manifest["complete"] and manifest["counts"]["found"] == 11
  reasons = {s["subject"]: s["reason"] for s in manifest["skipped"]}
  assert sorted(reasons) == sorted(BAD)
  for subject, words in BAD.items():
    assert words in reasons[subject], (subject, reasons[subject])
  assert "t2w.nii.gz" in reasons["bad_corrupt"] and "t1w.nii.gz" in reasons["bad_nan"]
  prepared_ids = sorted(sum(manifest["splits"].values(), []))
  assert prepared_ids == [f"s{s:02d}" for s in range(6)]
  assert manifest["geometry"]["s02"]["off_grid"] == ["t2w"]
  assert manifest["channels"] == {"source": ["t1w[z-1]", "t1w[z+0]", "t1w[z+1]"],
                                  "target": ["t2w"]}
  assert manifest["settings"] == {"layout": "phantom", "fractions": [0.6, 0.2, 0.2],
                                  "seed": 3, "storage": records.STORAGE}
  # Every prepared subject has a mask file: the recipe says so, for `translate` to know.
  assert manifest["recipe"] == {"sources": ["t1w"], "targets": ["t2w"],
                                "spacing": [1.0, 1.0, 1.0], "size": list(SIZE), "context": 1,
                                "register": None, "mask": "file"}
  assert shards.recipe(out).size == SIZE and shards.recipe(out).context == 1
  assert json.loads((out / "manifest.json").read_text()) == manifest


def test_split_is_disjoint_by_subject_and_deterministic(prepared):
  manifest, out = prepared
  splits = manifest["splits"]
  seen = [s for name in prepare.SPLITS for s in splits[name]]
  assert len(seen) == len(set(seen))
  for name in prepare.SPLITS:
    source = shards.ShardSlices(out, name) if splits[name] else []
    subjects = {int(source[i]["subject"]) for i in range(len(source))}
    assert subjects == {manifest["subjects"].index(s) for s in splits[name]}
  again = prepare.split_subjects(manifest["subjects"], (0.6, 0.2, 0.2), 3)
  assert all(set(splits[n]) <= set(again[n]) for n in prepare.SPLITS)


def test_split_subjects_properties():
  keys = [f"k{i:03d}" for i in range(100)]
  split = prepare.split_subjects(keys, (0.8, 0.1, 0.1), seed=0)
  assert [len(split[n]) for n in prepare.SPLITS] == [80, 10, 10]
  assert sorted(sum(split.values(), [])) == keys
  assert split == prepare.split_subjects(list(reversed(keys)), (0.8, 0.1, 0.1), seed=0)
  assert split != prepare.split_subjects(keys, (0.8, 0.1, 0.1), seed=1)
  three = prepare.split_subjects(["a", "b", "c"], (0.8, 0.1, 0.1), seed=0)
  assert all(len(three[n]) == 1 for n in prepare.SPLITS)
  with pytest.raises(prepare.PrepareError, match="3 non-negative numbers"):
    prepare.split_subjects(keys, (0.8, 0.2))


def test_records_equal_an_independent_numpy_computation(prepared, dataset):
  manifest, out = prepared
  index = manifest["subjects"].index("s00")
  split = next(n for n in prepare.SPLITS if "s00" in manifest["splits"][n])
  source = shards.ShardSlices(out, split)
  subject_records = sorted(
      (source[i] for i in range(len(source)) if int(source[i]["subject"]) == index),
      key=lambda r: int(r["slice"]))
  t1 = nib.load(dataset / "s00" / "t1w.nii.gz").get_fdata()
  t2 = nib.load(dataset / "s00" / "t2w.nii.gz").get_fdata()
  mask = np.asarray(nib.load(dataset / "s00" / "mask.nii.gz").dataobj) > 0

  def unit(volume):  # MR: 0.5th/99.5th percentile in the foreground → [-1, 1]
    lo, hi = np.percentile(volume[mask], [0.5, 99.5])
    return np.clip(2 * (volume - lo) / (hi - lo) - 1, -1, 1)

  def frame(volume, fill):  # the body is centred: x crops 2 each side, y pads 2 each side
    out_ = np.full(SIZE + volume.shape[2:], fill)
    out_[:, 2:26] = volume[2:22]
    return out_

  raw_t1 = t1
  t1, t2 = unit(t1), unit(t2)
  assert [int(r["slice"]) for r in subject_records] == list(range(SHAPE[2]))
  for r in subject_records:
    z = int(r["slice"])
    near = np.clip([z - 1, z, z + 1], 0, SHAPE[2] - 1)
    assert r["source"].shape == SIZE + (3,) and r["source"].dtype == np.float32
    np.testing.assert_allclose(r["source"], frame(t1[:, :, near], -1.0), atol=2e-5)
    np.testing.assert_allclose(r["target"][..., 0], frame(t2[:, :, z], -1.0), atol=2e-5)
    np.testing.assert_array_equal(r["mask"][..., 0], frame(mask[:, :, z], 0.0))
  norm = manifest["normalisation"]["s00"]["t1w"]
  np.testing.assert_allclose([norm["lo"], norm["hi"]], np.percentile(raw_t1[mask], [0.5, 99.5]),
                             rtol=1e-6)


def test_empty_slices_are_dropped(prepared):
  manifest, out = prepared
  # s03's body leaves its two end slices at each side empty (conftest_data.body).
  assert manifest["slices"]["s03"] == list(range(2, 10))
  split = next(n for n in prepare.SPLITS if "s03" in manifest["splits"][n])
  kept = [int(r["slice"]) for r in shards.read_shard(prepare.shard_path(out, split, "s03"))]
  assert sorted(kept) == list(range(2, 10))


def test_shards_feed_a_grain_dataset(prepared):
  manifest, out = prepared
  source = shards.ShardSlices(out, "train")
  assert len(source) == manifest["counts"]["slices"]["train"]
  batch = next(iter(grain.MapDataset.source(source).shuffle(seed=0).batch(4)))
  assert batch["source"].shape == (4,) + SIZE + (3,) and batch["subject"].shape == (4,)


def test_encode_decode_round_trip():
  rng = np.random.default_rng(0)
  record = {"source": rng.uniform(-1, 1, (5, 7, 3)).astype(np.float32),
            "target": np.array([-1.0, 1.0, 0.0, -1.0] * 35, np.float32).reshape(5, 7, 4),
            "mask": (rng.random((5, 7, 1)) > 0.5).astype(np.float32),
            "subject": np.int32(12), "slice": np.int32(-1)}
  data = records.encode(record)
  back = records.decode(data)
  np.testing.assert_allclose(back["source"], record["source"], atol=0.5 / 32767 + 1e-7)
  np.testing.assert_array_equal(back["target"], record["target"])
  np.testing.assert_array_equal(back["mask"], record["mask"])
  assert (back["subject"], back["slice"]) == (12, -1)
  # int16 codes: round(unit · 32767), read independently of `decode`.
  codes = np.frombuffer(data, "<i2", 5 * 7 * 3, 20)
  np.testing.assert_array_equal(codes, np.round(record["source"] * 32767).ravel())
  for broken, words in ((data[:10], "shorter than its header"), (data[:-1], "promises"),
                        (b"XXXX" + data[4:], "not a medjax slice record")):
    with pytest.raises(ValueError, match=words):
      records.decode(broken)


def test_interrupted_prepare_leaves_no_temporary_and_resumes(dataset, prepared, tmp_path,
                                                             monkeypatch):
  out = tmp_path / "shards"
  encode, written = records.encode, []

  def interrupt_third_subject(record):
    written.append(int(record["subject"]))
    if len(set(written)) == 3 and written.count(written[-1]) == 2:
      raise KeyboardInterrupt  # Ctrl-C with one slice of the third shard written
    return encode(record)

  monkeypatch.setattr(records, "encode", interrupt_third_subject)
  with pytest.raises(KeyboardInterrupt):
    run(dataset, out)
  monkeypatch.setattr(records, "encode", encode)
  assert written.count(written[-1]) == 2  # it did stop inside a shard
  assert temporaries(out) == []
  finished = all_shards(out)
  assert len(finished) == 2
  assert not json.loads((out / "manifest.json").read_text())["complete"]
  for path in finished:  # what the loader finds is whole
    meta = json.loads(path.with_name(path.name.replace(".array_record", ".json")).read_text())
    assert sorted(int(r["slice"]) for r in shards.read_shard(path)) == meta["slices"]

  calls = []

  def counted(files_, recipe, **kwargs):
    calls.append(kwargs["subject_id"])
    return preprocess(files_, recipe, **kwargs)

  monkeypatch.setattr(prepare, "preprocess", counted)
  manifest = run(dataset, out)
  done_before = {path.name.removesuffix(".array_record") for path in finished}
  assert not done_before & set(calls) and len(calls) == 11 - 2 - 1  # bad_missing never loads
  assert temporaries(out) == []
  reference_manifest, reference = prepared
  for key in ("splits", "counts", "skipped", "normalisation", "subjects", "recipe"):
    assert manifest[key] == reference_manifest[key], key
  for path in all_shards(out):
    assert path.read_bytes() == (reference / path.relative_to(out)).read_bytes(), path


# A prepare killed (SIGKILL, OOM, power cut) in the middle of the third shard: nothing of
# `atomic_write` runs, so its temporary stays on disk.
KILL_IN_THIRD_SHARD = """
import os, signal, sys
from medjax.data import prepare, records
encode, seen = records.encode, []
def encode_then_die(record):
  seen.append(int(record["subject"]))
  if len(set(seen)) == 3 and seen.count(seen[-1]) == 2:
    os.kill(os.getpid(), signal.SIGKILL)
  return encode(record)
records.encode = encode_then_die
prepare.prepare("phantom", sys.argv[1], sys.argv[2], ["t1w"], "t2w", spacing=(1.0, 1.0, 1.0),
                size=(20, 28), context=1, fractions=(0.6, 0.2, 0.2), seed=3, progress=False)
"""


@pytest.fixture(scope="module")
def killed(dataset, tmp_path_factory):
  out = tmp_path_factory.mktemp("killed") / "shards"
  process = subprocess.run([sys.executable, "-c", KILL_IN_THIRD_SHARD, str(dataset), str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert process.returncode == -9, process.stderr
  (stale,) = temporaries(out)
  assert stale.name.startswith(files.TMP_PREFIX) and stale.name.endswith(".array_record")
  return out, stale


def test_a_killed_prepare_leaves_nothing_the_loader_reads(killed, tmp_path):
  out = tmp_path / "shards"
  shutil.copytree(killed[0], out)
  stale = out / killed[1].relative_to(killed[0])
  assert stale.exists()
  found = all_shards(out)
  assert stale not in found  # a killed prepare's hidden temporary is never read
  assert len(found) == 2 and all(not p.name.startswith(".") for p in found)
  split = stale.parent.name
  if shards.shard_paths(out, split):
    source = shards.ShardSlices(out, split)
    assert len(source) == sum(len(shards.read_shard(p)) for p in shards.shard_paths(out, split))
    assert len(shards.split_volumes(out, split)) == len(shards.shard_paths(out, split))


def test_a_rerun_after_a_kill_removes_the_temporary_and_finishes(killed, prepared, dataset,
                                                                 tmp_path):
  out = tmp_path / "shards"
  shutil.copytree(killed[0], out)
  manifest = run(dataset, out)
  assert temporaries(out) == []
  assert manifest["complete"] and manifest["splits"] == prepared[0]["splits"]
  for path in all_shards(prepared[1]):
    assert (out / path.relative_to(prepared[1])).read_bytes() == path.read_bytes(), path


def test_other_settings_on_the_same_out_are_refused(prepared, dataset):
  with pytest.raises(prepare.PrepareError, match="size"):
    run(dataset, prepared[1], size=(24, 24))
  with pytest.raises(prepare.PrepareError, match="fractions"):
    run(dataset, prepared[1], fractions=(0.5, 0.25, 0.25))


def test_strict_turns_skips_into_an_error(dataset, tmp_path):
  # The kind of error is the command line's business (test_command_line_and_worker_pool).
  with pytest.raises(MedjaxError, match="bad_nan"):
    run(dataset, tmp_path / "strict", strict=True)
  assert json.loads((tmp_path / "strict" / "manifest.json").read_text())["complete"]


def cli_prepare(dataset, out, *flags):
  return cli.main(["medjax", "prepare", "--layout", "phantom", "--input-dir", str(dataset),
                   "--output-dir", str(out), *flags])


def test_command_line_and_worker_pool(dataset, prepared, tmp_path, capsys, monkeypatch):
  flags = ["--source", "T1w", "--target", "t2", "--spacing", "1", "--size", "20x28",
           "--context", "1", "--fractions", "0.6,0.2,0.2", "--seed", "3"]
  out = tmp_path / "cli"
  assert cli_prepare(dataset, out, *flags, "--workers", "2") == 0
  report = capsys.readouterr().err
  assert "skipped 5" in report and "bad_4d" in report
  manifest = shards.load_manifest(out)
  for key in ("splits", "counts", "skipped", "normalisation", "settings", "recipe"):
    assert manifest[key] == prepared[0][key], key
  for path in all_shards(prepared[1]):  # worker processes write the same bytes
    for twin in (path, path.with_name(path.name.replace(".array_record", ".json"))):
      assert (out / twin.relative_to(prepared[1])).read_bytes() == twin.read_bytes(), twin
  assert temporaries(out) == []

  # The recorded command is the same request: a rerun of it prepares nothing again.
  command = shlex.split(manifest["command"])
  assert command[:4] == ["medjax", "prepare", "--layout", "phantom"]
  calls = []
  monkeypatch.setattr(prepare, "preprocess",
                      lambda files_, recipe, **kw: calls.append(kw["subject_id"]) or preprocess(
                          files_, recipe, **kw))
  assert cli.main(command) == 0
  assert sorted(calls) == sorted(set(BAD) - {"bad_missing"})  # only the broken ones retry
  capsys.readouterr()

  status = cli_prepare(dataset, out, *flags, "--strict")
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines[-1].startswith("medjax prepare: error: 5 subject(s) skipped under --strict")
  assert "bad_nan" in lines[-1] and shards.load_manifest(out)["complete"]
  assert status == 1  # a partial failure: the other subjects and the manifest are written


def test_command_line_mistakes_are_one_line_and_write_nothing(dataset, tmp_path, capsys):
  out = tmp_path / "never"
  request = ["--source", "t1w", "--target", "t2w"]
  for flags, words in [
      (request + ["--split", "0.6,0.2,0.2"], "--split: the split fractions are now --fractions"),
      (request + ["--fractions", "0.6,0.2"], "--fractions"),
      (request + ["--size", "20x0"], "--size"),
      (["--source", "dwi", "--target", "t2w"], "unknown modality 'dwi'"),
      (request + ["--register", "affine"], "--register")]:
    assert cli_prepare(dataset, out, *flags) == 2, flags
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medjax prepare: error: "), lines
    assert words in lines[0], (words, lines[0])
  missing = tmp_path / "no_such_dataset"
  assert cli.main(["medjax", "prepare", "--layout", "phantom", "--input-dir", str(missing),
                   "--output-dir", str(out), *request]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and str(missing) in lines[0]
  assert not out.exists()


def test_a_split_may_have_no_share(dataset, tmp_path, capsys):
  """0,0,1: a folder of test subjects only (the library takes non-negative shares)."""
  status = cli_prepare(dataset, tmp_path / "test_only", "--source", "t1w", "--target", "t2w",
                       "--size", "20x28", "--fractions", "0,0,1")
  assert status == 0, capsys.readouterr().err
  manifest = shards.load_manifest(tmp_path / "test_only")
  assert manifest["counts"]["subjects"] == {"train": 0, "val": 0, "test": 6}


def test_bids_sessions_stay_in_one_split(tmp_path):
  rng = np.random.default_rng(0)
  for p in range(4):
    for s in (1, 2):
      anat = tmp_path / "bids" / f"sub-{p}" / f"ses-{s}" / "anat"
      for m in ("T1w", "T2w"):
        save(anat / f"sub-{p}_ses-{s}_{m}.nii.gz", mr_volume(rng))
  manifest = prepare.prepare("bids", tmp_path / "bids", tmp_path / "out", ["t1w"], "t2w",
                             size=24, fractions=(0.5, 0.25, 0.25), progress=False)
  for name, subjects in manifest["splits"].items():
    for subject in subjects:
      other = subject.replace("ses-1", "ses-2") if "ses-1" in subject else (
          subject.replace("ses-2", "ses-1"))
      assert other in subjects, (name, subject)


def write_csv_dataset(root: Path, ids) -> Path:
  rng = np.random.default_rng(0)
  rows = ["subject,t1w,t2w"]
  for i, sid in enumerate(ids):
    t1 = save(root / "images" / f"{i}_t1w.nii.gz", mr_volume(rng))
    t2 = save(root / "images" / f"{i}_t2w.nii.gz", mr_volume(rng))
    rows.append(f"{sid},{t1},{t2}")
  (root / "subjects.csv").write_text("\n".join(rows) + "\n")
  return root / "subjects.csv"


def test_subject_ids_become_file_names_inside_their_split(tmp_path):
  ids = ["../escape", "site/a", "plain"]
  table = write_csv_dataset(tmp_path / "data", ids)
  out = tmp_path / "out" / "shards"
  prepare.prepare("csv", table, out, ["t1w"], "t2w", size=24, fractions=(1, 0, 0),
                  progress=False)
  written = sorted(p.relative_to(tmp_path / "out").as_posix()
                   for p in (tmp_path / "out").rglob("*") if p.is_file())
  assert written == sorted(["shards/manifest.json"] + [
      f"shards/train/{stem}{suffix}" for stem in ("__escape", "site__a", "plain")
      for suffix in (".array_record", ".json")])
  assert sorted(v.subject for v in shards.split_volumes(out, "train")) == sorted(ids)


def test_ids_that_share_a_file_name_keep_their_own_shards(tmp_path):
  table = write_csv_dataset(tmp_path / "data", ["p/1", "p__1"])  # both → p__1
  out = tmp_path / "out"
  with pytest.raises(prepare.PrepareError) as refused:
    prepare.prepare("csv", table, out, ["t1w"], "t2w", size=24, fractions=(1, 0, 0),
                    progress=False)
  assert "p/1" in str(refused.value) and "p__1" in str(refused.value)
  assert not list(out.glob("*/*.array_record"))  # refused before anything was written


def test_split_volumes_and_pickled_sources(prepared):
  import pickle
  manifest, out = prepared
  split = next(n for n in prepare.SPLITS if manifest["splits"][n])
  volumes_ = shards.split_volumes(out, split)
  assert [v.subject for v in volumes_] == manifest["splits"][split]
  source = pickle.loads(pickle.dumps(shards.ShardSlices(out, split)))  # as grain workers get it
  split_records = [source[i] for i in range(len(source))]
  for volume in volumes_:
    index = manifest["subjects"].index(volume.subject)
    mine = sorted((r for r in split_records if int(r["subject"]) == index),
                  key=lambda r: int(r["slice"]))
    assert [int(r["slice"]) for r in mine] == manifest["slices"][volume.subject]
    np.testing.assert_array_equal(volume.target, np.stack([r["target"] for r in mine]))
    np.testing.assert_array_equal(volume.source, np.stack([r["source"] for r in mine]))
    assert volume.target_params == manifest["normalisation"][volume.subject]["t2w"]


def test_synthrad2025_mha_through_prepare(tmp_path):
  import SimpleITK as sitk
  rng = np.random.default_rng(0)
  from conftest_data import ct_volume
  for sid in ("1HNA001", "1HNA002", "1HNA003"):
    folder = tmp_path / "Task1" / "HN" / sid
    for name, volume in (("mr", mr_volume(rng)), ("ct", ct_volume(rng)),
                         ("mask", body().astype(np.float32))):
      nifti = save(tmp_path / "tmp" / f"{sid}_{name}.nii.gz", volume, affine(angle_deg=10))
      folder.mkdir(parents=True, exist_ok=True)
      sitk.WriteImage(sitk.ReadImage(str(nifti)), str(folder / f"{name}.mha"))
  manifest = prepare.prepare("synthrad2025", tmp_path / "Task1", tmp_path / "out", ["mr"], "ct",
                             size=24, progress=False)
  assert manifest["counts"]["prepared"] == 3 and not manifest["skipped"]
  assert manifest["normalisation"]["1HNA001"]["ct"] == {"kind": "ct", "lo": -1024.0, "hi": 3000.0}


# --- one preprocessing path: `medjax prepare` and `medjax translate` make the same slices ---

QUANTUM = 0.5 / 32767 + 1e-7  # the int16 storage of the shards (medjax/data/records.py)


def write_two_grid_subject(root: Path, with_mask: bool) -> Path:
  """t1w oblique and left-right flipped; pd, the second source, on its own coarser,
  rotated and shifted grid; t2w on t1w's."""
  rng = np.random.default_rng(7)
  folder = root / "s0"
  a = affine(angle_deg=12, flips=(-1, 1, 1))
  save(folder / "t1w.nii.gz", mr_volume(rng), a)
  save(folder / "t2w.nii.gz", mr_volume(rng), a)
  pd_shape = (18, 18, 10)
  pd_affine = affine((1.4, 1.3, 1.5), angle_deg=-20, shape=pd_shape)
  pd_affine[:3, 3] += (1.0, -1.5, 0.5)
  save(folder / "pd.nii.gz", mr_volume(rng, pd_shape), pd_affine)
  if with_mask:
    save(folder / "mask.nii.gz", body(), a, np.uint8)
  return folder


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask_file", "automatic_mask"])
def test_prepare_and_translate_make_the_same_model_input(tmp_path, with_mask, monkeypatch):
  folder = write_two_grid_subject(tmp_path / "data", with_mask)
  out = tmp_path / "shards"
  made = []

  def kept(files_, recipe, **kwargs):
    made.append(preprocess(files_, recipe, **kwargs))
    return made[-1]

  monkeypatch.setattr(prepare, "preprocess", kept)
  assert cli.main(["medjax", "prepare", "--layout", "phantom", "--input-dir",
                   str(tmp_path / "data"), "--output-dir", str(out), "--source", "t1w,pd",
                   "--target", "t2w", "--spacing", "1.2x1.2x1.5", "--size", "16x24",
                   "--context", "1"]) == 0
  (by_prepare,) = made
  (split,) = [name for name, ids in shards.load_manifest(out)["splits"].items() if ids]
  shard = sorted(shards.read_shard(prepare.shard_path(out, split, "s0")),
                 key=lambda r: int(r["slice"]))

  # What `infer.translate_file` does with the run's recipe (the shards' own) and the files.
  recipe = shards.recipe(out)
  assert recipe.sources == ("t1w", "pd") and recipe.context == 1
  inputs = [folder / "t1w.nii.gz", folder / "pd.nii.gz"]
  mask = folder / "mask.nii.gz" if with_mask else None
  given = dict(zip(recipe.sources, inputs)) | ({"mask": Path(mask)} if mask else {})
  by_translate = preprocess(given, recipe, subject_id=inputs[0].name, targets=False)
  model_source = by_translate.model_source(recipe.context)

  # The case this is about: a second modality resampled from another grid, 2.5D context.
  assert by_translate.geometry["off_grid"] == ["pd"] == by_prepare.geometry["off_grid"]
  assert by_translate.geometry["mask"] == by_prepare.geometry["mask"] == (
      "file" if with_mask else "auto")
  assert model_source.shape[1:] == (16, 24, 6)
  slices = [int(r["slice"]) for r in shard]
  assert slices == by_translate.foreground_slices().tolist() and len(slices) >= 6
  for record in shard:
    z = int(record["slice"])
    assert np.abs(record["source"] - model_source[z]).max() <= QUANTUM, z
    np.testing.assert_array_equal(record["mask"], by_translate.mask[z])
  # Same normalisation: the one fit from the same voxels in the same mask.
  assert by_translate.normalisation == {m: by_prepare.normalisation[m] for m in recipe.sources}
  assert shards.load_manifest(out)["normalisation"]["s0"] == by_prepare.normalisation
  for key in ("grid_affine", "grid_shape", "crop_start", "original_affine", "ras_affine"):
    assert by_translate.geometry[key] == by_prepare.geometry[key], key


def test_a_size_that_cuts_the_body_is_reported(dataset, tmp_path, capsys):
  """`--size` crops in-plane around the body; when the body does not fit, prepare says how
  much of it was lost (the body of these subjects spans 16 of 24 voxels across)."""
  flags = ["--source", "t1w", "--target", "t2w", "--fractions", "0.6,0.2,0.2"]
  assert cli_prepare(dataset, tmp_path / "cut", *flags, "--size", "10x10") == 0
  err = capsys.readouterr().err
  assert "--size 10x10 cuts off part of the body" in err
  cut = shards.load_manifest(tmp_path / "cut")["geometry"]
  for subject, geometry in cut.items():
    mask = np.asarray(nib.load(dataset / subject / "mask.nii.gz").dataobj) > 0
    across = max(np.ptp(np.flatnonzero(mask.any((1, 2)))), np.ptp(np.flatnonzero(mask.any((0, 2)))))
    assert across >= 10 and geometry["body_cropped"] > 0.1, (subject, geometry["body_cropped"])
  assert cli_prepare(dataset, tmp_path / "whole", *flags, "--size", "24x24") == 0
  assert "cuts off" not in capsys.readouterr().err
  whole = shards.load_manifest(tmp_path / "whole")["geometry"]
  assert all(g["body_cropped"] == 0.0 for g in whole.values())


def test_3d_patch_reader_reads_the_volumes_split_volumes_rebuilds(prepared):
  """ShardVolumes (3D training reads a few slices at a time) and split_volumes (evaluation
  reads whole shards) see the same subject volumes."""
  from medjax.data import patches
  _, out = prepared
  store = patches.ShardVolumes(out, "train")
  volumes = shards.split_volumes(out, "train")  # sorted by subject = by shard stem here
  assert len(store) == len(volumes) >= 2
  for position, volume in enumerate(volumes):
    depth = volume.source.shape[0]
    assert store.shape(position) == volume.source.shape[:3]
    for z0, z1 in ((0, depth), (1, min(depth, 4))):
      window = store.window(position, z0, z1)
      for key in ("source", "target", "mask"):
        np.testing.assert_array_equal(window[key], getattr(volume, key)[z0:z1])
    points = store.foreground(position)
    assert len(points) and (volume.mask[tuple(points.T)][..., 0] == 1).all()
