"""The intensity-mapping baseline recovers a known intensity transfer function."""

import numpy as np

from medjax import baseline


def test_lookup_table_recovers_a_monotone_mapping():
  rng = np.random.default_rng(0)
  transfer = lambda s: np.tanh(2 * s) * 0.8  # the closed form the table should learn
  records = []
  for _ in range(20):
    source = rng.uniform(-1, 1, (16, 16, 1)).astype(np.float32)
    records.append({"source": source, "target": transfer(source)})
  lut = baseline.fit(records)
  probe = np.linspace(-0.99, 0.99, 101, dtype=np.float32)[:, None]
  np.testing.assert_allclose(lut(probe)[:, 0], transfer(probe[:, 0]), atol=0.01)


def test_lookup_table_averages_targets_that_share_a_source_value():
  # Bone and air are both dark on MR: one source value, two targets → their mean.
  source = np.full((8, 8, 1), -0.9, np.float32)
  target = np.where(np.arange(64).reshape(8, 8, 1) % 2 == 0, -1.0, 0.6).astype(np.float32)
  lut = baseline.fit([{"source": source, "target": target}])
  np.testing.assert_allclose(lut(np.array([[-0.9]], np.float32)), [[-0.2]], atol=1e-5)


def test_empty_training_set_is_an_error():
  import pytest
  with pytest.raises(ValueError, match="no training voxels"):
    baseline.fit([])
