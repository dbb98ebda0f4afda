"""The module widget and the segment editor effect on real MRML (slicer-core), with widgets that behave like
PythonQt (Testing/pythonqt_fakes.py) and the SPD engine as a real child process. They cannot show that the GUI
looks right; they do run every GUI code path (build, click, correct, work ahead, auto-update, preview, apply,
undo, cancel, batch, an engine that dies) so that a typo or a broken call fails here rather than in Slicer.
One test holds the GIL on the main thread the way PythonQt's event loop does."""
from __future__ import annotations

import ctypes
import importlib.util
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (MRML in Python) is not installed", allow_module_level=True)
pytest.importorskip("torch")

import pythonqt_fakes as fakes  # noqa: E402
from SPDSegmentLib.core import prompts  # noqa: E402
from SPDSegmentLib.core.models import registry  # noqa: E402
from SPDSegmentLib.core.volume import read, read_label, to_sitk  # noqa: E402
from SPDSegmentLib.research import speed  # noqa: E402
from SPDSegmentLib.slicer_side import adapter as sa  # noqa: E402
from SPDSegmentLib.slicer_side import gui as shared  # noqa: E402
from slicer_app import make_standalone_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AXIAL = np.eye(4)  # Red view: normal S
CORONAL = np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])  # Green view: normal A


@pytest.fixture()
def gui(monkeypatch, sample_paths, tmp_path):
    app = make_standalone_app()
    calls = fakes.install(monkeypatch, app.scene)
    volume = read(sample_paths["image"])
    label = read_label(sample_paths["label"], like=volume)
    ks = np.unique(np.nonzero(label)[0])[::3]
    ijk = [(*np.round(np.argwhere(label[k] > 0).mean(0)[::-1]), k) for k in ks]
    lps = (np.c_[np.array(ijk, float), np.ones(len(ijk))] @ volume.ijk_to_lps.T)[:, :3]
    points_path = prompts.write_markups(tmp_path / "clicks.mrk.json", lps, node_name="clicks")
    volume_node = app.load_volume(sample_paths["image"])
    nodes = types.SimpleNamespace(volume=volume_node, points=app.load_markups(points_path),
                                  segmentation=app.new_segmentation(volume_node))
    gui = types.SimpleNamespace(app=app, calls=calls, volume=volume, label=label, nodes=nodes, ijk=ijk, tmp=tmp_path,
                                points_path=points_path, image_path=sample_paths["image"], built=[])
    yield gui
    for built in gui.built:  # as Slicer does when it deletes them: nothing keeps observing the scene
        built.cleanup()


def module_widget(gui, name):
    widget = load("SPDSegment/SPDSegment.py", name).SPDSegmentWidget()
    widget.setup()
    gui.built.append(widget)
    return widget


def load(relative, name):
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait(poll, busy, timeout=120):
    start = time.time()
    while busy() and time.time() - start < timeout:
        poll()
        time.sleep(0.02)
    assert not busy(), "the engine did not answer"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_one_thread):
    yield


