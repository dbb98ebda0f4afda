"""atomic_write: every writer of the package (segmentations, markups, models, caches, downloads) goes
through it, so a failure leaves the old file or none, never a partial one."""
from __future__ import annotations

import numpy as np
import pytest

from SPDSegmentLib.core.files import atomic_write


def test_success_replaces_the_file_in_one_rename(tmp_path):
    target = tmp_path / "sub" / "entry.q.npy"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(target.name) and tmp != target
        np.save(tmp, np.arange(3))  # np.save keeps a name ending in .npy as it is
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    assert [p.name for p in target.parent.iterdir()] == ["entry.q.npy"]


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.spd.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.spd.safetensors"]
