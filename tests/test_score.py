"""`medjax score`: files matched by subject, CSV and JSON written, bad subjects reported.

The metric maths is tested against scikit-image in test_metrics.py; here the reference
is `metrics.score` called on the arrays directly, so what is checked is the file side.
"""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from medjax import cli, metrics, score

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def save(path, data, affine=AFFINE):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), path)


def ct_subject(rng, shape=(24, 22, 16)):
  """A body of soft tissue and bone in HU, a prediction with errors, and the body mask."""
  x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
  mask = x ** 2 / 0.8 + y ** 2 / 0.7 + z ** 2 / 0.9 < 1
  target = np.where(mask, 40 + 1200 * (np.abs(x) > 0.6) + 30 * rng.standard_normal(shape),
                    -1000)
  pred = target + 80 * rng.standard_normal(shape) + 50 * y
  return pred, target, mask


@pytest.fixture
def folders(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {}
  for sid in ("s01", "s02", "s03"):
    pred, target, mask = ct_subject(rng)
    save(tmp_path / "pred" / f"{sid}.nii.gz", pred)
    # The targets are a SynthRAD-style dataset: <id>/ct.nii.gz beside <id>/mask.nii.gz.
    save(tmp_path / "data" / "Task1" / "brain" / sid / "ct.nii.gz", target)
    save(tmp_path / "data" / "Task1" / "brain" / sid / "mr.nii.gz", target)
    save(tmp_path / "data" / "Task1" / "brain" / sid / "mask.nii.gz", mask)
    save(tmp_path / "target" / f"{sid}.nii.gz", target)
    save(tmp_path / "mask" / f"{sid}.nii.gz", mask)
    arrays[sid] = (pred, target, mask)
  return tmp_path, arrays


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@pytest.mark.parametrize("dataset", [False, True])
def test_scores_every_subject_and_writes_csv_and_summary(folders, dataset, capsys):
  root, arrays = folders
  out = root / "results" / "scores.csv"
  target = (["--target-dir", str(root / "data"), "--layout", "synthrad2023"] if dataset
            else ["--target-dir", str(root / "target"), "--mask-dir", str(root / "mask")])
  assert cli.main(["medjax", "score", "--pred-dir", str(root / "pred"), *target,
                   "--protocol", "synthrad2023", "--output", str(out)]) == 0
  rows = read_csv(out)
  assert [r["subject"] for r in rows] == ["s01", "s02", "s03"]
  for row in rows:
    pred, target_hu, mask = arrays[row["subject"]]
    expected = metrics.score(pred.astype(np.float32), target_hu.astype(np.float32), mask,
                             protocol="synthrad2023", axial_axis=2)  # RAS files: z last
    assert set(expected) == set(row) - {"subject"}
    for name, value in expected.items():
      assert float(row[name]) == pytest.approx(value, rel=1e-6)
  summary = json.loads(out.with_suffix(".json").read_text())
  assert summary["protocol"] == "synthrad2023" and summary["subjects"] == 3
  assert summary["failed"] == {}
  maes = np.array([float(r["mae"]) for r in rows])
  assert summary["metrics"]["mae"]["mean"] == pytest.approx(maes.mean())
  assert summary["metrics"]["mae"]["std"] == pytest.approx(maes.std())
  assert summary["metrics"]["mae"]["median"] == pytest.approx(np.median(maes))
  printed = capsys.readouterr().out
  assert "s02" in printed and "mean ± std" in printed and "median" in printed


def test_mri_scores_targets_on_their_robust_unit_range(tmp_path):
  rng = np.random.default_rng(1)
  shape = (24, 24, 16)
  mask = np.zeros(shape, bool)
  mask[3:-3, 4:-4, 2:-2] = True
  target = np.where(mask, 300 + 200 * rng.random(shape), 0)
  lo, hi = np.percentile(target[mask], (0.5, 99.5))
  unit_target = np.clip((target - lo) / (hi - lo), 0, 1)
  pred = np.clip(unit_target + 0.05 * rng.standard_normal(shape), 0, 1)
  save(tmp_path / "pred" / "a.nii.gz", pred)
  save(tmp_path / "target" / "a.nii.gz", target)
  save(tmp_path / "mask" / "a.nii.gz", mask)
  assert cli.main(["medjax", "score", "--pred-dir", str(tmp_path / "pred"), "--target-dir",
                   str(tmp_path / "target"), "--mask-dir", str(tmp_path / "mask"),
                   "--protocol", "mri"]) == 0
  row, = read_csv(tmp_path / "pred" / "scores.csv")
  expected = metrics.score(pred.astype(np.float32), unit_target.astype(np.float32), mask,
                           protocol="mri", axial_axis=2)
  for name, value in expected.items():
    assert float(row[name]) == pytest.approx(value, rel=1e-4, abs=1e-6)


def test_a_bad_subject_is_reported_and_the_others_scored(folders, capsys):
  root, arrays = folders
  save(root / "pred" / "s02.nii.gz", arrays["s02"][0][:, :, :-1])  # another grid
  save(root / "mask" / "s03.nii.gz", np.zeros_like(arrays["s03"][2]))  # an empty mask
  save(root / "pred" / "s04.nii.gz", arrays["s01"][0])  # a prediction without a target
  out = root / "scores.csv"
  assert cli.main(["medjax", "score", "--pred-dir", str(root / "pred"), "--target-dir",
                   str(root / "target"), "--mask-dir", str(root / "mask"), "--protocol",
                   "synthrad2023", "--output", str(out)]) == 1
  *subject_lines, last = capsys.readouterr().err.strip().splitlines()
  assert last.startswith("medjax score: error: 3 subject(s)")
  lines = {line.split(":")[1].strip(): line for line in subject_lines}
  assert set(lines) == {"s02", "s03", "s04"}
  assert "s02.nii.gz" in lines["s02"] and "grid" in lines["s02"]
  assert "s03.nii.gz" in lines["s03"] and "empty mask" in lines["s03"]
  assert "s04.nii.gz" in lines["s04"] and "no target" in lines["s04"]
  assert [r["subject"] for r in read_csv(out)] == ["s01"]
  summary = json.loads(out.with_suffix(".json").read_text())
  assert sorted(summary["failed"]) == ["s02", "s03", "s04"]


def test_nothing_to_score_is_one_line(folders, capsys):
  root, _ = folders
  assert cli.main(["medjax", "score", "--pred-dir", str(root / "nowhere"), "--target-dir",
                   str(root / "target"), "--protocol", "synthrad2023"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("medjax score: error:") and "nowhere" in err
  assert len(err.splitlines()) == 1


def test_report_has_a_picture_per_subject_and_a_page_linking_them(folders):
  root, _ = folders
  report = root / "report"
  assert cli.main(["medjax", "score", "--pred-dir", str(root / "pred"), "--target-dir",
                   str(root / "data"), "--layout", "synthrad2023", "--protocol",
                   "synthrad2023", "--report-dir", str(report)]) == 0
  page = (report / "report.md").read_text()
  for sid in ("s01", "s02", "s03"):
    image = report / f"{sid}.png"
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"({sid}.png)" in page and f"| {sid} |" in page
  assert "mae" in page and "ssim" in page


def test_evaluation_volumes_make_the_same_report(tmp_path):
  """`medjax evaluate`'s (Z, H, W, C) volumes go through `figures.evaluation_subjects`."""
  from medjax import evaluate, figures
  from medjax.data.preprocess import Volume
  rng = np.random.default_rng(2)
  unit = lambda: rng.uniform(-1, 1, (6, 16, 12, 1)).astype(np.float32)
  volume = Volume("phantom_007", unit(), unit(), np.ones((6, 16, 12, 1), np.float32),
                  {"kind": "mr", "lo": 0.0, "hi": 1.0})
  prediction = evaluate.Prediction(unit(), np.abs(unit()))
  row = {"subject": "phantom_007", "model_mae": 0.1, "baseline_mae": 0.2}
  subject, = figures.evaluation_subjects([volume], [prediction], [row], "t2w")
  assert subject.prediction.shape == (16, 12, 6) and subject.metrics == {"mae": 0.1}
  np.testing.assert_allclose(subject.target[:, :, 2], (volume.target[2, ..., 0] + 1) / 2)
  page = figures.write_report(tmp_path, [subject], protocol="mri")
  assert "(phantom_007.png)" in open(page).read() and (tmp_path / "phantom_007.png").exists()


@pytest.mark.parametrize("axcodes,axis", [("RAS", 2), ("LPS", 2), ("SAR", 0), ("ASL", 1)])
def test_axial_axis_is_the_files_inferior_superior_axis(axcodes, axis):
  directions = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0),
                "S": (0, 0, 1), "I": (0, 0, -1)}
  affine = np.eye(4)
  affine[:3, :3] = np.array([directions[c] for c in axcodes]).T * 2.5
  assert nib.aff2axcodes(affine) == tuple(axcodes)
  assert score.axial_axis(affine) == axis