@pytest.fixture()
def engine(gui, monkeypatch):
    """This Slicer's SPD engine (a real child process, one torch thread), stopped after the test."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = shared.engine()
    yield client
    client.stop()
    shared._engine = None


def segment_bytes(gui, segment_id):
    return sa.segment_array(gui.nodes.segmentation, segment_id, gui.volume).tobytes()


# ---------------------------------------------------------------- the module

def test_module_widget_run_undo_batch(gui, engine, monkeypatch):
    editor = fakes.SegmentEditorWidget(gui.app.scene)  # desktop Slicer: the Segment Editor keeps the undo
    monkeypatch.setattr(sa, "segment_editor_widget", lambda: editor)
    widget = module_widget(gui, "SPDSegment_smoke")
    ui, state = widget.ui, widget._parameterNode
    assert ui.tauSlider.value == shared.spd_header(registry.BUNDLED_SPD_MODELS[registry.DEFAULT_MODEL])["tau"]
    widget.enter()  # opening the module starts the engine
    assert engine.alive
    assert widget.timer.interval == round(speed.POLL_SECONDS * 1000)  # as bench-speed polls
    ui.volumeSelector.setCurrentNode(gui.nodes.volume)
    ui.pointsSelector.setCurrentNode(gui.nodes.points)
    ui.segmentationSelector.setCurrentNode(gui.nodes.segmentation)
    ui.modelCombo.setCurrentIndex(ui.modelCombo.findData("tiny_sam_test"))
    ui.modeCombo.currentText = "raw"
    ui.overlaysCheck.checked = True
    assert not ui.tauSlider.enabled  # a backbone runs raw: no tau
    assert (state.volume, state.points, state.mode) == (gui.nodes.volume, gui.nodes.points, "raw")
    ui.runButton.click()
    assert not ui.runButton.enabled and ui.cancelButton.enabled
    wait(widget.poll, lambda: widget.task is not None)
    segmentation = gui.nodes.segmentation.GetSegmentation()
    assert ui.statusLabel.text.startswith("raw:"), ui.statusLabel.text
    assert segmentation.GetNumberOfSegments() == 1 and segmentation.GetNthSegment(0).GetName() == "clicks"
    assert ui.segmentCombo.count() == 2 and ui.runButton.enabled  # the new segment is offered
    assert editor.segmentationNode() is gui.nodes.segmentation
    ui.undoButton.click()  # the Segment Editor's Undo: the run was one step
    assert ui.statusLabel.text == "Undone." and segmentation.GetNumberOfSegments() == 0
    ui.undoButton.click()
    assert ui.statusLabel.text == "Nothing to undo."
    ui.runButton.click()
    ui.cancelButton.click()  # cancelled: nothing is written
    assert ui.statusLabel.text == "Cancelling..."
    wait(widget.poll, lambda: widget.task is not None)
    assert ui.statusLabel.text.startswith("Cancelled") and segmentation.GetNumberOfSegments() == 0
    ui.downloadButton.click()  # the tiny test model is on this machine: "downloading" it loads it in the engine
    wait(widget.poll, lambda: widget.task is not None)
    assert ui.statusLabel.text.startswith("Model ready: tiny_sam_test"), ui.statusLabel.text

    ui.pointsSelector.setCurrentNode(None)  # errors are shown, not raised
    widget.onRun()
    assert "point list" in ui.statusLabel.text and widget.task is None

    cases = gui.tmp / "batch"
    cases.mkdir()
    (cases / "h.nii.gz").write_bytes(gui.image_path.read_bytes())
    (cases / "h.mrk.json").write_bytes(gui.points_path.read_bytes())
    ui.batchInputPath.currentPath, ui.batchOutputPath.currentPath = str(cases), str(cases / "out")
    ui.batchButton.click()
    wait(widget.poll, lambda: widget.task is not None)
    assert ui.statusLabel.text == "Batch: h done" and (cases / "out" / "h_spd.seg.nrrd").is_file()

    ui.checkDeviceButton.click()  # answered by the engine: Slicer's process imports no torch for it
    wait(widget.poll, lambda: widget.task is not None)
    assert ui.deviceLabel.text.startswith(("CPU", "CUDA")), ui.deviceLabel.text


def test_module_run_writes_only_where_it_ran_and_leaves_other_segments(gui, engine):
    """A run into an existing segment, with "only slices" of its clicks: the segment keeps its content on the other
    slices, and an overlapping segment keeps its voxels (the module's default: allow overlap)."""
    widget = module_widget(gui, "SPDSegment_where")
    ui, segmentation_node = widget.ui, gui.nodes.segmentation
    target = sa.add_segment(segmentation_node, "target")
    other = sa.add_segment(segmentation_node, "other")
    everything = np.ones(gui.volume.shape, np.uint8)
    for segment_id in (target, other):
        sa.apply_mask_to_segment((segmentation_node, segment_id, gui.nodes.volume), everything, gui.volume)
    ui.volumeSelector.setCurrentNode(gui.nodes.volume)
    ui.pointsSelector.setCurrentNode(gui.nodes.points)
    ui.segmentationSelector.setCurrentNode(segmentation_node)
    ui.segmentCombo.setCurrentIndex(ui.segmentCombo.findData(target))
    ui.modelCombo.setCurrentIndex(ui.modelCombo.findData("tiny_sam_test"))
    ui.modeCombo.currentText = "raw"
    assert widget._parameterNode.segmentId == target and widget._parameterNode.overwrite == "allow overlap"
    ui.runButton.click()
    wait(widget.poll, lambda: widget.task is not None)
    _, clicks = sa.prepare_inputs(gui.nodes.volume, gui.nodes.points, model={})  # as the run read them
    clicked = sorted({int(t) for t in clicks.slice_index()})  # raw mode decodes the clicked slices
    after = sa.segment_array(segmentation_node, target, gui.volume)
    elsewhere = [t for t in range(gui.volume.shape[clicks.axis]) if t not in clicked]
    assert np.take(after, elsewhere, axis=clicks.axis).all()  # kept where the run did not run
    assert not np.take(after, clicked, axis=clicks.axis).all()  # replaced where it did
    assert sa.segment_array(segmentation_node, other, gui.volume).all()


def test_module_refuses_an_old_slicer_before_running(gui, engine, monkeypatch):
    module = load("SPDSegment/SPDSegment.py", "SPDSegment_old")
    monkeypatch.setattr(slicer.app, "minorVersion", 8)
    logic = module.SPDSegmentLogic()
    with pytest.raises(Exception, match=r"needs Slicer 5\.10 or later; this is Slicer 5\.8"):
        logic.startRun(gui.nodes.volume, gui.nodes.points, "tiny_sam_test")
    assert not engine.alive  # nothing was started


# ---------------------------------------------------------------- the effect

class SliceView:
    """A slice widget as the effect sees it: its slice node (real MRML) and the point an event lands on."""

    def __init__(self, ras, slice_to_ras):
        self.ras, self.node = list(ras), slicer.vtkMRMLSliceNode()
        matrix = self.node.GetSliceToRAS()
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, slice_to_ras[r, c])

    def className(self):
        return "qMRMLSliceWidget"

    def mrmlSliceNode(self):
        return self.node

    def xy_to_ras(self, xy):
        return self.ras


