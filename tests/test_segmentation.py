"""Task-based evaluation: Dice by set counting, a tiny segmenter that learns and is cached,
and `medjax score --segmentation` on phantom files giving the in-memory path's Dice.

One segmenter (tiny phantom, a few dozen steps) is trained for the module; its run
directory holds only the config.json that `segmenter_for` reads.
"""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from medjax import cli, files, segmentation
from medjax.data import intensity, phantom, pipeline

from conftest import tiny_config

STEPS = 40


def count_dice(pred, truth, value):
  """Dice from index sets: the voxels of each volume with the label, as flat indices."""
  p = set(np.flatnonzero(np.asarray(pred).ravel() == value).tolist())
  t = set(np.flatnonzero(np.asarray(truth).ravel() == value).tolist())
  return 2 * len(p & t) / (len(p) + len(t)) if p or t else math.nan


def test_dice_is_twice_the_overlap_over_the_sizes():
  rng = np.random.default_rng(0)
  truth = rng.integers(0, 4, (6, 7, 5))
  pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, 4, truth.shape))
  labels = {"a": 1, "b": 2, "c": 3, "absent": 9}
  scores = segmentation.dice(pred, truth, labels)
  for name, value in labels.items():
    expected = count_dice(pred, truth, value)
    assert (math.isnan(scores[name]) and math.isnan(expected)) or scores[name] == expected
  assert math.isnan(scores["absent"])  # in neither volume: no evidence, NaN
  # By hand: P = {0, 1}, T = {1, 2, 3} → 2·1 / (2 + 3); a label only predicted scores 0.
  assert segmentation.dice([5, 5, 0, 0], [0, 5, 5, 5], {"x": 5})["x"] == pytest.approx(0.4)
  assert segmentation.dice([7, 0], [0, 0], {"x": 7})["x"] == 0.0
  # A mask restricts the count to its voxels.
  inside = segmentation.dice([5, 5, 0, 0], [0, 5, 5, 5], {"x": 5}, mask=[0, 1, 1, 0])
  assert inside["x"] == pytest.approx(2 * 1 / (1 + 2))
  assert segmentation.mean({"a": 0.5, "b": math.nan, "c": 1.0}) == 0.75


def test_modalities_are_the_sources_then_the_target():
  config = tiny_config()
  assert segmentation.modalities(config) == ("t1w", "t2w")
  assert "air" not in segmentation.LABELS and segmentation.LABELS["lesion"] == 6


