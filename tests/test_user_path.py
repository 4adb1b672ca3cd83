"""The user's path is the evaluation's path.

What a user types — `medjax phantom` (or a dataset) → `prepare` → `train` → `translate` on a
new file with no mask → `score` — must give the numbers the run's own evaluation gives for
the same subjects. The phantom at 48×48×32 is where a body mask that lost half of the head
(Otsu on T1w) once cost 13 dB: the MR source was normalised over another region than in
training. Each run here is small (16 channels, `STEPS` = 60), so its absolute scores are
low; what is compared is the same model reached two ways. With the old mask (Otsu's
threshold, largest component) in translate, the T2w run loses 1.0 dB without a mask file
(a CT run 1.9 dB; 1.8 dB at 150 steps, only 0.2 dB at 30): `NO_MASK_DB` = 0.25 catches
it with room, while the right mask stays within 0.01 dB.

The last test also runs every other command once, in this process, as a user types it.
"""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from medjax import cli

from conftest import ROOT, tiny_spec

pytestmark = pytest.mark.slow

STEPS = 60  # enough training for a wrong normalisation to show (module docstring)
NO_MASK_DB = 0.25  # dB a translation without the mask file may lie from the evaluation
SHAPE = "48x48x32"  # experiments/phantom.py's `small` grid: the head at 3.3 × 3.3 × 3 mm
SPACING = (160 / 48, 160 / 48, 3.0)
TEST_SUBJECT = "phantom_004"  # 5 subjects: train 0-2, val 3, test 4
OVERRIDES = [f"--config.data.phantom.shape={SHAPE}",
             "--config.data.phantom.spacing=({},{},{})".format(*SPACING),
             "--config.model.channels=16", "--config.train.learning_rate=3e-3",
             "--config.train.warmup_steps=10", "--config.train.ema_decay=0.99"]


def medjax(*argv) -> int:
  return cli.main(["medjax", *map(str, argv)])


def steps(n: int) -> list[str]:
  return [f"--config.train.total_steps={n}", f"--config.eval.every={n}",
          f"--config.checkpoint.every={n}"]


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
  data = tmp_path_factory.mktemp("phantom")
  assert medjax("phantom", "--output-dir", data, "--subjects", 5, "--shape", SHAPE) == 0
  return data


def scored_metrics(pred_dir, data, target) -> dict:
  """`medjax score` of pred_dir against the phantom files: {metric: {mean, …}}."""
  protocol = "synthrad2023" if target == "ct" else "mri"
  medjax("score", "--pred-dir", pred_dir, "--target-dir", data, "--layout", "phantom",
         "--target", target, "--protocol", protocol)  # status 1: the others have no prediction
  return json.loads((pred_dir / "scores.json").read_text())["metrics"]


def scored_psnr(pred_dir, data, target) -> float:
  return scored_metrics(pred_dir, data, target)["psnr"]["mean"]


def translate_test_subject(workdir, data, out_root, target) -> dict:
  """The test subject's T1w translated as a user would, with the mask file and without
  it, then scored: {"mask": metrics, "no mask": metrics}."""
  source = data / TEST_SUBJECT / "t1w.nii.gz"
  scores = {}
  for given in ("mask", "no mask"):
    out = out_root / given.replace(" ", "_")
    extra = ["--mask", data / TEST_SUBJECT / "mask.nii.gz"] if given == "mask" else []
    assert medjax("translate", "--workdir", workdir, "--input", source, "--output",
                  out / f"{TEST_SUBJECT}.nii.gz", *extra) == 0
    scores[given] = scored_metrics(out, data, target)
  return scores


def test_translating_without_a_mask_scores_what_the_evaluation_scored(
    phantom_files, tmp_path, capsys):
  """T1w → T2w in 2D, the run scoring with mirror TTA (as experiments/phantom_ar.py's
  do): `medjax translate` takes the run's eval.tta unless told otherwise. The CT target
  (HU out, the synthrad2023 protocol) takes the same path in the 3D test below, with the
  same checks."""
  target = "t2w"
  workdir = tmp_path / "run"
  assert medjax("train", "--config", tiny_spec("regression", target), "--workdir", workdir,
                *OVERRIDES, *steps(STEPS), "--config.eval.tta=flip") == 0
  assert medjax("evaluate", "--workdir", workdir, "--split", "test") == 0
  evaluated = json.loads((workdir / "eval" / str(STEPS) / "test_summary.json").read_text())
  assert evaluated["subjects"] == 1 and evaluated["tta"] == "flip"
  one_order = tmp_path / "tta_none"
  assert medjax("translate", "--workdir", workdir, "--tta", "none", "--input",
                phantom_files / TEST_SUBJECT / "t1w.nii.gz", "--output",
                one_order / f"{TEST_SUBJECT}.nii.gz") == 0
  # The mirror changes the prediction, so the default below is seen to be the run's flip.
  assert abs(scored_psnr(one_order, phantom_files, target) - evaluated["model"]["psnr"]) > 1e-4
  scores = translate_test_subject(workdir, phantom_files, tmp_path, target)
  psnr = {given: metrics["psnr"]["mean"] for given, metrics in scores.items()}
  print(target, psnr, "evaluation:", evaluated["model"]["psnr"], capsys.readouterr().err[-300:])
  # With the training mask the two paths are the same computation on the same voxels.
  assert psnr["mask"] == pytest.approx(evaluated["model"]["psnr"], abs=0.01)
  # Without it, the automatic body mask must normalise the source as training did.
  assert abs(psnr["no mask"] - psnr["mask"]) < NO_MASK_DB
  assert abs(psnr["no mask"] - evaluated["model"]["psnr"]) < NO_MASK_DB


