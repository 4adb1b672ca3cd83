"""The grain pipeline: resumable position, per-process shards, unpaired mode, phantom source."""

import grain
import numpy as np

from medjax.data import intensity, phantom, pipeline

from conftest import tiny_config


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
