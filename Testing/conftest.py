"""Shared fixtures. The suite runs without desktop Slicer and without ../shared/data."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SPDSegment"))  # the core package, also when not pip-installed

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory):
    """Converted models and downloads go to a temporary user cache, never into the tester's home."""
    import os

    before = os.environ.get("SPDSEGMENT_CACHE")
    os.environ["SPDSEGMENT_CACHE"] = str(tmp_path_factory.mktemp("spdsegment-cache"))
    yield Path(os.environ["SPDSEGMENT_CACHE"])
    if before is None:
        os.environ.pop("SPDSEGMENT_CACHE", None)
    else:
        os.environ["SPDSEGMENT_CACHE"] = before


@pytest.fixture(scope="session")
def sample_paths():
    from SPDSegmentLib.core.sample import sample_case

    case = sample_case()
    return {"image": case.image, "label": case.label, "points": case.clicks}


@pytest.fixture(scope="session")
def tiny_backbone():
    from SPDSegmentLib.core.models import load_backbone

    return load_backbone("tiny_sam_test", device="cpu")


@pytest.fixture()
def oblique_volume():
    """A small volume with an oblique direction, non-unit spacing and an offset origin."""
    from SPDSegmentLib.core.volume import Volume, geometry_matrix

    angle = np.deg2rad(20)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    matrix = geometry_matrix(origin=(10.0, -5.0, 3.0), spacing=(0.8, 0.9, 2.0), direction=direction.ravel())
    rng = np.random.default_rng(0)
    return Volume(array=rng.random((6, 12, 10)).astype(np.float32), ijk_to_lps=matrix, name="oblique")


@pytest.fixture(scope="module")
def torch_one_thread():
    """Heavy test modules run torch on one thread (CI has 2 cores shared with other work)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def scenes_unwatched():
    """After each test, no scene keeps SPD's close observers (a scene freed by the garbage collector with a
    Python observer on it crashes VTK; adapter.on_scene_closed)."""
    yield
    from SPDSegmentLib.slicer_side import adapter

    adapter.stop_watching_scenes()