class Interactor:
    def __init__(self, control=False, shift=False, key=""):
        self.control, self.shift, self.key = control, shift, key

    def GetEventPosition(self):
        return (10, 10)

    def GetShiftKey(self):
        return self.shift

    def GetControlKey(self):
        return self.control

    def GetAltKey(self):
        return False

    def GetKeySym(self):
        return self.key


def make_effect(gui, model="tiny_sam_test", mode="raw", auto_update=False):
    """The SPD effect as the Segment Editor builds it, on the scene's editor node with a segment "hippo"
    selected; ``model``, ``mode`` and Auto-update chosen through its widgets, as a user would."""
    app, segmentation_node = gui.app, gui.nodes.segmentation
    segment_id = sa.add_segment(segmentation_node, "hippo")
    app.editor_node.SetAndObserveSegmentationNode(segmentation_node)
    app.editor_node.SetAndObserveSourceVolumeNode(gui.nodes.volume)
    app.editor_node.SetSelectedSegmentID(segment_id)
    module = load("SegmentEditorSPD/SegmentEditorSPDLib/SegmentEditorEffect.py", "SegmentEditorEffect_smoke")
    effect, scripted = fakes.build_effect(module.SegmentEditorEffect, app.editor_node, app.editor_logic)
    effect.modelCombo.setCurrentIndex(effect.modelCombo.findData(model))
    effect.modeCombo.currentText = mode
    effect.autoUpdateCheck.checked = auto_update
    gui.built.append(effect)
    return effect, scripted, segment_id, module


def click(effect, gui, ijk, view=CORONAL, **modifiers):
    """A left press in a slice view at voxel ``ijk``; returns whether the effect took it."""
    import vtk

    ras = (gui.volume.ijk_to_ras @ [*ijk, 1.0])[:3]
    return effect.processInteractionEvents(Interactor(**modifiers), vtk.vtkCommand.LeftButtonPressEvent,
                                           SliceView(ras, view))


def key(effect, name):
    import vtk

    return effect.processInteractionEvents(Interactor(key=name), vtk.vtkCommand.KeyPressEvent,
                                           SliceView([0, 0, 0], CORONAL))


def previewed_effect(gui):
    """The effect selected, every sample click placed in the Green view, and its Preview shown."""
    effect, scripted, segment_id, module = make_effect(gui)
    effect.activate()
    wait(effect.poll, lambda: effect.preload is not None)
    for ijk in gui.ijk:
        assert click(effect, gui, ijk)
    effect.previewButton.click()
    wait(effect.poll, lambda: effect.run is not None)
    assert effect.preview is not None, effect.statusLabel.text
    return effect, scripted, segment_id


