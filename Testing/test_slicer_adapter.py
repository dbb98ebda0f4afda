"""The Slicer adapter on real MRML (slicer-core): geometry, points, segment writes, undo, masking, failures."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (MRML in Python) is not installed", allow_module_level=True)

from SPDSegmentLib.core import prompts  # noqa: E402
from SPDSegmentLib.core.errors import Cancelled, InputError  # noqa: E402
from SPDSegmentLib.core.progress import Progress  # noqa: E402
from SPDSegmentLib.core.volume import LPS_TO_RAS, read, read_label  # noqa: E402
from SPDSegmentLib.slicer_side import adapter as sa  # noqa: E402
from slicer_app import make_standalone_app  # noqa: E402


def audit_at(ijk, status, source_slice, axis):
    """A real AuditEntry for the voxel ``ijk`` on a run along ``axis`` (rc + slice, as the pipeline makes)."""
    from SPDSegmentLib.core.distill import AuditEntry

    index = np.asarray(ijk, float)[::-1]  # (k, j, i)
    others = [a for a in range(3) if a != axis]
    return AuditEntry(rc=index[others], slice=int(index[axis]), status=status, source_slice=source_slice,
                      score=0.9)


@dataclass
class FakeResult:
    mask: np.ndarray
    saliency: Optional[np.ndarray] = None
    audit: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    axis: int = 0


def fake_segment(mask):
    """A segment_fn returning ``mask``, reporting one progress step (so cancellation is honoured)."""
    calls = []

    def segment(volume, voxel_prompts, model, options=None, progress=None):
        calls.append((volume, voxel_prompts, model, options))
        if progress is not None:
            progress.step("segment", 1, 1)
        return FakeResult(mask=mask.copy(), saliency=mask.astype(np.float32) * 0.8,
                          audit=[audit_at([5.0, 6.0, 7.0], "kept", 7, voxel_prompts.axis),
                                 audit_at([9.0, 9.0, 8.0], "rejected", 8, voxel_prompts.axis),
                                 audit_at([10.0, 12.0, 9.0], "borrowed", 8, voxel_prompts.axis)],
                          axis=voxel_prompts.axis)

    segment.calls = calls
    return segment


@pytest.fixture()
def app():
    return make_standalone_app()


@pytest.fixture(scope="session")
def sample(sample_paths):
    volume = read(sample_paths["image"])
    label = read_label(sample_paths["label"], like=volume)
    return volume, label


@pytest.fixture()
def loaded(app, sample_paths, sample, tmp_path):
    """Volume, a point list placed on the label (one background point), and an empty segmentation."""
    volume, label = sample
    volume_node = app.load_volume(sample_paths["image"])
    k_values = np.unique(np.nonzero(label)[0])[::4]
    ijk = []
    for k in k_values:
        j, i = np.argwhere(label[k] > 0).mean(0)
        ijk.append((round(i), round(j), k))
    ijk.append((0, 0, int(k_values[0])))  # a background click in a corner
    lps = (np.c_[np.array(ijk, float), np.ones(len(ijk))] @ volume.ijk_to_lps.T)[:, :3]
    labels = [1] * (len(ijk) - 1) + [0]
    path = prompts.write_markups(tmp_path / "hippo.mrk.json", lps, labels=labels, node_name="hippo")
    markups_node = app.load_markups(path)
    segmentation_node = app.new_segmentation(volume_node)
    return volume_node, markups_node, segmentation_node, path


def add_linear_transform(scene, node, angle_deg=25.0, translation=(4.0, -7.0, 3.0)):
    import vtk

    transform = vtk.vtkTransform()
    transform.Translate(*translation)
    transform.RotateWXYZ(angle_deg, 0.3, 0.2, 0.9)
    transform_node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform_node.SetMatrixTransformToParent(transform.GetMatrix())
    node.SetAndObserveTransformNodeID(transform_node.GetID())
    matrix = np.array([[transform.GetMatrix().GetElement(r, c) for c in range(4)] for r in range(4)])
    return transform_node, matrix


def box_mask(shape, lo, hi):
    mask = np.zeros(shape, np.uint8)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    return mask


# ---------------------------------------------------------------- reading

def test_volume_from_node_equals_file(app, sample_paths, sample):
    volume, _ = sample
    node = app.load_volume(sample_paths["image"])
    got = sa.volume_from_node(node)
    np.testing.assert_array_equal(got.array, volume.array)
    np.testing.assert_allclose(got.ijk_to_lps, volume.ijk_to_lps, atol=1e-6)
    assert got.name == node.GetName()
    assert not got.array.flags.writeable  # read-only for SPD (hashed once by Volume.fingerprint)
    from vtk.util import numpy_support

    scalars = node.GetImageData().GetPointData().GetScalars()
    node_voxels = numpy_support.vtk_to_numpy(scalars)
    assert np.shares_memory(got.array, node_voxels)  # a view: the main thread never copies the voxels
    assert sa.volume_from_node(node).array is got.array  # unchanged: the same array, shared with the engine once
    node_voxels[0] += 1  # the voxels change (as a module editing them in place would)
    scalars.Modified()
    changed = sa.volume_from_node(node)
    assert changed.array is not got.array and changed.array.flat[0] == volume.array.flat[0] + 1


def test_volume_from_node_applies_parent_linear_transform(app, sample_paths, sample):
    volume, _ = sample
    node = app.load_volume(sample_paths["image"])
    _, to_parent = add_linear_transform(app.scene, node)
    got = sa.volume_from_node(node)
    np.testing.assert_allclose(got.ijk_to_lps, LPS_TO_RAS @ to_parent @ LPS_TO_RAS @ volume.ijk_to_lps, atol=1e-6)
    # independent check: one voxel through MRML's own transform machinery
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    local = ijk_to_ras @ np.array([3.0, 4.0, 5.0, 1.0])
    world = [0.0, 0.0, 0.0]
    node.TransformPointToWorld(local[:3], world)
    lps = got.ijk_to_lps @ np.array([3.0, 4.0, 5.0, 1.0])
    np.testing.assert_allclose(lps[:3] * [-1, -1, 1], world, atol=1e-6)


def test_volume_under_nonlinear_transform_is_refused(app, sample_paths):
    import vtk

    node = app.load_volume(sample_paths["image"])
    spline = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p in [(0, 0, 0), (10, 0, 0), (0, 10, 0), (0, 0, 10), (10, 10, 10)]:
        source.InsertNextPoint(p)
        target.InsertNextPoint(p[0] + 1.0, p[1], p[2] + 0.5 * p[0] / 10)
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    spline.SetBasisToR()
    transform_node = app.scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    transform_node.SetAndObserveTransformToParent(spline)
    node.SetAndObserveTransformNodeID(transform_node.GetID())
    with pytest.raises(InputError, match="non-linear"):
        sa.volume_from_node(node)


def test_non_scalar_node_is_refused(app):
    with pytest.raises(InputError, match="scalar volume"):
        sa.volume_from_node(app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode"))


def test_points_from_markups_equal_file(loaded):
    _, markups_node, _, path = loaded
    expected = prompts.read(path)
    got = sa.points_from_markups(markups_node)
    np.testing.assert_allclose(got.lps, expected.lps, atol=1e-6)
    np.testing.assert_array_equal(got.labels, expected.labels)
    assert got.labels[-1] == 0 and got.labels[:-1].all()
    assert got.names == expected.names
    assert got.source == markups_node.GetName()


def test_sample_centerline_points_equal_file(app, sample_paths):
    if not sample_paths["points"].exists():
        pytest.skip("sample centerline not generated yet")
    node = app.load_markups(sample_paths["points"])
    expected = prompts.read(sample_paths["points"])
    got = sa.points_from_markups(node)
    np.testing.assert_allclose(got.lps, expected.lps, atol=1e-4)
    np.testing.assert_array_equal(got.labels, expected.labels)


def test_points_from_markups_world_coordinates_and_undefined_skipped(loaded, app):
    _, markups_node, _, path = loaded
    expected = prompts.read(path)
    _, to_parent = add_linear_transform(app.scene, markups_node, angle_deg=-10.0, translation=(1.0, 2.0, 3.0))
    markups_node.UnsetNthControlPointPosition(0)
    got = sa.points_from_markups(markups_node)
    ras = np.c_[expected.lps[1:] * [-1, -1, 1], np.ones(len(expected.lps) - 1)] @ to_parent.T
    np.testing.assert_allclose(got.lps, ras[:, :3] * [-1, -1, 1], atol=1e-6)
    assert len(got) == len(expected) - 1


def test_curve_points_and_background_descriptions(app):
    curve = app.scene.AddNewNodeByClass("vtkMRMLMarkupsCurveNode", "curve")
    for p in ([1.0, 2.0, 3.0], [2.0, 3.0, 3.0], [4.0, 3.0, 3.0]):
        curve.AddControlPoint(p)
    curve.SetNthControlPointDescription(2, "Background")
    curve.SetNthControlPointDescription(1, " Correction ")  # a trusted foreground correction
    got = sa.points_from_markups(curve)
    np.testing.assert_allclose(got.lps[0], [-1.0, -2.0, 3.0])
    np.testing.assert_array_equal(got.labels, [1, 1, 0])
    assert got.kinds == ["click", "correction", "background"]
    empty = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "empty")
    with pytest.raises(InputError, match="no placed points"):
        sa.points_from_markups(empty)


# ---------------------------------------------------------------- writing, undo, masking

def test_apply_writes_segment_and_undo_restores(loaded, sample):
    volume, label = sample
    volume_node, _, segmentation_node, _ = loaded
    segment_id = sa.add_segment(segmentation_node, "hippo")
    target = (segmentation_node, segment_id, volume_node)
    sa.apply_mask_to_segment(target, label, volume)
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, volume), label)
    second = box_mask(volume.shape, (5, 5, 5), (15, 20, 12))
    sa.apply_mask_to_segment(target, second, volume)
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, volume), second)
    assert sa.undo(target)
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, volume), label)
    assert sa.undo(target)
    assert sa.segment_array(segmentation_node, segment_id, volume).sum() == 0


def test_apply_through_editor_node_and_modes(app, loaded, sample):
    volume, _ = sample
    volume_node, _, segmentation_node, _ = loaded
    segment_id = sa.add_segment(segmentation_node, "a")
    editor = app.editor_node
    editor.SetAndObserveSegmentationNode(segmentation_node)
    editor.SetAndObserveSourceVolumeNode(volume_node)
    editor.SetSelectedSegmentID(segment_id)
    first = box_mask(volume.shape, (2, 2, 2), (10, 10, 10))
    second = box_mask(volume.shape, (8, 8, 8), (14, 14, 14))
    sa.apply_mask_to_segment(editor, first, volume, editor_logic=app.editor_logic)
    sa.apply_mask_to_segment(editor, second, volume, mode="add", editor_logic=app.editor_logic)
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, volume), first | second)
    sa.apply_mask_to_segment(editor, second, volume, mode="remove", editor_logic=app.editor_logic)
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, volume), first & (1 - second))
    app.editor_logic.Undo()
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, volume), first | second)
    with pytest.raises(InputError, match="mode"):
        sa.apply_mask_to_segment(editor, first, volume, mode="replace")


def first_then_mine(app, loaded, sample, first_name, configure):
    """A segment ``first_name`` holding a box, the editor configured by ``configure(editor, first_id)``, then
    a second box written into a new segment "mine"; returns (first mask, mine mask, read(id), first id, mine id)."""
    volume, _ = sample
    volume_node, _, segmentation_node, _ = loaded
    first = sa.add_segment(segmentation_node, first_name)
    mine = sa.add_segment(segmentation_node, "mine")
    first_mask = box_mask(volume.shape, (5, 5, 5), (15, 15, 15))
    sa.apply_mask_to_segment((segmentation_node, first, volume_node), first_mask, volume)
    configure(sa.spd_editor_node(app.scene), first)
    mine_mask = box_mask(volume.shape, (10, 10, 10), (20, 20, 20))
    sa.apply_mask_to_segment((segmentation_node, mine, volume_node), mine_mask, volume)
    return first_mask, mine_mask, lambda segment_id: sa.segment_array(segmentation_node, segment_id, volume), first, mine


@pytest.mark.parametrize("overwrite, other_kept", [("OverwriteNone", True), ("OverwriteAllSegments", False)])
def test_overwrite_other_segments_setting(app, loaded, sample, overwrite, other_kept):
    other_mask, mine_mask, read, other, mine = first_then_mine(
        app, loaded, sample, "other", lambda editor, _: editor.SetOverwriteMode(getattr(editor, overwrite)))
    np.testing.assert_array_equal(read(mine), mine_mask)
    np.testing.assert_array_equal(read(other), other_mask if other_kept else other_mask & (1 - mine_mask))


def test_editable_area_is_respected(app, loaded, sample):
    def inside_area_only(editor, area):
        editor.SetOverwriteMode(editor.OverwriteNone)
        editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
        editor.SetMaskSegmentID(area)

    area_mask, mine_mask, read, area, mine = first_then_mine(app, loaded, sample, "area", inside_area_only)
    np.testing.assert_array_equal(read(mine), mine_mask & area_mask)
    np.testing.assert_array_equal(read(area), area_mask)


def test_editable_intensity_range_is_respected(app, loaded, sample):
    volume, _ = sample
    volume_node, _, segmentation_node, _ = loaded
    segment_id = sa.add_segment(segmentation_node, "bright")
    editor = sa.spd_editor_node(app.scene)
    low, high = np.percentile(volume.array, [50, 100])
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(float(low), float(high))
    box = box_mask(volume.shape, (4, 6, 8), (20, 30, 25))
    sa.apply_mask_to_segment((segmentation_node, segment_id, volume_node), box, volume)
    expected = box & ((volume.array >= low) & (volume.array <= high)).astype(np.uint8)
    assert 0 < expected.sum() < box.sum()
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, volume), expected)


def test_volume_and_segmentation_under_one_transform(app, loaded, sample):
    volume_node, _, segmentation_node, _ = loaded
    transform_node, _ = add_linear_transform(app.scene, volume_node, angle_deg=30.0)
    segmentation_node.SetAndObserveTransformNodeID(transform_node.GetID())
    volume = sa.volume_from_node(volume_node)  # world geometry: oblique
    segment_id = sa.add_segment(segmentation_node, "moved")
    box = box_mask(volume.shape, (4, 6, 8), (20, 30, 25))
    sa.apply_mask_to_segment((segmentation_node, segment_id, volume_node), box, volume)
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, volume_node), box)


def test_segmentation_under_its_own_transform(app, loaded, sample):
    volume, _ = sample
    volume_node, _, segmentation_node, _ = loaded
    add_linear_transform(app.scene, segmentation_node, angle_deg=0.0, translation=(2.0, -3.0, 1.0))
    segment_id = sa.add_segment(segmentation_node, "shifted")
    box = box_mask(volume.shape, (4, 6, 8), (20, 30, 25))
    sa.apply_mask_to_segment((segmentation_node, segment_id, volume_node), box, volume)
    # the box is stored in the segmentation's own frame, so it reads back in place in world coordinates
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, volume), box)


# ---------------------------------------------------------------- runs on nodes

def test_console_api_creates_named_segment(loaded, sample):
    volume, label = sample
    volume_node, markups_node, segmentation_node, _ = loaded
    segment = fake_segment(label)
    result = sa.run_spd_on_nodes(volume_node, markups_node, segmentation_node, model="any", segment_fn=segment)
    assert segmentation_node.GetSegmentation().GetNumberOfSegments() == 1
    segment_id = segmentation_node.GetSegmentation().GetNthSegmentID(0)
    assert segmentation_node.GetSegmentation().GetSegment(segment_id).GetName() == markups_node.GetName()
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, volume_node), label)
    got_volume, got_prompts, got_model, _ = segment.calls[0]
    assert got_model == "any" and got_prompts.axis in (0, 1, 2)
    assert len(got_prompts) == markups_node.GetNumberOfControlPoints()
    np.testing.assert_array_equal(got_volume.array, volume.array)
    assert result.mask is not None


def test_console_run_into_existing_segment_and_missing_segment(loaded, sample):
    volume, label = sample
    volume_node, markups_node, segmentation_node, _ = loaded
    segment_id = sa.add_segment(segmentation_node, "target")
    sa.run_spd_on_nodes(volume_node, markups_node, segmentation_node, segment_id, segment_fn=fake_segment(label))
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, volume), label)
    assert sa.undo((segmentation_node, segment_id, volume_node))
    assert sa.segment_array(segmentation_node, segment_id, volume).sum() == 0
    segment = fake_segment(label)
    with pytest.raises(InputError, match="not in"):
        sa.run_spd_on_nodes(volume_node, markups_node, segmentation_node, "nope", segment_fn=segment)
    assert not segment.calls  # checked before any work


@pytest.mark.parametrize("slice_to_ras, axis", [
    (np.eye(4), 0),  # Red (axial): normal S
    (np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]]), 1),  # Green (coronal): normal A
    (np.array([[0, 0, 1.0, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]), 2),  # Yellow (sagittal): normal R
])
def test_axis_from_slice_view(sample, slice_to_ras, axis):
    volume, _ = sample
    assert sa.axis_from_slice_to_ras(slice_to_ras, volume) == axis


def test_axis_sources_through_the_adapter(app, loaded, sample, tmp_path):
    """The view's axis keeps source "view" on its way to the prompts; "auto" prefers the model's orientation."""
    from types import SimpleNamespace

    volume, label = sample
    volume_node, markups_node, segmentation_node, _ = loaded
    green = np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    view_axis = sa.axis_from_slice_to_ras(green, volume)
    assert view_axis == 1 and view_axis.source == "view"
    _, vp = sa.prepare_inputs(volume_node, markups_node, axis=view_axis)
    assert vp.axis == 1 and vp.axis_source == "view"
    assert prompts.axis_note(vp, volume) == "coronal slices (array axis 1), the slice view the clicks were placed in"
    _, vp = sa.prepare_inputs(volume_node, markups_node, axis="coronal")
    assert vp.axis == 1 and vp.axis_source == "given"
    # voxel centres on a 45 degree diagonal between i and j: a close call that the model's orientation settles
    ijk = np.array([[8.0 + s, 15.0 + s, 17.0, 1.0] for s in range(12)])
    path = prompts.write_markups(tmp_path / "diagonal.mrk.json", (ijk @ volume.ijk_to_lps.T)[:, :3])
    diagonal = app.load_markups(path)
    _, vp = sa.prepare_inputs(volume_node, diagonal, model="tiny_sam_test")  # a plain backbone: a tie
    assert vp.axis == 1 and vp.axis_source == "tie"
    sagittal_model = SimpleNamespace(header={"views": ["sagittal"]})
    _, vp = sa.prepare_inputs(volume_node, diagonal, model=sagittal_model)
    assert vp.axis == 2 and vp.axis_source == "trained orientation"
    segment = fake_segment(label)
    sa.run_spd_on_nodes(volume_node, diagonal, segmentation_node, model=sagittal_model, segment_fn=segment)
    assert segment.calls[-1][1].axis == 2 and segment.calls[-1][1].axis_source == "trained orientation"


def test_axis_from_slice_view_follows_volume_orientation(oblique_volume):
    # a view along the volume's own j direction shows j slices (array axis 1), whatever the obliquity
    normal_ras = (oblique_volume.ijk_to_ras[:3, 1] / np.linalg.norm(oblique_volume.ijk_to_ras[:3, 1]))
    view = np.eye(4)
    view[:3, 2] = normal_ras
    assert sa.axis_from_slice_to_ras(view, oblique_volume) == 1


def test_failed_run_leaves_segment_unchanged(loaded, sample):
    volume, label = sample
    volume_node, markups_node, segmentation_node, _ = loaded
    segment_id = sa.add_segment(segmentation_node, "existing")
    before_mask = box_mask(volume.shape, (3, 3, 3), (9, 9, 9))
    sa.apply_mask_to_segment((segmentation_node, segment_id, volume_node), before_mask, volume)

    def broken(*args, **kwargs):
        raise RuntimeError("model exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        sa.run_spd_on_nodes(volume_node, markups_node, segmentation_node, segment_id, segment_fn=broken)
    with pytest.raises(RuntimeError):  # no new segment either
        sa.run_spd_on_nodes(volume_node, markups_node, segmentation_node, None, segment_fn=broken)
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, volume), before_mask)
    assert segmentation_node.GetSegmentation().GetNumberOfSegments() == 1

    def wrong_shape(volume, *args, **kwargs):
        return FakeResult(mask=np.ones((2, 2, 2), np.uint8))

    with pytest.raises(InputError, match="shape"):
        sa.run_spd_on_nodes(volume_node, markups_node, segmentation_node, segment_id, segment_fn=wrong_shape)
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, volume), before_mask)


@pytest.mark.parametrize("when", ["before", "after"])
def test_cancelled_run_leaves_segment_unchanged(loaded, sample, when):
    volume, label = sample
    volume_node, markups_node, segmentation_node, _ = loaded
    segment_id = sa.add_segment(segmentation_node, "existing")
    before_mask = box_mask(volume.shape, (3, 3, 3), (9, 9, 9))
    sa.apply_mask_to_segment((segmentation_node, segment_id, volume_node), before_mask, volume)
    progress = Progress()
    inner = fake_segment(label)

    def segment(*args, **kwargs):
        if when == "before":
            progress.cancel()  # the loop notices at its next step
            return inner(*args, **kwargs)
        result = inner(*args, **kwargs)
        progress.cancel()  # cancel pressed after the last slice: still nothing written
        return result

    for target_id in (segment_id, None):
        with pytest.raises(Cancelled):
            sa.run_spd_on_nodes(volume_node, markups_node, segmentation_node, target_id, progress=progress,
                                segment_fn=segment)
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, volume), before_mask)
    assert segmentation_node.GetSegmentation().GetNumberOfSegments() == 1


def test_run_with_editor_node_respects_its_settings(app, loaded, sample):
    volume, label = sample
    volume_node, markups_node, segmentation_node, _ = loaded
    locked = sa.add_segment(segmentation_node, "locked")
    locked_mask = box_mask(volume.shape, (0, 0, 0), (volume.shape[0], volume.shape[1] // 2, volume.shape[2]))
    sa.apply_mask_to_segment((segmentation_node, locked, volume_node), locked_mask, volume)
    app.editor_node.SetOverwriteMode(app.editor_node.OverwriteNone)
    app.editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    sa.run_spd_on_nodes(volume_node, markups_node, segmentation_node, segment_fn=fake_segment(label),
                        editor_node=app.editor_node)
    new_id = segmentation_node.GetSegmentation().GetNthSegmentID(1)
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, new_id, volume), label & (1 - locked_mask))
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, locked, volume), locked_mask)
    assert sa.undo(app.editor_node)  # one step: the new segment goes with its contents
    assert segmentation_node.GetSegmentation().GetSegment(new_id) is None
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, locked, volume), locked_mask)


def test_saliency_and_audit_nodes(app, loaded, sample):
    volume, label = sample
    volume_node, markups_node, segmentation_node, _ = loaded
    result = sa.run_spd_on_nodes(volume_node, markups_node, segmentation_node, segment_fn=fake_segment(label))
    node = sa.saliency_to_volume_node(result, volume, app.scene)
    np.testing.assert_allclose(sa.volume_from_node(node).array, label * 0.8, atol=1e-6)
    np.testing.assert_allclose(sa.volume_from_node(node).ijk_to_lps, volume.ijk_to_lps, atol=1e-6)
    nodes = sa.audit_to_markups_nodes(result, volume, app.scene)
    assert set(nodes) == {"kept", "rejected", "borrowed", "correction"}
    assert [nodes[s].GetNumberOfControlPoints() for s in ("kept", "rejected", "borrowed", "correction")] == [1, 1, 1, 0]
    kept = sa.points_from_markups(nodes["kept"])
    np.testing.assert_allclose(kept.lps[0], (volume.ijk_to_lps @ [5.0, 6.0, 7.0, 1.0])[:3], atol=1e-6)
    assert nodes["rejected"].GetDisplayNode().GetSelectedColor() == pytest.approx(sa.AUDIT_COLOURS["rejected"])
    again = sa.audit_to_markups_nodes(result.audit[:1], volume, app.scene, nodes=nodes, axis=result.axis)  # refill
    assert again["kept"] is nodes["kept"] and again["rejected"].GetNumberOfControlPoints() == 0
    with pytest.raises(InputError, match="saliency"):
        sa.saliency_to_volume_node(None, volume, app.scene)


def test_audit_entries_in_slice_coordinates(app, sample):
    """The pipeline's AuditEntry holds (row, col) on a slice; the adapter places it with the run's axis."""
    from SPDSegmentLib.core.distill import AuditEntry

    volume, _ = sample
    entries = [AuditEntry(rc=np.array([6.0, 5.0]), slice=7, status="kept", source_slice=7, score=0.9),
               AuditEntry(rc=np.array([12.0, 10.0]), slice=9, status="borrowed", source_slice=8, score=0.7),
               AuditEntry(rc=np.array([3.0, 4.0]), slice=7, status="correction", source_slice=7, score=0.9, label=0)]
    nodes = sa.audit_to_markups_nodes(entries, volume, app.scene, axis=0)
    assert nodes["correction"].GetNthControlPointDescription(0) == "background"  # a kind of its own, in blue
    assert nodes["correction"].GetDisplayNode().GetSelectedColor() == pytest.approx(sa.AUDIT_COLOURS["correction"])
    kept = sa.points_from_markups(nodes["kept"])
    np.testing.assert_allclose(kept.lps[0], (volume.ijk_to_lps @ [5.0, 6.0, 7.0, 1.0])[:3], atol=1e-6)
    assert nodes["borrowed"].GetNthControlPointDescription(0) == "from slice 8"
    on_j = sa.audit_to_markups_nodes(entries[:1], volume, app.scene, axis=1)  # rc = (k, i) on a j slice
    np.testing.assert_allclose(sa.points_from_markups(on_j["kept"]).lps[0],
                               (volume.ijk_to_lps @ [5.0, 7.0, 6.0, 1.0])[:3], atol=1e-6)
    with pytest.raises(InputError, match="axis"):
        sa.audit_to_markups_nodes(entries, volume, app.scene)


def test_real_pipeline_with_tiny_model(loaded, sample):
    pipeline = pytest.importorskip("SPDSegmentLib.core.pipeline")
    volume, _ = sample
    volume_node, markups_node, segmentation_node, _ = loaded
    result = sa.run_spd_on_nodes(volume_node, markups_node, segmentation_node, model="tiny_sam_test",
                                 options=pipeline.SegmentOptions(mode="raw"), device="cpu")
    assert result.mask.shape == volume.shape
    segment_id = segmentation_node.GetSegmentation().GetNthSegmentID(0)
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, volume),
                                  (np.asarray(result.mask) > 0).astype(np.uint8))


def test_gui_flow_reads_computes_then_writes(app, loaded, sample):
    """The GUI's path: read nodes on the main thread, compute elsewhere (the engine), write only after success."""
    from SPDSegmentLib.core.progress import Progress

    volume, label = sample
    volume_node, markups_node, segmentation_node, _ = loaded
    vol, voxel_prompts = sa.prepare_inputs(volume_node, markups_node, axis="axial")
    assert voxel_prompts.axis == 0
    segment = fake_segment(label)
    result = segment(vol, voxel_prompts, None, progress=Progress())
    segment_id = sa.write_result(result, vol, volume_node, segmentation_node, None, "bg")
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, volume_node), label)

    cancelled = Progress()
    cancelled.cancel()
    with pytest.raises(Cancelled):
        segment(vol, voxel_prompts, None, progress=cancelled)
    assert segmentation_node.GetSegmentation().GetNumberOfSegments() == 1


