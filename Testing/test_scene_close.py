"""Closing the scene (File > Close Scene: the scene's EndCloseEvent) on real MRML (slicer-core), with the
engine started through a launcher as in Slicer: the engine forgets the scene's volumes and cached slices,
the Slicer side releases its views and removes every shared file, the GUIs' listeners drop their own
copies, and no temporary file is left."""
from __future__ import annotations

import os
import time

import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (MRML in Python) is not installed", allow_module_level=True)
pytest.importorskip("torch")

from SPDSegmentLib.core import prompts  # noqa: E402
from SPDSegmentLib.core.pipeline import SegmentOptions  # noqa: E402
from SPDSegmentLib.engine.client import EngineClient  # noqa: E402
from SPDSegmentLib.slicer_side import adapter, gui  # noqa: E402
from launcher_stand_in import make_launcher  # noqa: E402
from slicer_app import make_standalone_app  # noqa: E402

TINY = "tiny_sam_test"


@pytest.mark.skipif(os.name != "posix", reason="the launcher stand-in is a POSIX executable")
def test_closing_the_scene_leaves_no_temporary_file(monkeypatch, tmp_path, sample_paths):
    app = make_standalone_app()
    client = EngineClient(python=str(make_launcher(tmp_path)), log_folder=tmp_path / "logs",
                          env=dict(os.environ, OMP_NUM_THREADS="1", SPDSEGMENT_RUNTIME="torch"))
    monkeypatch.setattr(gui, "_engine", client)
    monkeypatch.setattr(gui, "_scene_listeners", [])
    dropped = []
    gui.when_scene_closes(lambda: dropped.append("effect"))  # the effect and the module drop their copies here
    adapter.on_scene_closed(gui.forget_scene_data, app.scene)
    try:
        node = app.load_volume(sample_paths["image"])
        volume = adapter.volume_from_node(node)
        clicks = prompts.to_voxels(prompts.read(sample_paths["points"]), volume, axis=1)
        done = client.segment(volume, clicks, TINY, SegmentOptions(mode="raw"), device="cpu")
        assert done.wait(180) and done.result().voxels > 0
        share = client.share_folder
        assert list(share.glob("volume-*.npy"))
        status = client.status()
        assert status.wait(60) and status.result()["volumes"] == 1 and status.result()["cache_items"] > 0
        pending = client.encode_ahead(volume, clicks, TINY, SegmentOptions(mode="raw", neighbours=4), device="cpu")

        app.scene.Clear(0)  # File > Close Scene

        assert dropped == ["effect"] and pending.done and pending.cancelled
        assert not adapter._VOXELS  # the views of the scene's voxels are released
        after = client.status()  # answered after the engine's forget (messages arrive in order)
        deadline = time.perf_counter() + 60
        while True:
            assert after.wait(60)
            if after.result()["volumes"] == 0 or time.perf_counter() > deadline:
                break
            time.sleep(0.05)
            after = client.status()
        assert after.result()["volumes"] == 0 and after.result()["cache_items"] == 0
        client.poll()  # a late answer to the cancelled request: its files are removed as they are read
        left = sorted(p.name for p in share.iterdir())
        assert left == ["owners.json"], left
    finally:
        client.stop()
        adapter.stop_watching_scenes()  # before the scene goes (see adapter.on_scene_closed)
    assert not share.exists()


def test_the_scene_observer_is_added_once(tmp_path):
    app = make_standalone_app()
    calls = []

    def listener():
        calls.append(1)

    adapter.on_scene_closed(listener, app.scene)
    adapter.on_scene_closed(listener, app.scene)
    app.scene.Clear(0)
    app.scene.Clear(0)
    adapter.stop_watching_scenes()
    app.scene.Clear(0)
    assert calls == [1, 1]
