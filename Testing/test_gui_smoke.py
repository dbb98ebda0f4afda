"""The module widget and the segment editor effect on real MRML (slicer-core), with Qt, CTK and the
desktop-only Slicer pieces stubbed out and the SPD engine as a real child process. They cannot show
that the GUI looks right; they do run every GUI code path (build, click, work ahead, preview, apply,
undo, cancel, batch, an engine that dies) so that a typo or a broken call fails here rather than in
Slicer. One test holds the GIL on the main thread the way PythonQt's event loop does."""
from __future__ import annotations

import ctypes
import importlib.util
import sys
import threading
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
from SPDSegmentLib.core.models import registry  # noqa: E402
from SPDSegmentLib.core.volume import read, read_label, to_sitk  # noqa: E402
from SPDSegmentLib.research import speed  # noqa: E402
from SPDSegmentLib.slicer_side import adapter as sa  # noqa: E402
from SPDSegmentLib.slicer_side import gui as shared  # noqa: E402
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


def test_module_widget_run_undo_batch(gui, engine):
    module = load("SPDSegment/SPDSegment.py", "SPDSegment_smoke")
    module.SPDSegment(mock.MagicMock())
    widget = module.SPDSegmentWidget()
    widget.setup()
    default = registry.DEFAULT_MODEL
    assert widget.tauSlider.value == shared.spd_header(registry.BUNDLED_SPD_MODELS[default])["tau"]
    widget.enter()  # opening the module starts the engine
    assert engine.alive
    widget.volumeSelector.currentNode.return_value = gui.nodes.volume
    widget.pointsSelector.currentNode.return_value = gui.nodes.points
    widget.segmentationSelector.currentNode.return_value = gui.nodes.segmentation
    widget.segmentCombo.currentData, widget.modelPath.currentPath = "", ""
    widget.modelCombo.currentData, widget.modeCombo.currentText = "tiny_sam_test", "raw"
    widget.overlaysCheck.checked = True
    widget.onModelChanged()
    assert not widget.tauSlider.enabled  # a backbone runs raw: no tau
    widget.timer.setInterval.assert_called_once_with(round(speed.POLL_SECONDS * 1000))
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

    widget.onCheckDevice()  # answered by the engine: Slicer's process imports no torch for it
    wait(widget.poll, lambda: widget.task is not None)
    assert widget.deviceLabel.text.startswith(("CPU", "CUDA")), widget.deviceLabel.text

    widget.trainData.currentPath, widget.trainOut.currentPath = "", ""
    widget.onTrain()  # missing folders: a message in the log, no process
    assert widget.process is None
    assert widget.trainInstallButton is not None  # the Training panel can install MONAI


def test_module_refuses_an_old_slicer_before_running(gui, engine, monkeypatch):
    module = load("SPDSegment/SPDSegment.py", "SPDSegment_old")
    monkeypatch.setattr(slicer.app, "majorVersion", 5, raising=False)
    monkeypatch.setattr(slicer.app, "minorVersion", 8, raising=False)
    logic = module.SPDSegmentLogic()
    with pytest.raises(Exception, match=r"needs Slicer 5\.10 or later; this is Slicer 5\.8"):
        logic.startRun(gui.nodes.volume, gui.nodes.points, "tiny_sam_test")
    assert not engine.alive  # nothing was started


class ScriptedEffect:
    """The C++ side of a scripted effect, enough for the SPD effect, with Slicer's parameter rules: an empty
    value is never stored, and reading a parameter that is not there logs a qCritical (recorded here)."""

    def __init__(self, app, segmentation_node):
        self.app, self.segmentation_node, self.params = app, segmentation_node, {}
        self.critical = []  # parameters read without being defined
        self.confirm = 1  # confirmCurrentSegmentVisible: 0 = the user cancelled

    def parameterSetNode(self):
        return self.app.editor_node

    def parameterDefined(self, key):
        return key in self.params

    def setParameterDefault(self, key, value):
        if not self.parameterDefined(key):
            self.setParameter(key, value)

    def setParameter(self, key, value):
        if key not in self.params and str(value) == "":
            return  # qSlicerSegmentEditorAbstractEffect::setCommonParameter: no empty value is stored
        self.params[key] = str(value)

    def parameter(self, key):
        if key not in self.params:
            self.critical.append(key)  # "Parameter named ... cannot be found"
        return self.params.get(key, "")

    def integerParameter(self, key):
        return int(float(self.parameter(key) or 0))

    def doubleParameter(self, key):
        return float(self.parameter(key) or 0)

    def addLabeledOptionsWidget(self, *args):
        pass

    addOptionsWidget = addLabeledOptionsWidget

    def confirmCurrentSegmentVisible(self):
        return self.confirm

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


CORONAL = np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])  # Green view: normal A