def descriptions(node):
    return [node.GetNthControlPointDescription(i) for i in range(node.GetNumberOfControlPoints())]


def test_effect_clicks_keys_preview_apply_undo_cancel(gui, engine):
    import vtk

    app, segmentation_node = gui.app, gui.nodes.segmentation
    effect, scripted, segment_id, module = make_effect(gui)
    assert not scripted.parameterDefined("ModelFile")  # never stored empty
    assert scripted.parameter("Model") == "tiny_sam_test" and scripted.parameter("Mode") == "raw"
    assert effect.timer.interval == round(speed.POLL_SECONDS * 1000)  # as bench-speed polls

    effect.activate()  # selecting the effect starts the engine and loads the model, downloading nothing
    assert engine.alive and effect.preload is not None
    wait(effect.poll, lambda: effect.preload is not None)
    for ijk in gui.ijk:
        assert click(effect, gui, ijk)
    points = effect.promptsNode()
    assert points.GetNumberOfControlPoints() == len(gui.ijk) and not points.GetLocked()
    assert effect.statusLabel.text.startswith(f"{len(gui.ijk)} clicks; coronal slices (array axis 1)")  # the axis
    assert effect.axisInfo == (1, gui.volume.shape[1]) and "J" in effect.rangeAxisLabel.text  # Data Probe's J
    assert effect.ahead is not None and effect.ahead.wait(60)
    assert effect.ahead.result()["ran"]  # the clicked slices were encoded and run while "the user" clicked

    # a click from a view along another axis is refused, never read along the clicks' axis
    assert click(effect, gui, gui.ijk[0], view=AXIAL)
    assert points.GetNumberOfControlPoints() == len(gui.ijk) and "Not placed" in effect.statusLabel.text
    # a press on an existing click goes to the markups widget (which drags it), as do right-clicks and Delete
    points.GetDisplayNode().SetActiveControlPoint(2)  # what the markups widget marks when the mouse is over it
    assert not click(effect, gui, gui.ijk[2])
    assert not effect.processInteractionEvents(Interactor(), vtk.vtkCommand.RightButtonPressEvent,
                                               SliceView([0, 0, 0], CORONAL))
    assert not key(effect, "Delete")
    points.GetDisplayNode().SetActiveControlPoint(-1)
    assert points.GetNumberOfControlPoints() == len(gui.ijk)
    assert not click(effect, gui, gui.ijk[2], shift=True)  # Shift: Slicer's crosshair

    # background clicks: Ctrl-click once, or N for every click until N again; U and the button undo the last
    assert click(effect, gui, (2, gui.ijk[0][1], 2), control=True)
    assert key(effect, "n") and effect.backgroundCheck.checked
    assert click(effect, gui, (3, gui.ijk[1][1], 3))
    assert key(effect, "n") and not effect.backgroundCheck.checked
    assert descriptions(points)[-2:] == ["background", "background"]
    assert [points.GetNthControlPointSelected(i) for i in (0, len(gui.ijk))] == [True, False]  # colour by kind
    assert key(effect, "u") and points.GetNumberOfControlPoints() == len(gui.ijk) + 1
    effect.undoClickButton.click()
    assert points.GetNumberOfControlPoints() == len(gui.ijk)

    effect.previewButton.click()
    assert effect.statusLabel.text.startswith("Segmenting")
    wait(effect.poll, lambda: effect.run is not None)
    assert effect.preview is not None, effect.statusLabel.text
    assert effect.statusLabel.text.startswith("Preview: raw:")
    assert effect.preview["result"].axis == 1
    assert effect.preview["result"].axis_note.startswith("coronal slices (array axis 1), the slice view")
    assert effect.preview["result"].axis_note.rstrip(".") in effect.statusLabel.text  # shown to the user
    preview_mask = effect.preview["result"].mask
    assert sa.segment_array(segmentation_node, segment_id, gui.volume).sum() == 0  # preview writes nothing
    assert points.GetAttribute(module.PREVIEWED_ATTRIBUTE) == "1"
    assert click(effect, gui, gui.ijk[1])  # a click after the first Preview is a correction
    assert descriptions(points)[-1] == "correction" and points.GetNthControlPointSelected(len(gui.ijk))
    effect.onUndoClick()

    app.editor_node.SetSelectedSegmentID(None)
    effect.applyButton.click()  # no segment selected: says so, writes nothing
    assert "Select the segment" in effect.statusLabel.text and effect.preview is not None
    app.editor_node.SetSelectedSegmentID(segment_id)
    scripted.confirm = 0
    effect.applyButton.click()  # the user declined to show the hidden segment
    assert effect.preview is not None and sa.segment_array(segmentation_node, segment_id, gui.volume).sum() == 0
    scripted.confirm = 1
    stamp = sa.content_stamp(segmentation_node)
    effect.applyButton.click()
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, gui.volume), preview_mask)
    assert effect.preview is None and app.scene.GetFirstNodeByName("SPD preview") is None
    assert effect.statusLabel.text.startswith("Applied on")
    app.editor_logic.Undo()  # the Segment Editor's Undo: one step
    assert sa.content_stamp(segmentation_node) == stamp

    effect.previewButton.click()
    effect.cancelButton.click()  # cancel while running: the Preview ends now, nothing is shown or written
    assert effect.run is None and effect.preview is None and effect.statusLabel.text.startswith("Cancelled")
    for _ in range(10):  # an answer that still arrives is dropped
        effect.poll()
        time.sleep(0.02)
    assert effect.preview is None and app.scene.GetFirstNodeByName("SPD preview") is None

    effect.previewButton.click()
    effect.deactivate()  # leaving the effect while a Preview runs
    for _ in range(10):
        effect.poll()
        time.sleep(0.02)
    assert effect.preview is None and app.scene.GetFirstNodeByName("SPD preview") is None
    assert sa.segment_array(segmentation_node, segment_id, gui.volume).sum() == 0
    assert scripted.critical == [], f"parameters read without a check: {scripted.critical}"