def test_phantom_images_are_normalised_as_the_training_volumes():
  config = tiny_config()
  images, labels, mask = pipeline.phantom_images(config, 3, ("t1w", "t2w"))
  volume = pipeline.phantom_volume(config, 3)
  np.testing.assert_array_equal(images[..., :1], volume.source)
  np.testing.assert_array_equal(images[..., 1:], volume.target)
  np.testing.assert_array_equal(mask, volume.mask)
  p = config.data.phantom
  rendered = phantom.generate(p.seed, 3, tuple(p.shape), tuple(p.spacing))["labels"]
  np.testing.assert_array_equal(labels, np.moveaxis(rendered, -1, 0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A run directory (config.json only) and its segmenter, trained for STEPS steps."""
  workdir = tmp_path_factory.mktemp("seg_run")
  config = tiny_config()
  files.write_json(workdir / "config.json", config.to_dict())
  return workdir, config, segmentation.segmenter_for(workdir, steps=STEPS)


def test_the_segmenter_beats_a_constant_guess_and_is_cached(trained):
  workdir, config, segmenter = trained
  index = workdir / "segmenter" / "segmenter.json"
  made = json.loads(index.read_text())
  assert made["modalities"] == ["t1w", "t2w"] and made["steps"] == STEPS
  # Trivial predictor: every voxel the most frequent tissue of the training labels.
  train_labels = segmentation.training_slices(config, ("t1w", "t2w"))[1]
  common = int(np.bincount(train_labels.ravel()).argmax())
  for subject in pipeline.phantom_split(config)["val"]:
    images, labels, _ = pipeline.phantom_images(config, subject, segmenter.modalities)
    learned = segmentation.mean(segmentation.dice(segmenter.segment(images), labels,
                                                  segmenter.labels))
    constant = segmentation.mean(segmentation.dice(np.full_like(labels, common), labels,
                                                   segmenter.labels))
    assert learned > constant + 0.2, (learned, constant)
    assert made["val_dice"]["mean"] == pytest.approx(learned)  # one val subject
  # Loaded, not trained again: the folder is untouched and the parameters are the same.
  stamp = index.stat().st_mtime_ns
  again = segmentation.segmenter_for(workdir)  # steps=None: the cached one, any length
  assert index.stat().st_mtime_ns == stamp and again.settings["steps"] == STEPS
  np.testing.assert_array_equal(again.segment(images), segmenter.segment(images))


def test_task_scores_real_substitute_and_blank(trained):
  _, config, segmenter = trained
  subject = pipeline.phantom_split(config)["test"][0]
  images, labels, mask = pipeline.phantom_images(config, subject, segmenter.modalities)
  scores = segmentation.task_scores(segmenter, images, labels, 1, images[..., 1], mask)
  real = segmentation.dice(segmenter.segment(images), labels, segmenter.labels, mask)
  for kind in ("real", "synthesised"):
    assert scores[kind].keys() == real.keys()
    assert all(a == b or (math.isnan(a) and math.isnan(b))
               for a, b in zip(scores[kind].values(), real.values()))
  assert segmentation.mean(scores["blank"]) <= segmentation.mean(scores["real"])
  row = segmentation.columns(scores)
  assert row["dice_drop_mean"] == 0.0
  assert row["dice_real_mean"] == segmentation.mean(real)
  assert {"dice_synth_lesion", "dice_blank_wm", "dice_blank_mean"} <= row.keys()


# The prediction is the target itself: PSNR is inf, and its std over subjects NaN.
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract")
def test_score_segmentation_of_the_real_target_gives_the_real_dice(trained, tmp_path, capsys):
  workdir, config, segmenter = trained
  p = config.data.phantom
  data, out = tmp_path / "phantom", tmp_path / "out"
  assert cli.main(["medjax", "phantom", "--output-dir", str(data), "--subjects",
                   str(p.subjects), "--shape", "x".join(map(str, p.shape)),
                   "--spacing", "x".join(map(str, p.spacing)), "--seed", str(p.seed)]) == 0
  label_file = nib.load(data / "phantom_004" / "labels.nii.gz")
  assert label_file.get_data_dtype() == np.uint8
  # The prediction: each subject's real T2w in translate's [0, 1] output units.
  subjects = {}
  for folder in sorted(data.glob("phantom_*")):
    t2w = nib.load(folder / "t2w.nii.gz")
    volume = np.asarray(t2w.dataobj, np.float32)
    mask = np.asarray(nib.load(folder / "mask.nii.gz").dataobj)
    unit = intensity.to_unit_interval(
        intensity.normalise(volume, intensity.fit(volume, "t2w", mask)))
    out.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(unit.astype(np.float32), t2w.affine), out / f"{folder.name}.nii.gz")
    subjects[folder.name] = {"prediction": f"{folder.name}.nii.gz", "std": None, "sources": []}
  files.write_json(out / "translations.json", {"target": "t2w", "subjects": subjects})
  assert cli.main(["medjax", "score", "--pred-dir", str(out), "--target-dir", str(data),
                   "--layout", "phantom", "--protocol", "mri",
                   "--segmentation", str(workdir)]) == 0
  printed = capsys.readouterr().out
  assert "ceiling" in printed and "blank" in printed
  rows = {r["subject"]: r for r in csv.DictReader(open(out / "scores.csv"))}
  summary = json.loads((out / "scores.json").read_text())
  assert summary["segmentation"]["target"] == "t2w"
  for sid, row in rows.items():
    # The files' real column is the in-memory path's Dice (a second code path) …
    images, labels, mask = pipeline.phantom_images(config, int(sid[-3:]), ("t1w", "t2w"))
    expected = segmentation.dice(segmenter.segment(images), labels, segmenter.labels, mask)
    for name, value in expected.items():
      got = float(row[f"dice_real_{name}"])
      assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value, abs=1e-6)
      # … and the real target written in [0, 1] units segments as the real one.
      synth = float(row[f"dice_synth_{name}"])
      assert (math.isnan(synth) and math.isnan(got)) or synth == pytest.approx(got, abs=0.02)
  assert summary["metrics"]["dice_drop_mean"]["mean"] == pytest.approx(0.0, abs=0.01)


def test_score_segmentation_needs_the_phantom_layout(tmp_path, capsys):
  (tmp_path / "p").mkdir()
  assert cli.main(["medjax", "score", "--pred-dir", str(tmp_path / "p"), "--target-dir",
                   str(tmp_path), "--protocol", "mri", "--target", "t2w",
                   "--segmentation", str(tmp_path)]) == 2
  assert "needs --layout phantom" in capsys.readouterr().err