# ---------------------------------------------------------------- nothing lost: where a run writes, masking, undo

@dataclass
class RanResult:
    """A run's answer as the pipeline gives it: the mask, its slicing axis and the slices it decoded."""
    mask: np.ndarray
    axis: int
    slices: list


def segment_arrays(segmentation_node, volume):
    """{segment id: uint8 array} of every segment: the whole segmentation, to compare byte for byte."""
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    return {i: sa.segment_array(segmentation_node, i, volume).tobytes() for i in ids}


def test_modification_steps_limit_set_to_the_slices_that_ran():
    mask = box_mask((6, 5, 4), (1, 1, 1), (4, 4, 3))
    assert [m for _, m in sa.modification_steps(mask, "set")] == ["set"]
    (remove, remove_mode), (add, add_mode) = sa.modification_steps(mask, "set", (0, [2, 3]))
    assert (remove_mode, add_mode) == ("remove", "add")
    np.testing.assert_array_equal(add[2:4], mask[2:4])
    assert not add[[0, 1, 4, 5]].any() and not remove[[0, 1, 4, 5]].any()
    np.testing.assert_array_equal(remove[2:4], 1 - mask[2:4])
    with pytest.raises(InputError, match="mode"):
        sa.modification_steps(mask, "replace")
    assert sa.ran_on(RanResult(mask, 1, [0])) == (1, [0, 1, 2, 3])  # decoded slices and any slice it touches