def test_effect_auto_update_follows_clicks_moves_and_deletions(gui, engine):
    effect, scripted, _, module = make_effect(gui, auto_update=True)
    effect.activate()
    wait(effect.poll, lambda: effect.preload is not None)
    for ijk in gui.ijk[:3]:
        assert click(effect, gui, ijk)
    assert effect.run is not None and effect.ahead is None  # each click updates the preview itself
    wait(effect.poll, lambda: effect.run is not None)
    first = effect.preview["result"]
    assert len(first.slices) == 3
    for ijk in gui.ijk[3:6]:
        click(effect, gui, ijk)  # a click while an update runs: the newer clicks win
    assert effect.preview is not None and effect.statusLabel.text.startswith(("6 clicks", "Updating"))
    effect.poll()
    assert effect.statusLabel.text.startswith("Updating the preview")  # what shows while the engine catches up
    wait(effect.poll, lambda: effect.run is not None)
    assert len(effect.preview["result"].slices) == 6

    points = effect.promptsNode()
    i, j, k = gui.ijk[5]
    points.SetNthControlPointPositionWorld(5, *(gui.volume.ijk_to_ras @ [i, j + 1, k, 1.0])[:3])  # a drag to the
    points.InvokeEvent(points.PointEndInteractionEvent)  # next coronal slice, and the mouse let go
    assert effect.run is not None
    wait(effect.poll, lambda: effect.run is not None)
    assert j + 1 in effect.preview["result"].slices and j not in effect.preview["result"].slices
    points.RemoveNthControlPoint(0)  # hover + Delete, or the right-click menu
    assert effect.run is not None
    wait(effect.poll, lambda: effect.run is not None)
    assert len(effect.preview["result"].slices) == 5
    effect.autoUpdateCheck.checked = False  # off: clicks only send work ahead
    click(effect, gui, gui.ijk[6])
    assert effect.run is None and effect.ahead is not None
    effect.clearButton.click()  # every click gone: a new list may start in a view of another direction
    assert points.GetNumberOfControlPoints() == 0 and effect.statusLabel.text == "Clicks cleared."
    assert points.GetAttribute(module.VIEW_NORMAL_ATTRIBUTE) is None and \
        points.GetAttribute(module.PREVIEWED_ATTRIBUTE) is None
    assert click(effect, gui, gui.ijk[0], view=AXIAL) and "axial slices (array axis 0)" in effect.statusLabel.text
    assert descriptions(points) == [""]  # a new start: a click, not a correction
    effect.deactivate()


