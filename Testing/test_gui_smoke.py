"""Smoke tests of the module widget and the segment editor effect on real MRML (slicer-core) with Qt,
CTK and the desktop-only Slicer pieces stubbed out. They cannot show that the GUI looks right; they do
run every GUI code path (build, click, preview in the background, apply, undo, cancel, batch) so that
a typo or a broken call into the core fails here rather than in Slicer."""
from __future__ import annotations

import importlib.util
import sys
import time
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (MRML in Python) is not installed", allow_module_level=True)
pytest.importorskip("torch")

from SPDSegmentLib.core import prompts  # noqa: E402
from SPDSegmentLib.core.volume import read, read_label  # noqa: E402
from SPDSegmentLib.slicer_side import adapter as sa  # noqa: E402
from slicer_app import make_standalone_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class FakeQtModule(types.ModuleType):
    """Every class is a factory of fresh MagicMocks (so two spin boxes are two objects)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        factory = mock.MagicMock(name=name, side_effect=lambda *a, **k: mock.MagicMock())
        setattr(self, name, factory)
        return factory


class StubBase:
    def __init__(self, *args, **kwargs):
        self.parent = mock.MagicMock()
        self.layout = mock.MagicMock()

    def setup(self):
        pass


@pytest.fixture()
def gui(monkeypatch, sample_paths, tmp_path):
    app = make_standalone_app()
    qt, ctk = FakeQtModule("qt"), FakeQtModule("ctk")
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "ctk", ctk)
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (StubBase,), {}))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    effects = types.ModuleType("SegmentEditorEffects")
    effects.AbstractScriptedSegmentEditorEffect = type("Abstract", (), {
        "__init__": lambda self, scriptedEffect: setattr(self, "scriptedEffect", scriptedEffect),
        "xyToRas": lambda self, xy, view: view.ras})
    monkeypatch.setitem(sys.modules, "SegmentEditorEffects", effects)
    monkeypatch.setattr(slicer, "mrmlScene", app.scene, raising=False)
    monkeypatch.setattr(slicer, "app", mock.MagicMock(), raising=False)
    monkeypatch.setattr(slicer, "qMRMLNodeComboBox", qt.qMRMLNodeComboBox, raising=False)
    monkeypatch.setattr(slicer, "qSlicerSegmentEditorAbstractEffect",
                        types.SimpleNamespace(ModificationModeSet=app.editor_logic.ModificationModeSet), raising=False)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", mock.MagicMock(), raising=False)

    volume = read(sample_paths["image"])
    label = read_label(sample_paths["label"], like=volume)
    ks = np.unique(np.nonzero(label)[0])[::3]
    ijk = [(*np.round(np.argwhere(label[k] > 0).mean(0)[::-1]), k) for k in ks]
    lps = (np.c_[np.array(ijk, float), np.ones(len(ijk))] @ volume.ijk_to_lps.T)[:, :3]
    points_path = prompts.write_markups(tmp_path / "clicks.mrk.json", lps, node_name="clicks")
    volume_node = app.load_volume(sample_paths["image"])
    nodes = types.SimpleNamespace(volume=volume_node, points=app.load_markups(points_path),
                                  segmentation=app.new_segmentation(volume_node))
    return types.SimpleNamespace(app=app, volume=volume, label=label, nodes=nodes, ijk=ijk, tmp=tmp_path,
                                 points_path=points_path, image_path=sample_paths["image"])


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
    assert not busy(), "the background run did not finish"


def test_module_widget_run_undo_batch(gui):
    module = load("SPDSegment/SPDSegment.py", "SPDSegment_smoke")
    module.SPDSegment(mock.MagicMock())
    widget = module.SPDSegmentWidget()
    widget.setup()
    widget.volumeSelector.currentNode.return_value = gui.nodes.volume
    widget.pointsSelector.currentNode.return_value = gui.nodes.points
    widget.segmentationSelector.currentNode.return_value = gui.nodes.segmentation
    widget.segmentCombo.currentData, widget.modelPath.currentPath = "", ""
    widget.modelCombo.currentData, widget.modeCombo.currentText = "tiny_sam_test", "raw"
    widget.tauSlider.value, widget.neighboursSpin.value, widget.overlaysCheck.checked = 0.5, 2, True
    widget.onRun()
    wait(widget.poll, lambda: widget.task is not None)
    segmentation = gui.nodes.segmentation.GetSegmentation()
    assert widget.statusLabel.text.startswith("raw:"), widget.statusLabel.text
    assert segmentation.GetNumberOfSegments() == 1 and segmentation.GetNthSegment(0).GetName() == "clicks"
    widget.onUndo()
    assert widget.statusLabel.text == "Undone." and segmentation.GetNumberOfSegments() == 0

    widget.pointsSelector.currentNode.return_value = None  # errors are shown, not raised
    widget.onRun()
    assert "point list" in widget.statusLabel.text and widget.task is None

    cases = gui.tmp / "batch"
    cases.mkdir()
    (cases / "h.nii.gz").write_bytes(gui.image_path.read_bytes())
    (cases / "h.mrk.json").write_bytes(gui.points_path.read_bytes())
    widget.batchIn.currentPath, widget.batchOut.currentPath = str(cases), str(cases / "out")
    widget.onBatch()
    wait(widget.poll, lambda: widget.task is not None)
    assert widget.statusLabel.text == "Batch: h done" and (cases / "out" / "h_spd.seg.nrrd").is_file()

    widget.trainData.currentPath, widget.trainOut.currentPath = "", ""
    widget.onTrain()  # missing folders: a message in the log, no process
    assert widget.process is None


class ScriptedEffect:
    """The C++ side of a scripted effect, enough for the SPD effect (parameters on the editor node)."""

    def __init__(self, app, segmentation_node):
        self.app, self.segmentation_node, self.params = app, segmentation_node, {}

    def parameterSetNode(self):
        return self.app.editor_node

    def setParameterDefault(self, key, value):
        self.params.setdefault(key, str(value))

    def setParameter(self, key, value):
        self.params[key] = str(value)

    def parameter(self, key):
        return self.params.get(key, "")

    def integerParameter(self, key):
        return int(float(self.params.get(key) or 0))

    def doubleParameter(self, key):
        return float(self.params.get(key) or 0)

    def addLabeledOptionsWidget(self, *args):
        pass

    addOptionsWidget = addLabeledOptionsWidget

    def defaultModifierLabelmap(self):
        image = slicer.vtkOrientedImageData()
        slicer.vtkSegmentationConverter.DeserializeImageGeometry(
            self.app.editor_logic.GetReferenceImageGeometryString(), image, True, 3, 1)
        return image

    def saveStateForUndo(self):
        self.app.editor_logic.SaveStateForUndo()

    def modifySelectedSegmentByLabelmap(self, modifier, mode):
        segment_id = self.app.editor_node.GetSelectedSegmentID()
        self.app.editor_logic.ModifySegmentByLabelmap(self.segmentation_node, segment_id, modifier, mode, False, False)


class SliceView:
    def __init__(self, ras, slice_to_ras):
        self.ras, self.node = ras, slicer.vtkMRMLSliceNode()
        matrix = self.node.GetSliceToRAS()
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, slice_to_ras[r, c])

    def className(self):
        return "qMRMLSliceWidget"

    def mrmlSliceNode(self):
        return self.node


class Interactor:
    def __init__(self, remove=False):
        self.remove = remove

    def GetEventPosition(self):
        return (10, 10)

    def GetShiftKey(self):
        return self.remove

    def GetControlKey(self):
        return False


def test_effect_click_preview_apply_undo_cancel(gui):
    import vtk

    app, segmentation_node = gui.app, gui.nodes.segmentation
    segment_id = sa.add_segment(segmentation_node, "hippo")
    app.editor_node.SetAndObserveSegmentationNode(segmentation_node)
    app.editor_node.SetAndObserveSourceVolumeNode(gui.nodes.volume)
    app.editor_node.SetSelectedSegmentID(segment_id)
    module = load("SegmentEditorSPD/SegmentEditorSPDLib/SegmentEditorEffect.py", "SegmentEditorEffect_smoke")
    scripted = ScriptedEffect(app, segmentation_node)
    effect = module.SegmentEditorEffect(scripted)
    effect.setupOptionsFrame()
    effect.setMRMLDefaults()
    effect.modelCombo.findData.return_value = 0
    effect.updateGUIFromMRML()
    effect.modelCombo.currentData, effect.modelFile.currentPath = "tiny_sam_test", ""
    effect.modeCombo.currentText = "raw"
    for name, value in (("tauSlider", 0.5), ("neighboursSpin", 2), ("firstSpin", 0), ("lastSpin", 0)):
        setattr(getattr(effect, name), "value", value)
    for name, value in (("limitCheck", False), ("saliencyCheck", True), ("auditCheck", True)):
        setattr(getattr(effect, name), "checked", value)
    effect.updateMRMLFromGUI()
    assert scripted.params["Model"] == "tiny_sam_test" and scripted.params["Mode"] == "raw"

    from SPDSegmentLib.core.cache import default_cache
    from SPDSegmentLib.slicer_side import runner

    default_cache().clear()  # so that working ahead has work to do
    ahead = runner.run_ahead()
    runner.forget_models()
    effect.activate()  # selecting the effect loads its model in the background
    assert ahead.wait_idle(60) and ahead.last_error is None
    assert ("tiny_sam_test", "auto") in runner._MODELS
    encoded_before, runs_before = ahead.encoded, ahead.runs
    coronal = np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])  # Green view: normal A
    click = vtk.vtkCommand.LeftButtonPressEvent
    for i, j, k in gui.ijk:
        ras = (gui.volume.ijk_to_ras @ [i, j, k, 1.0])[:3]
        assert effect.processInteractionEvents(Interactor(), click, SliceView(list(ras), coronal))
    points = effect.promptsNode()
    assert points.GetNumberOfControlPoints() == len(gui.ijk)
    assert ahead.wait_idle(60) and ahead.last_error is None
    assert ahead.encoded > encoded_before  # the clicked slices were encoded while "the user" was clicking
    assert ahead.runs > runs_before  # and a run over the clicks so far was done and remembered
    effect.processInteractionEvents(Interactor(remove=True), click, SliceView(list(ras), coronal))
    assert points.GetNumberOfControlPoints() == len(gui.ijk) - 1
    assert effect.slicingAxis(gui.volume, sa) == 1  # from the clicked view, not assumed axial

    effect.onPreview()
    wait(effect.poll, lambda: effect.run is not None)
    assert effect.preview is not None, effect.statusLabel.text
    assert effect.preview["result"].axis == 1
    assert effect.preview["result"].axis_note.startswith("coronal slices (array axis 1), the slice view")
    preview_mask = effect.preview["result"].mask
    assert sa.segment_array(segmentation_node, segment_id, gui.volume).sum() == 0  # preview writes nothing
    effect.onApply()
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, gui.volume), preview_mask)
    assert effect.preview is None and app.scene.GetFirstNodeByName("SPD preview") is None
    app.editor_logic.Undo()
    assert sa.segment_array(segmentation_node, segment_id, gui.volume).sum() == 0

    effect.onPreview()
    effect.onCancel()  # cancel while running: nothing shown, nothing written
    wait(effect.poll, lambda: effect.run is not None)
    assert effect.preview is None or effect.statusLabel.text.startswith("Preview")
    effect.clearPreview()
    assert sa.segment_array(segmentation_node, segment_id, gui.volume).sum() == 0
