"""Any-to-any synthesis (docs/design.md, "Any-to-any synthesis"): the modality dropout,
the model input and its conditioning, per-direction evaluation, named inputs and the
`brasyn` layout, and the user's path through one direction."""

import itertools
import json
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
import pytest

from medjax import any2any, baseline, cli, compare, translators
from medjax import config as config_lib
from medjax.data import pipeline
from medjax.errors import ConfigError, UserError

from conftest import ROOT

NAMES = ("t1w", "t2w", "flair")
SPEC = (f"{ROOT / 'experiments' / 'phantom_any2any.py'}:method=regression,"
        f"modalities={'+'.join(NAMES)},size=tiny")
VAL_SUBJECT = "phantom_003"  # 5 tiny phantom subjects: train 0-2, val 3, test 4


def medjax(*argv) -> int:
  return cli.main(["medjax", *map(str, argv)])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny any-to-any regression run over T1w, T2w, FLAIR (evaluated on its val split at
  its last step, 6)."""
  from medjax import train
  workdir = tmp_path_factory.mktemp("any2any_run")
  train.train_and_evaluate(config_lib.load(SPEC), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
  """The tiny phantom as NIfTI files, on the tiny run's grid."""
  data = tmp_path_factory.mktemp("phantom")
  assert medjax("phantom", "--output-dir", data, "--subjects", 5, "--shape", "32x32x12",
                "--spacing", "5x5x8") == 0
  return data


# -- the draw and the layout -----------------------------------------------------------

def test_every_direction_is_drawn_through_the_pipeline_record_map():
  """1000 records through the pipeline's dropout map: every (target, available subset)
  of 4 modalities occurs, targets are uniform, the target is never available and the
  available set never empty; the record's target is the drawn modality's image."""
  count = 4
  images = np.stack([np.full((4, 4), 0.1 * (m + 1), np.float32) for m in range(count)], -1)
  record = {"source": images[..., :3], "target": images[..., 3:], "mask": np.ones((4, 4, 1)),
            "subject": np.int32(0), "slice": np.int32(0)}
  seen, targets = set(), np.zeros(count, int)
  for i in range(1000):
    out = pipeline.any2any_record(record, np.random.default_rng(i), index=[0, 1, 2, 3])
    layout = out["source"][0, 0]
    available, onehot = layout[count:2 * count], layout[2 * count:]
    target = int(np.argmax(onehot))
    assert onehot.sum() == 1 and available[target] == 0 and available.sum() >= 1
    np.testing.assert_array_equal(out["target"][..., 0], images[..., target])
    np.testing.assert_array_equal(out["source"][..., :count], images * available)
    seen.add((target, tuple(available)))
    targets[target] += 1
  assert len(seen) == count * (2 ** (count - 1) - 1) == 28
  # binomial(1000, 1/4): mean 250, std 13.7; ±60 is beyond 4 std
  assert np.all(np.abs(targets - 250) < 60), targets


def test_jitter_moves_the_available_inputs_never_the_target():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (8, 8, 3)).astype(np.float32)
  record = {"source": images[..., :2], "target": images[..., 2:], "mask": np.ones((8, 8, 1))}
  for seed in range(20):
    out = pipeline.any2any_record(record, np.random.default_rng(seed), index=[0, 1, 2],
                                  jitter=0.1)
    target = int(np.argmax(out["source"][0, 0, 6:]))
    available = out["source"][0, 0, 3:6]
    np.testing.assert_array_equal(out["target"][..., 0], images[..., target])
    for m in range(3):
      if available[m]:
        assert not np.allclose(out["source"][..., m], images[..., m])  # jittered
      else:
        assert not out["source"][..., m].any()  # missing: zero


def test_directions_are_each_missing_one_and_every_one_input():
  names = ("t1w", "t2w", "pd", "flair")
  standard = any2any.directions(names)
  expected_missing = {(tuple(n for n in names if n != t), t) for t in names}
  expected_single = {((a,), b) for a, b in itertools.permutations(names, 2)}
  assert set(standard) == expected_missing | expected_single and len(standard) == 16
  assert set(any2any.directions(names, "missing_one")) == expected_missing
  with pytest.raises(ValueError, match="eval.directions"):
    any2any.directions(names, "all")


# -- the conditioning -------------------------------------------------------------------

