"""SPD segment editor effect: click sloppy points in any slice view, preview, then apply or cancel.

Thin GUI over SPDSegmentLib: ``slicer_side.adapter`` reads and writes MRML; the SPD engine, a child
process (``SPDSegmentLib.engine``), does the work: it loads the model when the effect is selected,
encodes and runs ahead after each click, and answers Preview. A QTimer polls it without blocking;
no Python thread runs in Slicer. Building the effect or its options imports no torch and installs
or downloads nothing.
"""
import logging
import os
import sys

import ctk
import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

PROMPTS_ROLE = "SPD.Prompts"  # node reference role on the segment editor node
PREVIEW_NAME = "SPD preview"
# Effect parameters, stored on the segment editor node ("SPD.<name>"). "ModelFile" and "ViewNormal" are
# empty unless set, and Slicer stores no empty parameter, so they have no default and are read with a check.
DEFAULTS = {"Mode": "auto", "LimitSlices": 0, "FirstSlice": 0, "LastSlice": 0, "ShowSaliency": 1, "ShowAudit": 1}


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
    from SPDSegmentLib.slicer_side import adapter, gui

    return pipeline, prompts, gui, adapter


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "SPD"
        scriptedEffect.perSegment = True  # Apply writes the selected segment
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.active = False
        self.run = None  # engine Handle of the Preview in progress
        self.runVolume = None  # the volume copy that Preview runs on
        self.ahead = None  # engine Handle of the latest work ahead
        self.preload = None  # engine Handle of the model load when the effect was selected
        self.preview = None  # {"result", "volume", "nodes"} while a preview is shown
        self.previousForeground = None
        self._volumeCopy = (None, None)
        self.timer = qt.QTimer()
        self.timer.setInterval(50)  # a finished Preview is picked up within 50 ms; a poll is one read()
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
<p><b>Preview</b> segments in the SPD engine, a separate process (Cancel stops it); green/red/yellow points show
the kept, rejected and borrowed prompts and the saliency map is overlaid. <b>Apply</b> writes the selected
segment, respecting the editable area and "modify other segments"; Undo reverts it.</p>
<p><b>tau</b>: saliency a click must reach to be kept; <b>neighbours</b>: slices each click informs. Both start
at the chosen model's own values. The slicing direction follows the view you clicked in.</p></html>"""

    # ------------------------------------------------------------------ options
    def setupOptionsFrame(self):
        _, _, gui, _ = core()
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
        gui.fill_model_menu(self.modelCombo)
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
        self.tauSlider.minimum, self.tauSlider.maximum, self.tauSlider.singleStep = 0.05, 0.95, 0.05
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

        self.modelCombo.connect("currentIndexChanged(int)", self.onModelChanged)
        self.modelFile.connect("currentPathChanged(QString)", self.onModelChanged)
        for widget, signal in ((self.modeCombo, "currentIndexChanged(int)"), (self.tauSlider, "valueChanged(double)"),
                               (self.neighboursSpin, "valueChanged(int)"), (self.limitCheck, "toggled(bool)"),
                               (self.firstSpin, "valueChanged(int)"), (self.lastSpin, "valueChanged(int)"),
                               (self.saliencyCheck, "toggled(bool)"), (self.auditCheck, "toggled(bool)")):
            widget.connect(signal, self.updateMRMLFromGUI)
        self.updateButtons()

    def setMRMLDefaults(self):
        _, _, gui, _ = core()
        model = gui.model_choices()[0][0]  # the default SPD model
        tau, neighbours = gui.model_defaults(model) or (0.5, 2)
        for name, value in dict(DEFAULTS, Model=model, Tau=tau, Neighbours=neighbours).items():
            self.scriptedEffect.setParameterDefault(name, value)

    def textParameter(self, name):
        """A parameter that may be unset (Slicer stores no empty value): "" when it is not there."""
        effect = self.scriptedEffect
        return effect.parameter(name) if effect.parameterDefined(name) else ""

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
        self.modelFile.currentPath = self.textParameter("ModelFile")
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
        effect.setParameter("Model", self.modelCombo.currentData or core()[2].model_choices()[0][0])
        effect.setParameter("ModelFile", self.modelFile.currentPath or "")
        effect.setParameter("Mode", self.modeCombo.currentText)
        effect.setParameter("Tau", self.tauSlider.value)
        effect.setParameter("Neighbours", self.neighboursSpin.value)
        effect.setParameter("LimitSlices", int(self.limitCheck.checked))
        effect.setParameter("FirstSlice", self.firstSpin.value)
        effect.setParameter("LastSlice", self.lastSpin.value)
        effect.setParameter("ShowSaliency", int(self.saliencyCheck.checked))
        effect.setParameter("ShowAudit", int(self.auditCheck.checked))

    def onModelChanged(self, *unused):
        """Another model: its own tau and n (a model trained with another tau is never overridden)."""
        core()[2].show_model_defaults(self.modelFile.currentPath or self.modelCombo.currentData,
                                      self.tauSlider, self.neighboursSpin)
        self.updateMRMLFromGUI()
        if self.active:
            self.preloadModel()

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
        """Have the engine encode the slices around the clicks and run the pipeline while the user goes on
        clicking, so Preview mostly recalls. Only an optimisation: problems are reported by Preview."""
        try:
            volume, voxelPrompts, model, options = self.inputs()
        except Exception:  # noqa: BLE001 - e.g. no source volume yet
            return
        self.ahead = core()[2].engine().encode_ahead(volume, voxelPrompts, model, options)

    # ------------------------------------------------------------------ run
    def options(self, pipeline):
        effect = self.scriptedEffect
        sliceRange = None
        if effect.integerParameter("LimitSlices"):
            sliceRange = (effect.integerParameter("FirstSlice"), effect.integerParameter("LastSlice"))
        return pipeline.SegmentOptions(mode=effect.parameter("Mode"), tau=effect.doubleParameter("Tau"),
                                       neighbours=effect.integerParameter("Neighbours"), slice_range=sliceRange,
                                       return_saliency=bool(effect.integerParameter("ShowSaliency"))).validate()

    def slicingAxis(self, volume, adapter):
        text = self.textParameter("ViewNormal")
        if not text:
            return None  # prompts.to_voxels chooses from the points' coordinates
        import numpy as np

        sliceToRas = np.eye(4)
        sliceToRas[:3, 2] = [float(v) for v in text.split()]
        return adapter.axis_from_slice_to_ras(sliceToRas, volume)

    def sourceVolume(self, adapter):
        """A copy of the source volume, made again only when the node or its voxels changed."""
        node = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        if node is None or node.GetImageData() is None:
            return adapter.volume_from_node(node)  # raises its clear message
        transform = node.GetParentTransformNode()
        key = (node.GetID(), node.GetMTime(), node.GetImageData().GetMTime(),
               transform.GetMTime() if transform is not None else 0)
        if self._volumeCopy[0] != key:
            self._volumeCopy = (key, adapter.volume_from_node(node))
        return self._volumeCopy[1]

    def inputs(self):
        """(volume, voxel prompts, model, options) of a run, read from MRML on the main thread. Without a view
        (a picked point list) the axis comes from the clicks, preferring the model's trained orientations."""
        pipeline, prompts, gui, adapter = core()
        volume = self.sourceVolume(adapter)
        points = adapter.points_from_markups(self.promptsNode())
        model = self.modelName()
        axis = self.slicingAxis(volume, adapter)
        preferred = pipeline.trained_axes(gui.model_header(model) or {}, volume) if axis is None else ()
        voxelPrompts = prompts.to_voxels(points, volume, axis=axis, preferred_axes=preferred)
        return volume, voxelPrompts, model, self.options(pipeline)

    def modelName(self):
        """The chosen model file, else the chosen menu entry."""
        return self.textParameter("ModelFile") or self.scriptedEffect.parameter("Model")

    def onPreview(self):
        _, _, gui, adapter = core()
        self.clearPreview()
        try:
            adapter.check_slicer_version()
            volume, voxelPrompts, model, options = self.inputs()
        except Exception as exc:
            self.statusLabel.text = gui.error_line(exc) if self.promptsNode() else \
                "Click on the structure in a slice view first."
            return
        self.run, self.runVolume = gui.engine().segment(volume, voxelPrompts, model, options), volume
        self.statusLabel.text = f"Segmenting {len(voxelPrompts)} points..."
        self.progressBar.visible = True
        self.updateButtons()
        self.timer.start()

    def poll(self):
        """The QTimer's tick: read what the engine has sent (never waits), then show a finished Preview."""
        _, _, gui, _ = core()
        client = gui.engine_if_started()
        if client is not None:
            client.poll()
        if self.preload is not None and self.preload.done:
            preload, self.preload = self.preload, None
            if not preload.cancelled and preload.error is not None and self.run is None and self.preview is None:
                self.statusLabel.text = gui.error_line(preload.error)  # e.g. a checkpoint still to download
        if self.run is None:
            if not self.active:
                self.timer.stop()
            return
        if not self.run.done:
            gui.show_progress(self.progressBar, self.run)
            return
        run, volume, self.run, self.runVolume = self.run, self.runVolume, None, None
        self.progressBar.visible = False
        try:
            self.showPreview(run.result(), volume)
        except Exception as exc:
            self.statusLabel.text = gui.error_line(exc)  # Cancelled, InputError, the engine died: nothing written
            if not type(exc).__module__.startswith("SPDSegmentLib"):
                logging.exception("SPD preview failed")
        self.updateButtons()

    def showPreview(self, result, volume):
        _, _, gui, adapter = core()
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        segmentId = self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()
        previewNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", PREVIEW_NAME)
        previewNode.CreateDefaultDisplayNodes()
        previewNode.SetHideFromEditors(True)
        previewId = previewNode.GetSegmentation().AddEmptySegment("preview", "SPD preview")
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId) if segmentId else None
        previewNode.GetSegmentation().GetSegment(previewId).SetColor(*(segment.GetColor() if segment else (1, 1, 0)))
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            adapter.oriented_image(result.mask, volume), previewNode, previewId)
        previewNode.GetDisplayNode().SetOpacity2DFill(0.5)
        nodes = {"preview": previewNode}
        if self.scriptedEffect.integerParameter("ShowSaliency") and result.saliency is not None:
            nodes["saliency"] = adapter.saliency_to_volume_node(result, volume, slicer.mrmlScene)
            composite = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
            if composite is not None:
                self.previousForeground = (composite.GetForegroundVolumeID(), composite.GetForegroundOpacity())
            slicer.util.setSliceViewerLayers(foreground=nodes["saliency"], foregroundOpacity=0.4)
        if self.scriptedEffect.integerParameter("ShowAudit") and result.audit:
            nodes.update(adapter.audit_to_markups_nodes(result, volume, slicer.mrmlScene))
        self.preview = {"result": result, "volume": volume, "nodes": nodes}
        self.statusLabel.text = "Preview: " + gui.summary(result)

    def onApply(self):
        if self.preview is None:
            return
        _, _, _, adapter = core()
        editorNode = self.scriptedEffect.parameterSetNode()
        if not editorNode.GetSelectedSegmentID():
            self.statusLabel.text = "Select the segment to write into (in the segment list), then Apply."
            return
        if not self.scriptedEffect.confirmCurrentSegmentVisible():
            return  # the user cancelled (the segment is hidden)
        modifier = adapter.modifier_labelmap(self.preview["result"].mask, self.preview["volume"],
                                             editorNode.GetSegmentationNode(),
                                             self.scriptedEffect.defaultModifierLabelmap())
        self.scriptedEffect.saveStateForUndo()
        self.scriptedEffect.modifySelectedSegmentByLabelmap(
            modifier, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)
        self.clearPreview()
        self.statusLabel.text = "Applied (Undo reverts it)."

    def onCancel(self):
        if self.run is not None:
            self.run.cancel()  # the handle ends now; the engine stops at its next slice
            self.poll()
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

    def preloadModel(self):
        """Have the engine load (and on first use convert) the chosen model, downloading nothing, while the
        user places the first clicks. A checkpoint still to download is named in the status line."""
        self.preload = core()[2].engine().load_model(self.modelName(), allow_download=False)

    def activate(self):
        self.active = True
        self.preloadModel()  # starts the engine on first use
        self.timer.start()

    def deactivate(self):
        self.active = False
        self.stopWork()
        self._volumeCopy = (None, None)  # release the copy of the source volume
        self.clearPreview()
        self.progressBar.visible = False
        self.updateButtons()

    def stopWork(self):
        """Cancel what the engine does for this effect; a reply arriving later is dropped."""
        self.timer.stop()
        for handle in (self.run, self.ahead, self.preload):
            if handle is not None:
                handle.cancel()
        self.run = self.runVolume = self.ahead = self.preload = None

    def cleanup(self):
        self.stopWork()
