"""The SPD engine: its messages, the in-process Engine (work ahead, downloads only when asked, batches),
and the engine as a real child process (results equal to in-process ones, cancel, a killed engine, a hung
one, two volumes in turn, a volume it has not seen, a stranger refused)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from SPDSegmentLib.core import prompts
from SPDSegmentLib.core.errors import Cancelled, CheckpointError, InputError
from SPDSegmentLib.core.volume import Volume, read, read_label
from SPDSegmentLib.engine import protocol
from SPDSegmentLib.engine.client import EngineClient, EngineDied

pytest.importorskip("torch")
from SPDSegmentLib.core.pipeline import Result, SegmentOptions, plan, segment  # noqa: E402
from SPDSegmentLib.engine.server import Engine, run_batch  # noqa: E402

TINY = "tiny_sam_test"


@pytest.fixture(scope="module")
def case(sample_paths):
    volume = read(sample_paths["image"])
    volume.array.flags.writeable = False  # as the Slicer adapter's copy
    clicks = prompts.to_voxels(prompts.read(sample_paths["points"]), volume, axis=1)
    return volume, clicks


@pytest.fixture(scope="module")
def long_case(case):
    """A volume six times as long with a click on every slice: ~2 s of work with the tiny model."""
    volume, _ = case
    big = Volume(np.ascontiguousarray(np.tile(volume.array, (1, 6, 1))), volume.ijk_to_lps, name="long")
    big.array.flags.writeable = False
    ijk = np.array([[17.0, j, 17.0] for j in range(big.shape[1])])
    return big, prompts.to_voxels(prompts.from_ijk(ijk), big, axis=1)


# ---------------------------------------------------------------- messages

def test_requests_and_results_cross_as_json(tmp_path, case):
    volume, clicks = case
    shelf = protocol.VolumeShelf(tmp_path)
    request = protocol.Segment(volume, clicks, TINY, SegmentOptions(mode="raw", slice_range=(3, 9), window=(40, 400)))
    data = protocol.to_json(request, folder=tmp_path, share_volume=shelf.reference)
    assert len(protocol.dumps(data)) < 10_000  # the voxels travel by file, not in the JSON
    assert not shelf.complete(data["fields"]["volume"]["__volume__"])  # written by the client's polls
    assert shelf.write_some(10.0) and shelf.complete(data["fields"]["volume"]["__volume__"])
    message = protocol.loads(protocol.dumps({"type": "request", "id": 1, "kind": "segment", "body": data}))
    back = protocol.from_json(message["body"], open_volume=protocol.VolumeRack().open)
    assert isinstance(back, protocol.Segment) and back.model == TINY
    assert back.options == request.options and back.options.slice_range == (3, 9)
    np.testing.assert_array_equal(back.volume.array, volume.array)
    assert not back.volume.array.flags.writeable and back.volume.fingerprint() == volume.fingerprint()
    np.testing.assert_array_equal(back.prompts.ijk, clicks.ijk)
    assert back.prompts.axis == clicks.axis and back.prompts.names == clicks.names
    assert protocol.to_json(protocol.Segment(volume, clicks), share_volume=shelf.reference)["fields"]["volume"] == \
        data["fields"]["volume"]  # written once

    mask = np.zeros((40, 60, 50), np.uint8)
    mask[10:12, 20:30, 5:9] = 1
    result = Result(mask=mask, axis=1, slices=[20, 21], timings={"total_s": 0.1}, mode="raw")
    sent = protocol.to_json(result, folder=tmp_path)
    path = sent["fields"]["mask"]["file"]["path"]
    assert np.load(path).shape == (2, 10, 4)  # only the non-zero box is written
    got = protocol.from_json(sent)
    np.testing.assert_array_equal(got.mask, mask)
    assert got.slices == [20, 21] and not os.path.exists(path)  # the reader removes the file


def test_unknown_types_are_refused():
    with pytest.raises(ValueError, match="unknown data type"):
        protocol.from_json({"__dataclass__": "Popen", "fields": {}})
    with pytest.raises(TypeError):
        protocol.to_json(object())


def test_messages_arrive_in_any_pieces():
    buffer = protocol.LineBuffer()
    data = protocol.dumps({"type": "progress", "id": 1}) + protocol.dumps({"type": "result", "id": 1, "body": None})
    assert buffer.feed(data[:5]) == []
    assert [m["type"] for m in buffer.feed(data[5:])] == ["progress", "result"]


# ---------------------------------------------------------------- the engine in-process

def _always_salient_spd(backbone):
    import torch

    from SPDSegmentLib.core.saliency import SaliencyHead
    from SPDSegmentLib.core.spd_model import SPDModel

    head = SaliencyHead(backbone.embed_dim, 8).eval()
    with torch.no_grad():
        head.net[-1].weight.zero_()
        head.net[-1].bias.fill_(4.0)  # every prompt passes: every slice gets a consensus to decode
    return SPDModel(backbone, head, header={"tau": 0.5, "neighbours": 2, "lora_rank": 0})


@pytest.mark.parametrize("mode", ["raw", "spd"])
def test_work_ahead_leaves_nothing_for_the_preview_to_encode_or_decode(case, tiny_backbone, monkeypatch, mode):
    from SPDSegmentLib.core.cache import EmbeddingCache

    volume, clicks = case
    model = tiny_backbone if mode == "raw" else _always_salient_spd(tiny_backbone)
    options = SegmentOptions(mode=mode, return_saliency=True)
    engine = Engine(cache=EmbeddingCache())
    asked = []
    real_segment = segment
    monkeypatch.setattr("SPDSegmentLib.core.pipeline.segment",
                        lambda *a, **k: asked.append(a[3].return_saliency) or real_segment(*a, **k))
    done = engine.handle(protocol.EncodeAhead(volume, clicks, model, options))
    assert done == {"encoded": len(plan(volume, clicks, model, options).targets), "ran": True}
    assert asked == [False]  # no saliency volume per click: the maps are remembered per slice
    monkeypatch.undo()
    expected = segment(volume, clicks, model, options, cache=EmbeddingCache())
    assert expected.voxels > 0

    def done_ahead(*args, **kwargs):
        raise AssertionError("the Preview computed what was done ahead")

    monkeypatch.setattr(tiny_backbone, "encode", done_ahead)
    monkeypatch.setattr(tiny_backbone, "decode", done_ahead)
    result = engine.handle(protocol.Segment(volume, clicks, model, options))
    np.testing.assert_array_equal(result.mask, expected.mask)


def test_work_ahead_stops_at_the_next_slice_when_superseded(case, tiny_backbone, monkeypatch):
    from SPDSegmentLib.core.cache import EmbeddingCache
    from SPDSegmentLib.core.progress import Progress

    volume, clicks = case
    progress = Progress()
    encoded = []
    real_encode = tiny_backbone.encode

    def encode_then_supersede(images):
        encoded.append(1)
        progress.cancel()  # a newer click arrives while the first slice encodes
        return real_encode(images)

    monkeypatch.setattr(tiny_backbone, "encode", encode_then_supersede)
    with pytest.raises(Cancelled):
        Engine(cache=EmbeddingCache()).handle(protocol.EncodeAhead(volume, clicks, tiny_backbone,
                                                                   SegmentOptions(mode="raw")), progress)
    assert len(encoded) == 1  # the slice under way is finished, no further one is started


def test_a_missing_checkpoint_is_downloaded_only_when_asked(monkeypatch):
    from SPDSegmentLib.core.models import registry
    from SPDSegmentLib.engine import server

    fetched = []
    monkeypatch.setattr(registry, "is_available", lambda name: False)
    monkeypatch.setattr(registry, "checkpoint_for", lambda name, allow_download, progress: fetched.append(name))
    with pytest.raises(CheckpointError, match=r"sam_vit_h checkpoint \(2565 MB\) is not on this machine"):
        server.ensure_checkpoint("sam_vit_h", allow_download=False)
    assert fetched == []
    server.ensure_checkpoint("sam_vit_h", allow_download=True)
    assert fetched == ["sam_vit_h"]
    server.ensure_checkpoint("litemedsam", allow_download=False)  # bundled with a package: nothing to fetch
    server.ensure_checkpoint("spd-hippocampus", allow_download=False)  # its backbone is litemedsam


def test_run_batch_with_tiny_model(tmp_path, sample_paths, tiny_backbone):
    from SPDSegmentLib.core.batch import pair_cases

    volume = read(sample_paths["image"])
    label = read_label(sample_paths["label"], like=volume)
    k, j, i = np.argwhere(label > 0)[len(np.argwhere(label > 0)) // 2]
    (tmp_path / "a.nii.gz").write_bytes(sample_paths["image"].read_bytes())
    prompts.write_markups(tmp_path / "a.mrk.json", (volume.ijk_to_lps @ [i, j, k, 1.0])[:3][None])
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    prompts.write_markups(tmp_path / "broken.mrk.json", np.zeros((1, 3)))
    rows = run_batch(pair_cases(tmp_path), tmp_path / "out", tiny_backbone, SegmentOptions(mode="raw"))
    by_case = {r["case"]: r for r in rows}
    assert by_case["a"]["status"] == "done" and (tmp_path / "out" / "a_spd.seg.nrrd").is_file()
    assert by_case["broken"]["status"] == "failed" and by_case["broken"]["error"] and not (tmp_path / "out" / "broken_spd.seg.nrrd").exists()


# ---------------------------------------------------------------- the engine as a child process

EXACT = {"SPDSEGMENT_RUNTIME": "torch", "SPDSEGMENT_PRECISION": "fp32"}  # both processes compute alike
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # test engines share 2 cores with the suite and other work


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_one_thread):
    yield


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    engine = EngineClient(env=dict(os.environ, **EXACT, **ONE_THREAD), log_folder=tmp_path_factory.mktemp("logs"))
    assert engine.load_model(TINY, "cpu").wait(180)
    yield engine
    engine.stop()


def _wait_for_progress(handle, timeout=60):
    deadline = time.perf_counter() + timeout
    while handle.state()[0] not in ("encode", "decode") and not handle.done:
        assert time.perf_counter() < deadline, "no progress from the engine"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def tiny_default():
    """The tiny model as the engine of these tests loads it (eager PyTorch fp32)."""
    from SPDSegmentLib.core.pipeline import load_model

    return load_model(TINY, device="cpu", runtime=EXACT["SPDSEGMENT_RUNTIME"], precision=EXACT["SPDSEGMENT_PRECISION"])


def assert_same_mask(got, expected):
    """Equal but for a voxel or two where a logit sits at 0 (thread counts differ between the processes)."""
    assert got.shape == expected.shape and expected.sum() > 0
    assert np.count_nonzero(got != expected) <= max(2, expected.sum() // 500)


def test_engine_result_equals_the_in_process_one(client, case, tiny_default):
    volume, clicks = case
    options = SegmentOptions(mode="raw", return_saliency=True)
    handle = client.segment(volume, clicks, TINY, options, device="cpu")
    assert handle.wait(120), "no answer"
    result = handle.result()
    expected = segment(volume, clicks, tiny_default, options)
    assert_same_mask(result.mask, expected.mask)
    assert result.slices == expected.slices and result.axis == expected.axis
    status = client.status()
    assert status.wait(30) and status.result()["models"][0]["model"] == TINY


def test_cancel_ends_the_handle_at_once_and_the_engine_goes_on(client, long_case, case):
    volume, clicks = long_case
    handle = client.segment(volume, clicks, TINY, SegmentOptions(mode="raw"), device="cpu")
    _wait_for_progress(handle)
    handle.cancel()
    assert handle.done and handle.cancelled
    with pytest.raises(Cancelled):
        handle.result()
    status = client.status()  # answered at once, even while the cancelled job winds down
    assert status.wait(30) and status.result()["pid"] == client.pid
    small, small_clicks = case
    after = client.segment(small, small_clicks, TINY, SegmentOptions(mode="raw"), device="cpu")
    assert after.wait(120) and after.result().voxels > 0
    assert not client._abandoned  # the engine gave the cancelled request up


def test_a_killed_engine_fails_its_request_in_one_line_and_the_next_starts_a_fresh_one(client, long_case, case):
    volume, clicks = long_case
    first_pid = client.pid
    handle = client.segment(volume, clicks, TINY, SegmentOptions(mode="raw"), device="cpu")
    _wait_for_progress(handle)
    client.kill()  # as the out-of-memory killer would
    assert handle.wait(30)
    with pytest.raises(EngineDied) as died:
        handle.result()
    message = str(died.value)
    assert "\n" not in message and "stopped unexpectedly" in message and str(client.log_path) in message
    small, small_clicks = case  # shared with the engine that died; the new one has never seen it
    after = client.segment(small, small_clicks, TINY, SegmentOptions(mode="raw"), device="cpu")
    assert after.wait(180) and after.result().voxels > 0
    assert client.pid != first_pid and client.starts >= 2


@pytest.mark.skipif(sys.platform == "win32", reason="freezes the engine with SIGSTOP")
def test_a_hung_request_is_cancelled_and_its_engine_replaced(case, long_case, tmp_path):
    """An engine stuck in native code never gives up a cancelled request: it is killed ``hang_seconds`` later."""
    import signal

    volume, clicks = case
    engine = EngineClient(env=dict(os.environ, **EXACT, **ONE_THREAD), log_folder=tmp_path, hang_seconds=0.5)
    try:
        assert engine.load_model(TINY, "cpu").wait(180)
        handle = engine.segment(*long_case, TINY, SegmentOptions(mode="raw"), device="cpu")
        hung_pid = engine.pid
        os.kill(hung_pid, signal.SIGSTOP)  # hung: it reads no cancel and answers nothing
        os.waitpid(hung_pid, os.WUNTRACED)  # a stop takes effect a moment later: wait for it
        handle.cancel()
        assert handle.done and handle.cancelled  # the GUI is free at once
        time.sleep(1.0)
        engine.poll()
        assert not engine.alive and "did not stop within" in engine.log_path.read_text()
        after = engine.segment(volume, clicks, TINY, SegmentOptions(mode="raw"), device="cpu")
        assert after.wait(180) and after.result().voxels > 0 and engine.pid != hung_pid
    finally:
        engine.stop()


def test_two_volumes_in_turn(client, case, tiny_default):
    volume, clicks = case
    other = Volume(np.ascontiguousarray(volume.array[:, :, ::-1]), volume.ijk_to_lps, name="flipped")
    other.array.flags.writeable = False
    options = SegmentOptions(mode="raw")
    masks = []
    for vol in (volume, other, volume):
        handle = client.segment(vol, clicks, TINY, options, device="cpu")
        assert handle.wait(120)
        masks.append(handle.result().mask)
    np.testing.assert_array_equal(masks[0], masks[2])
    assert_same_mask(masks[0], segment(volume, clicks, tiny_default, options).mask)
    assert_same_mask(masks[1], segment(other, clicks, tiny_default, options).mask)
    assert not np.array_equal(masks[0], masks[1])


def test_a_volume_file_that_is_gone_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="could not read the volume"):
        protocol.VolumeRack().open({"id": "x", "array": {"path": str(tmp_path / "gone.npy"), "dtype": "int16",
                                                         "shape": [2, 2, 2]}, "ijk_to_lps": np.eye(4).tolist()})


def test_errors_come_back_as_their_own_type(client, case):
    volume, clicks = case
    handle = client.segment(volume, clicks, TINY, SegmentOptions(mode="raw", slice_range=(900, 901)), device="cpu")
    assert handle.wait(60)
    with pytest.raises(InputError, match="No prompts"):
        handle.result()


def test_the_engine_serves_only_its_parent(tmp_path):
    """A process that does not know the token is refused; started by hand, the engine does not run."""
    from SPDSegmentLib.engine.client import PACKAGE_PARENT

    env = dict(os.environ, PYTHONPATH=str(PACKAGE_PARENT), **{protocol.TOKEN_ENV: "secret",
                                                              protocol.SHARE_ENV: str(tmp_path)})
    stranger = subprocess.run([sys.executable, "-m", "SPDSegmentLib.engine"], env=env, capture_output=True,
                              timeout=120, input=protocol.dumps({"type": "hello", "token": "guess"}) +
                              protocol.dumps({"type": "request", "id": 1, "kind": "status", "body": None}))
    assert stranger.returncode == 3 and b"refused" in stranger.stderr and b"result" not in stranger.stdout
    by_hand = subprocess.run([sys.executable, "-m", "SPDSegmentLib.engine"], env=dict(
        os.environ, PYTHONPATH=str(PACKAGE_PARENT)), capture_output=True, timeout=120, input=b"")
    assert by_hand.returncode == 2 and b"not meant to be started by hand" in by_hand.stderr


def test_no_thread_in_the_parent_and_the_engine_ends_with_its_pipe(case, tmp_path):
    volume, clicks = case
    before = threading.active_count()
    engine = EngineClient(env=dict(os.environ, **ONE_THREAD), log_folder=tmp_path)
    try:
        handle = engine.segment(volume, clicks, TINY, SegmentOptions(mode="raw"), device="cpu")
        assert threading.active_count() == before
        assert handle.wait(180) and handle.result().voxels > 0
        assert threading.active_count() == before
        process = engine._process
        process.stdin.close()  # Slicer gone (even by a crash): the engine does not outlive it
        assert process.wait(30) == 0
    finally:
        engine.stop()
    assert not engine.alive and engine._share is None


def test_bench_speed_times_the_effects_path_through_the_engine_and_in_process(case, tiny_default, tmp_path):
    """``spd bench-speed``'s effect path runs both ways, and the Preview it times covers every click."""
    from SPDSegmentLib.research import speed

    volume, clicks = case
    seconds, again = speed._clicked_one_per_second(volume, clicks, TINY, preview_after=0.0, seconds_per_click=0.01,
                                                   device="cpu", client=EngineClient(
                                                       env=dict(os.environ, **ONE_THREAD), log_folder=tmp_path))
    assert 0.0 <= again and 0.0 <= seconds < 60.0
    seconds, again = speed._clicked_in_process(volume, clicks, tiny_default, 0.0, seconds_per_click=0.01)
    assert 0.0 <= again and 0.0 <= seconds < 60.0
    assert [len(c) for c in speed._click_by_click(clicks)] == list(range(1, len(clicks) + 1))
    assert [speed._at_next_tick(s) for s in (0.01, 0.05, 0.051)] == pytest.approx([0.05, 0.05, 0.1])
