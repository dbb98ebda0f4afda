"""The module and the effect against widgets that behave like PythonQt (Testing/pythonqt_fakes.py): setters emit
at once, ``setParameter`` refreshes the effect's widgets before it returns, the module's panel is its .ui file and
its state a parameter node. No engine is started here (tests/test_gui_smoke.py runs the engine paths)."""
from __future__ import annotations

import ast
import importlib.util
import json
import struct
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (MRML in Python) is not installed", allow_module_level=True)

import pythonqt_fakes as fakes  # noqa: E402
from SPDSegmentLib.core.models import registry  # noqa: E402
from SPDSegmentLib.slicer_side import adapter as sa  # noqa: E402
from SPDSegmentLib.slicer_side import gui as shared  # noqa: E402
from slicer_app import make_standalone_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "SPDSegment" / "Resources" / "UI" / "SPDSegment.ui"


def load(relative, name):
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_file(folder, tau, neighbours, name="mine") -> str:
    """A model file that has only a header (all the GUIs read of it): its own tau and n."""
    header = {"spd_header": json.dumps({"format": "spdsegment-model", "tau": tau, "neighbours": neighbours})}
    data = json.dumps({"__metadata__": header}).encode()
    path = Path(folder) / f"{name}.spd.safetensors"
    path.write_bytes(struct.pack("<Q", len(data)) + data)
    return str(path)


@pytest.fixture()
def app(monkeypatch):
    app = make_standalone_app()
    app.calls, app.built = fakes.install(monkeypatch, app.scene), []
    yield app
    for built in app.built:  # as Slicer does when it deletes them: nothing keeps observing the scene
        built.cleanup()


def new_effect(app):
    """The SPD effect as the Segment Editor builds it: options, then defaults, then parameter-change updates."""
    module = load("SegmentEditorSPD/SegmentEditorSPDLib/SegmentEditorEffect.py", "SegmentEditorEffect_pythonqt")
    effect, scripted = fakes.build_effect(module.SegmentEditorEffect, app.editor_node, app.editor_logic)
    app.built.append(effect)
    return effect, scripted, module


def new_module_widget(app):
    module = load("SPDSegment/SPDSegment.py", "SPDSegment_pythonqt")
    widget = module.SPDSegmentWidget()
    widget.setup()
    app.built.append(widget)
    return widget, module


# ---------------------------------------------------------------- the fakes themselves

def test_the_fakes_emit_like_pythonqt():
    qt, ctk = fakes.qt_module(), fakes.ctk_module()
    seen = []
    spin = qt.QSpinBox()
    spin.setRange(0, 10)
    spin.connect("valueChanged(int)", lambda value: seen.append(("spin", value)))
    spin.value = 4
    spin.value = 4  # no change, no signal
    spin.value = 99  # clamped, as Qt does
    was = spin.blockSignals(True)
    spin.value = 2
    spin.blockSignals(was)
    assert seen == [("spin", 4), ("spin", 10)] and spin.value == 2
    combo = qt.QComboBox()
    combo.connect("currentIndexChanged(int)", lambda index: seen.append(("combo", index)))
    combo.addItem("a", 1)  # the first item becomes current, and says so
    combo.addItem("b", 2)
    combo.currentText = "b"
    assert seen[-2:] == [("combo", 0), ("combo", 1)] and combo.currentData == 2
    box = qt.QCheckBox()
    box.toggled.connect(lambda *args: seen.append(("toggled",) + args))  # the new-style form; slot takes all
    box.connect("stateChanged(int)", lambda: seen.append(("state",)))  # a slot that takes fewer arguments
    box.click()
    assert seen[-2:] == [("state",), ("toggled", True)]
    slider = ctk.ctkSliderWidget()
    slider.minimum, slider.maximum = 0.05, 0.95
    slider.value = 0.333
    assert slider.value == 0.33  # two decimals
    assert box.disconnect("toggled(bool)", seen.append) is False and box.connections() == 2