def test_a_write_changes_the_segment_only_on_the_slices_that_ran(loaded, sample):
    volume, label = sample
    volume_node, _, segmentation_node, _ = loaded
    segment_id = sa.add_segment(segmentation_node, "hippo")
    before = box_mask(volume.shape, (0, 0, 0), volume.shape)  # content on every slice
    sa.apply_mask_to_segment((segmentation_node, segment_id, volume_node), before, volume)
    ks = np.unique(np.nonzero(label)[0])
    ran = [int(k) for k in ks[len(ks) // 3: len(ks) // 3 + 4]]  # "only slices": four slices
    mask = np.zeros_like(label)
    mask[ran] = label[ran]
    sa.write_result(RanResult(mask, 0, ran), volume, volume_node, segmentation_node, segment_id)
    after = sa.segment_array(segmentation_node, segment_id, volume)
    outside = [k for k in range(volume.shape[0]) if k not in ran]
    np.testing.assert_array_equal(after[outside], before[outside])  # kept where SPD did not run
    np.testing.assert_array_equal(after[ran], label[ran])
    assert sa.undo(segmentation_node)
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, volume), before)


@pytest.mark.parametrize("overwrite, other_kept", [(None, True), ("allow overlap", True), ("overwrite all", False)])
def test_a_module_write_keeps_an_overlapping_other_segment(loaded, sample, overwrite, other_kept):
    volume, label = sample
    volume_node, markups_node, segmentation_node, _ = loaded
    other = sa.add_segment(segmentation_node, "other")
    other_mask = box_mask(volume.shape, (0, 0, 0), (volume.shape[0], volume.shape[1] // 2, volume.shape[2]))
    sa.apply_mask_to_segment((segmentation_node, other, volume_node), other_mask, volume)
    assert (other_mask & label).any()  # they overlap
    sa.spd_editor_node(segmentation_node.GetScene()).SetOverwriteMode(0)  # what an earlier write left: a default
    sa.run_spd_on_nodes(volume_node, markups_node, segmentation_node, segment_fn=fake_segment(label),
                        overwrite=overwrite)
    new_id = segmentation_node.GetSegmentation().GetNthSegmentID(1)
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, new_id, volume), label)
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, other, volume),
                                  other_mask if other_kept else other_mask & (1 - label))


