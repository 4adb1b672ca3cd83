"""The grain pipeline: resumable position, per-process shards, unpaired mode, phantom source,
and the checks that a run's data is what its config asks for."""

import shutil
import sys
from pathlib import Path

import grain
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402
from conftest_data import mr_volume, save  # noqa: E402

from medjax.data import intensity, phantom, pipeline, prepare, shards  # noqa: E402
from medjax.data.preprocess import Recipe  # noqa: E402
from medjax.errors import ConfigError  # noqa: E402


def test_phantom_slices_are_the_normalised_volume():
  config = tiny_config()
  source = pipeline.PhantomSlices(config, [3])
  vols = phantom.generate(config.data.phantom.seed, 3, shape=tuple(config.data.phantom.shape),
                          spacing=tuple(config.data.phantom.spacing))
  # Independent reference: percentiles inside the mask → [-1, 1], clipped.
  lo, hi = np.percentile(vols["t2w"][vols["mask"] > 0.5], [0.5, 99.5])
  expected = np.clip(2 * (vols["t2w"] - lo) / (hi - lo) - 1, -1, 1)
  for z in (0, 5, 11):
    record = source[z]
    np.testing.assert_allclose(record["target"][..., 0], expected[:, :, z], atol=1e-5)
    assert record["source"].shape == (32, 32, 1) and record["slice"] == z
    np.testing.assert_array_equal(record["mask"][..., 0], vols["mask"][:, :, z])
  ct = pipeline.phantom_volume(tiny_config(target="ct"), 3)
  np.testing.assert_allclose(intensity.denormalise(ct.target[..., 0], ct.target_params),
                             np.clip(np.moveaxis(vols["ct"], -1, 0), -1024, 3000), atol=0.1)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_restored_iterator_continues_with_the_next_batch():
  source = grain.sources.RangeDataSource(0, 50, 1)
  ds = pipeline.make_dataset(source, seed=3, batch_size=4, augment=False,
                             process_index=0, process_count=1)
  it = iter(ds)
  _take(it, 7)
  state = it.get_state()
  expected = _take(it, 5)
  fresh = iter(ds)
  fresh.set_state(state)
  for a, b in zip(_take(fresh, 5), expected):
    np.testing.assert_array_equal(a, b)


def test_epochs_are_reshuffled_and_complete():
  source = grain.sources.RangeDataSource(0, 12, 1)
  it = iter(pipeline.make_dataset(source, seed=0, batch_size=4, augment=False,
                                  process_index=0, process_count=1))
  first = np.concatenate(_take(it, 3))
  second = np.concatenate(_take(it, 3))
  assert sorted(first) == sorted(second) == list(range(12))
  assert not np.array_equal(first, second)


def test_processes_read_disjoint_shards():
  source = grain.sources.RangeDataSource(0, 40, 1)
  seen = []
  for index in range(2):
    it = iter(pipeline.make_dataset(source, seed=0, batch_size=5, augment=False,
                                    process_index=index, process_count=2))
    seen.append(set(np.concatenate(_take(it, 4)).tolist()))
  assert seen[0].isdisjoint(seen[1])
  assert seen[0] | seen[1] == set(range(40))


def test_unpaired_mode_draws_targets_from_other_subjects():
  config = tiny_config()
  config.data.augment = False  # targets must stay the rendered slices to be recognised
  config.data.unpaired = True
  config.data.phantom.subjects = 10
  sources, targets = pipeline.unpaired_sources(config)
  source_subjects = {int(sources[i]["subject"]) for i in range(len(sources))}
  target_subjects = {int(targets[i]["subject"]) for i in range(len(targets))}
  assert source_subjects.isdisjoint(target_subjects)
  batch = next(iter(pipeline.train_dataset(config)))
  # Each target is a slice of one of the target-side subjects, never the source's own.
  reference = {(int(targets[i]["subject"]), int(targets[i]["slice"])): targets[i]["target"]
               for i in range(len(targets))}
  hits = sum(any(np.array_equal(t, r) for r in reference.values()) for t in batch["target"])
  assert hits == len(batch["target"])
  assert set(batch["subject"].tolist()) <= source_subjects


def test_a_phantom_run_recipe_is_the_phantom_grid():
  config = tiny_config(target="ct")
  recipe = pipeline.recipe(config)
  assert recipe == Recipe(sources=("t1w",), targets=("ct",), spacing=(5.0, 5.0, 8.0),
                          size=(32, 32), context=0, register=None, mask="phantom")
  # What a model is initialised with has the shapes and dtypes of what it trains on.
  example, record = recipe.example_record(), pipeline.PhantomSlices(config, [0])[4]
  for key in ("source", "target", "mask", "subject", "slice"):
    assert np.shape(example[key]) == np.shape(record[key]), key
    assert np.asarray(example[key]).dtype == np.asarray(record[key]).dtype, key


def test_held_out_phantom_volumes_and_empty_splits():
  config = tiny_config()
  split = pipeline.phantom_split(config)
  assert split == {"train": [0, 1, 2], "val": [3], "test": [4]}
  (volume,) = pipeline.eval_volumes(config, "test")
  assert volume.subject == "phantom_004" and volume.source.shape == (12, 32, 32, 1)
  pipeline.check_splits(config)
  config.data.phantom.subjects = 2  # 2 subjects: no validation subject
  with pytest.raises(ConfigError, match="val split"):
    pipeline.check_splits(config)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  for s in range(3):
    for modality in ("t1w", "t2w"):
      save(root / f"s{s}" / f"{modality}.nii.gz", mr_volume(rng))
  out = root / "shards"
  prepare.prepare("phantom", root, out, ["t1w"], "t2w", size=24, fractions=(1, 1, 1),
                  progress=False)
  return out


def shards_config(out, target="t2w"):
  config = tiny_config(target=target)
  config.data.kind, config.data.dir = "shards", str(out)
  return config


def test_shards_are_checked_against_the_config(prepared, tmp_path):
  config = shards_config(prepared)
  assert pipeline.recipe(config) == pipeline.check_shards(config) == shards.recipe(prepared)
  assert pipeline.recipe(config).size == (24, 24)
  source = pipeline.train_source(config)
  manifest = shards.load_manifest(prepared)
  assert len(source) == manifest["counts"]["slices"]["train"] > 0
  assert [v.subject for v in pipeline.eval_volumes(config, "val")] == manifest["splits"]["val"]
  # These subjects have 8 slices with body in them: too few for the 11-voxel SSIM window
  # the evaluation will use, which must be said before any training, naming them.
  short = {s: len(manifest["slices"][s]) for n in ("val", "test") for s in manifest["splits"][n]}
  assert set(short.values()) == {8}
  with pytest.raises(ConfigError, match="fewer foreground slices") as refused:
    pipeline.check_splits(config)
  assert all(f"{s} (8)" in str(refused.value) for s in short)
  with pytest.raises(ConfigError, match=r"targets=\['t2w'\], the config asks \['pd'\]"):
    pipeline.check_shards(shards_config(prepared, target="pd"))
  with pytest.raises(ConfigError, match="run `medjax prepare` first"):
    pipeline.recipe(shards_config(tmp_path))
  held_out = tmp_path / "no_test"
  shutil.copytree(prepared, held_out)
  for path in shards.shard_paths(held_out, "test"):
    path.unlink()
  with pytest.raises(ConfigError, match="test split"):
    pipeline.check_splits(shards_config(held_out))