def test_the_mask_hides_a_missing_channel_and_the_target_embedding_steers():
  """Whatever garbage sits in a missing modality's channel, the output is the same; the
  target one-hot and the availability mask each change it."""
  config = config_lib.load(SPEC)
  translator = translators.build(config)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  source = any2any.condition(images, NAMES, ("t1w",), "flair")
  batch = {"source": source, "target": images[..., 2:], "mask": np.ones_like(images[..., :1])}
  params = jax.jit(translator.init_params)(jax.random.PRNGKey(0), batch)
  # a fresh network outputs 0 (zero-initialised head): move every weight off init
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  predict = jax.jit(lambda p, s: translator.translate(p, s, None)[0])
  out = lambda s: np.asarray(predict(params, jnp.asarray(s)))
  reference = out(source)
  assert np.abs(reference).max() > 1e-3
  garbage = source.copy()
  garbage[..., 1] = rng.normal(0, 5, garbage.shape[:-1])  # t2w is missing
  np.testing.assert_array_equal(out(garbage), reference)
  other_target = any2any.condition(images, NAMES, ("t1w",), "t2w")
  assert np.abs(out(other_target) - reference).max() > 1e-3
  more_given = any2any.condition(images, NAMES, ("t1w", "t2w"), "flair")
  assert np.abs(out(more_given) - reference).max() > 1e-3


@pytest.mark.parametrize("method", ["flow", "bridge"])
def test_stochastic_translators_train_and_sample_any2any(method):
  """Flow and the bridge take any-to-any inputs (diffusion shares flow's path through
  `Translator.apply`): a train step, two draws; the bridge starts from the mean of the
  available images."""
  import functools
  config = config_lib.load(str(ROOT / "experiments" / "phantom_any2any.py")
                           + f":method={method},modalities={'+'.join(NAMES)},size=tiny")
  translator = translators.build(config)
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  source = any2any.condition(images, NAMES, ("t1w", "t2w"), "flair")
  batch = {"source": source, "target": images[..., 2:], "mask": np.ones_like(images[..., :1])}
  key = jax.random.PRNGKey(0)
  state = jax.jit(translator.init)(key, batch)
  state, metrics = jax.jit(translator.train_step)(state, batch, key)
  assert np.isfinite(float(metrics["loss"]))
  mean, std = jax.jit(functools.partial(translator.translate, steps=2, samples=2))(
      state.ema_params, jnp.asarray(source), key)
  assert mean.shape == (2, 16, 16, 1) and np.isfinite(np.asarray(mean)).all()
  if method == "bridge":
    np.testing.assert_allclose(np.asarray(translator._start(jnp.asarray(source))),
                               images[..., :2].mean(-1, keepdims=True), atol=1e-6)


def test_bad_any2any_configs_are_one_line_errors():
  def load(spec_arg, overrides=()):
    return config_lib.validate(config_lib.load(
        f"{ROOT / 'experiments' / 'phantom_any2any.py'}:size=tiny{spec_arg}", list(overrides)))
  load("")  # the default set validates
  with pytest.raises(ConfigError, match="any-to-any runs with"):
    load("", ["translator.name=pix2pix"])
  with pytest.raises(ConfigError, match="does not carry"):
    load("", ["data.modalities=t1w,ct"])
  with pytest.raises(ConfigError, match="MR contrasts"):
    load("", ["data.source=t1w,ct", "data.modalities=t1w,ct"])
  plain = config_lib.load(str(ROOT / "experiments" / "phantom.py") + ":size=tiny",
                          ["data.modalities=t1w,t2w"])
  with pytest.raises(ConfigError, match="data.any2any=true"):
    config_lib.validate(plain)


# -- the run: evaluation, baseline, compare ---------------------------------------------

