"""Corrections (issue 19): point kinds, the threshold field, corrections through segment, the challenge's click
rule, and the simulate/evaluate options. Tiny models and tiny volumes: contracts, not accuracy."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cli_helpers import run

from SPDSegmentLib.core import corrections, prompts
from SPDSegmentLib.core import volume as vol
from SPDSegmentLib.core.cache import EmbeddingCache
from SPDSegmentLib.core.errors import InputError
from SPDSegmentLib.core.pipeline import SegmentOptions, segment
from SPDSegmentLib.core.saliency import SaliencyHead
from SPDSegmentLib.core.spd_model import SPDModel
from SPDSegmentLib.research import simulate as sim

AXIS = 1

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---------------------------------------------------------------- point kinds

def test_kinds_default_from_labels_and_must_agree(oblique_volume):
    points = prompts.from_ijk([[1, 2, 3], [2, 3, 4]], labels=[1, 0])
    assert points.kinds == ["click", "background"]
    points = prompts.from_ijk([[1, 2, 3], [2, 3, 4]], kinds=["correction", "background"])
    np.testing.assert_array_equal(points.labels, [1, 0])  # labels follow the kinds
    with pytest.raises(InputError, match="background point has label 0"):
        prompts.from_ijk([[1, 2, 3]], labels=[1], kinds=["background"])
    with pytest.raises(InputError, match="unknown point kind 'negative'"):
        prompts.from_ijk([[1, 2, 3]], kinds=["negative"])
    voxels = prompts.to_voxels(prompts.from_ijk([[1, 2, 3], [2, 3, 4], [3, 4, 5]],
                                                kinds=["click", "correction", "background"]), oblique_volume, axis=0)
    assert voxels.kinds == ["click", "correction", "background"]
    np.testing.assert_array_equal(voxels.is_correction(), [False, True, True])
    assert voxels.select([0, 2]).kinds == ["click", "background"]


@pytest.mark.parametrize("suffix", [".mrk.json", ".csv"])
def test_kinds_round_trip_through_markups_and_csv(tmp_path, oblique_volume, suffix):
    lps = vol.ijk_to_physical(np.array([[1.0, 2.0, 3.0], [2.0, 3.0, 1.0], [4.0, 5.0, 2.0]]),
                              oblique_volume.ijk_to_lps)
    kinds = ["click", "correction", "background"]
    written = prompts.write_points(tmp_path / f"p{suffix}", prompts.from_lps(lps, names=["a", "b", "c"], kinds=kinds))
    back = prompts.read(written)
    assert back.kinds == kinds and back.names == ["a", "b", "c"]
    np.testing.assert_array_equal(back.labels, [1, 1, 0])
    np.testing.assert_allclose(back.lps, lps, atol=1e-4)


def test_csv_label_words_and_slicer_descriptions(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("x,y,z,label\n1,2,3,fg\n1,2,4,correction\n1,2,5,0\n1,2,6,Correction\n")
    assert prompts.read(path).kinds == ["click", "correction", "background", "correction"]
    path.write_text("x,y,z,label\n1,2,3,2\n")
    with pytest.raises(InputError, match="'correction' for foreground corrections"):
        prompts.read(path)
    slicer_table = tmp_path / "slicer.csv"  # Slicer's own table: 'label' is the point's name, the kind is described
    slicer_table.write_text("label,r,a,s,description\nF-1,1,2,3,\nF-2,1,2,4,correction\nF-3,1,2,5,background\n")
    got = prompts.read(slicer_table)
    assert got.kinds == ["click", "correction", "background"] and got.names == ["F-1", "F-2", "F-3"]


# ---------------------------------------------------------------- the threshold field

def _field_mask(probabilities, fixes, spacing=(1.0, 1.0), across=1.0):
    thresholds = corrections.threshold_field(probabilities, fixes, spacing, across)
    return {t: probabilities[t] > thresholds[t] for t in probabilities}


def cone(shape, centre, radius, top, edge):
    """A blob whose probability falls from ``top`` at its centre to ``edge`` at ``radius`` (0.1 outside)."""
    rows, cols = np.indices(shape, dtype=float)
    d = np.hypot(rows - centre[0], cols - centre[1])
    return np.where(d <= radius, top - (top - edge) * d / radius, 0.1).astype(np.float32)


def test_background_click_removes_the_region_it_sits_in_and_nothing_far_away():
    shape = (80, 80)
    prob = np.maximum(cone(shape, (20, 20), 10, 0.95, 0.55),  # the wrong region, most confident at its middle
                      cone(shape, (60, 60), 10, 0.95, 0.55))  # another region, far away (more than 3 sigma)
    probabilities = {t: prob.copy() for t in range(30)}
    before = {t: p > 0.5 for t, p in probabilities.items()}
    after = _field_mask(probabilities, [corrections.Correction(15, np.array([20.0, 20.0]), 0)])
    assert before[15][20, 20] and not after[15][20, 20]  # the clicked voxel always changes
    assert not after[15][:40, :40].any()  # the whole region it sits in goes
    assert not after[16][:40, :40].any() and not after[14][:40, :40].any()  # and where it continues
    np.testing.assert_array_equal(after[15][40:, 40:], before[15][40:, 40:])
    far = corrections.reach(1.0) + 1
    for t in range(30):
        if abs(t - 15) >= far:
            np.testing.assert_array_equal(after[t], before[t])  # beyond its reach across slices
    assert not np.array_equal(after[18], before[18])  # fading over 4 mm across slices


def test_foreground_correction_adds_the_structure_under_it_only_near_it():
    shape = (60, 120)
    prob = np.full(shape, 0.05, np.float32)
    prob[30:50] = 0.9  # what was found
    prob[20:30] = np.linspace(0.1, 0.45, 10)[:, None]  # a missed rim, surer towards what was found
    probabilities = {0: prob}
    after = _field_mask(probabilities, [corrections.Correction(0, np.array([25.0, 20.0]), 1)])
    assert after[0][25, 18:23].all() and after[0][26:30, 14:27].all()  # the clicked voxel and the rim beside it
    np.testing.assert_array_equal(after[0][:, 50:], prob[:, 50:] > 0.5)  # nothing farther along the rim
    assert not after[0][:20].any()  # nor in the confident background


def test_no_corrections_is_the_plain_threshold_and_unsegmented_slices_are_left_alone():
    probabilities = {3: np.random.default_rng(0).random((20, 20)).astype(np.float32)}
    field = corrections.threshold_field(probabilities, [], (1.0, 1.0), 1.0)
    assert np.all(field[3] == 0.5)
    field = corrections.threshold_field(probabilities, [corrections.Correction(7, np.array([5.0, 5.0]), 0)],
                                        (1.0, 1.0), 1.0)
    assert np.all(field[3] == 0.5)  # its own slice was not segmented: nothing to weigh it against


# ---------------------------------------------------------------- corrections through segment

def salient_model(backbone, bias):
    """An in-memory SPD model whose saliency is sigmoid(bias) everywhere, averaged half and half."""
    torch.manual_seed(0)
    head = SaliencyHead(backbone.embed_dim, 8).eval()
    with torch.no_grad():
        head.net[-1].weight.zero_()
        head.net[-1].bias.fill_(bias)
    return SPDModel(backbone, head, header={"tau": 0.5, "neighbours": 1, "lora_rank": 0, "fusion": 0.5,
                                            "decoder_prompt": "box"})


@pytest.fixture(scope="module")
def case(sample_paths):
    volume = vol.read(sample_paths["image"])
    label = vol.read_label(sample_paths["label"], like=volume)
    clicks = sim.simulate(label, AXIS, "moderate", seed=0).voxel_prompts(volume)
    return volume, label, clicks


def _with(clicks, ijk, kind):
    return dataclasses.replace(clicks, ijk=np.vstack([clicks.ijk, np.asarray(ijk, float)[None]]),
                               labels=np.append(clicks.labels, 0 if kind == "background" else 1),
                               names=list(clicks.names) + ["c"], kinds=list(clicks.kinds) + [kind])


def test_a_background_click_removes_a_false_positive_near_it_only(case, tiny_backbone):
    volume, _, clicks = case
    model = salient_model(tiny_backbone, 6.0)  # everything salient: the result spills over
    cache = EmbeddingCache()
    base = segment(volume, clicks, model, cache=cache)
    inside = np.argwhere(base.mask)
    k, j, i = inside[len(inside) // 2]
    fixed = segment(volume, _with(clicks, [i, j, k], "background"), model, cache=cache)
    assert base.mask[k, j, i] == 1 and fixed.mask[k, j, i] == 0
    assert fixed.voxels < base.voxels
    changed = np.argwhere(fixed.mask != base.mask)
    spacing = volume.spacing[::-1]
    distance_mm = np.linalg.norm((changed - [k, j, i]) * spacing, axis=1)
    assert distance_mm.max() <= corrections.TRUNCATE * corrections.SIGMA_MM * 1.5  # near the click only
    assert [e.status for e in fixed.audit].count("correction") == 1
    assert fixed.audit_counts()["correction"] == 1 and "correction 1" in fixed.summary()


def test_a_background_click_at_the_results_end_segments_no_new_slice(case, tiny_backbone):
    from SPDSegmentLib.core import pipeline

    volume, _, clicks = case
    model = salient_model(tiny_backbone, 6.0)
    cache = EmbeddingCache()
    base = segment(volume, clicks, model, cache=cache)
    last = int(np.flatnonzero(base.mask.any(axis=(0, 2))).max())  # the result's last slice along axis 1
    k, i = np.argwhere(base.mask[:, last, :])[0]
    listed = _with(clicks, [i, last, k], "background")
    before = pipeline.plan(volume, clicks, model, SegmentOptions())
    after = pipeline.plan(volume, listed, model, SegmentOptions())
    assert after.targets == before.targets and after.encode == before.encode  # nothing new to encode
    fixed = segment(volume, listed, model, cache=cache)
    assert fixed.timings["encode_s"] < 0.05 * base.timings["encode_s"] + 0.01
    assert not (fixed.mask & ~base.mask).any()  # a background click only removes
    assert fixed.mask[k, last, i] == 0


def test_a_trusted_foreground_correction_adds_where_the_saliency_map_rejects(case, tiny_backbone):
    volume, _, clicks = case
    model = salient_model(tiny_backbone, -6.0)  # nothing salient: every sloppy click is rejected
    cache = EmbeddingCache()
    base = segment(volume, clicks, model, cache=cache)
    assert base.audit_counts()["kept"] == 0
    t = int(clicks.slice_index()[len(clicks) // 2])
    point = [10.0, float(t), 12.0]  # (i, j, k) on slice t of axis 1
    fixed = segment(volume, _with(clicks, point, "correction"), model, cache=cache)
    assert fixed.mask[12, t, 10] == 1  # the clicked voxel is in the result
    correction = next(e for e in fixed.audit if e.status == "correction")
    assert correction.label == 1 and correction.slice == t


def test_the_same_click_list_gives_the_same_mask(case, tiny_backbone):
    volume, label, clicks = case
    model = salient_model(tiny_backbone, 6.0)
    inside = np.argwhere(label)
    k, j, i = inside[0]
    listed = _with(_with(clicks, [i, j, k], "background"), [i + 2, j, k + 1], "correction")
    warm = EmbeddingCache()
    first = segment(volume, listed, model, cache=warm)
    segment(volume, clicks, model, cache=warm)  # something else in between
    again = segment(volume, listed, model, cache=warm)
    fresh = segment(volume, listed, model, cache=EmbeddingCache())
    np.testing.assert_array_equal(first.mask, again.mask)
    np.testing.assert_array_equal(first.mask, fresh.mask)


def test_raw_mode_gives_background_clicks_to_the_decoder_as_negative_points(case, tiny_backbone, monkeypatch):
    from SPDSegmentLib.core import pipeline

    volume, label, clicks = case
    j = int(clicks.slice_index()[len(clicks) // 2])  # a slice with a sloppy click
    k, i = np.argwhere(label[:, j])[0]
    seen = []
    real = pipeline._decode
    monkeypatch.setattr(pipeline, "_decode", lambda *a, **kw: seen.extend(a[2]) or real(*a, **kw))
    segment(volume, _with(clicks, [i, j, k], "background"), tiny_backbone, SegmentOptions(mode="raw"),
            cache=EmbeddingCache())
    job = next(job for job in seen if job[0] == j)
    assert 0 in list(job[2]) and 1 in list(job[2]) and job[3] is not None  # negatives beside positives, a box


# ---------------------------------------------------------------- the challenge's click rule

def ball(shape, centre, radius):
    grid = np.indices(shape, dtype=float)
    return (sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2).astype(np.uint8)


def test_click_rule_on_synthetic_masks():
    label = ball((30, 40, 30), (15, 20, 15), 8)
    assert sim.next_correction(label, label.copy(), AXIS) is None
    # a false positive blob bigger than a small miss: a background click at its deepest in-plane point
    result = label.copy()
    blob = np.zeros(label.shape, bool)  # apart from the structure; its thickest section is on slice 20 of axis 1
    blob[12:19, 20, 25:32] = True
    blob[13:18, 18:23, 26:31] = True
    result[blob.astype(bool)] = 1
    result[ball(label.shape, (15, 13, 15), 1).astype(bool)] = 0
    click = sim.next_correction(label, result, AXIS)
    i, j, k = click.ijk.astype(int)
    assert click.label == 0 and click.kind == "background" and blob[k, j, i]
    assert click.slice == j == 20  # the thickest section of the blob, on a slice of axis 1
    section = np.take(blob, j, axis=AXIS)
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(np.pad(section, 1))[1:-1, 1:-1]
    assert click.depth == pytest.approx(depth.max()) and depth[k, i] == depth.max()
    assert click.error_voxels == int(blob.sum())
    # a bigger miss than any false positive: a foreground click inside the miss
    result = label.copy()
    miss = ball(label.shape, (15, 20, 9), 5).astype(bool) & label.astype(bool)
    result[miss] = 0
    click = sim.next_correction(label, result, 0)
    i, j, k = click.ijk.astype(int)
    assert click.label == 1 and click.kind == "correction" and miss[k, j, i] and click.slice == k
    with pytest.raises(InputError, match="one grid"):
        sim.next_correction(label, result[:-1], AXIS)


def test_corrections_accumulate(case):
    _, _, clicks = case
    click = sim.CorrectionClick(ijk=np.array([3.0, 4.0, 5.0]), label=0, slice=4, error_voxels=9, depth=1.0)
    more = sim.with_correction(sim.with_correction(clicks, click), dataclasses.replace(click, label=1))
    assert len(more) == len(clicks) + 2 and more.kinds[-2:] == ["background", "correction"]
    assert list(more.labels[-2:]) == [0, 1] and more.names[-2:] == ["C-1", "C-2"]


def test_harsh_level_skips_runs_of_slices():
    mask = ball((30, 60, 30), (15, 30, 15), 12)
    mask[:, :6] = 0
    runs = []
    for seed in range(10):
        clicked = set(sim.simulate(mask, AXIS, "harsh", seed).slice_index.tolist())
        present = [t for t in range(mask.shape[AXIS]) if mask[:, t].any()]
        missing = [t for t in present if t not in clicked]
        gaps = np.split(np.array(missing), np.flatnonzero(np.diff(missing) > 1) + 1) if missing else []
        runs += [len(g) for g in gaps]
    assert np.mean(runs) >= 3.0  # severe skips single slices (mean run length near 1 to 2)


# ---------------------------------------------------------------- command line

def test_simulate_adds_the_next_correction_against_a_result(capsys, sample_paths, tmp_path):
    volume = vol.read(sample_paths["image"])
    label = vol.read_label(sample_paths["label"], like=volume)
    result = label.copy()
    result[:, 20:24] = 0  # a miss across a few slices of axis 1
    vol.write_segmentation(tmp_path / "result.nii.gz", result, volume.ijk_to_lps)
    out = tmp_path / "next.csv"
    code, stdout, err = run(capsys, "simulate", sample_paths["label"], "--points", sample_paths["points"],
                            "--result", tmp_path / "result.nii.gz", "--out", out)
    assert code == 0, err
    points = prompts.read(out)
    original = prompts.read(sample_paths["points"])
    assert len(points) == len(original) + 1 and points.kinds[-1] == "correction" and "+ 1 correction" in stdout
    ijk = vol.physical_to_ijk(points.lps[-1:], volume.ijk_to_lps)[0]
    assert 20 <= round(ijk[1]) <= 23 and label[tuple(np.rint(ijk[::-1]).astype(int))]


def test_simulate_corrections_segment_and_write_every_click(capsys, sample_paths, tmp_path):
    out = tmp_path / "clicks.mrk.json"
    code, stdout, err = run(capsys, "simulate", sample_paths["label"], "--axis", "1", "--corrections", "2",
                            "--image", sample_paths["image"], "--model", "tiny_sam_test", "--out", out)
    assert code == 0, err
    assert stdout.startswith("Dice after 0..2 corrections: ") and len(stdout.splitlines()[0].split()[-3:]) == 3
    kinds = prompts.read(out).kinds
    assert set(kinds[-2:]) <= {"correction", "background"} and kinds.count("click") == len(kinds) - 2


@pytest.mark.parametrize("args, message", [
    (["--corrections", "2"], "give the image with --image"),
    (["--corrections", "-1"], "how many correction clicks"),
    (["--result", "r.nii.gz", "--corrections", "1", "--image", "i.nii.gz"], "Give one of them"),
    (["--axis", "5"], "not an array axis"),
])
def test_simulate_refuses_bad_options(capsys, sample_paths, tmp_path, args, message):
    out = tmp_path / "c.mrk.json"
    code, _, err = run(capsys, "simulate", sample_paths["label"], "--out", out, *args)
    assert code == 2 and message in err and not out.exists()


def test_simulate_refuses_an_unknown_output_type(capsys, sample_paths, tmp_path):
    code, _, err = run(capsys, "simulate", sample_paths["label"], "--out", tmp_path / "c.txt")
    assert code == 2 and "Unsupported --out file type" in err and ".csv" in err


@pytest.mark.parametrize("args, message", [
    (["--corrections", "-2"], "number of correction clicks"),
    (["--corrections", "5", "--levels", "sloppy"], "Unknown noise level 'sloppy'"),
    ([], "--models-dir is needed"),
])
def test_evaluate_refuses_bad_correction_options(capsys, tmp_path, args, message):
    code, _, err = run(capsys, "evaluate", "--data-root", tmp_path, "--out-dir", tmp_path / "out", *args)
    assert code == 2 and message in err and not (tmp_path / "out").exists()


def test_evaluate_corrections_parses_with_the_harsh_level():
    from SPDSegmentLib import cli

    args = cli.build_parser().parse_args(["evaluate", "--corrections", "5", "--levels", "moderate", "harsh",
                                          "--cache-dir", "c"])
    assert args.corrections == 5 and args.levels == ["moderate", "harsh"] and args.models_dir is None
    args = cli.build_parser().parse_args(["simulate", "l.nii.gz", "--level", "harsh", "--out", "o.csv"])
    assert args.level == "harsh" and args.axis is None


# ---------------------------------------------------------------- the engine: catching up, the correction latency

def test_a_preview_that_must_encode_says_it_is_catching_up(case, tiny_backbone):
    from SPDSegmentLib.core.progress import Progress
    from SPDSegmentLib.engine import protocol
    from SPDSegmentLib.engine.server import Engine

    volume, _, clicks = case
    engine = Engine(cache=EmbeddingCache())
    request = protocol.Segment(volume, clicks, tiny_backbone, SegmentOptions(mode="raw"))
    stages = []
    engine.handle(request, Progress(lambda stage, done, total: stages.append(stage)))
    assert protocol.CATCHING_UP_STAGE in stages and "encode" not in stages
    stages.clear()
    engine.handle(request, Progress(lambda stage, done, total: stages.append(stage)))
    assert protocol.CATCHING_UP_STAGE not in stages  # nothing left to encode: nothing to catch up


def test_the_effect_says_it_is_catching_up():
    """What the effect's status line and progress bar show while a Preview encodes what the work ahead missed."""
    import types

    from SPDSegmentLib.engine import protocol
    from SPDSegmentLib.slicer_side import gui

    handle = types.SimpleNamespace(state=lambda: (protocol.CATCHING_UP_STAGE, 3, 12))
    assert gui.progress_line(handle, "Updating the preview") == \
        "Updating the preview: catching up (encoding) 3/12..."
    bar = types.SimpleNamespace(setMaximum=lambda n: None, setValue=lambda n: None, format=None)
    bar.setFormat = lambda text: setattr(bar, "format", text)
    gui.show_progress(bar, handle)
    assert bar.format == "catching up (encoding): %p%"


