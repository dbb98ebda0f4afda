"""Contextual Prompt Distillation on constructed saliency maps: every rule with an exact outcome."""
from __future__ import annotations

import numpy as np
import pytest

from SPDSegmentLib.core import distill

SHAPE = (20, 20)
TAU = 0.5


def maps(n_slices: int, values=None, shape=SHAPE, fill: float = 0.0):
    """{t: map} with ``fill`` everywhere and ``values[t][(r, c)] = v`` at single pixels."""
    out = {t: np.full(shape, fill, np.float32) for t in range(n_slices)}
    for t, pixels in (values or {}).items():
        for (r, c), v in pixels.items():
            out[t][r, c] = v
    return out


def pts(*rc, labels=None):
    rc = np.array(rc, float).reshape(-1, 2)
    return rc, np.ones(len(rc), int) if labels is None else np.asarray(labels, int)


def entries(result, status=None, slice_=None):
    return [e for e in result.audit if (status is None or e.status == status)
            and (slice_ is None or e.slice == slice_)]


def rcs(entry_list):
    return sorted(tuple(float(v) for v in e.rc) for e in entry_list)


# ---------------------------------------------------------------- local validation

def test_point_kept_above_tau_rejected_at_or_below():
    saliency = maps(1, {0: {(5, 5): 0.9, (10, 10): TAU, (15, 15): 0.2, (3, 12): 0.500001}})
    prompts = {0: pts([5, 5], [10, 10], [15, 15], [3, 12])}
    result = distill.distill(prompts, saliency, tau=TAU, neighbours=2)
    kept, rejected = entries(result, "kept"), entries(result, "rejected")
    assert rcs(kept) == [(3.0, 12.0), (5.0, 5.0)]
    assert rcs(rejected) == [(10.0, 10.0), (15.0, 15.0)]  # S == tau is not "> tau"
    assert {e.slice for e in result.audit} == {0} and {e.source_slice for e in result.audit} == {0}
    scores = {tuple(e.rc): e.score for e in result.audit}
    assert scores[(5.0, 5.0)] == pytest.approx(0.9) and scores[(10.0, 10.0)] == pytest.approx(TAU)
    consensus = result.consensus[0]
    assert sorted(map(tuple, consensus.rc.tolist())) == [(3.0, 12.0), (5.0, 5.0)]
    assert consensus.labels.tolist() == [1, 1] and consensus.sources.tolist() == [0, 0]
    assert result.counts() == {"kept": 2, "rejected": 2, "borrowed": 0}


def test_saliency_is_sampled_at_the_nearest_pixel_and_clipped():
    saliency = np.zeros(SHAPE, np.float32)
    saliency[5, 6] = 1.0
    saliency[19, 0] = 0.7
    np.testing.assert_allclose(distill.sample(saliency, np.array([[4.6, 5.6], [5.4, 6.4], [4.4, 6.0]])), [1, 1, 0])
    np.testing.assert_allclose(distill.sample(saliency, np.array([[40.0, -3.0], [25.2, -0.4]])), [0.7, 0.7])


def test_a_slice_with_only_rejected_points_gets_no_consensus():
    saliency = maps(3)
    result = distill.distill({1: pts([4, 4], [8, 8])}, saliency, tau=TAU, neighbours=1)
    assert result.consensus == {}
    assert result.counts() == {"kept": 0, "rejected": 2, "borrowed": 0}


# ---------------------------------------------------------------- borrowing

def borrowing_case():
    """Target slice 3 (n = 2) and one prompt per neighbour, each testing one rule.

    - (5, 5) on 3: S_3 = 0.9 -> kept
    - (7, 7) on 4: S_4 = 0.8, S_3 = 0.8 -> kept on 4 and borrowed into 3
    - (12, 3) on 2: S_2 = 0.8, S_3 = 0.1 -> kept on 2, NOT borrowed (fails S_t)
    - (3, 16) on 5: S_5 = 0.2, S_3 = 0.9 -> rejected on 5, NOT borrowed (fails its own map)
    - (8, 8) on 6: S_6 = 0.9, S_3 = 0.9 but |6 - 3| = 3 > n -> never borrowed into 3
    """
    saliency = maps(7, {
        3: {(5, 5): 0.9, (7, 7): 0.8, (12, 3): 0.1, (3, 16): 0.9, (8, 8): 0.9},
        4: {(7, 7): 0.8},
        2: {(12, 3): 0.8},
        5: {(3, 16): 0.2},
        6: {(8, 8): 0.9},
    })
    prompts = {3: pts([5, 5]), 4: pts([7, 7]), 2: pts([12, 3]), 5: pts([3, 16]), 6: pts([8, 8])}
    return prompts, saliency