def test_evaluation_reports_every_direction_and_fits_a_baseline_per_pair(run_dir):
  summary = json.loads((run_dir / "eval" / "6" / "summary.json").read_text())
  names = {any2any.direction_name(a, t) for a, t in any2any.directions(NAMES)}
  assert set(summary["directions"]) == names and len(names) == 9
  rows = (run_dir / "eval" / "6" / "subjects.csv").read_text().splitlines()
  assert rows[0].startswith("subject,direction,") and len(rows) == 1 + 9
  mean_psnr = np.mean([d["model"]["psnr"] for d in summary["directions"].values()])
  assert summary["model"]["psnr"] == pytest.approx(mean_psnr, rel=1e-9)
  # Each pair's table against the one-direction fit (baseline.fit) on the same records.
  config = config_lib.load(SPEC)
  source = pipeline.train_source(config)
  records = [source[i] for i in range(len(source))]
  saved = baseline.from_dict(json.loads((run_dir / "baseline.json").read_text()))
  for (i, j), table in saved.tables.items():
    pairs = ({"source": any2any.images_of(r["source"], r["target"], [0, 1, 2])[..., i:i + 1],
              "target": any2any.images_of(r["source"], r["target"], [0, 1, 2])[..., j:j + 1]}
             for r in records)
    np.testing.assert_allclose(table, baseline.fit(pairs).table, atol=1e-5)


def test_compare_sets_any2any_beside_dedicated_runs_at_equal_total_steps():
  config = config_lib.load(SPEC)
  assert compare.train_steps(config, compare.Budget(train_steps=10)) == 30
  dedicated = config_lib.load(f"{ROOT / 'experiments' / 'phantom.py'}:source=t1w+t2w,"
                              "target=flair,size=tiny")
  assert compare.task_of(dedicated) == "t1w+t2w>flair"
  block = lambda v: {"model": {"psnr": v}, "baseline": {"psnr": 1.0}}
  results = compare.by_direction([
      {"method": "regression", "task": "flair", "model": {}, "baseline": {},
       "directions": {"t1w+t2w>flair": block(20.0), "t2w>t1w": block(18.0)}},
      {"method": "regression", "task": "t1w+t2w>flair", "model": {"psnr": 21.0},
       "baseline": {"psnr": 1.0}}])
  tasks = [(r["task"], r["method"], r["model"]["psnr"]) for r in results]
  assert tasks == [("t1w+t2w>flair", "regression, any-to-any", 20.0),
                   ("t2w>t1w", "regression, any-to-any", 18.0),
                   ("t1w+t2w>flair", "regression", 21.0)]


# -- translate: named inputs, refusals, the user's path, brasyn -------------------------

def test_translate_refuses_what_the_run_cannot_do():
  from medjax import infer
  config = ml_collections.ConfigDict({"data": {"any2any": True, "modalities": NAMES,
                                               "source": NAMES[:2], "target": "flair"}})
  run = types.SimpleNamespace(config=config, recipe=types.SimpleNamespace(sources=NAMES[:2]),
                              target="flair")
  assert infer.direction(run, {"t2": "b", "t1": "a"}) == (("t1w", "t2w"), ["a", "b"], "flair")
  assert infer.direction(run, {"flair": "c"}, "t1w") == (("flair",), ["c"], "t1w")
  for inputs, target, words in (
      ({"pd": "a"}, "flair", "never saw pd"),
      ({"t1w": "a", "flair": "b"}, "flair", "also given as an input"),
      ({"t1w": "a"}, None, "give --target"),
      (["a", "b"], "flair", "name each input"),
      ({"t1w": "a"}, "ct", "synthesises t1w, t2w, flair, not ct")):
    with pytest.raises(UserError, match=words):
      infer.direction(run, inputs, target)
  plain = types.SimpleNamespace(config=ml_collections.ConfigDict({"data": {"any2any": False}}),
                                recipe=types.SimpleNamespace(sources=("t1w",)), target="t2w")
  with pytest.raises(UserError, match="translates t1w to t2w only"):
    infer.direction(plain, ["a"], "flair")
  assert infer.direction(plain, {"t1w": "a"}, "t2w") == (("t1w",), ["a"], "t2w")


