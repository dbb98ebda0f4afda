"""prompts: markups / CSV files -> physical points -> voxels, grouped by slice."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from SPDSegmentLib.core import prompts
from SPDSegmentLib.core.errors import InputError
from SPDSegmentLib.core.volume import Volume, geometry_matrix, ijk_to_physical, lps_to_ras

# (i, j, k) inside the oblique fixture (i < 10, j < 12, k < 6), clicked on axial planes (integer k)
IJK = np.array([[2.0, 3.0, 1.0], [4.3, 5.7, 1.0], [7.2, 2.2, 3.0]])


def markups_file(path, positions, frame="LPS", kind="Fiducial", descriptions=None, extra_points=()):
    points = [{"id": str(n + 1), "label": f"F-{n + 1}", "description": (descriptions or [""] * len(positions))[n],
               "position": [float(v) for v in p], "positionStatus": "defined"} for n, p in enumerate(positions)]
    markup = {"type": kind, "controlPoints": points + list(extra_points)}
    if frame is not None:
        markup["coordinateSystem"] = frame
    path.write_text(json.dumps({"@schema": prompts.MARKUPS_SCHEMA, "markups": [markup]}))
    return path


def lps_of(volume, ijk=IJK):
    return ijk_to_physical(ijk, volume.ijk_to_lps)


def check_voxels(points, volume, ijk=IJK):
    vp = prompts.to_voxels(points, volume)
    np.testing.assert_allclose(vp.ijk, ijk, atol=1e-6)
    assert vp.axis == 0 and len(vp.outside_lps) == 0
    return vp


# ---------------------------------------------------------------- formats

def test_markups_lps(tmp_path, oblique_volume):
    path = markups_file(tmp_path / "p.mrk.json", lps_of(oblique_volume), descriptions=["", "Background", ""])
    points = prompts.read(path)
    assert points.source == "p.mrk.json" and points.names == ["F-1", "F-2", "F-3"]
    np.testing.assert_array_equal(points.labels, [1, 0, 1])
    vp = check_voxels(points, oblique_volume)
    np.testing.assert_array_equal(vp.labels, [1, 0, 1])


def test_markups_ras_and_default_frame(tmp_path, oblique_volume):
    lps = lps_of(oblique_volume)
    check_voxels(prompts.read(markups_file(tmp_path / "ras.mrk.json", lps_to_ras(lps), frame="RAS")), oblique_volume)
    check_voxels(prompts.read(markups_file(tmp_path / "none.mrk.json", lps, frame=None)), oblique_volume)


def test_curves_and_every_markup_in_file(tmp_path, oblique_volume):
    lps = lps_of(oblique_volume)
    skipped = [{"position": [0, 0, 0], "positionStatus": "undefined"}, {"label": "no position"}]
    markups_file(tmp_path / "c.mrk.json", lps[:2], kind="Curve", extra_points=skipped)
    data = json.loads((tmp_path / "c.mrk.json").read_text())
    data["markups"].append({"type": "ClosedCurve", "coordinateSystem": "RAS",
                            "controlPoints": [{"position": list(lps_to_ras(lps[2:])[0])}]})
    data["markups"].append({"type": "ROI", "controlPoints": [{"position": [1e4, 0, 0]}]})  # not a point list
    (tmp_path / "c.mrk.json").write_text(json.dumps(data))
    check_voxels(prompts.read(tmp_path / "c.mrk.json"), oblique_volume)


@pytest.mark.parametrize("header, frame", [("r,a,s,label", "ras"), ("l,p,s,label", "lps"), ("x,y,z,label", "lps"),
                                           ("# coordinates: ras\nx,y,z,label", "ras"),
                                           ("# CoordinateSystem = RAS\nx\ty\tz\tlabel", "ras")])
def test_csv_physical(tmp_path, oblique_volume, header, frame):
    lps = lps_of(oblique_volume)
    coords = lps_to_ras(lps) if frame == "ras" else lps
    sep = "\t" if "\t" in header else ","
    rows = [sep.join([f"{v:.10f}" for v in c] + [str(lab)]) for c, lab in zip(coords, [1, 0, 1])]
    path = tmp_path / "p.csv"
    path.write_text("\n".join([header] + rows) + "\n")
    points = prompts.read(path)
    np.testing.assert_array_equal(points.labels, [1, 0, 1])
    check_voxels(points, oblique_volume)


def test_csv_ijk_and_slicer_table(tmp_path, oblique_volume):
    path = tmp_path / "v.tsv"
    path.write_text("i\tj\tk\n" + "\n".join("\t".join(map(str, p)) for p in IJK))
    points = prompts.read(path)
    assert points.lps is None and points.ijk is not None
    check_voxels(points, oblique_volume)
    # Slicer's own markups CSV: 'label' is the point name, 'defined' 0 marks an unplaced point
    ras = lps_to_ras(lps_of(oblique_volume))
    rows = [f"F-{n},{r:.9f},{a:.9f},{s:.9f},1,{'background' if n == 1 else ''}" for n, (r, a, s) in enumerate(ras)]
    (tmp_path / "s.csv").write_text("label,r,a,s,defined,description\n" + "\n".join(rows) + "\nF-9,0,0,0,0,\n")
    points = prompts.read(tmp_path / "s.csv")
    assert points.names == ["F-0", "F-1", "F-2"]
    np.testing.assert_array_equal(points.labels, [1, 0, 1])
    check_voxels(points, oblique_volume)


def test_legacy_fcsv(tmp_path, oblique_volume):
    ras = lps_to_ras(lps_of(oblique_volume))
    rows = [f"vtkMRMLMarkupsFiducialNode_{n},{r},{a},{s},0,0,0,1,1,1,0,F-{n},{'background' if n else ''},"
            for n, (r, a, s) in enumerate(ras)]
    (tmp_path / "old.fcsv").write_text("# Markups fiducial file version = 4.10\n# CoordinateSystem = 0\n"
                                       "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                                       + "\n".join(rows) + "\n")
    points = prompts.read(tmp_path / "old.fcsv")
    assert points.names == ["F-0", "F-1", "F-2"]
    np.testing.assert_array_equal(points.labels, [1, 0, 0])
    check_voxels(points, oblique_volume)


def test_helpers_agree(oblique_volume):
    lps = lps_of(oblique_volume)
    for points in (prompts.from_lps(lps), prompts.from_ras(lps_to_ras(lps)), prompts.from_ijk(IJK)):
        check_voxels(points, oblique_volume)
    with pytest.raises(InputError, match="labels"):
        prompts.from_lps(lps, labels=[1, 2, 1])
    with pytest.raises(InputError, match="not finite"):
        prompts.from_ras([[0.0, np.nan, 1.0]])


# ---------------------------------------------------------------- malformed files

@pytest.mark.parametrize("name, text, match", [
    ("bad.mrk.json", '{"markups": [', "not valid JSON"),
    ("nokey.mrk.json", '{"points": []}', "no 'markups'"),
    ("short.mrk.json", '{"markups": [{"type": "Fiducial", "controlPoints": [{"position": [1, 2]}]}]}', "three"),
    ("nan.mrk.json", '{"markups": [{"type": "Fiducial", "controlPoints": [{"position": [NaN, 2, 3]}]}]}', "finite"),
    ("frame.mrk.json", '{"markups": [{"type": "Fiducial", "coordinateSystem": "XYZ", "controlPoints": []}]}', "XYZ"),
    ("empty.mrk.json", '{"markups": [{"type": "Fiducial", "controlPoints": []}]}', "no placed points"),
    ("roi.mrk.json", '{"markups": [{"type": "ROI", "controlPoints": [{"position": [1, 2, 3]}]}]}', "ROI"),
    ("noheader.csv", "1,2,3\n4,5,6\n", "header"),
    ("text.csv", "x,y,z\n1,two,3\n", "not all numbers"),
    ("inf.csv", "x,y,z\n1,inf,3\n", "non-finite"),
    ("headeronly.csv", "x,y,z,label\n", "no points"),
    ("blank.csv", "\n\n", "empty"),
    ("label.csv", "x,y,z,label\n1,2,3,1\n1,2,3,7\n", "label column"),
    ("points.xyz", "1 2 3\n", "Unsupported"),
])
def test_malformed_files(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError) as info:
        prompts.read(path)
    assert name in str(info.value) and match in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        prompts.read(tmp_path / "nothing.mrk.json")


# ---------------------------------------------------------------- inside / outside

def test_outside_points_are_reported_not_clamped(oblique_volume):
    far = lps_of(oblique_volume, np.array([[2.0, 3.0, 40.0], [-3.0, 1.0, 1.0]]))
    lps = np.vstack([lps_of(oblique_volume), far])
    vp = prompts.to_voxels(prompts.from_lps(lps, labels=[1, 1, 0, 1, 1]), oblique_volume)
    np.testing.assert_allclose(vp.ijk, IJK, atol=1e-6)
    np.testing.assert_array_equal(vp.labels, [1, 1, 0])
    np.testing.assert_array_equal(vp.outside_lps, far)


def test_volume_faces_count_as_inside(oblique_volume):
    ijk = np.array([[-0.5, 0.0, 2.0], [9.5, 11.5, 5.5], [0.0, 0.0, -0.5]])
    vp = prompts.to_voxels(prompts.from_lps(lps_of(oblique_volume, ijk)), oblique_volume, axis=0)
    assert len(vp) == 3
    np.testing.assert_array_equal(vp.slice_index(), [2, 5, 0])
    vp = prompts.to_voxels(prompts.from_ijk([[0, 0, 5.52], [0, 0, 5.0]]), oblique_volume, axis=0)
    assert len(vp) == 1 and len(vp.outside_lps) == 1


def test_all_outside(oblique_volume):
    lps = lps_of(oblique_volume)
    with pytest.raises(InputError) as info:  # RAS read as LPS: the message says so
        prompts.to_voxels(prompts.from_lps(lps_to_ras(lps), names=None, source="clicks.csv"), oblique_volume)
    text = str(info.value)
    assert "All 3" in text and "clicks.csv" in text and "LPS" in text and "RAS" in text and "3 of them" in text
    with pytest.raises(InputError, match="i,j,k"):
        prompts.to_voxels(prompts.from_ijk([[50, 0, 0]]), oblique_volume)


def test_no_points(oblique_volume):
    with pytest.raises(InputError, match="no prompts"):
        prompts.to_voxels(prompts.from_lps(np.zeros((0, 3))), oblique_volume)


# ---------------------------------------------------------------- slicing axis

@pytest.mark.parametrize("ijk, axis", [
    ([[1.3, 2.7, 1], [4.1, 5.6, 1], [2.2, 3.3, 2]], 0),  # integer k: axial clicks
    ([[1.3, 2, 1.4], [4.1, 5, 2.6]], 1),  # integer j
    ([[1, 2.7, 1.4], [4, 5.6, 2.6]], 2),  # integer i
    ([[1.02, 2.7, 1.4], [3.96, 5.6, 2.6]], 2),  # within 0.05 voxel of an integer
    ([[1.1, 2.7, 1.4], [4, 5.6, 2.6]], 0),  # none qualifies, 2 slices each way, no clear direction: axial
    ([[1, 2, 1], [1, 5, 1], [1, 8, 1]], 1),  # voxel centres: j has the most distinct slices
    ([[1, 2, 1], [4, 5, 1], [7, 8, 1]], 1),  # i and j: as many slices, directions close: coronal first
    ([[1, 2, 1], [1, 5, 2], [1, 8, 3]], 1),  # j and k: as many slices, but 5.4 mm along j and 4 mm along k
    ([[1, 2, 3]], 0),  # one voxel centre: axial
])
def test_choose_axis(oblique_volume, ijk, axis):
    assert prompts.choose_axis(np.array(ijk, float), oblique_volume) == axis


SLICE_VIEW_CASES = [  # clicks placed in a slice view: on the integer planes of its axis only
    ([[1.3, 2.7, 1], [4.1, 5.6, 1], [2.2, 3.3, 2]], 0),
    ([[1.3, 2, 1.4], [4.1, 5, 2.6]], 1),
    ([[1, 2.7, 1.4], [4, 5.6, 2.6]], 2),
    ([[1.3, 0.2, 1], [1.4, 2.6, 1], [1.2, 5.3, 2], [1.3, 8.7, 2], [1.6, 11.2, 3]], 0),  # runs along j: still axial
]


@pytest.mark.parametrize("ijk, axis", SLICE_VIEW_CASES)
def test_slice_view_clicks_keep_their_axis(oblique_volume, ijk, axis):
    choice = prompts.choose_axis(np.array(ijk, float), oblique_volume, preferred_axes=(2, 1, 0))
    assert choice == axis and choice.source == "slice planes"
    vp = prompts.to_voxels(prompts.from_ijk(ijk), oblique_volume)
    assert vp.axis == axis and vp.axis_source == "slice planes"


def grid_volume(spacing=(0.9, 1.1, 1.5), shape=(40, 40, 40), degrees=20.0):
    """An oblique grid (rotated about S) with the given (i, j, k) spacing; array (k, j, i)."""
    angle = np.deg2rad(degrees)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    return Volume(np.zeros(shape, np.float32), geometry_matrix((4.0, -2.0, 7.0), spacing, direction.ravel()),
                  name="grid")


def centerline_along(axis, n=24):
    """A gently curving centerline at voxel centres with one point per slice along array ``axis``."""
    t = np.arange(8, 8 + n)
    drift_a = 20 + np.round(3 * np.sin(t / 6.0))  # a few voxels of curve
    drift_b = 15 + np.round(t / 5.0)  # a slow slope
    index = np.zeros((n, 3))  # (k, j, i)
    others = [a for a in range(3) if a != axis]
    index[:, axis], index[:, others[0]], index[:, others[1]] = t, drift_a, drift_b
    return index[:, ::-1].copy()  # (i, j, k)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_voxel_centre_centerline_is_sliced_across(axis):
    volume = grid_volume()
    ijk = centerline_along(axis)
    assert np.all(ijk == np.round(ijk))  # every plane test fits: the geometry decides
    for preferred in ((), ((axis + 1) % 3,)):  # a clear geometry is not overruled by the model's preference
        choice = prompts.choose_axis(ijk, volume, preferred_axes=preferred)
        assert choice == axis and choice.source == "clicks' geometry", choice.why
    vp = prompts.to_voxels(prompts.from_lps(ijk_to_physical(ijk, volume.ijk_to_lps)), volume)
    assert vp.axis == axis and vp.axis_source == "clicks' geometry"
    note = prompts.axis_note(vp, volume)
    assert note.startswith(f"{('axial', 'coronal', 'sagittal')[axis]} slices (array axis {axis}) from the clicks' "
                           "geometry") and "\n" not in note
    # the same line placed in 3D (a curve resampled in mm): on no axis's planes, the geometry still decides
    jitter = np.random.default_rng(axis).uniform(0.15, 0.35, ijk.shape) * np.random.default_rng(9).choice([-1, 1],
                                                                                                         ijk.shape)
    choice = prompts.choose_axis(ijk + jitter, volume)
    assert choice == axis and choice.source == "clicks' geometry", choice.why


@pytest.mark.parametrize("direction, spacing, axis", [
    ((1.0, 0.55, 0.3), (0.9, 1.1, 1.5), 2),  # mostly along i: more i slices than any other
    ((0.3, 1.0, 0.6), (0.9, 1.1, 1.5), 1),  # mostly along j
    ((1.0, 1.0, 0.0), (0.8, 1.2, 1.0), 1),  # as many i as j slices, but 1.5 x longer along j in mm
    ((0.0, 0.95, 1.0), (1.0, 1.0, 1.6), 0),  # about as many j as k slices, but 1.7 x longer along k in mm
])
def test_oblique_voxel_centre_line(direction, spacing, axis):
    volume = grid_volume(spacing)
    s = np.arange(25)[:, None]
    ijk = np.round(np.array([5.0, 5.0, 5.0]) + s * np.array(direction))
    choice = prompts.choose_axis(ijk, volume, preferred_axes=((axis + 2) % 3,))
    assert choice == axis and choice.source == "clicks' geometry", choice.why


def test_tie_between_two_axes_and_the_trained_orientation():
    volume = grid_volume(spacing=(1.0, 1.0, 1.0))
    ijk = np.array([[5.0 + s, 9.0 + s, 12.0] for s in range(20)])  # 45 degrees between i and j, one k plane
    tie = prompts.choose_axis(ijk, volume)
    assert tie == 1 and tie.source == "tie"  # coronal before sagittal; axial (k) has a single slice
    assert "close: coronal, sagittal" in tie.why
    vp = prompts.to_voxels(prompts.from_ijk(ijk), volume)
    assert vp.axis_source == "tie" and "Set the axis" in prompts.axis_note(vp, volume)
    trained = prompts.choose_axis(ijk, volume, preferred_axes=(2,))  # the model's orientation wins a close call
    assert trained == 2 and trained.source == "trained orientation"
    vp = prompts.to_voxels(prompts.from_ijk(ijk), volume, preferred_axes=(0, 2))
    assert vp.axis == 2 and "the model was trained on sagittal slices" in prompts.axis_note(vp, volume)
    assert prompts.choose_axis(ijk, volume, preferred_axes=(0,)) == 1  # not among the close ones: no say
    blob = np.array(list(itertools.product((10.0, 11.0, 12.0), repeat=3)))  # no main direction
    choice = prompts.choose_axis(blob, volume, preferred_axes=(2,))
    assert choice == 2 and choice.source == "trained orientation" and "no main direction" in choice.why
    assert prompts.choose_axis(blob, volume).source == "tie"


def test_axis_sources_and_names(oblique_volume):
    points = prompts.from_ijk(IJK)
    given = prompts.to_voxels(points, oblique_volume, axis="coronal")
    assert given.axis == 1 and given.axis_source == "given"
    assert prompts.axis_note(given, oblique_volume) == "coronal slices (array axis 1), as given"
    assert prompts.to_voxels(points, oblique_volume, axis=np.int64(2)).axis_source == "given"
    view = prompts.to_voxels(points, oblique_volume, axis=prompts.AxisChoice(2, "view"))
    assert view.axis == 2 and type(view.axis) is int and view.axis_source == "view"
    assert "the slice view" in prompts.axis_note(view, oblique_volume)
    planes = prompts.to_voxels(points, oblique_volume)
    assert planes.axis_source == "slice planes" and "lie on its slice planes" in prompts.axis_note(planes,
                                                                                                oblique_volume)
    assert [prompts.axis_name(a, oblique_volume) for a in range(3)] == ["axial", "coronal", "sagittal"]
    permuted = Volume(np.zeros((4, 5, 6)), geometry_matrix((0, 0, 0), (1, 1, 1), [0, 1, 0, 0, 0, 1, 1, 0, 0]))
    assert [prompts.axis_name(a, permuted) for a in range(3)] == ["coronal", "sagittal", "axial"]
    with pytest.raises(ValueError):
        prompts.AxisChoice(1, "guess")
    bare = prompts.VoxelPrompts(ijk=IJK, labels=np.ones(3, int), axis=0, outside_lps=np.zeros((0, 3)))
    assert bare.axis_source == "given"  # made by hand (research code): the caller chose


def test_axis_names(oblique_volume):
    assert [prompts.axis_from_name(n, oblique_volume) for n in ("axial", "Coronal", "sagittal")] == [0, 1, 2]
    assert [prompts.axis_from_name(n, oblique_volume) for n in ("k", "j", "i", "0", "2", "red")] == [0, 1, 2, 0, 2, 0]
    # i runs along S, j along L, k along P: axial slices are along array axis 2
    permuted = Volume(np.zeros((4, 5, 6)), geometry_matrix((0, 0, 0), (1, 1, 1), [0, 1, 0, 0, 0, 1, 1, 0, 0]))
    assert [prompts.axis_from_name(n, permuted) for n in ("axial", "coronal", "sagittal")] == [2, 0, 1]
    assert prompts.choose_axis(np.array([[0.3, 1.2, 2.7]]), permuted) == 2
    with pytest.raises(InputError, match="Unknown slicing axis"):
        prompts.axis_from_name("oblique", oblique_volume)


def test_axis_argument(oblique_volume):
    points = prompts.from_ijk(IJK)
    assert prompts.to_voxels(points, oblique_volume, axis="auto").axis == 0
    assert prompts.to_voxels(points, oblique_volume, axis="sagittal").axis == 2
    assert prompts.to_voxels(points, oblique_volume, axis=1).axis == 1
    with pytest.raises(InputError):
        prompts.to_voxels(points, oblique_volume, axis=3)


def test_by_slice_grouping(oblique_volume):
    vp = prompts.to_voxels(prompts.from_ijk(IJK, labels=[1, 0, 1]), oblique_volume)
    np.testing.assert_array_equal(vp.slice_index(), [1, 1, 3])
    np.testing.assert_allclose(vp.rc(), IJK[:, [1, 0]])  # axial slice: rows j, cols i
    groups = vp.by_slice()
    assert list(groups) == [1, 3]
    np.testing.assert_allclose(groups[1][0], [[3.0, 2.0], [5.7, 4.3]])
    np.testing.assert_array_equal(groups[1][1], [1, 0])
    np.testing.assert_allclose(groups[3][0], [[2.2, 7.2]])
    coronal = prompts.to_voxels(prompts.from_ijk(IJK), oblique_volume, axis=1)
    np.testing.assert_allclose(coronal.rc(), IJK[:, [2, 0]])  # rows k, cols i
    np.testing.assert_array_equal(coronal.slice_index(), [3, 6, 2])


# ---------------------------------------------------------------- writing

def test_write_markups_round_trip(tmp_path, oblique_volume):
    lps = lps_of(oblique_volume)
    path = prompts.write_markups(tmp_path / "out" / "audit.mrk.json", lps, names=["a", "b", "c"],
                                 color=(0.1, 0.2, 0.3), labels=[1, 0, 1])
    assert sorted(p.name for p in path.parent.iterdir()) == ["audit.mrk.json"]  # no temporary left
    data = json.loads(path.read_text())
    markup = data["markups"][0]
    assert data["@schema"] == prompts.MARKUPS_SCHEMA and markup["coordinateSystem"] == "LPS"
    assert markup["display"]["color"] == [0.1, 0.2, 0.3] == markup["display"]["selectedColor"]
    assert markup["name"] == "SPD prompts" and markup["controlPoints"][0]["locked"] is True
    points = prompts.read(path)
    np.testing.assert_allclose(points.lps, lps)
    assert points.names == ["a", "b", "c"]
    np.testing.assert_array_equal(points.labels, [1, 0, 1])
    with pytest.raises(InputError):
        prompts.write_markups(tmp_path / "bad.mrk.json", [[0, np.nan, 0]])
    assert not (tmp_path / "bad.mrk.json").exists()


def test_write_markups_failure_leaves_nothing(tmp_path):
    (tmp_path / "taken.mrk.json").mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(InputError, match="Could not write .*taken.mrk.json.*nothing was written"):
        prompts.write_markups(tmp_path / "taken.mrk.json", [[1.0, 2.0, 3.0]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.mrk.json"]