def test_borrowing_rules_on_one_target():
    prompts, saliency = borrowing_case()
    result = distill.distill(prompts, saliency, tau=TAU, neighbours=2, targets=[3])
    borrowed = entries(result, "borrowed")
    assert len(borrowed) == 1
    (b,) = borrowed
    assert b.slice == 3 and b.source_slice == 4 and tuple(b.rc) == (7.0, 7.0)
    assert b.score == pytest.approx(0.8) and b.label == 1
    consensus = result.consensus[3]
    assert sorted(zip(map(tuple, consensus.rc.tolist()), consensus.sources.tolist())) == [
        ((5.0, 5.0), 3), ((7.0, 7.0), 4)]
    assert set(result.consensus) == {3}  # only the requested target
    # own-slice records: one per input point
    status = {(e.source_slice, tuple(e.rc)): e.status for e in result.audit if e.status != "borrowed"}
    assert status == {(3, (5.0, 5.0)): "kept", (4, (7.0, 7.0)): "kept", (2, (12.0, 3.0)): "kept",
                      (5, (3.0, 16.0)): "rejected", (6, (8.0, 8.0)): "kept"}


def test_neighbours_beyond_n_are_never_borrowed():
    prompts, saliency = borrowing_case()
    for n in (0, 1, 2):  # the point on slice 6 is 3 slices away from 3
        result = distill.distill(prompts, saliency, tau=TAU, neighbours=n, targets=[3])
        assert all(e.source_slice != 6 for e in entries(result, "borrowed"))
    near = distill.distill(prompts, saliency, tau=TAU, neighbours=3, targets=[3])
    assert sorted(e.source_slice for e in entries(near, "borrowed")) == [4, 6]
    # n = 1 still reaches slice 4; n = 0 borrows nothing
    assert [e.source_slice for e in entries(distill.distill(prompts, saliency, TAU, 1, [3]), "borrowed")] == [4]
    assert entries(distill.distill(prompts, saliency, TAU, 0, [3]), "borrowed") == []


def test_local_only_borrows_nothing():
    prompts, saliency = borrowing_case()
    result = distill.distill(prompts, saliency, tau=TAU, neighbours=3, targets=[3], local_only=True)
    assert entries(result, "borrowed") == []
    assert result.consensus[3].rc.tolist() == [[5.0, 5.0]] and result.consensus[3].sources.tolist() == [3]
    assert result.counts() == {"kept": 4, "rejected": 1, "borrowed": 0}


def test_a_target_without_own_prompts_is_filled_by_borrowing():
    saliency = maps(5, fill=0.9)
    result = distill.distill({0: pts([2, 2]), 4: pts([9, 9])}, saliency, tau=TAU, neighbours=2, targets=[2])
    borrowed = entries(result, "borrowed")
    assert sorted((e.source_slice, tuple(e.rc)) for e in borrowed) == [(0, (2.0, 2.0)), (4, (9.0, 9.0))]
    assert all(e.slice == 2 for e in borrowed)
    assert sorted(result.consensus[2].sources.tolist()) == [0, 4]


def test_borrowed_points_keep_their_in_plane_position_and_target_score():
    saliency = maps(2, {0: {(4, 7): 0.95}, 1: {(4, 7): 0.6}})
    result = distill.distill({0: pts([4.2, 6.9])}, saliency, tau=TAU, neighbours=1, targets=[1])
    (b,) = entries(result, "borrowed")
    np.testing.assert_allclose(b.rc, [4.2, 6.9])
    assert b.score == pytest.approx(0.6)  # saliency on the target slice, not the source
    np.testing.assert_allclose(result.consensus[1].rc, [[4.2, 6.9]])


# ---------------------------------------------------------------- background points