@pytest.mark.slow
def test_translate_and_score_give_the_evaluation_of_one_direction(run_dir, phantom_files,
                                                                  tmp_path):
  """The val subject's T1w and T2w files → FLAIR with `medjax translate`, scored with
  `medjax score`: the run's own evaluation of direction t1w+t2w>flair."""
  subject = phantom_files / VAL_SUBJECT
  out = tmp_path / "out"
  assert medjax("translate", "--workdir", run_dir, "--input", f"t1w={subject / 't1w.nii.gz'}",
                "--input", f"t2w={subject / 't2w.nii.gz'}", "--target", "flair",
                "--mask", subject / "mask.nii.gz", "--output",
                out / f"{VAL_SUBJECT}.nii.gz") == 0
  sidecar = json.loads((out / f"{VAL_SUBJECT}.json").read_text())
  assert sidecar["input_modalities"] == ["t1w", "t2w"] and sidecar["target"] == "flair"
  medjax("score", "--pred-dir", out, "--target-dir", phantom_files, "--layout", "phantom",
         "--target", "flair", "--protocol", "mri")  # status 1: the others have no prediction
  scored = json.loads((out / "scores.json").read_text())["metrics"]
  evaluated = json.loads((run_dir / "eval" / "6" / "summary.json").read_text())
  direction = evaluated["directions"]["t1w+t2w>flair"]["model"]
  assert scored["psnr"]["mean"] == pytest.approx(direction["psnr"], abs=0.01)
  assert scored["mae"]["mean"] == pytest.approx(direction["mae"], rel=1e-3)


BRATS = {"t1w": "t1n", "t2w": "t2w", "flair": "t2f"}