def test_the_editable_area_is_a_setting_of_the_console_api(loaded, sample):
    volume, label = sample
    volume_node, markups_node, segmentation_node, _ = loaded
    other = sa.add_segment(segmentation_node, "other")
    other_mask = box_mask(volume.shape, (0, 0, 0), (volume.shape[0], volume.shape[1] // 2, volume.shape[2]))
    sa.apply_mask_to_segment((segmentation_node, other, volume_node), other_mask, volume)
    sa.run_spd_on_nodes(volume_node, markups_node, segmentation_node, segment_fn=fake_segment(label),
                        editable_area="outside all segments")
    new_id = segmentation_node.GetSegmentation().GetNthSegmentID(1)
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, new_id, volume), label & (1 - other_mask))
    for bad, match in ((dict(overwrite="sometimes"), "other segments"), (dict(editable_area="inside"), "editable"),
                       (dict(editable_area="inside one segment"), "editable"),
                       (dict(overwrite="overwrite all", editor_node=sa.spd_editor_node(segmentation_node.GetScene())),
                        "not both")):
        segment = fake_segment(label)
        with pytest.raises(InputError, match=match):
            sa.run_spd_on_nodes(volume_node, markups_node, segmentation_node, segment_fn=segment, **bad)
        assert not segment.calls  # refused before any work
    with pytest.raises(InputError, match="mask_segment_id"):
        sa.configure_editor(sa.spd_editor_node(segmentation_node.GetScene()), editable_area="inside one segment")


