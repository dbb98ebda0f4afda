"""pipeline.segment on the sample case with the tiny random SAM: contracts, not accuracy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from SPDSegmentLib.core import distill
from SPDSegmentLib.core.prompts import read as read_points, to_voxels
from SPDSegmentLib.core import volume as vol
from SPDSegmentLib.core.cache import EmbeddingCache
from SPDSegmentLib.core.errors import Cancelled, InputError
from SPDSegmentLib.core.pipeline import SegmentOptions, segment
from SPDSegmentLib.core.progress import Progress
from SPDSegmentLib.core.saliency import SaliencyHead
from SPDSegmentLib.core.spd_model import SPDModel

AXIS = 1


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # 2-core machines: no oversubscription


@pytest.fixture(scope="module")
def case(sample_paths):
    volume = vol.read(sample_paths["image"])
    prompts = to_voxels(read_points(sample_paths["points"]), volume, axis=AXIS)
    return volume, prompts


@pytest.fixture(scope="module")
def raw_result(case, tiny_backbone):
    volume, prompts = case
    return segment(volume, prompts, tiny_backbone, SegmentOptions(mode="raw"), cache=EmbeddingCache())


def spd(backbone, bias=None, tau=0.5, neighbours=2, seed=0):
    """An in-memory SPD model; ``bias`` makes the saliency constant (sigmoid(bias) everywhere)."""
    torch.manual_seed(seed)
    head = SaliencyHead(backbone.embed_dim, 8).eval()
    if bias is not None:
        with torch.no_grad():
            last = head.net[-1]
            last.weight.zero_()
            last.bias.fill_(bias)
    return SPDModel(backbone, head, header={"tau": tau, "neighbours": neighbours, "lora_rank": 0})


@pytest.fixture(scope="module")
def spd_cache():
    return EmbeddingCache()


def prompted_slices(prompts):
    return sorted(prompts.by_slice())


def slices_with_voxels(mask, axis=AXIS):
    return sorted(np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0].tolist())


# ---------------------------------------------------------------- raw mode

def test_raw_mode_mask_type_shape_and_slices(case, raw_result):
    volume, prompts = case
    result = raw_result
    assert result.mode == "raw" and result.axis == AXIS
    assert result.mask.dtype == np.uint8 and result.mask.shape == volume.shape
    assert set(np.unique(result.mask).tolist()) <= {0, 1}
    prompted = prompted_slices(prompts)
    assert result.slices == prompted  # every prompted slice has a foreground point (and so a box)
    assert set(slices_with_voxels(result.mask)) <= set(prompted)
    assert result.voxels == int(result.mask.sum()) > 0
    assert result.audit == [] and result.saliency is None
    assert {"encode_s", "decode_s", "total_s"} <= set(result.timings)
    assert result.axis_note == "coronal slices (array axis 1), as given"


def test_raw_mode_points_only(case, tiny_backbone):
    volume, prompts = case
    result = segment(volume, prompts, tiny_backbone, SegmentOptions(mode="raw", use_box=False),
                     cache=EmbeddingCache())
    assert result.mask.shape == volume.shape
    assert set(slices_with_voxels(result.mask)) <= set(prompted_slices(prompts))


def test_inputs_are_not_modified(case, tiny_backbone):
    volume, prompts = case
    array, matrix = volume.array.copy(), volume.ijk_to_lps.copy()
    ijk, labels = prompts.ijk.copy(), prompts.labels.copy()
    segment(volume, prompts, tiny_backbone, SegmentOptions(mode="raw"), cache=EmbeddingCache())
    segment(volume, prompts, spd(tiny_backbone), SegmentOptions(mode="spd", return_saliency=True),
            cache=EmbeddingCache())
    np.testing.assert_array_equal(volume.array, array)
    assert volume.array.dtype == array.dtype
    np.testing.assert_array_equal(volume.ijk_to_lps, matrix)
    np.testing.assert_array_equal(prompts.ijk, ijk)
    np.testing.assert_array_equal(prompts.labels, labels)


def test_same_inputs_give_the_same_mask(case, tiny_backbone, raw_result):
    volume, prompts = case
    again = segment(volume, prompts, tiny_backbone, SegmentOptions(mode="raw"), cache=EmbeddingCache())
    np.testing.assert_array_equal(again.mask, raw_result.mask)
    assert again.slices == raw_result.slices


def test_second_run_hits_the_cache_and_encodes_nothing(case, tiny_backbone, raw_result, monkeypatch):
    volume, prompts = case
    cache = EmbeddingCache()
    first = segment(volume, prompts, tiny_backbone, SegmentOptions(mode="raw"), cache=cache)
    n = len(prompted_slices(prompts))
    assert cache.misses == n and cache.hits == 0
    assert len(cache) == 2 * n  # n embeddings and n decoded slices (remembered for re-prompting)
    misses, hits = cache.misses, cache.hits

    def no_network(*args, **kwargs):
        raise AssertionError("the network ran although every slice and prompt is cached")

    monkeypatch.setattr(tiny_backbone, "encode", no_network)
    monkeypatch.setattr(tiny_backbone, "decode", no_network)
    second = segment(volume, prompts, tiny_backbone, SegmentOptions(mode="raw"), cache=cache)
    assert cache.misses == misses and cache.hits == hits + n
    np.testing.assert_array_equal(second.mask, first.mask)
    np.testing.assert_array_equal(first.mask, raw_result.mask)


def test_reprompting_decodes_only_the_slices_whose_prompts_changed(case, tiny_backbone, monkeypatch):
    import dataclasses

    volume, prompts = case
    cache = EmbeddingCache()
    first = segment(volume, prompts, tiny_backbone, SegmentOptions(mode="raw"), cache=cache)
    moved = prompts.ijk.copy()
    moved[0, (3 - prompts.axis) % 3] += 1.0  # the clinician drags one click by a voxel within its slice
    edited = dataclasses.replace(prompts, ijk=moved)
    decoded = []
    real_decode = tiny_backbone.decode

    def counting_decode(embeddings, *args, **kwargs):
        decoded.append(embeddings.shape[0])
        return real_decode(embeddings, *args, **kwargs)

    monkeypatch.setattr(tiny_backbone, "decode", counting_decode)
    second = segment(volume, edited, tiny_backbone, SegmentOptions(mode="raw"), cache=cache)
    assert sum(decoded) == 1  # one slice changed, one decoded; the others are recalled
    assert second.slices == first.slices
    fresh = segment(volume, edited, tiny_backbone, SegmentOptions(mode="raw"), cache=EmbeddingCache())
    np.testing.assert_array_equal(second.mask, fresh.mask)  # recalled slices equal recomputed ones


# ---------------------------------------------------------------- errors and cancelling

def test_spd_mode_with_a_plain_backbone_is_an_input_error(case, tiny_backbone):
    volume, prompts = case
    with pytest.raises(InputError, match="SPD model"):
        segment(volume, prompts, tiny_backbone, SegmentOptions(mode="spd"), cache=EmbeddingCache())


def test_no_prompts_in_the_slice_range_is_an_input_error(case, tiny_backbone):
    volume, prompts = case
    first = prompted_slices(prompts)[0]
    assert first > 3
    with pytest.raises(InputError, match="No prompts"):
        segment(volume, prompts, tiny_backbone, SegmentOptions(mode="raw", slice_range=(0, first - 1)),
                cache=EmbeddingCache())


def test_slice_range_limits_the_segmented_slices(case, tiny_backbone):
    volume, prompts = case
    lo, hi = 12, 20
    result = segment(volume, prompts, tiny_backbone, SegmentOptions(mode="raw", slice_range=(lo, hi)),
                     cache=EmbeddingCache())
    assert result.slices == [t for t in prompted_slices(prompts) if lo <= t <= hi]
    assert all(lo <= t <= hi for t in slices_with_voxels(result.mask))
    result = segment(volume, prompts, spd(tiny_backbone, bias=10.0), SegmentOptions(mode="spd", slice_range=(lo, hi)),
                     cache=EmbeddingCache())
    assert result.slices and all(lo <= t <= hi for t in result.slices)


def test_cancel_at_the_first_encode_step(case, tiny_backbone):
    volume, prompts = case
    stages = []

    def callback(stage, done, total):
        stages.append(stage)
        if stage == "encode":
            progress.cancel()

    progress = Progress(callback)
    with pytest.raises(Cancelled):
        segment(volume, prompts, tiny_backbone, SegmentOptions(mode="raw", batch_size=4), progress=progress,
                cache=EmbeddingCache())
    assert stages == ["encode"] and progress.cancelled  # stopped at the next step: no decoding


def test_cancelled_before_start_with_a_warm_cache_still_raises(case, tiny_backbone):
    volume, prompts = case
    cache = EmbeddingCache()
    segment(volume, prompts, tiny_backbone, SegmentOptions(mode="raw"), cache=cache)
    progress = Progress()
    progress.cancel()
    with pytest.raises(Cancelled):  # no encode step at all: the check after encoding catches it
        segment(volume, prompts, tiny_backbone, SegmentOptions(mode="raw"), progress=progress, cache=cache)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_volume_is_an_input_error(case, tiny_backbone, bad):
    volume, prompts = case
    array = volume.array.astype(np.float32)
    array[5, 10, 7] = bad
    with pytest.raises(InputError, match="NaN or infinite"):
        segment(vol.Volume(array, volume.ijk_to_lps, "bad"), prompts, tiny_backbone, SegmentOptions(mode="raw"),
                cache=EmbeddingCache())


# ---------------------------------------------------------------- SPD mode

def test_spd_mode_audit_and_saliency(case, tiny_backbone, spd_cache):
    volume, prompts = case
    model = spd(tiny_backbone)
    result = segment(volume, prompts, model, SegmentOptions(return_saliency=True), cache=spd_cache)
    assert result.mode == "spd"  # auto mode picks SPD for an SPD model
    statuses = [e.status for e in result.audit]
    assert set(statuses) <= {"kept", "rejected", "borrowed"}
    assert statuses.count("kept") + statuses.count("rejected") == len(prompts)
    assert result.audit_counts() == {s: statuses.count(s) for s in ("kept", "rejected", "borrowed")}
    targets = distill.target_slices(prompted_slices(prompts), model.neighbours, volume.shape[AXIS])
    assert set(result.slices) <= set(targets)
    assert set(slices_with_voxels(result.mask)) <= set(result.slices)
    saliency = result.saliency
    assert saliency is not None and saliency.shape == volume.shape and saliency.dtype == np.float32
    assert saliency.min() >= 0.0 and saliency.max() <= 1.0
    for t in range(volume.shape[AXIS]):
        plane = vol.get_slice(saliency, AXIS, t)
        assert plane.any() == (t in targets), t  # maps on the target slices only
    no_saliency = segment(volume, prompts, model, SegmentOptions(mode="spd"), cache=spd_cache)
    assert no_saliency.saliency is None
    np.testing.assert_array_equal(no_saliency.mask, result.mask)


def test_spd_all_salient_keeps_every_click_and_borrows_every_neighbour(case, tiny_backbone, spd_cache):
    volume, prompts = case
    n = 2
    result = segment(volume, prompts, spd(tiny_backbone, bias=10.0, neighbours=n), SegmentOptions(), cache=spd_cache)
    counts = result.audit_counts()
    by_slice = prompts.by_slice()
    targets = distill.target_slices(by_slice, n, volume.shape[AXIS])
    expected_borrowed = sum(int((labels > 0).sum()) for j, (_, labels) in by_slice.items()
                            for t in targets if 0 < abs(t - j) <= n)
    assert counts == {"kept": len(prompts), "rejected": 0, "borrowed": expected_borrowed}
    assert result.slices == targets  # every target slice received points


def test_spd_nothing_salient_rejects_everything_and_segments_nothing(case, tiny_backbone, spd_cache):
    volume, prompts = case
    model = spd(tiny_backbone, bias=-10.0)
    for empty_slice in ("skip", "saliency"):
        result = segment(volume, prompts, model, SegmentOptions(empty_slice=empty_slice), cache=spd_cache)
        assert result.audit_counts() == {"kept": 0, "rejected": len(prompts), "borrowed": 0}
        assert result.slices == [] and result.voxels == 0


def test_tau_and_neighbours_options_override_the_model(case, tiny_backbone, spd_cache):
    volume, prompts = case
    model = spd(tiny_backbone, bias=0.0)  # saliency exactly 0.5 everywhere
    strict = segment(volume, prompts, model, SegmentOptions(), cache=spd_cache)  # tau 0.5: 0.5 is not above
    assert strict.audit_counts()["kept"] == 0
    loose = segment(volume, prompts, model, SegmentOptions(tau=0.4, neighbours=0), cache=spd_cache)
    assert loose.audit_counts() == {"kept": len(prompts), "rejected": 0, "borrowed": 0}
    assert loose.slices == prompted_slices(prompts)  # n = 0: no neighbour slices


def test_local_only_borrows_nothing(case, tiny_backbone, spd_cache):
    volume, prompts = case
    result = segment(volume, prompts, spd(tiny_backbone, bias=10.0), SegmentOptions(local_only=True, empty_slice="skip"),
                     cache=spd_cache)
    assert result.audit_counts()["borrowed"] == 0
    assert result.slices == prompted_slices(prompts)


def test_empty_slice_saliency_never_segments_fewer_slices(case, tiny_backbone, spd_cache):
    volume, prompts = case
    prompted = prompted_slices(prompts)
    added = 0
    for seed in (0, 1, 3, 4):  # random heads that reject some clicks: some targets lose every prompt
        model = spd(tiny_backbone, seed=seed)
        skip = segment(volume, prompts, model, SegmentOptions(empty_slice="skip"), cache=spd_cache)
        fill = segment(volume, prompts, model, SegmentOptions(empty_slice="saliency"), cache=spd_cache)
        assert set(skip.slices) <= set(fill.slices), seed
        extra = set(fill.slices) - set(skip.slices)
        assert all(prompted[0] <= t <= prompted[-1] for t in extra)  # only between the first and last click
        for t in skip.slices:  # slices with consensus prompts are decoded the same way in both
            np.testing.assert_array_equal(vol.get_slice(fill.mask, AXIS, t), vol.get_slice(skip.mask, AXIS, t))
        added += len(extra)
    assert added > 0  # the option did something on at least one of the heads


def test_spd_segment_is_deterministic(case, tiny_backbone, spd_cache):
    volume, prompts = case
    model = spd(tiny_backbone, seed=3)
    a = segment(volume, prompts, model, SegmentOptions(), cache=spd_cache)
    b = segment(volume, prompts, model, SegmentOptions(), cache=EmbeddingCache())
    np.testing.assert_array_equal(a.mask, b.mask)
    assert [(e.slice, e.status, e.source_slice) for e in a.audit] == \
        [(e.slice, e.status, e.source_slice) for e in b.audit]


# ---------------------------------------------------------------- the slicing axis the model prefers

def test_trained_axes_from_the_model(case, tiny_backbone, oblique_volume, tmp_path):
    from SPDSegmentLib.core.pipeline import trained_axes
    from SPDSegmentLib.core.volume import Volume, geometry_matrix

    volume, _ = case
    # i runs along S, j along L, k along P: axial is array axis 2, coronal 0, sagittal 1
    permuted = Volume(np.zeros((4, 5, 6)), geometry_matrix((0, 0, 0), (1, 1, 1), [0, 1, 0, 0, 0, 1, 1, 0, 0]))
    assert trained_axes({"views": ["axial", "coronal", "sagittal"], "axis": 1}, permuted) == (2, 0, 1)
    assert trained_axes({"views": ["coronal", "oblique?", "Green"]}, permuted) == (0,)  # unknown names: no say
    assert trained_axes({"axis": 1}, permuted) == (1,)  # an array axis, taken as it is
    assert trained_axes({"axis": 1}, oblique_volume) == (1,)
    assert trained_axes({"tau": 0.5}, volume) == ()
    assert trained_axes(spd(tiny_backbone), volume) == ()  # a header without axis or views
    assert trained_axes(SPDModel(tiny_backbone, None, {"views": ["sagittal"]}), volume) == (2,)
    assert trained_axes(tiny_backbone, volume) == ()  # a plain backbone: no preference
    assert trained_axes("tiny_sam_test", volume) == trained_axes("litemedsam", volume) == ()
    # the bundled headers: spd-hippocampus knows every view, spd-left-atrium two
    assert sorted(trained_axes("spd-hippocampus", volume)) == sorted(trained_axes(None, volume)) == [0, 1, 2]
    assert len(trained_axes("spd-left-atrium", volume)) == 2
    assert trained_axes(str(tmp_path / "missing.spd.safetensors"), volume) == ()  # loading it says what is wrong