def test_the_fakes_catch_a_slot_that_writes_every_parameter(app):
    """Issue 19's tau bug, in four lines: a model change writes "Model" first, which refreshes the slider from the
    old "Tau" before the slot reads it. PythonQt-like fakes show it; MagicMock widgets never did."""
    effect, scripted, _ = new_effect(app)
    scripted.setParameter("Tau", 0.5)

    def write_every_parameter_from_the_widgets():
        scripted.setParameter("Model", "another")
        scripted.setParameter("Tau", effect.tauSlider.value)

    effect.tauSlider.blockSignals(True)
    effect.tauSlider.value = 0.3  # the model's own tau, put into the slider
    effect.tauSlider.blockSignals(False)
    write_every_parameter_from_the_widgets()
    assert scripted.doubleParameter("Tau") == 0.5  # the old tau came back: the bug the fakes exist to catch


# ---------------------------------------------------------------- choosing a model puts its own tau and n

def test_effect_choosing_a_model_uses_its_own_tau_and_neighbours(app, tmp_path):
    pipeline = pytest.importorskip("SPDSegmentLib.core.pipeline")
    effect, scripted, _ = new_effect(app)
    default_tau, default_n = shared.model_defaults(registry.DEFAULT_MODEL)
    assert (scripted.doubleParameter("Tau"), effect.tauSlider.value) == (default_tau, default_tau)
    mine = model_file(tmp_path, tau=0.3, neighbours=4)
    effect.modelFile.currentPath = mine  # the user picks a file: its own values, in the widgets and the run
    assert (scripted.doubleParameter("Tau"), scripted.integerParameter("Neighbours")) == (0.3, 4)
    assert (effect.tauSlider.value, effect.neighboursSpin.value) == (0.3, 4)
    assert effect.options(pipeline).tau == 0.3 and effect.modelName() == mine
    effect.modelFile.currentPath = ""
    other = next(name for name, _ in shared.model_choices() if shared.model_defaults(name) and
                 name != registry.DEFAULT_MODEL)
    effect.modelCombo.setCurrentIndex(effect.modelCombo.findData(other))  # another bundled model
    assert scripted.parameter("Model") == other
    assert scripted.doubleParameter("Tau") == effect.tauSlider.value == shared.model_defaults(other)[0]
    effect.modelCombo.setCurrentIndex(effect.modelCombo.findData("tiny_sam_test"))  # a backbone: raw, no tau
    assert not effect.tauSlider.enabled and not effect.neighboursSpin.enabled
    effect.tauSlider.value = 0.42  # a widget writes its own parameter only
    assert scripted.doubleParameter("Tau") == 0.42 and scripted.parameter("Model") == "tiny_sam_test"
    assert scripted.critical == [], f"parameters read without a check: {scripted.critical}"


def test_module_choosing_a_model_uses_its_own_tau_and_neighbours(app, tmp_path):
    widget, _ = new_module_widget(app)
    state = widget._parameterNode
    default_tau, default_n = shared.model_defaults(registry.DEFAULT_MODEL)
    assert (state.model, state.tau, state.neighbours) == (registry.DEFAULT_MODEL, default_tau, default_n)
    assert widget.ui.tauSlider.value == default_tau
    mine = model_file(tmp_path, tau=0.3, neighbours=4)
    widget.ui.modelPath.currentPath = mine
    assert (state.modelFile, state.tau, state.neighbours) == (mine, 0.3, 4)
    assert (widget.ui.tauSlider.value, widget.ui.neighboursSpin.value) == (0.3, 4)
    assert widget.options().tau == 0.3 and widget.modelName() == mine
    widget.ui.modelPath.currentPath = ""
    widget.ui.modelCombo.setCurrentIndex(widget.ui.modelCombo.findData("tiny_sam_test"))
    assert state.model == "tiny_sam_test" and not widget.ui.tauSlider.enabled
    widget.ui.tauSlider.value = 0.42
    assert state.tau == 0.42 and state.model == "tiny_sam_test"


# ---------------------------------------------------------------- the module's panel and state

def ui_names():
    return {w.get("name") for w in ElementTree.parse(UI_FILE).getroot().iter("widget")}


def test_every_widget_the_module_uses_is_in_its_ui_file():
    tree = ast.parse((ROOT / "SPDSegment" / "SPDSegment.py").read_text(encoding="utf-8"))
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"}
    assert used and used <= ui_names(), f"not in SPDSegment.ui: {sorted(used - ui_names())}"