def test_undo_restores_byte_for_byte_and_never_reverts_a_later_edit(app, loaded, sample):
    volume, label = sample
    volume_node, markups_node, segmentation_node, _ = loaded
    other = sa.add_segment(segmentation_node, "other")

    def edit_with_another_tool(mask):
        app.editor_node.SetAndObserveSegmentationNode(segmentation_node)
        app.editor_logic.ModifySegmentByLabelmap(segmentation_node, other, sa.modifier_labelmap(
            mask, volume, segmentation_node), app.editor_logic.ModificationModeAdd, False, False)

    edit_with_another_tool(box_mask(volume.shape, (2, 2, 2), (9, 9, 9)))
    before, stamp = segment_arrays(segmentation_node, volume), sa.content_stamp(segmentation_node)
    sa.run_spd_on_nodes(volume_node, markups_node, segmentation_node, segment_fn=fake_segment(label))
    assert sa.content_stamp(segmentation_node) != stamp
    assert sa.undo(segmentation_node)  # one step: the new segment goes with its contents
    assert segment_arrays(segmentation_node, volume) == before and sa.content_stamp(segmentation_node) == stamp
    assert not sa.undo(segmentation_node)  # SPD wrote nothing else

    sa.run_spd_on_nodes(volume_node, markups_node, segmentation_node, other, segment_fn=fake_segment(label))
    edit_with_another_tool(box_mask(volume.shape, (20, 20, 10), (25, 25, 15)))  # after SPD's write
    edited = segment_arrays(segmentation_node, volume)
    with pytest.raises(InputError, match="edited after SPD's last write"):
        sa.undo(segmentation_node)
    assert segment_arrays(segmentation_node, volume) == edited  # nothing reverted