def test_background_points_pass_through_on_their_own_slice_only():
    saliency = maps(3, {1: {(5, 5): 0.9, (10, 10): 0.9}}, fill=0.0)
    saliency[0][:] = 0.9  # the neighbour maps pass everywhere except at the background click on 0
    saliency[0][3, 3] = 0.0
    saliency[2][:] = 0.9
    prompts = {1: pts([5, 5], [10, 10], [15, 15], labels=[1, 0, 0]), 0: pts([3, 3], labels=[0])}
    result = distill.distill(prompts, saliency, tau=TAU, neighbours=1, targets=[0, 1, 2])
    # background clicks are corrections, kept whatever the saliency there: (15, 15) on 1 and (3, 3) on 0 lie at S = 0
    own = {(e.source_slice, tuple(e.rc)): (e.status, e.label) for e in result.audit if e.status != "borrowed"}
    assert own == {(1, (5.0, 5.0)): ("kept", 1), (1, (10.0, 10.0)): ("correction", 0),
                   (1, (15.0, 15.0)): ("correction", 0), (0, (3.0, 3.0)): ("correction", 0)}
    assert result.counts() == {"kept": 1, "rejected": 0, "borrowed": 2, "correction": 3}
    c1 = result.consensus[1]
    assert sorted(zip(map(tuple, c1.rc.tolist()), c1.labels.tolist(), c1.sources.tolist())) == [
        ((5.0, 5.0), 1, 1), ((10.0, 10.0), 0, 1), ((15.0, 15.0), 0, 1)]
    assert c1.positives.tolist() == [[5.0, 5.0]]
    # (10, 10) on 1 passes S_1 and S_0 / S_2, but a background click is never borrowed
    assert sorted((e.slice, e.source_slice, tuple(e.rc)) for e in entries(result, "borrowed")) == [
        (0, 1, (5.0, 5.0)), (2, 1, (5.0, 5.0))]
    c0 = result.consensus[0]
    assert sorted(zip(map(tuple, c0.rc.tolist()), c0.labels.tolist(), c0.sources.tolist())) == [
        ((3.0, 3.0), 0, 0), ((5.0, 5.0), 1, 1)]
    assert result.consensus[2].labels.tolist() == [1] and result.consensus[2].sources.tolist() == [1]


# ---------------------------------------------------------------- invariants on random cases

def brute_force_borrowings(prompts, saliency, tau, n, targets, trusted):
    expected = set()
    for t in targets:
        for j, (rc, labels) in prompts.items():
            if j == t or abs(j - t) > n or t not in saliency:
                continue
            for p, label, sure in zip(rc, labels, trusted[j]):
                own_ok = sure or distill.sample(saliency[j], p)[0] > tau
                if label > 0 and own_ok and distill.sample(saliency[t], p)[0] > tau:
                    expected.add((t, j, tuple(p)))
    return expected


@pytest.mark.parametrize("seed", range(8))
def test_every_point_reported_once_and_borrowing_matches_the_definition(seed):
    rng = np.random.default_rng(seed)
    n_slices, n = 9, int(rng.integers(0, 4))
    saliency = {t: rng.random(SHAPE).astype(np.float32) for t in range(n_slices)}
    prompted = sorted(rng.choice(n_slices, size=5, replace=False).tolist())
    prompts = {}
    for t in prompted:
        k = int(rng.integers(1, 5))
        prompts[t] = (rng.uniform(0, SHAPE[0] - 1, size=(k, 2)), rng.integers(0, 2, size=k))
    # trusted foreground corrections: a random subset of the foreground points
    trusted = {t: (labels > 0) & (rng.random(len(labels)) < 0.3) for t, (_, labels) in prompts.items()}
    targets = distill.target_slices(prompts, n, n_slices)
    result = distill.distill(prompts, saliency, tau=TAU, neighbours=n, targets=targets, trusted=trusted)

    own = [e for e in result.audit if e.status != "borrowed"]
    assert {e.status for e in own} <= {"kept", "rejected", "correction"}
    assert len(own) == sum(len(rc) for rc, _ in prompts.values())
    keys = [(e.source_slice, tuple(e.rc)) for e in own]
    assert len(set(keys)) == len(keys)  # each input point exactly once
    assert set(keys) == {(t, tuple(p)) for t, (rc, _) in prompts.items() for p in rc}
    sure = {(t, tuple(p)) for t, (rc, _) in prompts.items() for p, s in zip(rc, trusted[t]) if s}
    for e in own:
        assert e.slice == e.source_slice
        if e.label == 0 or (e.slice, tuple(e.rc)) in sure:
            expected = "correction"
        else:
            expected = "kept" if distill.sample(saliency[e.slice], e.rc)[0] > TAU else "rejected"
        assert e.status == expected
    borrowed = {(e.slice, e.source_slice, tuple(e.rc)) for e in entries(result, "borrowed")}
    assert borrowed == brute_force_borrowings(prompts, saliency, TAU, n, targets, trusted)
    # consensus = kept and corrections on t (incl. background) + borrowed into t
    for t in targets:
        size = sum(1 for e in own if e.slice == t and e.status in ("kept", "correction")) + \
            sum(1 for b in borrowed if b[0] == t)
        assert (len(result.consensus[t]) if t in result.consensus else 0) == size
    assert set(result.consensus) <= set(targets)


def test_default_targets_are_the_prompted_slices_with_a_map():
    saliency = maps(4, fill=0.9)
    result = distill.distill({1: pts([2, 2]), 3: pts([4, 4]), 7: pts([5, 5])}, saliency, tau=TAU, neighbours=2)
    assert set(result.consensus) == {1, 3}  # 7 has no map: skipped, not an error
    assert all(e.source_slice != 7 for e in result.audit)