def test_the_panel_binds_the_parameter_node(app):
    widget, module = new_module_widget(app)
    bound = {w.property("SlicerParameterName"): w for w in vars(widget.ui).values()
             if w.property("SlicerParameterName")}
    assert set(bound) <= set(module.SPDSegmentParameterNode.allParameters)
    assert {"volume", "points", "segmentation", "mode", "tau", "neighbours", "overwrite", "editableArea",
            "overlays"} <= set(bound)
    state, node = widget._parameterNode, widget.logic.getParameterNode()
    widget.ui.overwriteCombo.currentText = "overwrite all"  # the panel writes the scene's parameter node
    widget.ui.neighboursSpin.value = 5
    assert (state.overwrite, state.neighbours) == ("overwrite all", 5) and node.GetParameter("neighbours") == "5"
    state.mode = "raw"  # the node writes the panel (a scene loaded, another widget)
    assert widget.ui.modeCombo.currentText == "raw"
    assert state.overwrite == "overwrite all" and sa.DEFAULT_OVERWRITE == "allow overlap"  # the default is safe
    volume = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
    widget.ui.volumeSelector.setCurrentNode(volume)
    assert state.volume is volume and node.GetNodeReference("volume") is volume
    again, _ = new_module_widget(app)  # the state lives in the scene: a new panel shows it
    assert (again.ui.neighboursSpin.value, again.ui.modeCombo.currentText) == (5, "raw")
    assert again.ui.volumeSelector.currentNode() is volume


def test_the_module_state_is_saved_with_the_scene(app, monkeypatch, tmp_path):
    widget, _ = new_module_widget(app)
    volume = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "saved volume")
    widget.ui.volumeSelector.setCurrentNode(volume)
    widget.ui.modelPath.currentPath = model_file(tmp_path, tau=0.3, neighbours=4)
    widget.ui.editableAreaCombo.currentText = "outside all segments"
    app.scene.SetSaveToXMLString(1)
    app.scene.Commit()  # what File > Save writes (the scene's .mrml)
    reopened = make_standalone_app()
    reopened.scene.SetLoadFromXMLString(1)
    reopened.scene.SetSceneXMLString(app.scene.GetSceneXMLString())
    reopened.scene.Import()
    monkeypatch.setattr(slicer, "mrmlScene", reopened.scene)
    reopened.built = app.built  # cleaned up with the others
    again, _ = new_module_widget(reopened)
    assert again.ui.volumeSelector.currentNode().GetName() == "saved volume"
    assert (again.ui.tauSlider.value, again.ui.neighboursSpin.value) == (0.3, 4)
    assert again.ui.modelPath.currentPath == widget.ui.modelPath.currentPath
    assert again.ui.editableAreaCombo.currentText == "outside all segments"


def test_every_module_button_is_connected(app, monkeypatch):
    widget, _ = new_module_widget(app)
    pressed = []
    for name in ("onRun", "onCancel", "onUndo", "onDownload", "onCheckDevice", "onInstall", "onInstallTraining",
                 "onTrain", "onBatch"):
        monkeypatch.setattr(widget, name, lambda *a, name=name: pressed.append(name))
    widget.cleanup()  # the real slots are disconnected ...
    assert all(w.connections() == 0 for w in vars(widget.ui).values() if w.property("SlicerParameterName") is None
               and isinstance(w, fakes.QAbstractButton))
    widget.setup()  # ... and connected again, now to the recording ones
    for button in ("runButton", "cancelButton", "undoButton", "downloadButton", "checkDeviceButton", "installButton",
                   "trainInstallButton", "trainButton", "batchButton"):
        getattr(widget.ui, button).enabled = True
        getattr(widget.ui, button).click()
    assert pressed == ["onRun", "onCancel", "onUndo", "onDownload", "onCheckDevice", "onInstall", "onInstallTraining",
                       "onTrain", "onBatch"]