def make_effect(gui, model="tiny_sam_test"):
    """The SPD effect on the scene's segment editor node, a segment "hippo" selected, ``model`` chosen."""
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
    effect.modelCombo.currentData, effect.modelFile.currentPath = model, ""
    effect.modeCombo.currentText = "raw"
    for name, value in (("firstSpin", 0), ("lastSpin", 0)):
        setattr(getattr(effect, name), "value", value)
    for name, value in (("limitCheck", False), ("saliencyCheck", True), ("auditCheck", True)):
        setattr(getattr(effect, name), "checked", value)
    effect.onModelChanged()
    return effect, scripted, segment_id


def segment_bytes(gui, segment_id):
    return sa.segment_array(gui.nodes.segmentation, segment_id, gui.volume).tobytes()


def test_effect_click_preview_apply_undo_cancel(gui, engine):
    import vtk

    app, segmentation_node = gui.app, gui.nodes.segmentation
    effect, scripted, segment_id = make_effect(gui)
    default = registry.DEFAULT_MODEL
    assert float(scripted.params["Tau"]) == shared.spd_header(registry.BUNDLED_SPD_MODELS[default])["tau"]
    assert "ModelFile" not in scripted.params and "ViewNormal" not in scripted.params  # never stored empty
    assert scripted.params["Model"] == "tiny_sam_test" and scripted.params["Mode"] == "raw"
    assert not effect.tauSlider.enabled  # a backbone has no tau of its own: raw mode
    effect.timer.setInterval.assert_called_once_with(round(speed.POLL_SECONDS * 1000))  # as bench-speed polls

    effect.activate()  # selecting the effect starts the engine and loads the model, downloading nothing
    assert engine.alive and effect.preload is not None
    wait(effect.poll, lambda: effect.preload is not None)
    click = vtk.vtkCommand.LeftButtonPressEvent
    for i, j, k in gui.ijk:
        ras = (gui.volume.ijk_to_ras @ [i, j, k, 1.0])[:3]
        assert effect.processInteractionEvents(Interactor(), click, SliceView(list(ras), CORONAL))
    points = effect.promptsNode()
    assert points.GetNumberOfControlPoints() == len(gui.ijk)
    assert effect.ahead is not None and effect.ahead.wait(60)
    assert effect.ahead.result()["ran"]  # the clicked slices were encoded and run while "the user" clicked
    effect.processInteractionEvents(Interactor(remove=True), click, SliceView(list(ras), CORONAL))
    assert points.GetNumberOfControlPoints() == len(gui.ijk) - 1
    assert effect.slicingAxis(gui.volume, sa) == 1  # from the clicked view, not assumed axial

    effect.onPreview()
    wait(effect.poll, lambda: effect.run is not None)
    assert effect.preview is not None, effect.statusLabel.text
    assert effect.statusLabel.text.startswith("Preview: raw:")
    assert effect.preview["result"].axis == 1
    assert effect.preview["result"].axis_note.startswith("coronal slices (array axis 1), the slice view")
    assert effect.preview["result"].axis_note.rstrip(".") in effect.statusLabel.text  # shown to the user
    preview_mask = effect.preview["result"].mask
    assert sa.segment_array(segmentation_node, segment_id, gui.volume).sum() == 0  # preview writes nothing

    app.editor_node.SetSelectedSegmentID(None)
    effect.onApply()  # no segment selected: says so, writes nothing
    assert "Select the segment" in effect.statusLabel.text and effect.preview is not None
    app.editor_node.SetSelectedSegmentID(segment_id)
    scripted.confirm = 0
    effect.onApply()  # the user declined to show the hidden segment
    assert effect.preview is not None and sa.segment_array(segmentation_node, segment_id, gui.volume).sum() == 0
    scripted.confirm = 1
    effect.onApply()
    np.testing.assert_array_equal(sa.segment_array(segmentation_node, segment_id, gui.volume), preview_mask)
    assert effect.preview is None and app.scene.GetFirstNodeByName("SPD preview") is None
    app.editor_logic.Undo()
    assert sa.segment_array(segmentation_node, segment_id, gui.volume).sum() == 0

    effect.onPreview()
    effect.onCancel()  # cancel while running: the Preview ends now, nothing is shown or written
    assert effect.run is None and effect.preview is None and effect.statusLabel.text.startswith("Cancelled")
    for _ in range(10):  # an answer that still arrives is dropped
        effect.poll()
        time.sleep(0.02)
    assert effect.preview is None and app.scene.GetFirstNodeByName("SPD preview") is None

    effect.onPreview()
    effect.deactivate()  # leaving the effect while a Preview runs
    for _ in range(10):
        effect.poll()
        time.sleep(0.02)
    assert effect.preview is None and app.scene.GetFirstNodeByName("SPD preview") is None
    assert sa.segment_array(segmentation_node, segment_id, gui.volume).sum() == 0
    assert scripted.critical == [], f"parameters read without a check: {scripted.critical}"


def test_selecting_the_effect_downloads_nothing(gui, engine, monkeypatch):
    effect, scripted, _ = make_effect(gui, model="sam_vit_b")
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
    effect, scripted, _ = make_effect(gui)
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
    effect, scripted, segment_id = make_effect(gui)
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