def test_a_3d_run_translates_by_sliding_window_what_its_evaluation_scored(
    phantom_files, tmp_path, capsys):
  """3D: the evaluation's Gaussian sliding window over the held-out volume and `medjax
  translate` on the subject's NIfTI are one path — the same scores, slice consistency
  included — with or without the mask file."""
  workdir = tmp_path / "run3d"
  spec = f"{ROOT}/experiments/phantom_mr_ct_3d.py:size=tiny"
  assert medjax("train", "--config", spec, "--workdir", workdir, *OVERRIDES[:2],
                "--config.train.learning_rate=3e-3", "--config.train.warmup_steps=5",
                "--config.train.ema_decay=0.9", *steps(12)) == 0
  assert medjax("evaluate", "--workdir", workdir, "--split", "test") == 0
  evaluated = json.loads((workdir / "eval" / "12" / "test_summary.json").read_text())
  assert evaluated["subjects"] == 1 and evaluated["overlap"] == 0.5
  scores = translate_test_subject(workdir, phantom_files, tmp_path, "ct")
  print(scores, evaluated["model"], capsys.readouterr().err[-300:])
  for key in ("psnr", "mae", "through_plane_mae"):
    assert scores["mask"][key]["mean"] == pytest.approx(evaluated["model"][key], rel=1e-3,
                                                        abs=0.01)
  assert abs(scores["no mask"]["psnr"]["mean"] - evaluated["model"]["psnr"]) < 0.5


def test_prepared_data_chain_and_a_run_without_its_data(phantom_files, tmp_path, capsys):
  """phantom files → prepare → train on shards (overrides in-process) → evaluate with the
  test split alone → translate a file with no mask → score; then the data folder goes and
  the run still translates the same voxels; then config, sweep and compare."""
  shards, workdir = tmp_path / "shards", tmp_path / "run"
  assert medjax("prepare", "--layout", "phantom", "--input-dir", phantom_files,
                "--output-dir", shards, "--source", "t1w", "--target", "t2w",
                "--spacing", "x".join(f"{s:.10g}" for s in SPACING), "--size", "48x48",
                "--fractions", "0.6,0.2,0.2") == 0
  manifest = json.loads((shards / "manifest.json").read_text())
  test_subject, = manifest["splits"]["test"]
  assert medjax("train", "--config", f"{ROOT}/experiments/brats_t1_t2.py:method=regression",
                "--workdir", workdir, f"--config.data.dir={shards}", "--config.data.workers=0",
                "--config.model.channels=16", "--config.model.channel_mult=1,2",
                "--config.model.num_res_blocks=1", "--config.model.attention_levels=()",
                "--config.train.batch_size=8", "--config.train.learning_rate=3e-3",
                "--config.train.warmup_steps=10", "--config.train.ema_decay=0.99",
                "--config.logging.progress=false", *steps(STEPS)) == 0
  saved = json.loads((workdir / "config.json").read_text())  # the overrides of this argv
  assert saved["data"]["dir"] == str(shards) and saved["train"]["total_steps"] == STEPS
  assert saved["model"]["channel_mult"] == [1, 2] and saved["model"]["attention_levels"] == []

  assert medjax("evaluate", "--workdir", workdir, "--split", "test") == 0
  summary = workdir / "eval" / str(STEPS) / "test_summary.json"
  evaluated = json.loads(summary.read_text())["model"]
  for split in ("train", "val"):  # evaluation needs the held-out split only
    shutil.rmtree(shards / split)
  (shards / "manifest.json").unlink()
  summary.unlink()
  assert medjax("evaluate", "--workdir", workdir, "--split", "test") == 0
  assert json.loads(summary.read_text())["model"] == evaluated

  source = phantom_files / test_subject / "t1w.nii.gz"
  first = tmp_path / "out" / f"{test_subject}.nii.gz"
  assert medjax("translate", "--workdir", workdir, "--input", source, "--output", first) == 0
  psnr = scored_psnr(first.parent, phantom_files, "t2w")
  assert abs(psnr - evaluated["psnr"]) < NO_MASK_DB

  shutil.rmtree(shards)  # the run carries its recipe and baseline: no data needed
  again = tmp_path / "again.nii.gz"
  assert medjax("translate", "--workdir", workdir, "--input", source, "--output", again) == 0
  np.testing.assert_array_equal(nib.load(again).get_fdata(), nib.load(first).get_fdata())

  capsys.readouterr()
  assert medjax("config", tiny_spec("bridge"), "--config.seed=3") == 0
  assert "seed = 3" in capsys.readouterr().out
  grid = tmp_path / "grid.py"
  grid.write_text("from medjax.sweep import sweep\n"
                  "def get_sweep():\n  return sweep('train.learning_rate', [1e-3, 2e-3])\n")
  assert medjax("sweep", "--config", tiny_spec("regression"), "--sweep", grid,
                "--workdir", tmp_path / "sweep", "--dry-run") == 0
  assert capsys.readouterr().out.count("to run") == 2
  assert medjax("compare", "--experiments", tiny_spec("regression"), "--workdir",
                tmp_path / "compare", "--train-steps", 2, "--sweep-steps", "",
                "--image-slices", 1) == 0
  assert "intensity map (baseline)" in (tmp_path / "compare" / "compare.md").read_text()
