"""SPD segment editor effect: click sloppy points in any slice view, preview, then apply or cancel.

Thin GUI over SPDSegmentLib: slicer_adapter reads/writes MRML, runner computes in a worker thread that
a QTimer polls. Building the effect or its options imports no torch and installs or downloads nothing.
"""
import logging
import os
import sys
import time

import ctk
import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

PROMPTS_ROLE = "SPD.Prompts"  # node reference role on the segment editor node
PREVIEW_NAME = "SPD preview"
# effect parameters (Slicer stores them on the segment editor node as "SPD.<name>")
DEFAULTS = {"Model": "spd-hippocampus", "ModelFile": "", "Mode": "auto", "Tau": 0.5,
            "Neighbours": 2, "LimitSlices": 0, "FirstSlice": 0, "LastSlice": 0,
            "ShowSaliency": 1, "ShowAudit": 1, "ViewNormal": ""}


def ensureCoreOnPath():
    """SPDSegmentLib sits next to this module when installed, in ../../SPDSegment in a source tree."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.dirname(here), os.path.join(os.path.dirname(os.path.dirname(here)), "SPDSegment")):
        if os.path.isdir(os.path.join(folder, "SPDSegmentLib")) and folder not in sys.path:
            sys.path.append(folder)


def core():
    """The core modules a run needs, imported lazily (none of them imports torch)."""
    ensureCoreOnPath()
    from SPDSegmentLib.core import pipeline, prompts
    from SPDSegmentLib.slicer_side import runner, adapter as slicer_adapter

    return pipeline, prompts, runner, slicer_adapter


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "SPD"
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.run = None  # BackgroundRun in progress
        self.pending = None  # (volume, axis) of the run in progress
        self.preview = None  # {"result", "volume", "nodes"} while a preview is shown
        self.previousForeground = None
        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.connect("timeout()", self.poll)

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return """<html>Segment from a few sloppy clicks with SAM + Saliency-Guided Prompt Distillation.<br>
<p><b>Left-click</b> in any slice view: add a point on the structure (one per slice or every few slices).
<b>Shift- or Ctrl-click</b>: remove the nearest point. Or pick an existing point list or curve.</p>
<p><b>Preview</b> segments in the background (Cancel stops it); green/red/yellow points show the kept, rejected
and borrowed prompts and the saliency map is overlaid. <b>Apply</b> writes the selected segment, respecting the
editable area and "modify other segments"; Undo reverts it.</p>
<p><b>tau</b>: saliency a click must reach to be kept; <b>neighbours</b>: slices each click informs.
The slicing direction follows the view you clicked in.</p></html>"""

    # ------------------------------------------------------------------ options
    def setupOptionsFrame(self):
        self.promptsSelector = slicer.qMRMLNodeComboBox()
        self.promptsSelector.nodeTypes = ["vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsCurveNode"]
        self.promptsSelector.noneEnabled = True
        self.promptsSelector.addEnabled = False
        self.promptsSelector.noneDisplay = "(click in a slice view to start)"
        self.promptsSelector.setMRMLScene(slicer.mrmlScene)
        self.promptsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onPromptsNodeChanged)
        self.scriptedEffect.addLabeledOptionsWidget("Points:", self.promptsSelector)
        self.clearButton = qt.QPushButton("Clear points")
        self.clearButton.connect("clicked()", self.onClearPoints)
        self.scriptedEffect.addOptionsWidget(self.clearButton)

        self.modelCombo = qt.QComboBox()
        self.modelCombo.addItem("SPD hippocampus (bundled)", "spd-hippocampus")
        try:
            ensureCoreOnPath()
            from SPDSegmentLib.core.models.registry import catalogue  # json only: no torch
            for name, entry in catalogue().items():
                self.modelCombo.addItem(entry["title"], name)
        except ImportError:
            pass
        self.scriptedEffect.addLabeledOptionsWidget("Model:", self.modelCombo)
        self.modelFile = ctk.ctkPathLineEdit()
        self.modelFile.filters = ctk.ctkPathLineEdit.Files
        self.modelFile.nameFilters = ["Models (*.spd.safetensors *.pth *.pt)"]
        self.modelFile.setToolTip("A local model file (e.g. one you trained); overrides the menu when set.")
        self.scriptedEffect.addLabeledOptionsWidget("Model file:", self.modelFile)
        self.modeCombo = qt.QComboBox()
        self.modeCombo.addItems(["auto", "spd", "raw"])
        self.scriptedEffect.addLabeledOptionsWidget("Mode:", self.modeCombo)
        self.tauSlider = ctk.ctkSliderWidget()
        self.tauSlider.minimum, self.tauSlider.maximum, self.tauSlider.singleStep = 0.0, 1.0, 0.05
        self.scriptedEffect.addLabeledOptionsWidget("Saliency threshold (tau):", self.tauSlider)
        self.neighboursSpin = qt.QSpinBox()
        self.neighboursSpin.setRange(0, 10)
        self.scriptedEffect.addLabeledOptionsWidget("Neighbour slices:", self.neighboursSpin)
        rangeRow = qt.QHBoxLayout()
        self.limitCheck = qt.QCheckBox("only slices")
        self.firstSpin, self.lastSpin = qt.QSpinBox(), qt.QSpinBox()
        for spin in (self.firstSpin, self.lastSpin):
            spin.setRange(0, 100000)
        for widget in (self.limitCheck, self.firstSpin, qt.QLabel("to"), self.lastSpin):
            rangeRow.addWidget(widget)
        self.scriptedEffect.addLabeledOptionsWidget("Slice range:", rangeRow)
        self.saliencyCheck = qt.QCheckBox("saliency")
        self.auditCheck = qt.QCheckBox("kept / rejected / borrowed points")
        showRow = qt.QHBoxLayout()
        showRow.addWidget(self.saliencyCheck)
        showRow.addWidget(self.auditCheck)
        self.scriptedEffect.addLabeledOptionsWidget("Show:", showRow)

        buttons = qt.QHBoxLayout()
        self.previewButton = qt.QPushButton("Preview")
        self.applyButton = qt.QPushButton("Apply")
        self.cancelButton = qt.QPushButton("Cancel")
        for button, slot in ((self.previewButton, self.onPreview), (self.applyButton, self.onApply),
                             (self.cancelButton, self.onCancel)):
            button.connect("clicked()", slot)
            buttons.addWidget(button)
        self.scriptedEffect.addOptionsWidget(buttons)
        self.progressBar = qt.QProgressBar()
        self.progressBar.visible = False
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        for widget, signal in ((self.modelCombo, "currentIndexChanged(int)"),
                               (self.modelFile, "currentPathChanged(QString)"),
                               (self.modeCombo, "currentIndexChanged(int)"), (self.tauSlider, "valueChanged(double)"),
                               (self.neighboursSpin, "valueChanged(int)"), (self.limitCheck, "toggled(bool)"),
                               (self.firstSpin, "valueChanged(int)"), (self.lastSpin, "valueChanged(int)"),
                               (self.saliencyCheck, "toggled(bool)"), (self.auditCheck, "toggled(bool)")):
            widget.connect(signal, self.updateMRMLFromGUI)
        self.updateButtons()

    def setMRMLDefaults(self):
        for name, value in DEFAULTS.items():
            self.scriptedEffect.setParameterDefault(name, value)

    def updateGUIFromMRML(self):
        effect = self.scriptedEffect
        if effect.parameterSetNode() is None:
            return
        widgets = (self.promptsSelector, self.modelCombo, self.modelFile, self.modeCombo, self.tauSlider,
                   self.neighboursSpin, self.limitCheck, self.firstSpin, self.lastSpin, self.saliencyCheck,
                   self.auditCheck)
        blocked = [w.blockSignals(True) for w in widgets]
        self.promptsSelector.setCurrentNode(effect.parameterSetNode().GetNodeReference(PROMPTS_ROLE))
        index = self.modelCombo.findData(effect.parameter("Model"))
        self.modelCombo.setCurrentIndex(max(index, 0))
        self.modelFile.currentPath = effect.parameter("ModelFile")
        self.modeCombo.setCurrentText(effect.parameter("Mode"))
        self.tauSlider.value = effect.doubleParameter("Tau")
        self.neighboursSpin.value = effect.integerParameter("Neighbours")
        self.limitCheck.checked = effect.integerParameter("LimitSlices") != 0
        self.firstSpin.value = effect.integerParameter("FirstSlice")
        self.lastSpin.value = effect.integerParameter("LastSlice")
        self.saliencyCheck.checked = effect.integerParameter("ShowSaliency") != 0
        self.auditCheck.checked = effect.integerParameter("ShowAudit") != 0
        for widget, was in zip(widgets, blocked):
            widget.blockSignals(was)
        self.updateButtons()

    def updateMRMLFromGUI(self, *unused):
        effect = self.scriptedEffect
        effect.setParameter("Model", self.modelCombo.currentData or DEFAULTS["Model"])
        effect.setParameter("ModelFile", self.modelFile.currentPath)
        effect.setParameter("Mode", self.modeCombo.currentText)
        effect.setParameter("Tau", self.tauSlider.value)
        effect.setParameter("Neighbours", self.neighboursSpin.value)
        effect.setParameter("LimitSlices", int(self.limitCheck.checked))
        effect.setParameter("FirstSlice", self.firstSpin.value)
        effect.setParameter("LastSlice", self.lastSpin.value)
        effect.setParameter("ShowSaliency", int(self.saliencyCheck.checked))
        effect.setParameter("ShowAudit", int(self.auditCheck.checked))

    def updateButtons(self):
        running = self.run is not None
        self.previewButton.enabled = not running
        self.applyButton.enabled = self.preview is not None and not running
        self.cancelButton.enabled = running or self.preview is not None

    # ------------------------------------------------------------------ points
    def promptsNode(self, create=False):
        node = self.scriptedEffect.parameterSetNode().GetNodeReference(PROMPTS_ROLE)
        if node is None and create:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "SPD points")
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetGlyphScale(2.0)
            self.scriptedEffect.parameterSetNode().SetNodeReferenceID(PROMPTS_ROLE, node.GetID())
            self.promptsSelector.setCurrentNode(node)
        return node

    def onPromptsNodeChanged(self, node):
        if self.scriptedEffect.parameterSetNode() is None:
            return
        self.scriptedEffect.parameterSetNode().SetNodeReferenceID(PROMPTS_ROLE, node.GetID() if node else None)
        self.scriptedEffect.setParameter("ViewNormal", "")  # a picked list: axis from its coordinates

    def onClearPoints(self):
        node = self.promptsNode()
        if node is not None:
            node.RemoveAllControlPoints()

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if eventId != vtk.vtkCommand.LeftButtonPressEvent or viewWidget.className() != "qMRMLSliceWidget":
            return False
        if self.run is not None:
            return True  # no edits while a run reads the points
        ras = self.xyToRas(callerInteractor.GetEventPosition(), viewWidget)
        node = self.promptsNode(create=True)
        if callerInteractor.GetShiftKey() or callerInteractor.GetControlKey():
            if node.GetNumberOfControlPoints():
                node.RemoveNthControlPoint(node.GetClosestControlPointIndexToPositionWorld(ras))
            return True
        node.AddControlPointWorld(vtk.vtkVector3d(*ras))
        sliceToRas = viewWidget.mrmlSliceNode().GetSliceToRAS()
        normal = [sliceToRas.GetElement(row, 2) for row in range(3)]
        self.scriptedEffect.setParameter("ViewNormal", " ".join(f"{v:.6f}" for v in normal))
        self.runAhead()
        return True

    def runAhead(self):
        """Encode the slices around the clicks and run the pipeline while the user goes on clicking,
        so Preview mostly recalls. Only an optimisation: problems are reported by Preview, not here."""
        try:
            volume, voxelPrompts, model, options = self.inputs()
            self.runner.run_ahead().request(volume, voxelPrompts, model, options)
        except Exception:  # noqa: BLE001 - e.g. no source volume yet
            pass

    # ------------------------------------------------------------------ run
    def options(self, pipeline):
        effect = self.scriptedEffect
        sliceRange = None
        if effect.integerParameter("LimitSlices"):
            sliceRange = (effect.integerParameter("FirstSlice"), effect.integerParameter("LastSlice"))
        return pipeline.SegmentOptions(mode=effect.parameter("Mode"), tau=effect.doubleParameter("Tau"),
                                       neighbours=effect.integerParameter("Neighbours"), slice_range=sliceRange,
                                       return_saliency=bool(effect.integerParameter("ShowSaliency")))

    def slicingAxis(self, volume, slicer_adapter):
        text = self.scriptedEffect.parameter("ViewNormal")
        if not text:
            return None  # prompts.to_voxels chooses from the points' coordinates
        import numpy as np

        sliceToRas = np.eye(4)
        sliceToRas[:3, 2] = [float(v) for v in text.split()]
        return slicer_adapter.axis_from_slice_to_ras(sliceToRas, volume)

    @property
    def runner(self):
        return core()[2]

    def sourceVolume(self, slicer_adapter):
        """A copy of the source volume, made again only when the node or its voxels changed."""
        node = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        if node is None or node.GetImageData() is None:
            return slicer_adapter.volume_from_node(node)  # raises its clear message
        transform = node.GetParentTransformNode()
        key = (node.GetID(), node.GetMTime(), node.GetImageData().GetMTime(),
               transform.GetMTime() if transform is not None else 0)
        if getattr(self, "_volumeCopy", (None, None))[0] != key:
            self._volumeCopy = (key, slicer_adapter.volume_from_node(node))
        return self._volumeCopy[1]

    def inputs(self):
        """(volume, voxel prompts, model, options) of a run, read from MRML on the main thread."""
        pipeline, prompts, runner, slicer_adapter = core()
        volume = self.sourceVolume(slicer_adapter)
        points = slicer_adapter.points_from_markups(self.promptsNode())
        voxelPrompts = prompts.to_voxels(points, volume, axis=self.slicingAxis(volume, slicer_adapter))
        return volume, voxelPrompts, self.modelName(), self.options(pipeline)

    def modelName(self):
        """The chosen model file, else the chosen catalogue name (empty: the default)."""
        return self.scriptedEffect.parameter("ModelFile") or self.scriptedEffect.parameter("Model")

    def onPreview(self):
        self.clearPreview()
        runner = self.runner
        runner.run_ahead().stop()  # the run takes over; what was done ahead is in the cache
        try:
            volume, voxelPrompts, model, options = self.inputs()
        except Exception as exc:
            self.statusLabel.text = str(exc) if self.promptsNode() else "Click on the structure in a slice view first."
            return
        self.pending = volume
        self.run = runner.BackgroundRun(lambda p: runner.compute(volume, voxelPrompts, model, options, p)).start()
        self.statusLabel.text = f"Segmenting {len(voxelPrompts)} points..."
        self.progressBar.visible = True
        self.updateButtons()
        self.timer.start()

    def poll(self):
        if self.run is None:
            self.timer.stop()
            return
        stage, done, total = self.run.state()
        self.progressBar.setMaximum(max(total, 1))
        self.progressBar.setValue(min(done, total))
        self.progressBar.setFormat(f"{stage}: %p%")
        if not self.run.done:
            time.sleep(0.002)  # let the worker thread take the GIL if the GUI loop holds it
            return
        self.timer.stop()
        run, volume, self.run, self.pending = self.run, self.pending, None, None
        self.progressBar.visible = False
        try:
            self.showPreview(run.result(), volume)
        except Exception as exc:
            self.statusLabel.text = f"{exc}"  # Cancelled, InputError, ...: nothing was written
            if not type(exc).__module__.startswith("SPDSegmentLib"):
                logging.exception("SPD preview failed")
        self.updateButtons()

    def showPreview(self, result, volume):
        _, _, _, slicer_adapter = core()
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        segmentId = self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()
        previewNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", PREVIEW_NAME)
        previewNode.CreateDefaultDisplayNodes()
        previewNode.SetHideFromEditors(True)
        previewId = previewNode.GetSegmentation().AddEmptySegment("preview", "SPD preview")
        color = segmentationNode.GetSegmentation().GetSegment(segmentId).GetColor() if segmentId else (1, 1, 0)
        previewNode.GetSegmentation().GetSegment(previewId).SetColor(*color)
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            slicer_adapter.oriented_image(result.mask, volume), previewNode, previewId)
        previewNode.GetDisplayNode().SetOpacity2DFill(0.5)
        nodes = {"preview": previewNode}
        if self.scriptedEffect.integerParameter("ShowSaliency") and result.saliency is not None:
            nodes["saliency"] = slicer_adapter.saliency_to_volume_node(result, volume, slicer.mrmlScene)
            composite = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
            if composite is not None:
                self.previousForeground = (composite.GetForegroundVolumeID(), composite.GetForegroundOpacity())
            slicer.util.setSliceViewerLayers(foreground=nodes["saliency"], foregroundOpacity=0.4)
        if self.scriptedEffect.integerParameter("ShowAudit") and result.audit:
            nodes.update(slicer_adapter.audit_to_markups_nodes(result, volume, slicer.mrmlScene))
        self.preview = {"result": result, "volume": volume, "nodes": nodes}
        counts = ", ".join(f"{n} {s}" for s, n in result.audit_counts().items()) if result.audit else "raw prompts"
        self.statusLabel.text = f"Preview: {result.voxels} voxels on {len(result.slices)} slices ({counts})."

    def onApply(self):
        if self.preview is None:
            return
        _, _, _, slicer_adapter = core()
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        modifier = slicer_adapter.modifier_labelmap(self.preview["result"].mask, self.preview["volume"],
                                                    segmentationNode, self.scriptedEffect.defaultModifierLabelmap())
        self.scriptedEffect.saveStateForUndo()
        self.scriptedEffect.modifySelectedSegmentByLabelmap(
            modifier, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)
        self.clearPreview()
        self.statusLabel.text = "Applied (Undo reverts it)."

    def onCancel(self):
        if self.run is not None:
            self.run.cancel()
            self.statusLabel.text = "Cancelling..."
        else:
            self.clearPreview()
            self.statusLabel.text = "Preview discarded; the segment is unchanged."

    def clearPreview(self):
        if self.preview is not None:
            if self.previousForeground is not None:
                foregroundId, opacity = self.previousForeground
                foreground = slicer.mrmlScene.GetNodeByID(foregroundId) if foregroundId else None
                slicer.util.setSliceViewerLayers(foreground=foreground, foregroundOpacity=opacity)
                self.previousForeground = None
            for node in self.preview["nodes"].values():
                if node is not None and node.GetScene() is not None:
                    slicer.mrmlScene.RemoveNode(node)
            self.preview = None
        self.updateButtons()

    def activate(self):
        """Load the model in the background while the user places the first clicks. Only an
        optimisation: a missing dependency or model is reported by Preview, not here."""
        try:
            self.runner.run_ahead().preload(self.modelName() or None)
        except Exception:  # noqa: BLE001
            pass

    def deactivate(self):
        if self.run is not None:
            self.run.cancel()
        if "SPDSegmentLib.slicer_side.runner" in sys.modules:  # stop working ahead, without importing anything new
            sys.modules["SPDSegmentLib.slicer_side.runner"].run_ahead().stop()
        self._volumeCopy = (None, None)  # release the copy of the source volume
        self.clearPreview()

    def cleanup(self):
        self.timer.stop()
        if self.run is not None:
            self.run.cancel()