def test_module_training_starts_a_process_and_shows_its_progress(app, tmp_path):
    widget, _ = new_module_widget(app)
    widget.ui.trainButton.click()  # no folders: a message, no process
    assert widget.process is None and "data folder" in widget.ui.trainLog.toPlainText()
    widget.ui.trainDataPath.currentPath, widget.ui.trainOutputPath.currentPath = str(tmp_path), \
        str(tmp_path / "new.spd.safetensors")
    widget.ui.trainEpochsSpin.value = 3
    widget.ui.trainLoraCheck.checked = True
    widget.ui.trainButton.click()
    program, args = widget.process.started_with
    assert args[args.index("--stage1-epochs") + 1] == "3" and args[args.index("--mode") + 1] == "lora"
    assert widget.ui.trainButton.text == "Stop training"
    widget.process.write_output(b"stage 1 (saliency):  40%|####  | 40/100 [00:10<00:15]\r")
    assert widget.ui.trainProgressBar.value == 40
    model_file(tmp_path, tau=0.25, neighbours=1, name="new")
    widget.process.finish(0)
    assert widget.ui.trainButton.text == "Start training"
    assert widget._parameterNode.modelFile == str(tmp_path / "new.spd.safetensors")  # the new model is chosen ...
    assert widget._parameterNode.tau == 0.25  # ... with its own tau


# ---------------------------------------------------------------- the effect's own widgets and keys

def test_effect_widgets_each_write_their_parameter(app):
    effect, scripted, _ = new_effect(app)
    changes = [(effect.modeCombo, "currentText", "raw", "Mode", "raw"),
               (effect.neighboursSpin, "value", 7, "Neighbours", "7"),
               (effect.saliencyCheck, "checked", False, "ShowSaliency", "0"),
               (effect.auditCheck, "checked", False, "ShowAudit", "0"),
               (effect.autoUpdateCheck, "checked", False, "AutoUpdate", "0"),
               (effect.backgroundCheck, "checked", True, "BackgroundClicks", "1"),
               (effect.opacitySlider, "value", 0.25, "PreviewOpacity", "0.25"),
               (effect.show3DButton, "checked", True, "PreviewShow3D", "1")]
    for widget, attribute, value, parameter, stored in changes:
        setattr(widget, attribute, value)
        assert scripted.parameter(parameter) == stored, parameter
    scripted.setParameter("Mode", "spd")  # and the parameters drive the widgets (a scene loaded)
    assert effect.modeCombo.currentText == "spd"
    effect.axisInfo = (0, 35)
    effect.updateSliceRangeWidgets()
    assert (effect.firstSpin.maximum, effect.lastSpin.maximum) == (34, 34) and "K" in effect.rangeAxisLabel.text
    effect.lastSpin.value = 12
    assert scripted.integerParameter("LastSlice") == 12
    effect.limitCheck.checked = True  # a range chosen before is kept
    assert scripted.integerParameter("LimitSlices") == 1 and scripted.integerParameter("LastSlice") == 12


class Keys:
    def __init__(self, key):
        self.key = key

    def GetKeySym(self):
        return self.key


class SliceWidget:
    def className(self):
        return "qMRMLSliceWidget"


def test_effect_keys(app):
    import vtk

    effect, scripted, _ = new_effect(app)
    press = vtk.vtkCommand.KeyPressEvent
    assert effect.processInteractionEvents(Keys("n"), press, SliceWidget())  # N: background clicks from now on
    assert scripted.integerParameter("BackgroundClicks") == 1 and effect.backgroundCheck.checked
    assert "background" in effect.statusLabel.text
    assert effect.processInteractionEvents(Keys("N"), press, SliceWidget())  # and back
    assert scripted.integerParameter("BackgroundClicks") == 0 and not effect.backgroundCheck.checked
    assert effect.processInteractionEvents(Keys("u"), press, SliceWidget())  # U with no click: said so
    assert effect.statusLabel.text == "No click to undo."
    for key in ("Delete", "BackSpace", "t", "z"):  # the markups widget's, the slice view's, the Segment Editor's
        assert not effect.processInteractionEvents(Keys(key), press, SliceWidget()), key


def test_effect_cleanup_leaves_nothing_connected(app):
    effect, scripted, _ = new_effect(app)
    node = effect.promptsNode(create=True)
    effect.active = True
    effect.observePoints(node)
    tag = effect._sceneObserver = app.scene.AddObserver(app.scene.StartCloseEvent, effect.onSceneStartClose)
    widgets = [w for w in vars(effect).values() if isinstance(w, fakes.QObject)]
    assert effect.timer.connections() == 1 and sum(w.connections() for w in widgets) > 10
    effect.cleanup()
    assert [type(w).__name__ for w in widgets if w.connections()] == []
    assert not node.HasObserver(node.PointRemovedEvent) and not node.HasObserver(node.PointEndInteractionEvent)
    assert app.scene.GetCommand(tag) is None and effect._sceneObserver is None
