"""The noisy-prompt simulator: statistics per level, determinism, geometry and the markups file."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from SPDSegmentLib.core.errors import InputError
from SPDSegmentLib.core.prompts import MARKUPS_SCHEMA
from SPDSegmentLib.core.sample import SAMPLE_DIR
from SPDSegmentLib.core.volume import geometry_matrix, ijk_to_physical
from SPDSegmentLib.research import simulate as sim
from SPDSegmentLib.research.data import structure_range, structure_slices, training_slices

SEEDS = range(30)
ORDER = ("clean", "mild", "moderate", "severe", "harsh")


def ellipsoid(shape=(24, 60, 28), centre=(12.0, 30.0, 14.0), semi=(7.0, 24.0, 9.0)) -> np.ndarray:
    """An elongated ellipsoid whose long axis is array axis 1."""
    grid = np.indices(shape, dtype=float)
    r2 = sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, semi))
    return (r2 <= 1.0).astype(np.uint8)


def hippocampus():
    path = SAMPLE_DIR / "hippocampus_001_label.nii.gz"
    if not path.exists():
        return None
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return (sitk.GetArrayFromImage(image) > 0).astype(np.uint8), image


def _cases():
    cases = {"ellipsoid": ellipsoid()}
    hip = hippocampus()
    if hip is not None:
        cases["hippocampus"] = hip[0]
    return cases


CASES = _cases()


def in_plane(points_ijk: np.ndarray, axis: int) -> np.ndarray:
    """(row, col) of (i, j, k) points for slices along array ``axis``."""
    array_points = points_ijk[:, ::-1]
    return array_points[:, [a for a in range(3) if a != axis]]


@pytest.fixture(scope="module", params=sorted(CASES))
def runs(request):
    """All levels x seeds on one mask (axis 1), computed once per module."""
    mask = CASES[request.param]
    return {
        "name": request.param,
        "mask": mask,
        "centre": sim.centerline(mask, 1),
        "runs": {level: [sim.simulate(mask, 1, level, seed) for seed in SEEDS] for level in ORDER},
    }


def reader_clicks(p: sim.SimulatedPrompts) -> np.ndarray:
    return p.kind != "spurious"


# ---------------------------------------------------------------- the level table

def test_level_table_is_fixed():
    assert list(sim.LEVELS) == list(ORDER)
    assert sim.LEVELS["clean"] == sim.NoiseLevel(1, 0.0, 0.0, 0.0, 0.0)
    assert all(level.every_kth == 1 for level in sim.LEVELS.values())
    for field in ("displacement", "drift_fraction", "missing_fraction", "spurious_per_slice"):
        values = [getattr(sim.LEVELS[name], field) for name in ORDER]
        assert values == sorted(values) and len(set(values)) == 5, field
    # only harsh drifts further and skips runs of slices
    assert [(sim.LEVELS[n].drift_max, sim.LEVELS[n].missing_run) for n in ORDER] == [(3.0, 1)] * 4 + [(5.0, 4)]
    for name in ORDER:  # the docstring table is the table in code
        level = sim.LEVELS[name]
        row = f"| `{name}`"
        line = next(line for line in sim.__doc__.splitlines() if line.startswith(row))
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        assert [float(c) for c in cells] == [level.every_kth, level.displacement, level.drift_fraction,
                                             level.missing_fraction, level.spurious_per_slice, level.drift_max,
                                             level.missing_run]


def test_bad_levels_rejected():
    mask = ellipsoid()
    with pytest.raises(InputError):
        sim.simulate(mask, 1, "sloppy", 0)
    with pytest.raises(InputError):
        sim.NoiseLevel(0, 0.1, 0.1, 0.1, 0.1)
    with pytest.raises(InputError):
        sim.NoiseLevel(1, 0.1, 1.5, 0.1, 0.1)


# ---------------------------------------------------------------- centerline

def test_centerline_medial_point_and_radius():
    mask = np.zeros((3, 20, 30), np.uint8)
    mask[1, 5:12, 4:25] = 1  # a 7 x 21 rectangle: medial row 8, radius 4 (distance to the background)
    mask[1, 15:17, 2:4] = 1  # a smaller component that must be ignored
    centre = sim.centerline(mask, 0)
    assert list(centre) == [1]
    rc, radius = centre[1]
    assert rc[0] == 8 and 7 <= rc[1] <= 21
    assert radius == 4.0


def test_centerline_structure_touching_the_border_has_finite_radius():
    mask = np.ones((2, 5, 5), np.uint8)
    rc, radius = sim.centerline(mask, 0)[0]
    assert tuple(rc) == (2.0, 2.0) and radius == 3.0


def test_structure_range():
    mask = ellipsoid()
    assert structure_range(mask, 1) == (6, 54)
    assert structure_range(mask, 0) == (5, 19)
    assert structure_range(mask, 0, margin=3) == (2, 22) and structure_range(mask, 0, margin=9) == (0, 23)
    assert training_slices(mask, 0, 3) == list(range(2, 23))
    lo, hi = structure_range(mask, 1)
    assert set(sim.centerline(mask, 1)) == set(range(lo, hi + 1)) == set(structure_slices(mask, 1))


def test_empty_and_malformed_masks_rejected():
    with pytest.raises(InputError, match="label is empty"):
        sim.simulate(np.zeros((4, 5, 6), np.uint8), 0, "mild", 0)
    with pytest.raises(InputError, match="label is empty"):
        sim.centerline(np.zeros((4, 5, 6)), 1)
    with pytest.raises(InputError, match="label is empty"):
        structure_range(np.zeros((4, 5, 6)), 2)
    with pytest.raises(InputError):
        sim.simulate(np.ones((4, 5), np.uint8), 0, "mild", 0)
    with pytest.raises(InputError):
        sim.simulate(np.ones((4, 5, 6), np.uint8), 3, "mild", 0)


# ---------------------------------------------------------------- statistics per level

def test_clean_is_one_medial_click_per_slice(runs):
    mask, centre = runs["mask"], runs["centre"]
    for p in runs["runs"]["clean"]:
        assert (p.kind == "centerline").all() and p.inside.all() and (p.labels == 1).all()
        assert sorted(p.slice_index.tolist()) == sorted(centre)  # exactly one per structure slice
        rc = in_plane(p.ijk, 1)
        for t, point in zip(p.slice_index, rc):
            np.testing.assert_array_equal(point, centre[int(t)][0])
    assert mask.any()


def test_clicks_on_integer_planes_and_in_bounds(runs):
    mask = runs["mask"]
    upper = np.array(mask.shape[::-1]) - 1  # (i, j, k) extent
    for level in ORDER:
        for p in runs["runs"][level]:
            assert p.ijk.shape == (len(p), 3) and p.labels.shape == p.kind.shape == p.inside.shape == (len(p),)
            assert set(np.unique(p.kind)) <= set(sim.KINDS)
            slice_coord = p.ijk[:, 2 - p.axis]
            np.testing.assert_array_equal(slice_coord, np.round(slice_coord))
            assert (p.ijk >= 0).all() and (p.ijk <= upper).all()
            voxels = np.rint(p.ijk[:, ::-1]).astype(int)
            np.testing.assert_array_equal(p.inside, mask[tuple(voxels.T)].astype(bool))
            assert p.level == level and p.axis == 1


def test_missing_fraction_and_ends_always_prompted(runs):
    slices = sorted(runs["centre"])
    n = len(slices)
    for level in ORDER:
        fractions = []
        for p in runs["runs"][level]:
            prompted = set(p.slice_index[reader_clicks(p)].tolist())
            assert len(prompted) == int(reader_clicks(p).sum())  # one reader click per prompted slice
            assert slices[0] in prompted and slices[-1] in prompted
            fraction = 1.0 - len(prompted) / n
            assert abs(fraction - sim.LEVELS[level].missing_fraction) <= 0.5 / n + 1e-9
            fractions.append(fraction)
        assert abs(np.mean(fractions) - sim.LEVELS[level].missing_fraction) <= 0.03


def test_drift_fraction_and_drift_lies_outside(runs):
    mask, centre = runs["mask"], runs["centre"]
    for level in ORDER:
        fractions = []
        for p in runs["runs"][level]:
            reader = reader_clicks(p)
            drift = p.kind == "drift"
            fractions.append(drift.sum() / reader.sum())
            assert not p.inside[drift].any()
            for point, t in zip(in_plane(p.ijk[drift], 1), p.slice_index[drift]):
                slice2d = np.take(mask, int(t), axis=1) > 0
                distance = ndimage.distance_transform_edt(~slice2d)
                radius = centre[int(t)][1]
                d = distance[tuple(np.rint(point).astype(int))]
                if runs["name"] == "ellipsoid":  # room around it: the ring of 1..drift_max radii always fits
                    assert radius - 0.5 <= d <= sim.LEVELS[level].drift_max * radius + 0.5
                else:
                    assert d >= 1.0
        assert abs(np.mean(fractions) - sim.LEVELS[level].drift_fraction) <= 0.03, level


def test_displacement_grows_with_level(runs):
    centre = runs["centre"]
    means = []
    for level in ORDER:
        relative = []
        for p in runs["runs"][level]:
            keep = p.kind == "centerline"
            for point, t in zip(in_plane(p.ijk[keep], 1), p.slice_index[keep]):
                rc, radius = centre[int(t)]
                relative.append(np.linalg.norm(point - rc) / radius)
        means.append(float(np.mean(relative)))
        # Radial offset of an isotropic Gaussian: mean sigma * sqrt(pi / 2) (clipping only shortens it).
        expected = sim.LEVELS[level].displacement * math.sqrt(math.pi / 2)
        assert means[-1] <= expected * 1.1 + 1e-9 and means[-1] >= expected * 0.8, (level, means[-1], expected)
    assert means[0] == 0.0
    assert means == sorted(means) and len(set(means)) == len(ORDER), means


def test_spurious_rate_and_box(runs):
    mask, centre = runs["mask"], runs["centre"]
    for level in ORDER:
        counts, slices = 0, 0
        for p in runs["runs"][level]:
            slices += int(reader_clicks(p).sum())
            spurious = p.kind == "spurious"
            counts += int(spurious.sum())
            for point, t in zip(in_plane(p.ijk[spurious], 1), p.slice_index[spurious]):
                rows, cols = np.nonzero(np.take(mask, int(t), axis=1))
                grow = 2 * centre[int(t)][1]
                assert rows.min() - grow <= point[0] <= rows.max() + grow
                assert cols.min() - grow <= point[1] <= cols.max() + grow
        rate = sim.LEVELS[level].spurious_per_slice
        assert abs(counts / slices - rate) <= max(0.02, 4 * math.sqrt(rate / slices)), level


def test_levels_are_nested_for_one_seed():
    mask = CASES["ellipsoid"]
    for seed in range(5):
        missing = []
        for level in ORDER:
            p = sim.simulate(mask, 1, level, seed)
            prompted = set(p.slice_index[reader_clicks(p)].tolist())
            missing.append(set(sim.centerline(mask, 1)) - prompted)
        assert missing[0] <= missing[1] <= missing[2] <= missing[3]


# ---------------------------------------------------------------- determinism and options

def _same(a: sim.SimulatedPrompts, b: sim.SimulatedPrompts) -> bool:
    return (a.ijk.shape == b.ijk.shape and np.array_equal(a.ijk, b.ijk) and np.array_equal(a.kind, b.kind)
            and np.array_equal(a.inside, b.inside))


def test_seeded_determinism_and_seed_variation():
    mask = CASES["ellipsoid"]
    for level in ("mild", "moderate", "severe"):
        assert _same(sim.simulate(mask, 1, level, 7), sim.simulate(mask.copy(), 1, level, 7))
        assert not _same(sim.simulate(mask, 1, level, 7), sim.simulate(mask, 1, level, 8))
    assert _same(sim.simulate(mask, 1, "clean", 1), sim.simulate(mask, 1, "clean", 2))  # no noise, no randomness


def test_every_kth_override_and_custom_level():
    mask = CASES["ellipsoid"]
    slices = sorted(sim.centerline(mask, 1))
    p = sim.simulate(mask, 1, "clean", 0, every_kth=4)
    expected = slices[::4] + ([slices[-1]] if (len(slices) - 1) % 4 else [])
    assert p.slice_index.tolist() == expected
    custom = sim.NoiseLevel(every_kth=2, displacement=0.0, drift_fraction=1.0, missing_fraction=0.0,
                            spurious_per_slice=0.0)
    q = sim.simulate(mask, 1, custom, 3)
    assert q.level == "custom" and (q.kind == "drift").all() and not q.inside.any()
    assert sim.simulate(mask, 1, sim.LEVELS["mild"], 3).level == "mild"


@pytest.mark.parametrize("axis", [0, 2])
def test_other_axes(axis):
    mask = CASES["ellipsoid"]
    p = sim.simulate(mask, axis, "clean", 0)
    centre = sim.centerline(mask, axis)
    assert sorted(p.slice_index.tolist()) == sorted(centre) and p.inside.all()
    for point, t in zip(in_plane(p.ijk, axis), p.slice_index):
        np.testing.assert_array_equal(point, centre[int(t)][0])


# ---------------------------------------------------------------- markups

def test_to_markups_writes_lps_points(tmp_path):
    mask = CASES["ellipsoid"]
    p = sim.simulate(mask, 1, "severe", 4)
    angle = np.deg2rad(20)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    matrix = geometry_matrix((10.0, -5.0, 3.0), (0.8, 0.9, 2.0), direction.ravel())
    out = p.to_markups(tmp_path / "sub" / "points.mrk.json", matrix)
    assert out == tmp_path / "sub" / "points.mrk.json"
    assert [f.name for f in out.parent.iterdir()] == ["points.mrk.json"]  # no temporary left behind
    document = json.loads(out.read_text())
    assert document["@schema"] == MARKUPS_SCHEMA  # one writer: the same file as prompts.write_markups
    (markup,) = document["markups"]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "LPS"
    points = markup["controlPoints"]
    assert len(points) == len(p)
    np.testing.assert_allclose([c["position"] for c in points], ijk_to_physical(p.ijk, matrix), atol=1e-9)
    assert [c["label"] for c in points] == [f"P-{n}" for n in range(1, len(p) + 1)]
    assert [c["description"] for c in points] == p.kind.tolist()


def test_sample_centerline_file_is_the_moderate_seed0_simulation():
    hip = hippocampus()
    path = SAMPLE_DIR / "hippocampus_001_centerline.mrk.json"
    if hip is None or not path.exists():
        pytest.skip("sample case not present")
    mask, image = hip
    matrix = geometry_matrix(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    p = sim.simulate(mask, 1, "moderate", 0)
    points = json.loads(path.read_text())["markups"][0]["controlPoints"]
    assert [c["description"] for c in points] == p.kind.tolist()
    np.testing.assert_allclose([c["position"] for c in points], ijk_to_physical(p.ijk, matrix), atol=1e-6)