def test_bench_speed_times_corrections_through_the_engine(case, tmp_path):
    import os

    from SPDSegmentLib.engine.client import EngineClient
    from SPDSegmentLib.research import speed

    volume, label, clicks = case
    client = EngineClient(env=dict(os.environ, OMP_NUM_THREADS="1"), log_folder=tmp_path)
    seconds = speed._corrected_preview(volume, label, clicks, "tiny_sam_test", clicks=2, device="cpu", client=client,
                                       busy=1)
    assert len(seconds) == 2 and all(0.0 < s < 60.0 for s in seconds)
    assert not client.alive  # stopped after timing
    with speed.busy_processes(1) as spinners:  # the --busy option
        assert len(spinners) == 1 and spinners[0].poll() is None  # spinning while the block runs
    assert spinners[0].poll() is not None  # and stopped after it


@pytest.mark.parametrize("only", ["preview_only", "corrections_only"])
def test_bench_speed_never_spins_on_top_of_the_correction_rows(monkeypatch, tmp_path, tiny_backbone, only):
    """--busy N means N spinning processes: the Preview rows run among them, the correction rows spin their own
    only while the corrections are timed (once they ran inside the others' spinning: twice N)."""
    import argparse
    from contextlib import contextmanager

    from SPDSegmentLib.research import speed

    spinning, seen = [0], {}

    @contextmanager
    def counted(count):
        spinning[0] += count
        try:
            yield []
        finally:
            spinning[0] -= count

    monkeypatch.setattr(speed, "busy_processes", counted)
    monkeypatch.setattr(speed, "load_model", lambda *args, **kwargs: tiny_backbone)
    monkeypatch.setattr(speed, "_speed_rows", lambda *args, **kwargs: seen.setdefault("preview", spinning[0]))
    monkeypatch.setattr(speed, "_correction_rows", lambda cases, args: seen.setdefault("corrections", spinning[0]))
    args = argparse.Namespace(model="tiny_sam_test", device="cpu", runtime="torch", precision="auto",
                              data_root=str(tmp_path), busy=2, seconds_per_click=1.0,
                              preview_only=only == "preview_only", corrections_only=only == "corrections_only")
    speed.run_speed_benchmark(args)
    assert seen == ({"preview": 2, "corrections": 0} if only == "preview_only" else {"corrections": 0})
