"""`medjax prepare` on a small, partly broken dataset: skips, split, records, resume."""

import argparse
import json
import sys
from pathlib import Path

import grain
import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest_data import SHAPE, affine, body, corrupt_gzip, mr_volume, save, truncate  # noqa: E402

from medjax.data import shards  # noqa: E402

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
  kw = {"spacing": (1.0, 1.0, 1.0), "size": SIZE, "context": 1, "split": (0.6, 0.2, 0.2),
        "seed": 3, "progress": False, **kw}
  return shards.prepare("phantom", root, out, ["t1w"], "t2w", **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("data") / "phantom"
  write_dataset(root)
  return root


@pytest.fixture(scope="module")
def prepared(dataset, tmp_path_factory):
  out = tmp_path_factory.mktemp("out") / "shards"
  return run(dataset, out), out


def test_bad_subjects_are_reported_and_the_rest_prepared(prepared, capsys):
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
  assert json.loads((out / "manifest.json").read_text()) == manifest


def test_split_is_disjoint_by_subject_and_deterministic(prepared):
  manifest, out = prepared
  splits = manifest["splits"]
  seen = [s for name in shards.SPLITS for s in splits[name]]
  assert len(seen) == len(set(seen))
  for name in shards.SPLITS:
    source = shards.ShardSlices(out, name) if splits[name] else []
    subjects = {int(source[i]["subject"]) for i in range(len(source))}
    assert subjects == {manifest["subjects"].index(s) for s in splits[name]}
  again = shards.split_subjects(manifest["subjects"], (0.6, 0.2, 0.2), 3)
  assert all(set(splits[n]) <= set(again[n]) for n in shards.SPLITS)


def test_split_subjects_properties():
  keys = [f"k{i:03d}" for i in range(100)]
  split = shards.split_subjects(keys, (0.8, 0.1, 0.1), seed=0)
  assert [len(split[n]) for n in shards.SPLITS] == [80, 10, 10]
  assert sorted(sum(split.values(), [])) == keys
  assert split == shards.split_subjects(list(reversed(keys)), (0.8, 0.1, 0.1), seed=0)
  assert split != shards.split_subjects(keys, (0.8, 0.1, 0.1), seed=1)
  three = shards.split_subjects(["a", "b", "c"], (0.8, 0.1, 0.1), seed=0)
  assert all(len(three[n]) == 1 for n in shards.SPLITS)


def test_records_equal_an_independent_numpy_computation(prepared, dataset):
  manifest, out = prepared
  index = manifest["subjects"].index("s00")
  split = next(n for n in shards.SPLITS if "s00" in manifest["splits"][n])
  source = shards.ShardSlices(out, split)
  records = sorted((source[i] for i in range(len(source)) if int(source[i]["subject"]) == index),
                   key=lambda r: int(r["slice"]))
  t1 = nib.load(dataset / "s00" / "t1w.nii.gz").get_fdata()
  t2 = nib.load(dataset / "s00" / "t2w.nii.gz").get_fdata()
  mask = np.asarray(nib.load(dataset / "s00" / "mask.nii.gz").dataobj) > 0

  def unit(volume):  # docs/design.md: MR 0.5th/99.5th percentile in the foreground → [-1, 1]
    lo, hi = np.percentile(volume[mask], [0.5, 99.5])
    return np.clip(2 * (volume - lo) / (hi - lo) - 1, -1, 1)

  def frame(volume, fill):  # the body is centred: x crops 2 each side, y pads 2 each side
    out_ = np.full(SIZE + volume.shape[2:], fill)
    out_[:, 2:26] = volume[2:22]
    return out_

  raw_t1 = t1
  t1, t2 = unit(t1), unit(t2)
  assert [int(r["slice"]) for r in records] == list(range(SHAPE[2]))
  for r in records:
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
  back = shards.decode(shards.encode(record))
  np.testing.assert_allclose(back["source"], record["source"], atol=0.5 / 32767 + 1e-7)
  np.testing.assert_array_equal(back["target"], record["target"])
  np.testing.assert_array_equal(back["mask"], record["mask"])
  assert (back["subject"], back["slice"]) == (12, -1)


def test_interrupted_prepare_resumes(dataset, prepared, tmp_path, monkeypatch):
  out = tmp_path / "shards"
  encode, written = shards.encode, []

  def interrupt_third_subject(record):
    written.append(int(record["subject"]))
    if len(set(written)) == 3:
      raise KeyboardInterrupt  # Ctrl-C in the middle of a shard
    return encode(record)

  monkeypatch.setattr(shards, "encode", interrupt_third_subject)
  with pytest.raises(KeyboardInterrupt):
    run(dataset, out)
  monkeypatch.setattr(shards, "encode", encode)
  finished = sorted(p.name for p in out.glob("*/*.array_record"))
  assert len(finished) == 2 and len(list(out.glob("*/*.tmp"))) == 1
  assert not json.loads((out / "manifest.json").read_text())["complete"]

  from medjax.data import volumes
  preprocess, calls = volumes.preprocess_subject, []

  def counted(subject, *args, **kwargs):
    calls.append(subject.id)
    return preprocess(subject, *args, **kwargs)

  monkeypatch.setattr(volumes, "preprocess_subject", counted)
  manifest = run(dataset, out)
  done_before = {name.removesuffix(".array_record") for name in finished}
  assert not done_before & set(calls) and len(calls) == 11 - 2 - 1  # bad_missing never loads
  assert not list(out.glob("*/*.tmp"))
  reference = prepared[0]
  for key in ("splits", "counts", "skipped", "normalisation", "subjects"):
    assert manifest[key] == reference[key], key


def test_other_settings_on_the_same_out_are_refused(prepared, dataset):
  with pytest.raises(shards.PrepareError, match="size"):
    run(dataset, prepared[1], size=(24, 24))


def test_strict_turns_skips_into_an_error(dataset, tmp_path):
  with pytest.raises(shards.PrepareError, match="bad_nan"):
    run(dataset, tmp_path / "strict", strict=True)
  assert json.loads((tmp_path / "strict" / "manifest.json").read_text())["complete"]


def test_command_line_and_worker_pool(dataset, prepared, tmp_path, capsys):
  parser = shards.add_prepare_args(argparse.ArgumentParser())
  argv = ["--layout", "phantom", "--root", str(dataset), "--out", str(tmp_path / "cli"),
          "--source", "T1w", "--target", "t2", "--spacing", "1", "--size", "20,28",
          "--context", "1", "--split", "0.6,0.2,0.2", "--seed", "3", "--workers", "2"]
  assert shards.prepare_main(parser.parse_args(argv)) == 0
  report = capsys.readouterr().err
  assert "skipped 5" in report and "bad_4d" in report
  manifest = shards.load_manifest(tmp_path / "cli")
  for key in ("splits", "counts", "skipped", "normalisation", "settings"):
    assert manifest[key] == prepared[0][key], key
  assert manifest["command"].startswith("medjax prepare --layout phantom")
  for name in shards.SPLITS:  # worker processes write the same bytes
    for path in (prepared[1] / name).glob("*.array_record"):
      assert (tmp_path / "cli" / name / path.name).read_bytes() == path.read_bytes()
  assert shards.prepare_main(parser.parse_args(argv + ["--strict"])) == 1


def test_bids_sessions_stay_in_one_split(tmp_path):
  rng = np.random.default_rng(0)
  for p in range(4):
    for s in (1, 2):
      anat = tmp_path / "bids" / f"sub-{p}" / f"ses-{s}" / "anat"
      for m in ("T1w", "T2w"):
        save(anat / f"sub-{p}_ses-{s}_{m}.nii.gz", mr_volume(rng))
  manifest = shards.prepare("bids", tmp_path / "bids", tmp_path / "out", ["t1w"], "t2w",
                            size=24, split=(0.5, 0.25, 0.25), progress=False)
  for name, subjects in manifest["splits"].items():
    for subject in subjects:
      other = subject.replace("ses-1", "ses-2") if "ses-1" in subject else (
          subject.replace("ses-2", "ses-1"))
      assert other in subjects, (name, subject)


def test_split_volumes_and_pickled_sources(prepared):
  import pickle
  manifest, out = prepared
  split = next(n for n in shards.SPLITS if manifest["splits"][n])
  volumes_ = shards.split_volumes(out, split)
  assert [v.subject for v in volumes_] == manifest["splits"][split]
  source = pickle.loads(pickle.dumps(shards.ShardSlices(out, split)))  # as grain workers get it
  records = [source[i] for i in range(len(source))]
  for volume in volumes_:
    index = manifest["subjects"].index(volume.subject)
    mine = sorted((r for r in records if int(r["subject"]) == index), key=lambda r: int(r["slice"]))
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
  manifest = shards.prepare("synthrad2025", tmp_path / "Task1", tmp_path / "out", ["mr"], "ct",
                            size=24, progress=False)
  assert manifest["counts"]["prepared"] == 3 and not manifest["skipped"]
  assert manifest["normalisation"]["1HNA001"]["ct"] == {"kind": "ct", "lo": -1024.0, "hi": 3000.0}