@pytest.mark.slow
def test_brats_folders_prepare_train_and_fill_in_brasyn_gaps(phantom_files, tmp_path, capsys):
  """A BraTS 2023 folder → `prepare` (T1n, T2w → FLAIR shards) → an any-to-any run on
  those shards → `translate --layout brasyn` on copies with one modality removed (the
  BraSyn case), two removed, none removed, all removed. Each gap is written under BraTS's
  own file name, the odd subjects are reported (not crashed), and `score` finds each
  subject's target."""
  complete, brasyn = tmp_path / "complete", tmp_path / "brasyn"
  drop = {"BraTS-GLI-00000-000": ("flair",), "BraTS-GLI-00001-000": ("t2w", "flair"),
          "BraTS-GLI-00002-000": (), "BraTS-GLI-00003-000": NAMES, "BraTS-GLI-00004-000": ()}
  for i, (sid, removed) in enumerate(drop.items()):
    for root, skip in ((complete, ()), (brasyn, removed)):
      (root / sid).mkdir(parents=True)
      for modality, tag in BRATS.items():
        if modality not in skip:
          shutil.copy(phantom_files / f"phantom_00{i}" / f"{modality}.nii.gz",
                      root / sid / f"{sid}-{tag}.nii.gz")
    # the phantom's tissue labels stand in for BraTS's tumour labels
    shutil.copy(phantom_files / f"phantom_00{i}" / "labels.nii.gz",
                complete / sid / f"{sid}-seg.nii.gz")
    if removed == NAMES:  # this subject keeps only its segmentation
      shutil.copy(phantom_files / f"phantom_00{i}" / "labels.nii.gz",
                  brasyn / sid / f"{sid}-seg.nii.gz")
  shards, run = tmp_path / "shards", tmp_path / "run"
  assert medjax("prepare", "--layout", "brats2023", "--input-dir", complete, "--output-dir",
                shards, "--source", "t1w,t2w", "--target", "flair", "--spacing", "5x5x8",
                "--size", "32x32", "--fractions", "0.6,0.2,0.2") == 0
  # prepare carries each subject's labels (nearest neighbour on the grid, here the file's
  # own) beside its shard: the seg file's axial slices where the shard has foreground
  meta = json.loads(next((shards / "train").glob("*.json")).read_text())
  seg = nib.load(complete / meta["subject"] / f"{meta['subject']}-seg.nii.gz").get_fdata()
  with np.load(shards / "train" / meta["labels"]) as saved:
    np.testing.assert_array_equal(saved["labels"],
                                  np.moveaxis(seg, -1, 0)[meta["slices"]].astype(np.uint8))
  assert medjax("train", "--config", SPEC, "--workdir", run, "--config.data.kind=shards",
                f"--config.data.dir={shards}", "--config.train.total_steps=2",
                "--config.eval.directions=missing_one") == 0
  # task-based evaluation on a prepared dataset: BraTS's tumour labels (1, 2, 3) are scored
  assert medjax("evaluate", "--workdir", run, "--split", "test", "--segmentation") == 0
  scored = json.loads((run / "eval" / "2" / "test_summary.json").read_text())
  assert scored["segmenter"]["modalities"] == list(NAMES)
  assert set(scored["segmentation"]) >= {"dice_real_necrosis", "dice_synth_oedema",
                                         "dice_blank_enhancing", "dice_drop_mean"}
  out = tmp_path / "filled"
  capsys.readouterr()
  status = medjax("translate", "--workdir", run, "--input-dir", brasyn, "--layout",
                  "brasyn", "--output-dir", out)
  err = capsys.readouterr().err
  assert status == 1  # PartialFailure: one subject had nothing to translate from
  assert "BraTS-GLI-00003-000" in err and "2 modalities missing (t2w, flair)" in err
  written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz"))
  assert written == ["BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz",
                     "BraTS-GLI-00001-000/BraTS-GLI-00001-000-t2f.nii.gz",
                     "BraTS-GLI-00001-000/BraTS-GLI-00001-000-t2w.nii.gz"]
  reference = nib.load(brasyn / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t1n.nii.gz")
  filled = nib.load(out / written[0])
  assert filled.shape == reference.shape
  np.testing.assert_allclose(filled.affine, reference.affine)
  assert np.isfinite(filled.get_fdata()).all()
  index = json.loads((out / "translations.json").read_text())
  assert set(index["subjects"]) == {"BraTS-GLI-00000-000", "BraTS-GLI-00001-000"}
  assert index["subjects"]["BraTS-GLI-00001-000"]["filled"]["t2w"]["available"] == ["t1w"]
  assert "nothing to synthesise" in index["notes"]["BraTS-GLI-00002-000"]
  assert "BraTS-GLI-00003-000" in index["failed"]
  medjax("score", "--pred-dir", out, "--target-dir", complete, "--layout", "brats2023",
         "--protocol", "mri")
  rows = (out / "scores.csv").read_text().splitlines()
  assert [row.split(",")[0] for row in rows[1:]] == ["BraTS-GLI-00000-000",
                                                     "BraTS-GLI-00001-000"]


def test_evaluation_scores_each_direction_by_segmentation(run_dir):
  """`eval.segmentation`: per direction and subject, the segmenter's Dice with the real
  images (computed here independently), the synthesised target and a blank one."""
  from medjax import evaluate, segmentation
  from medjax.run import Run
  run = Run.load(run_dir)
  segmenter = segmentation.segmenter_for(run, steps=10)  # cached: evaluation reuses it
  volumes = run.eval_volumes("val")
  summary, rows, _ = evaluate.evaluate(run, volumes, directions="missing_one",
                                       segmentation=True)
  assert summary["segmenter"]["modalities"] == list(NAMES)
  assert set(summary["directions"]) == {any2any.direction_name(a, t) for a, t in
                                        any2any.directions(NAMES, "missing_one")}
  images, labels, mask = pipeline.phantom_images(run.config, 3, NAMES)
  real = segmentation.dice(segmenter.segment(images), labels, segmenter.labels, mask[..., 0] > 0)
  for row in rows:
    assert row["dice_real_mean"] == pytest.approx(segmentation.mean(real), abs=1e-9)
    assert row["dice_drop_mean"] == pytest.approx(row["dice_real_mean"] - row["dice_synth_mean"])
  for block in summary["directions"].values():
    assert block["segmentation"]["dice_blank_mean"]["n"] == 1


def test_compare_scores_an_any2any_run_per_direction(run_dir, tmp_path, monkeypatch):
  """`compare.run_one` on an any-to-any experiment (its training replaced by the trained
  tiny run): M × the steps asked, one table row per direction beside the baseline."""
  budget = compare.Budget(train_steps=2, sweep_steps=(1,))
  trained = []

  def train(config, workdir, mesh=None):
    trained.append(config.train.total_steps)
    shutil.copytree(run_dir, workdir, dirs_exist_ok=True)
  monkeypatch.setattr(compare.train, "train_and_evaluate", train)
  result = compare.run_one(SPEC, str(tmp_path), budget)
  assert trained == [2 * len(NAMES)] and result["train_steps"] == 6 and not result["sweep"]
  rows = compare.write_table(str(tmp_path), compare.by_direction([result]))
  tasks = {row["task"] for row in rows}
  assert tasks == set(result["directions"]) and len(tasks) == 9
  assert len(rows) == 2 * 9  # each direction: the baseline and the model
  assert "t1w+t2w>flair" in (tmp_path / "compare.md").read_text()