def test_effect_apply_with_only_slices_keeps_the_segment_elsewhere(gui, engine):
    """"only slices": Apply changes the segment on those slices and keeps it on every other one; an overlapping
    segment keeps its voxels when the Segment Editor allows overlap; Undo restores everything byte for byte."""
    app, segmentation_node = gui.app, gui.nodes.segmentation
    effect, scripted, segment_id, _ = make_effect(gui)
    other = sa.add_segment(segmentation_node, "other")
    everything = np.ones(gui.volume.shape, np.uint8)
    for target in (segment_id, other):
        sa.apply_mask_to_segment((segmentation_node, target, gui.nodes.volume), everything, gui.volume)
    app.editor_node.SetOverwriteMode(app.editor_node.OverwriteNone)  # the Segment Editor's "allow overlap"
    app.editor_node.SetSelectedSegmentID(segment_id)
    effect.activate()
    wait(effect.poll, lambda: effect.preload is not None)
    for ijk in gui.ijk:
        click(effect, gui, ijk)
    clicked = sorted({int(j) for _, j, _ in gui.ijk})
    effect.limitCheck.checked = True  # starts at the clicks' span
    assert (scripted.integerParameter("FirstSlice"), scripted.integerParameter("LastSlice")) == \
        (clicked[0], clicked[-1])
    effect.lastSpin.value = clicked[len(clicked) // 2]  # fewer slices
    kept = [t for t in clicked if t <= clicked[len(clicked) // 2]]
    effect.previewButton.click()
    wait(effect.poll, lambda: effect.run is not None)
    assert effect.preview["result"].slices == kept, effect.statusLabel.text
    preview_mask = np.asarray(effect.preview["result"].mask).copy()
    assert preview_mask[:, kept].any() and not preview_mask[:, kept].all()
    before = {s: sa.segment_array(segmentation_node, s, gui.volume) for s in (segment_id, other)}
    stamp = sa.content_stamp(segmentation_node)
    effect.applyButton.click()
    after = sa.segment_array(segmentation_node, segment_id, gui.volume)
    outside = [t for t in range(gui.volume.shape[1]) if t not in kept]
    np.testing.assert_array_equal(after[:, outside], before[segment_id][:, outside])  # untouched where SPD did not run
    np.testing.assert_array_equal(after[:, kept], preview_mask[:, kept])
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, other, gui.volume), before[other])
    app.editor_logic.Undo()  # the Segment Editor's Undo: byte for byte
    assert sa.content_stamp(segmentation_node) == stamp
    effect.deactivate()


def test_effect_preview_is_kept_across_effects_and_shown_as_asked(gui, engine):
    app = gui.app
    effect, scripted, segment_id = previewed_effect(gui)
    preview_node = effect.preview["nodes"]["preview"]
    assert preview_node.GetDisplayNode().GetOpacity() == pytest.approx(0.6)
    effect.opacitySlider.value = 0.3
    assert preview_node.GetDisplayNode().GetOpacity() == pytest.approx(0.3)
    effect.show3DButton.click()
    assert preview_node.GetSegmentation().ContainsRepresentation("Closed surface")
    effect.show3DButton.click()
    assert not preview_node.GetSegmentation().ContainsRepresentation("Closed surface")
    effect.auditCheck.checked = False  # the next preview has no audit lists
    effect.deactivate()  # another effect, as with Grow from seeds: the preview stays
    assert effect.preview is not None and app.scene.GetFirstNodeByName("SPD preview") is preview_node
    effect.activate()
    assert effect.preview is not None and effect.applyButton.enabled
    effect.applyButton.click()
    assert sa.segment_array(gui.nodes.segmentation, segment_id, gui.volume).any()

    effect.previewButton.click()
    wait(effect.poll, lambda: effect.run is not None)
    assert not any(k in effect.preview["nodes"] for k in ("kept", "rejected", "borrowed"))
    effect.deactivate()
    other_volume = app.load_volume(gui.image_path, "another")
    app.editor_node.SetAndObserveSourceVolumeNode(other_volume)
    effect.activate()  # the kept preview was of another source volume: gone
    assert effect.preview is None and app.scene.GetFirstNodeByName("SPD preview") is None
    effect.deactivate()


def test_closing_the_scene_drops_what_the_gui_holds(gui, engine):
    app = gui.app
    effect, scripted, _ = previewed_effect(gui)
    assert effect._volumeCopy[1] is not None
    widget = module_widget(gui, "SPDSegment_close")
    widget.ui.volumeSelector.setCurrentNode(gui.nodes.volume)
    widget.ui.pointsSelector.setCurrentNode(gui.nodes.points)
    widget.ui.segmentationSelector.setCurrentNode(gui.nodes.segmentation)
    widget.ui.runButton.click()
    assert widget.task is not None
    app.scene.Clear(0)
    assert effect.preview is None and effect._volumeCopy == (None, None) and effect.run is None
    assert widget.task is None and widget._parameterNode is None
    scene = app.scene.GetAddressAsString("vtkObject")
    assert not any(owner == scene for _, owner in sa._LOGICS_BY_ID.values())
    effect.deactivate()


def test_a_background_click_changes_the_mask(gui, engine, monkeypatch):
    """The bundled model on the sample case, two clicks on neighbouring coronal slices (n = 0, PyTorch: no model
    conversion, ~10 s): a Ctrl-click on a voxel of the result removes it, and the preview follows."""
    monkeypatch.setenv("SPDSEGMENT_RUNTIME", "torch")  # the engine inherits it
    effect, scripted, segment_id, _ = make_effect(gui, model=registry.DEFAULT_MODEL, mode="spd", auto_update=True)
    effect.neighboursSpin.value = 0
    effect.activate()
    wait(effect.poll, lambda: effect.preload is not None, timeout=300)
    label = gui.label > 0
    middle = int(np.median(np.nonzero(label)[1]))
    for j in (middle, middle + 1):
        k, i = np.argwhere(label[:, j, :]).mean(0)
        assert click(effect, gui, (round(i), j, round(k)))
    wait(effect.poll, lambda: effect.run is not None, timeout=300)
    before = np.asarray(effect.preview["result"].mask).copy()
    assert before.any(), effect.statusLabel.text
    wrong = np.argwhere(before.astype(bool) & ~label)  # a false positive, else a voxel of the result
    k, j, i = (wrong if len(wrong) else np.argwhere(before))[0]
    assert click(effect, gui, (i, j, k), control=True)
    assert effect.promptsNode().GetNthControlPointDescription(2) == "background"
    wait(effect.poll, lambda: effect.run is not None, timeout=300)
    after = np.asarray(effect.preview["result"].mask)
    assert after[k, j, i] == 0 and after.sum() < before.sum(), effect.statusLabel.text
    effect.deactivate()


def test_selecting_the_effect_downloads_nothing(gui, engine, monkeypatch):
    effect, scripted, _, _ = make_effect(gui, model="sam_vit_b")
    asked = []
    real_load = engine.load_model
    monkeypatch.setattr(engine, "load_model", lambda *a, **k: asked.append(k.get("allow_download")) or
                        real_load(*a, **k))
    effect.activate()
    wait(effect.poll, lambda: effect.preload is not None, timeout=180)
    assert asked == [False]
    if not registry.is_available("sam_vit_b"):
        assert "not on this machine" in effect.statusLabel.text and "Download" in effect.statusLabel.text
    effect.deactivate()


# ---------------------------------------------------------------- the engine keeps Slicer responsive

def long_case(gui, offset):
    """A volume node three times as long as the sample (plus ``offset``, so each is new to the engine) and a
    point list with a click on every one of its 153 coronal slices: ~1 s of work with the tiny model."""
    import SimpleITK as sitk

    array = np.ascontiguousarray(np.tile(gui.volume.array, (1, 3, 1)) + offset)
    path = gui.tmp / f"long{offset}.nii.gz"
    sitk.WriteImage(to_sitk(array, gui.volume.ijk_to_lps), str(path))
    node = gui.app.load_volume(path, f"long{offset}")
    ijk = np.array([[17.3, j, 17.3] for j in range(array.shape[1])])  # off-grid in i and k: coronal slices
    lps = (np.c_[ijk, np.ones(len(ijk))] @ gui.volume.ijk_to_lps.T)[:, :3]
    points = gui.app.load_markups(prompts.write_markups(gui.tmp / f"long{offset}.mrk.json", lps,
                                                        node_name=f"long{offset}"))
    return node, points


def preview_seconds(effect, gui, volume_node, points_node, starve: bool) -> float:
    """Preview on ``volume_node`` while the main thread idles like Slicer's, the effect polling every 100 ms.
    ``starve``: between polls it holds the GIL as PythonQt's event loop does (a usleep that keeps it),
    with a 2 ms sleep every 100 ms, as the issue measured it."""
    usleep = ctypes.PyDLL(None).usleep
    gui.app.editor_node.SetAndObserveSourceVolumeNode(volume_node)
    gui.app.editor_node.SetNodeReferenceID("SPD.Prompts", points_node.GetID())
    start = time.perf_counter()
    effect.onPreview()
    while effect.run is not None:
        if starve:
            usleep(100000)  # PyDLL: the GIL stays held
            time.sleep(0.002)
        else:
            time.sleep(0.1)
        effect.poll()
        assert time.perf_counter() - start < 300, "the Preview did not finish"
    assert effect.preview is not None, effect.statusLabel.text
    seconds = time.perf_counter() - start
    effect.clearPreview()
    return seconds


@pytest.mark.skipif(sys.platform == "win32", reason="emulates the GIL-holding event loop with libc usleep")
def test_preview_is_not_slowed_by_a_main_thread_that_holds_the_gil(gui, engine):
    effect, scripted, _, _ = make_effect(gui)
    effect.activate()
    wait(effect.poll, lambda: effect.preload is not None)

    # the emulation is real: a Python thread in Slicer's process would starve
    counts = {}
    for starve in (False, True):
        stop, count = threading.Event(), [0]

        def spin():
            while not stop.is_set():
                count[0] += 1

        worker = threading.Thread(target=spin)
        worker.start()
        end = time.perf_counter() + 0.6
        while time.perf_counter() < end:
            if starve:
                ctypes.PyDLL(None).usleep(100000)
                time.sleep(0.002)
            else:
                time.sleep(0.1)
        stop.set()
        worker.join()
        counts[starve] = count[0]
    assert counts[True] < 0.5 * counts[False], counts

    # the Preview runs in the engine process: the same time either way (rounds interleaved, best of three).
    # The bound is loose on purpose: a job that shares the CPU can double one round (seen in CI on a busy
    # machine), while a worker thread in this process ran 5.9x slower under the same starvation (issue 11).
    times = {False: [], True: []}
    for round_ in range(3):
        for starve in (False, True):
            volume_node, points_node = long_case(gui, 1 + 2 * round_ + starve)
            times[starve].append(preview_seconds(effect, gui, volume_node, points_node, starve))
    unstarved, starved = min(times[False]), min(times[True])
    print(f"Preview on 153 slices: unstarved {times[False]} s, main thread holding the GIL {times[True]} s")
    assert starved <= 2.5 * unstarved, times
    effect.deactivate()


def test_a_killed_engine_leaves_the_segment_as_it_was(gui, engine):
    effect, scripted, segment_id, _ = make_effect(gui)
    effect.activate()
    wait(effect.poll, lambda: effect.preload is not None)
    sa.apply_mask_to_segment(gui.app.editor_node, (gui.label > 0).astype(np.uint8), gui.volume)
    before = segment_bytes(gui, segment_id)
    assert np.frombuffer(before, np.uint8).any()  # a segment with content, which must stay as it is
    volume_node, points_node = long_case(gui, 0)
    gui.app.editor_node.SetAndObserveSourceVolumeNode(volume_node)
    gui.app.editor_node.SetNodeReferenceID("SPD.Prompts", points_node.GetID())
    effect.onPreview()
    wait(effect.poll, lambda: effect.run is not None and effect.run.state()[0] not in ("encode", "decode"))
    first_pid = engine.pid
    engine.kill()  # out of memory, a native crash
    wait(effect.poll, lambda: effect.run is not None)
    message = effect.statusLabel.text
    assert "stopped unexpectedly" in message and str(engine.log_path) in message and "\n" not in message
    assert effect.preview is None and segment_bytes(gui, segment_id) == before
    effect.onPreview()  # the next request starts a fresh engine
    wait(effect.poll, lambda: effect.run is not None, timeout=240)
    assert effect.preview is not None, effect.statusLabel.text
    assert engine.pid != first_pid
    effect.deactivate()
