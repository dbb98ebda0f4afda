"""The feature store: int8 embeddings per case and axis, written atomically, read back within int8 error."""
from __future__ import annotations

import numpy as np

from SPDSegmentLib.research.features import FeatureStore


def test_written_entries_read_back(tmp_path):
    store = FeatureStore(tmp_path)
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(3, 4, 2, 2)).astype(np.float32)
    assert not store.has("hippocampus", "case_1", 1)
    store.write("hippocampus", "case_1", 1, [5, 6, 7], embeddings, {"axis": 1})
    assert store.has("hippocampus", "case_1", 1)
    entry = store.entry("hippocampus", "case_1", 1)
    assert entry.slices == [5, 6, 7] and entry.meta["axis"] == 1
    step = np.abs(embeddings).max() / 127  # int8 with a per-slice, per-channel scale
    np.testing.assert_allclose(entry.embedding(6), embeddings[1], atol=step)
    np.testing.assert_allclose(entry.embeddings([7, 5]), embeddings[[2, 0]], atol=step)
    assert sorted(p.name for p in (tmp_path / "hippocampus" / "case_1").iterdir()) == [
        "axis1.json", "axis1.q.npy", "axis1.scale.npy"]  # no temporaries left