# ---------------------------------------------------------------- target slices

def test_target_slices():
    assert distill.target_slices([3, 10], 2, 12) == [1, 2, 3, 4, 5, 8, 9, 10, 11]
    assert distill.target_slices([0], 2, 3) == [0, 1, 2]
    assert distill.target_slices([5, 1], 0, 10) == [1, 5]
    assert distill.target_slices([4, 5], 1, 10) == [3, 4, 5, 6]  # overlapping ranges, each once
    assert distill.target_slices({2: None}, 1, 3) == [1, 2]  # any iterable of slices (a dict's keys)
    assert distill.target_slices([], 2, 10) == []


# ---------------------------------------------------------------- boxes

def two_blobs():
    s = np.zeros(SHAPE, np.float32)
    s[2:6, 2:7] = 0.9  # blob A: rows 2..5, cols 2..6
    s[12:17, 10:19] = 0.8  # blob B: rows 12..16, cols 10..18
    return s


def box(result):
    return tuple(result[0].tolist()), tuple(result[1].tolist())


def test_saliency_box_picks_the_component_containing_the_points():
    s = two_blobs()
    assert box(distill.saliency_box(s, np.array([[14.0, 15.0]]), TAU)) == ((12, 10), (16, 18))
    assert box(distill.saliency_box(s, np.array([[3.2, 4.4]]), TAU)) == ((2, 2), (5, 6))
    # points in both blobs (and one on background): the union of the two
    assert box(distill.saliency_box(s, np.array([[3.0, 3.0], [0.0, 19.0], [16.0, 18.0]]), TAU)) == ((2, 2), (16, 18))


def test_saliency_box_falls_back_to_all_components_then_none():
    s = two_blobs()
    assert box(distill.saliency_box(s, np.array([[0.0, 19.0]]), TAU)) == ((2, 2), (16, 18))
    assert box(distill.saliency_box(s, np.zeros((0, 2)), TAU)) == ((2, 2), (16, 18))
    assert distill.saliency_box(np.full(SHAPE, TAU, np.float32), np.array([[5.0, 5.0]]), TAU) is None
    assert distill.saliency_box(np.zeros(SHAPE, np.float32), np.zeros((0, 2)), TAU) is None
    # a higher tau drops blob B (0.8)
    assert box(distill.saliency_box(s, np.zeros((0, 2)), 0.85)) == ((2, 2), (5, 6))


def test_saliency_box_clips_points_outside_the_slice():
    s = np.zeros(SHAPE, np.float32)
    s[15:20, 15:20] = 1.0
    assert box(distill.saliency_box(s, np.array([[100.0, 100.0]]), TAU)) == ((15, 15), (19, 19))
    s2 = two_blobs()
    assert box(distill.saliency_box(s2, np.array([[-7.0, -7.0]]), TAU)) == ((2, 2), (16, 18))  # (0, 0): no blob


def test_points_box_margin_rounding_and_clipping():
    lo, hi = distill.points_box(np.array([[5.0, 5.0], [8.0, 10.0]]), 2.0, SHAPE)
    assert lo.tolist() == [3, 3] and hi.tolist() == [10, 12]
    assert lo.dtype.kind == "i" and hi.dtype.kind == "i"
    lo, hi = distill.points_box(np.array([[2.5, 3.2]]), 1.0, SHAPE)
    assert lo.tolist() == [1, 2] and hi.tolist() == [4, 5]  # floor below, ceil above
    lo, hi = distill.points_box(np.array([[1.0, 18.0]]), 5.0, SHAPE)
    assert lo.tolist() == [0, 13] and hi.tolist() == [6, 19]  # clipped to the slice
    lo, hi = distill.points_box(np.array([[0.0, 0.0], [19.0, 19.0]]), 50.0, (20, 30))
    assert lo.tolist() == [0, 0] and hi.tolist() == [19, 29]


def test_audit_entry_rc_is_a_copy():
    rc, labels = pts([5, 5])
    result = distill.distill({0: (rc, labels)}, maps(1, {0: {(5, 5): 0.9}}), tau=TAU)
    rc[0] = [0, 0]
    assert result.audit[0].rc.tolist() == [5.0, 5.0]


def test_counts_sum_to_the_audit():
    prompts, saliency = borrowing_case()
    result = distill.distill(prompts, saliency, tau=TAU, neighbours=2, targets=distill.target_slices(prompts, 2, 7))
    counts = result.counts()
    assert sum(counts.values()) == len(result.audit)
    assert counts["kept"] + counts["rejected"] == 5
