"""Background runs, batches and the GUI helpers of SPDSegmentLib.slicer_side.runner (no Qt, no Slicer)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from SPDSegmentLib.core import prompts
from SPDSegmentLib.core.errors import Cancelled, InputError
from SPDSegmentLib.core.volume import read, read_label
from SPDSegmentLib.slicer_side import runner


def test_background_run_returns_result_and_progress():
    gate = threading.Event()

    def work(progress):
        progress.step("encode", 1, 4)
        gate.wait(5)
        return 42

    run = runner.BackgroundRun(work).start()
    with pytest.raises(RuntimeError, match="not finished"):
        run.result()
    gate.set()
    assert run.wait(5) and run.done
    assert run.state() == ("encode", 1, 4)
    assert run.result() == 42


def test_background_run_reraises_errors_and_cancels():
    run = runner.BackgroundRun(lambda progress: (_ for _ in ()).throw(InputError("bad points"))).start()
    run.wait(5)
    with pytest.raises(InputError, match="bad points"):
        run.result()

    started = threading.Event()

    def slow(progress):
        for step in range(1000):
            started.set()
            progress.step("decode", step, 1000)
            threading.Event().wait(0.005)
        return "finished"

    run = runner.BackgroundRun(slow).start()
    started.wait(5)
    run.cancel()
    assert run.wait(5) and run.cancelled
    with pytest.raises(Cancelled):
        run.result()


def test_parse_progress_and_train_arguments():
    assert runner.parse_progress("stage 1 (saliency):  40%|####      | 40/100 [00:10<00:15,  4.00it/s]") == 0.4
    assert runner.parse_progress("loading cases") is None
    args = runner.train_arguments("/data/Task04", "/out/m.spd.safetensors", epochs=3, lora=True, device="cpu")
    assert args[:3] == ["-m", "SPDSegmentLib.cli", "train"]
    assert args[args.index("--stage1-epochs") + 1] == "3" and args[args.index("--mode") + 1] == "lora"
    with pytest.raises(InputError):
        runner.train_arguments("", "/out/m.spd.safetensors")


def test_train_arguments_parse_with_the_cli():
    cli = pytest.importorskip("SPDSegmentLib.cli")
    parsed = cli.build_parser().parse_args(runner.train_arguments("/d", "/o.spd.safetensors", 2)[2:])
    assert parsed.data == "/d" and parsed.out == "/o.spd.safetensors" and parsed.stage1_epochs == 2


def test_model_menu_without_torch():
    names = [name for name, _ in runner.model_choices()]
    assert names[0].startswith("spd") and "litemedsam" in names and "tiny_sam_test" in names
    assert "licence" in runner.model_status("sam_vit_b")
    assert "bundled" in runner.model_status(names[0])


def write_case(folder, name, sample_paths, points_name):
    import shutil

    shutil.copy(sample_paths["image"], folder / f"{name}.nii.gz")
    volume = read(sample_paths["image"])
    label = read_label(sample_paths["label"], like=volume)
    k, j, i = np.argwhere(label > 0)[len(np.argwhere(label > 0)) // 2]
    lps = (volume.ijk_to_lps @ [i, j, k, 1.0])[:3]
    prompts.write_markups(folder / points_name, lps[None])


def test_pair_cases(tmp_path, sample_paths):
    write_case(tmp_path, "a", sample_paths, "a_centerline.mrk.json")
    write_case(tmp_path, "b", sample_paths, "b.mrk.json")
    (tmp_path / "c.nii.gz").write_bytes(b"")  # an image without points is left out
    (tmp_path / "a_label.nii.gz").write_bytes(b"")
    cases = runner.pair_cases(tmp_path)
    assert [(name, image.name, points.name) for name, image, points in cases] == [
        ("a", "a.nii.gz", "a_centerline.mrk.json"), ("b", "b.nii.gz", "b.mrk.json")]
    with pytest.raises(InputError, match="does not exist"):
        runner.pair_cases(tmp_path / "nope")


def test_run_batch_with_tiny_model(tmp_path, sample_paths):
    pytest.importorskip("SPDSegmentLib.core.pipeline")
    from SPDSegmentLib.core.pipeline import SegmentOptions

    write_case(tmp_path, "a", sample_paths, "a.mrk.json")
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    prompts.write_markups(tmp_path / "broken.mrk.json", np.zeros((1, 3)))
    model = runner.cached_model("tiny_sam_test", "cpu")
    assert runner.cached_model("tiny_sam_test", "cpu") is model
    rows = runner.run_batch(runner.pair_cases(tmp_path), tmp_path / "out", model, SegmentOptions(mode="raw"))
    by_case = {r["case"]: r for r in rows}
    assert by_case["a"]["error"] == "" and (tmp_path / "out" / "a_spd.seg.nrrd").is_file()
    assert by_case["broken"]["error"] and not (tmp_path / "out" / "broken_spd.seg.nrrd").exists()


# ---------------------------------------------------------------- working ahead of the Preview

@pytest.fixture()
def clicked_case(sample_paths):
    volume = read(sample_paths["image"])
    clicks = prompts.to_voxels(prompts.read(sample_paths["points"]), volume, axis=1)
    return volume, clicks


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
def test_run_ahead_leaves_nothing_for_the_preview_to_encode_or_decode(clicked_case, tiny_backbone, monkeypatch,
                                                                     mode):
    from SPDSegmentLib.core.cache import EmbeddingCache
    from SPDSegmentLib.core.pipeline import SegmentOptions, plan, segment

    volume, clicks = clicked_case
    model = tiny_backbone if mode == "raw" else _always_salient_spd(tiny_backbone)
    options = SegmentOptions(mode=mode)
    cache = EmbeddingCache()
    ahead = runner.RunAhead(cache)
    ahead.request(volume, clicks, model, options)
    assert ahead.wait_idle(60) and ahead.last_error is None
    targets = plan(volume, clicks, model, options).targets
    assert ahead.encoded == len(targets) and ahead.runs == 1
    expected = segment(volume, clicks, model, options, cache=EmbeddingCache())
    assert expected.voxels > 0

    def done_ahead(*args, **kwargs):
        raise AssertionError("the Preview computed what was done ahead")

    monkeypatch.setattr(tiny_backbone, "encode", done_ahead)
    monkeypatch.setattr(tiny_backbone, "decode", done_ahead)
    result = segment(volume, clicks, model, options, cache=cache)
    np.testing.assert_array_equal(result.mask, expected.mask)


def test_run_ahead_builds_no_saliency_volume(clicked_case, tiny_backbone, monkeypatch):
    from SPDSegmentLib.core import pipeline
    from SPDSegmentLib.core.cache import EmbeddingCache

    volume, clicks = clicked_case
    asked = []
    real_segment = pipeline.segment

    def recording_segment(*args, **kwargs):
        asked.append(args[3].return_saliency)
        return real_segment(*args, **kwargs)

    monkeypatch.setattr(pipeline, "segment", recording_segment)
    ahead = runner.RunAhead(EmbeddingCache())
    model = _always_salient_spd(tiny_backbone)
    ahead.request(volume, clicks, model, pipeline.SegmentOptions(mode="spd", return_saliency=True))
    assert ahead.wait_idle(60) and ahead.last_error is None
    assert asked == [False] and ahead.runs == 1


def test_a_newer_click_cancels_the_background_run_quietly(clicked_case, tiny_backbone, monkeypatch):
    from SPDSegmentLib.core.cache import EmbeddingCache
    from SPDSegmentLib.core.pipeline import SegmentOptions

    volume, clicks = clicked_case
    decoding = threading.Event()
    release = threading.Event()
    real_decode = tiny_backbone.decode

    def slow_decode(*args, **kwargs):
        decoding.set()
        release.wait(5)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(tiny_backbone, "decode", slow_decode)
    ahead = runner.RunAhead(EmbeddingCache())
    ahead.request(volume, clicks, tiny_backbone, SegmentOptions(mode="raw"))
    assert decoding.wait(30)  # every slice encoded; the background run is decoding
    ahead.stop()  # a Preview starts
    release.set()
    assert ahead.wait_idle(10)
    assert ahead.runs == 0 and ahead.last_error is None  # cancelled at the next slice, not an error


def test_run_ahead_stops_between_slices_and_newest_request_wins(clicked_case, tiny_backbone, monkeypatch):
    from SPDSegmentLib.core.cache import EmbeddingCache
    from SPDSegmentLib.core.pipeline import SegmentOptions

    volume, clicks = clicked_case
    first_slice = threading.Event()
    release = threading.Event()
    real_encode = tiny_backbone.encode

    def slow_encode(images):
        first_slice.set()
        release.wait(5)
        return real_encode(images)

    monkeypatch.setattr(tiny_backbone, "encode", slow_encode)
    ahead = runner.RunAhead(EmbeddingCache())
    ahead.request(volume, clicks, tiny_backbone, SegmentOptions(mode="raw"))
    assert first_slice.wait(10)
    ahead.stop()  # a Preview starts
    release.set()
    assert ahead.wait_idle(10)
    assert ahead.encoded == 1  # the slice under way is finished, no further one is started


def test_run_ahead_keeps_errors_to_itself(clicked_case, tiny_backbone):
    from SPDSegmentLib.core.pipeline import SegmentOptions

    volume, clicks = clicked_case
    ahead = runner.RunAhead()
    ahead.request(volume, clicks, tiny_backbone, SegmentOptions(mode="raw", slice_range=(900, 901)))  # no prompts there
    assert ahead.wait_idle(10)
    assert isinstance(ahead.last_error, InputError)


def test_bench_speed_clicking_path_previews_the_full_click_set(clicked_case, tiny_backbone, monkeypatch):
    """``spd bench-speed``'s effect path runs, and the Preview it times is a run over every click."""
    from SPDSegmentLib.core import pipeline
    from SPDSegmentLib.research import speed

    volume, clicks = clicked_case
    click_counts = []
    real_segment = pipeline.segment

    def recording_segment(volume_, prompts_, *args, **kwargs):
        click_counts.append(len(prompts_.ijk))
        return real_segment(volume_, prompts_, *args, **kwargs)

    monkeypatch.setattr(pipeline, "segment", recording_segment)
    seconds = speed._clicked_one_per_second(volume, clicks, tiny_backbone, preview_after=0.0, seconds_per_click=0.01)
    assert 0.0 <= seconds < 60.0
    assert len(clicks.ijk) in click_counts