def test_in_desktop_slicer_the_segment_editor_keeps_the_undo(app, loaded, sample, monkeypatch):
    """Slicer 5.10+ keeps undo states in the Segment Editor widget's own editor logic (vtkSegmentationHistory,
    private to it): a module write saves its state there, so the Segment Editor's Undo reverts it in order
    with the user's own edits, and the module's Undo is that same Undo."""
    from pythonqt_fakes import SegmentEditorWidget

    volume, label = sample
    volume_node, markups_node, segmentation_node, _ = loaded
    editor = SegmentEditorWidget(app.scene)
    monkeypatch.setattr(sa, "segment_editor_widget", lambda: editor)
    before = segment_arrays(segmentation_node, volume)
    sa.run_spd_on_nodes(volume_node, markups_node, segmentation_node, segment_fn=fake_segment(label))
    assert editor.segmentationNode() is segmentation_node  # the Segment Editor now shows it, undo included
    spd_id = segmentation_node.GetSegmentation().GetNthSegmentID(0)
    after_spd = segment_arrays(segmentation_node, volume)
    editor.node.SetSelectedSegmentID(spd_id)
    editor.paint(spd_id, sa.modifier_labelmap(box_mask(volume.shape, (1, 1, 1), (4, 4, 4)), volume,
                                              segmentation_node))  # the user paints afterwards
    assert segment_arrays(segmentation_node, volume) != after_spd
    editor.undo()  # the Segment Editor's Undo: the paint goes, SPD's write stays
    assert segment_arrays(segmentation_node, volume) == after_spd
    assert sa.undo(segmentation_node)  # the module's Undo is the same Undo: SPD's write goes
    assert segment_arrays(segmentation_node, volume) == before
    other = app.new_segmentation(volume_node, "other")
    assert not sa.undo(other)  # the Segment Editor's states are of another segmentation


def test_closing_the_scene_releases_the_editor_logics(app, loaded, sample):
    volume, label = sample
    volume_node, markups_node, segmentation_node, _ = loaded
    sa.run_spd_on_nodes(volume_node, markups_node, segmentation_node, segment_fn=fake_segment(label))
    scene = app.scene.GetAddressAsString("vtkObject")
    assert any(owner == scene for _, owner in sa._LOGICS_BY_ID.values())
    assert any(owner == scene for owner, _ in sa._STAMPS_AFTER_WRITE.values())
    app.scene.Clear(0)
    assert not any(owner == scene for _, owner in sa._LOGICS_BY_ID.values())
    assert not any(owner == scene for owner, _ in sa._STAMPS_AFTER_WRITE.values())
