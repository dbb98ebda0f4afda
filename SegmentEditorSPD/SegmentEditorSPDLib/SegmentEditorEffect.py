"""SPD segment editor effect: click sloppy points in a slice view, correct them, preview, then apply or cancel.

Thin GUI over SPDSegmentLib: ``slicer_side.adapter`` reads and writes MRML, ``slicer_side.gui`` holds what the
effect shares with the module; the SPD engine, a child process (``SPDSegmentLib.engine``), does the work: it
loads the model when the effect is selected, encodes and runs ahead after each click, and answers Preview. A
QTimer polls it without blocking; no Python thread runs in Slicer. Building the effect or its options imports
no torch and installs or downloads nothing.

Clicks live in one markups point list (the contract with the core): a control point described "background"
is a background click, "correction" a foreground correction (every foreground click placed after the first
Preview), anything else a sloppy click. Background clicks are drawn unselected (the list's colour), the others
selected (its selected colour): one list cannot colour points one by one, but it can colour them by selection.
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
VIEW_NORMAL_ATTRIBUTE = "SPD.ViewNormal"  # on the point list: the normal of the slice view its clicks are in
PREVIEWED_ATTRIBUTE = "SPD.Previewed"  # on the point list: a Preview was shown, so new clicks are corrections
TOGGLE_KIND_KEY, UNDO_CLICK_KEY = "n", "u"  # free in Slicer's slice views (vtkMRMLSliceIntersectionWidget)
FOREGROUND_COLOUR, BACKGROUND_COLOUR = (0.2, 0.75, 1.0), (1.0, 0.25, 0.85)  # unlike the audit's green/red/yellow
# Effect parameters, stored on the segment editor node ("SPD.<name>"). "ModelFile" is empty unless set, and Slicer
# stores no empty parameter, so it has no default and is read with a check. Model, Tau, Neighbours: setMRMLDefaults.
DEFAULTS = {"Mode": "auto", "LimitSlices": 0, "FirstSlice": 0, "LastSlice": 0, "ShowSaliency": 1, "ShowAudit": 1,
            "AutoUpdate": 1, "BackgroundClicks": 0, "PreviewOpacity": 0.6, "PreviewShow3D": 0}


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
        self.runPoints = None  # the point list it reads
        self.ahead = None  # engine Handle of the latest work ahead
        self.preload = None  # engine Handle of the model load when the effect was selected
        self.preview = None  # {"result", "volume", "nodes", "segmentation", "source"} while a preview is kept
        self.previousForeground = None
        self.axisInfo = None  # (axis, number of slices) of the clicks' slicing axis, once known
        self._volumeCopy = (None, None)
        self._connections = []  # (widget, signal, slot) made here, undone by cleanup
        self._pointsObserved = (None, [])  # (point list, observer tags) while the effect is active
        self._sceneObserver = None
        self._editingPoints = False  # our own bulk edits: the list's events are not reactions to the user
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
<p><b>Click</b> on the structure in a slice view (one point per slice or every few slices).
<b>Ctrl-click</b>: one background click (on something that is not the structure); <b>N</b>: every click is a
background click until N again; <b>U</b> or <i>Undo last click</i>: remove the newest click. Clicks placed
after the first Preview correct it. Drag a point to move it; hover it and press <b>Delete</b>, or right-click
it, to delete it. All clicks must be in views along one slicing direction.</p>
<p><b>Auto-update</b> re-runs Preview after every click, move or deletion (the SPD engine, a separate process,
has most of the work done by then). The preview shows the mask, the saliency map and which clicks were kept
(green), rejected (red) or borrowed (yellow). <b>Apply</b> writes the selected segment on the slices SPD ran on
only, respecting the editable area and "modify other segments"; the Segment Editor's Undo reverts it.</p>
<p><b>tau</b>: saliency a click must reach to be kept; <b>neighbours</b>: slices each click informs. Both start
at the chosen model's own values. Slice numbers are the Data Probe's I, J or K.</p></html>"""

    # ------------------------------------------------------------------ options
    def _connect(self, widget, signal, slot):
        widget.connect(signal, slot)
        self._connections.append((widget, signal, slot))

    def _parameterSlot(self, name, read):
        return lambda *unused: self.scriptedEffect.setParameter(name, read())

    def setupOptionsFrame(self):
        _, _, gui, _ = core()
        effect = self.scriptedEffect
        self.promptsSelector = slicer.qMRMLNodeComboBox()
        self.promptsSelector.nodeTypes = ["vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsCurveNode"]
        self.promptsSelector.noneEnabled = True
        self.promptsSelector.addEnabled = False
        self.promptsSelector.noneDisplay = "(click in a slice view to start)"
        self.promptsSelector.setMRMLScene(slicer.mrmlScene)
        effect.addLabeledOptionsWidget("Points:", self.promptsSelector)
        self.backgroundCheck = qt.QCheckBox("background clicks (N)")
        self.backgroundCheck.setToolTip("Checked: clicks mark what is not the structure. N in a slice view toggles "
                                        "it; Ctrl-click places one background click either way.")
        self.undoClickButton = qt.QPushButton("Undo last click (U)")
        self.clearButton = qt.QPushButton("Clear")
        clickRow = qt.QHBoxLayout()
        for widget in (self.backgroundCheck, self.undoClickButton, self.clearButton):
            clickRow.addWidget(widget)
        effect.addLabeledOptionsWidget("Clicks:", clickRow)

        self.modelCombo = qt.QComboBox()
        gui.fill_model_menu(self.modelCombo)  # before its signal is connected: filling is not a choice
        effect.addLabeledOptionsWidget("Model:", self.modelCombo)
        self.modelFile = ctk.ctkPathLineEdit()
        self.modelFile.filters = ctk.ctkPathLineEdit.Files
        self.modelFile.nameFilters = ["Models (*.spd.safetensors *.pth *.pt)"]
        self.modelFile.setToolTip("A local model file (e.g. one you trained); overrides the menu when set.")
        effect.addLabeledOptionsWidget("Model file:", self.modelFile)
        self.modeCombo = qt.QComboBox()
        self.modeCombo.addItems(["auto", "spd", "raw"])
        effect.addLabeledOptionsWidget("Mode:", self.modeCombo)
        self.tauSlider = ctk.ctkSliderWidget()
        (self.tauSlider.minimum, self.tauSlider.maximum), self.tauSlider.singleStep = gui.TAU_RANGE, 0.01
        effect.addLabeledOptionsWidget("Saliency threshold (tau):", self.tauSlider)
        self.neighboursSpin = qt.QSpinBox()
        self.neighboursSpin.setRange(*gui.NEIGHBOURS_RANGE)
        effect.addLabeledOptionsWidget("Neighbour slices:", self.neighboursSpin)
        rangeRow = qt.QHBoxLayout()
        self.limitCheck = qt.QCheckBox("only slices")
        self.firstSpin, self.lastSpin = qt.QSpinBox(), qt.QSpinBox()
        for spin in (self.firstSpin, self.lastSpin):
            spin.setToolTip("A slice number as the Data Probe shows it (the I, J or K of the slicing direction).")
        self.rangeAxisLabel = qt.QLabel("")
        for widget in (self.limitCheck, self.firstSpin, qt.QLabel("to"), self.lastSpin, self.rangeAxisLabel):
            rangeRow.addWidget(widget)
        effect.addLabeledOptionsWidget("Slice range:", rangeRow)
        self.saliencyCheck = qt.QCheckBox("saliency")
        self.auditCheck = qt.QCheckBox("kept / rejected / borrowed clicks")
        showRow = qt.QHBoxLayout()
        showRow.addWidget(self.saliencyCheck)
        showRow.addWidget(self.auditCheck)
        effect.addLabeledOptionsWidget("Show:", showRow)
        self.opacitySlider = ctk.ctkSliderWidget()
        self.opacitySlider.minimum, self.opacitySlider.maximum, self.opacitySlider.singleStep = 0.0, 1.0, 0.05
        self.opacitySlider.setToolTip("Opacity of the preview.")
        self.show3DButton = qt.QPushButton("Show 3D")
        self.show3DButton.checkable = True
        self.show3DButton.setToolTip("Show the preview in 3D views too.")
        displayRow = qt.QHBoxLayout()
        displayRow.addWidget(self.opacitySlider)
        displayRow.addWidget(self.show3DButton)
        effect.addLabeledOptionsWidget("Preview display:", displayRow)

        buttons = qt.QHBoxLayout()
        self.autoUpdateCheck = qt.QCheckBox("Auto-update")
        self.autoUpdateCheck.setToolTip("Update the preview after every click, move or deletion.")
        self.previewButton = qt.QPushButton("Preview")
        self.applyButton = qt.QPushButton("Apply")
        self.cancelButton = qt.QPushButton("Cancel")
        for widget in (self.autoUpdateCheck, self.previewButton, self.applyButton, self.cancelButton):
            buttons.addWidget(widget)
        effect.addOptionsWidget(buttons)
        self.progressBar = qt.QProgressBar()
        self.progressBar.visible = False
        effect.addOptionsWidget(self.progressBar)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        effect.addOptionsWidget(self.statusLabel)

        # Each widget writes its own parameter only: in Slicer, setParameter runs updateGUIFromMRML at once, so a
        # slot that wrote every parameter from the widgets would read widgets that the first write had refreshed.
        self._connect(self.promptsSelector, "currentNodeChanged(vtkMRMLNode*)", self.onPromptsNodeChanged)
        self._connect(self.modelCombo, "currentIndexChanged(int)", self.onModelChanged)
        self._connect(self.modelFile, "currentPathChanged(QString)", self.onModelChanged)
        self._connect(self.limitCheck, "toggled(bool)", self.onLimitToggled)
        for widget, signal, name, read in (
                (self.modeCombo, "currentIndexChanged(int)", "Mode", lambda: self.modeCombo.currentText),
                (self.tauSlider, "valueChanged(double)", "Tau", lambda: self.tauSlider.value),
                (self.neighboursSpin, "valueChanged(int)", "Neighbours", lambda: self.neighboursSpin.value),
                (self.firstSpin, "valueChanged(int)", "FirstSlice", lambda: self.firstSpin.value),
                (self.lastSpin, "valueChanged(int)", "LastSlice", lambda: self.lastSpin.value),
                (self.saliencyCheck, "toggled(bool)", "ShowSaliency", lambda: int(self.saliencyCheck.checked)),
                (self.auditCheck, "toggled(bool)", "ShowAudit", lambda: int(self.auditCheck.checked)),
                (self.autoUpdateCheck, "toggled(bool)", "AutoUpdate", lambda: int(self.autoUpdateCheck.checked)),
                (self.backgroundCheck, "toggled(bool)", "BackgroundClicks",
                 lambda: int(self.backgroundCheck.checked)),
                (self.opacitySlider, "valueChanged(double)", "PreviewOpacity", lambda: self.opacitySlider.value),
                (self.show3DButton, "toggled(bool)", "PreviewShow3D", lambda: int(self.show3DButton.checked))):
            self._connect(widget, signal, self._parameterSlot(name, read))
        for button, slot in ((self.undoClickButton, self.onUndoClick), (self.clearButton, self.onClearPoints),
                             (self.previewButton, self.onPreview), (self.applyButton, self.onApply),
                             (self.cancelButton, self.onCancel)):
            self._connect(button, "clicked()", slot)
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
        """Widgets from the parameters. Slicer calls it after every effect parameter change, of any effect."""
        effect = self.scriptedEffect
        if effect.parameterSetNode() is None or not effect.parameterDefined("Model"):
            return
        _, _, gui, _ = core()
        widgets = (self.promptsSelector, self.modelCombo, self.modelFile, self.modeCombo, self.tauSlider,
                   self.neighboursSpin, self.limitCheck, self.firstSpin, self.lastSpin, self.saliencyCheck,
                   self.auditCheck, self.autoUpdateCheck, self.backgroundCheck, self.opacitySlider, self.show3DButton)
        blocked = [w.blockSignals(True) for w in widgets]
        try:
            self.promptsSelector.setCurrentNode(effect.parameterSetNode().GetNodeReference(PROMPTS_ROLE))
            self.modelCombo.setCurrentIndex(max(self.modelCombo.findData(effect.parameter("Model")), 0))
            self.modelFile.currentPath = self.textParameter("ModelFile")
            self.modeCombo.setCurrentText(effect.parameter("Mode"))
            ownValues = gui.model_defaults(self.modelName()) is not None  # a backbone runs raw: no tau, no n
            self.tauSlider.enabled = self.neighboursSpin.enabled = ownValues
            self.tauSlider.value = effect.doubleParameter("Tau")
            self.neighboursSpin.value = effect.integerParameter("Neighbours")
            self.limitCheck.checked = effect.integerParameter("LimitSlices") != 0
            self.updateSliceRangeWidgets()
            self.saliencyCheck.checked = effect.integerParameter("ShowSaliency") != 0
            self.auditCheck.checked = effect.integerParameter("ShowAudit") != 0
            self.autoUpdateCheck.checked = effect.integerParameter("AutoUpdate") != 0
            self.backgroundCheck.checked = effect.integerParameter("BackgroundClicks") != 0
            self.opacitySlider.value = effect.doubleParameter("PreviewOpacity")
            self.show3DButton.checked = effect.integerParameter("PreviewShow3D") != 0
        finally:
            for widget, was in zip(widgets, blocked):
                widget.blockSignals(was)
        self.updateButtons()
        self.updatePreviewDisplay()

    def onModelChanged(self, *unused):
        """Another model: its own tau and n (a model trained with another tau is never overridden). The values are
        read from the widgets first, then written; each write refreshes every widget from the parameters."""
        _, _, gui, _ = core()
        modelFile, model = self.modelFile.currentPath or "", self.modelCombo.currentData or gui.model_choices()[0][0]
        defaults = gui.model_defaults(modelFile or model)
        effect = self.scriptedEffect
        effect.setParameter("ModelFile", modelFile)
        effect.setParameter("Model", model)
        if defaults is not None:
            effect.setParameter("Tau", defaults[0])
            effect.setParameter("Neighbours", defaults[1])
        self.updateGUIFromMRML()  # the tau and n widgets' state, also when no parameter changed
        if self.active:
            self.preloadModel()

    def onLimitToggled(self, checked):
        """"only slices" on: a range never chosen starts at the clicks' span (else every slice)."""
        effect = self.scriptedEffect
        if checked and effect.integerParameter("FirstSlice") == 0 and effect.integerParameter("LastSlice") == 0:
            _, _, gui, _ = core()
            try:
                _, voxelPrompts, _, _ = self.inputs(limit=False)
                numbers = voxelPrompts.slice_index()
            except Exception:  # noqa: BLE001 - no clicks or no volume yet: every slice
                numbers = []
            first, last = gui.slice_span(numbers, self.axisInfo[1] if self.axisInfo else 1)
            effect.setParameter("FirstSlice", first)
            effect.setParameter("LastSlice", last)
        effect.setParameter("LimitSlices", int(bool(checked)))

    def updateSliceRangeWidgets(self):
        """The slice range spin boxes count the slices of the clicks' axis, numbered as the Data Probe numbers them
        (I, J or K from 0), and show the range parameters (any range while the axis is not known yet)."""
        _, _, gui, _ = core()
        axis, count = self.axisInfo or (None, 100000)
        self.rangeAxisLabel.text = f"({gui.slice_letter(axis)}, 0-{count - 1})" if axis is not None else ""
        for spin, name in ((self.firstSpin, "FirstSlice"), (self.lastSpin, "LastSlice")):
            was = spin.blockSignals(True)
            spin.setRange(0, max(count - 1, 0))
            spin.value = self.scriptedEffect.integerParameter(name) if self.scriptedEffect.parameterDefined(name) else 0
            spin.blockSignals(was)

    def updateButtons(self):
        running = self.run is not None
        self.applyButton.enabled = self.preview is not None and not running
        self.cancelButton.enabled = running or self.preview is not None
        node = self.promptsNode()
        self.undoClickButton.enabled = self.clearButton.enabled = \
            node is not None and node.GetNumberOfControlPoints() > 0

    # ------------------------------------------------------------------ points
    def promptsNode(self, create=False):
        editorNode = self.scriptedEffect.parameterSetNode()
        node = editorNode.GetNodeReference(PROMPTS_ROLE) if editorNode is not None else None
        if node is None and create:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "SPD points")
            node.CreateDefaultDisplayNodes()
            node.SetLocked(False)  # the markups widget moves and deletes its points
            editorNode.SetNodeReferenceID(PROMPTS_ROLE, node.GetID())
            self.styleClicks(node)
            self.promptsSelector.setCurrentNode(node)
        return node

    def styleClicks(self, node):
        """Background clicks in the list's colour (unselected), the others in its selected colour."""
        _, _, gui, _ = core()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetSelectedColor(*FOREGROUND_COLOUR)
            display.SetColor(*BACKGROUND_COLOUR)
            display.SetGlyphScale(2.0)
        for index in range(node.GetNumberOfControlPoints()):
            background = gui.kind_of_description(node.GetNthControlPointDescription(index)) == gui.BACKGROUND
            node.SetNthControlPointSelected(index, not background)

    def onPromptsNodeChanged(self, node):
        editorNode = self.scriptedEffect.parameterSetNode()
        if editorNode is None:
            return
        editorNode.SetNodeReferenceID(PROMPTS_ROLE, node.GetID() if node else None)
        self.axisInfo = None
        if node is not None:
            self.styleClicks(node)
        if self.active:
            self.observePoints(node)
        self.updateButtons()

    def observePoints(self, node):
        """React to the user moving (end of a drag) or deleting clicks of ``node`` (None: stop)."""
        observed, tags = self._pointsObserved
        if observed is node:
            return
        for tag in tags:
            observed.RemoveObserver(tag)
        tags = [node.AddObserver(event, self.onPointsEdited)
                for event in (node.PointRemovedEvent, node.PointEndInteractionEvent)] if node is not None else []
        self._pointsObserved = (node, tags)

    def onPointsEdited(self, caller=None, event=None):
        if not self._editingPoints:
            self.onClicksChanged()

    def onClearPoints(self):
        node = self.promptsNode()
        if node is None:
            return
        self._editingPoints = True
        try:
            node.RemoveAllControlPoints()
            node.RemoveAttribute(VIEW_NORMAL_ATTRIBUTE)
            node.RemoveAttribute(PREVIEWED_ATTRIBUTE)
        finally:
            self._editingPoints = False
        self.axisInfo = None
        self.updateSliceRangeWidgets()
        self.statusLabel.text = "Clicks cleared."
        self.updateButtons()

    def onUndoClick(self):
        """Remove the newest click (the list's last point); the preview follows when Auto-update is on."""
        node = self.promptsNode()
        if node is None or node.GetNumberOfControlPoints() == 0:
            self.statusLabel.text = "No click to undo."
            return
        self._editingPoints = True
        try:
            node.RemoveNthControlPoint(node.GetNumberOfControlPoints() - 1)
        finally:
            self._editingPoints = False
        self.onClicksChanged()

    def hoveredControlPoint(self, node):
        """The control point of ``node`` under the mouse, as its markups widget marked it on the last move (-1:
        none). A press there belongs to the markups widget, which moves the point (right-click: its menu)."""
        display = node.GetDisplayNode()
        if display is None or node.GetLocked() or not display.GetVisibility():
            return -1
        index = display.GetActiveControlPoint()
        return index if 0 <= index < node.GetNumberOfControlPoints() else -1

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        """Clicks and keys in slice views. Returning False passes the event on: the Segment Editor observes the
        views before the markups widgets (qMRMLSegmentEditorWidget, priority 1.0 against 0), so a press on an
        existing point, Delete on a hovered one and right-clicks must be let through to reach them."""
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        if eventId == vtk.vtkCommand.KeyPressEvent:
            return self.onKey(str(callerInteractor.GetKeySym() or ""))
        if eventId != vtk.vtkCommand.LeftButtonPressEvent:
            return False
        if callerInteractor.GetShiftKey() or callerInteractor.GetAltKey():
            return False  # Slicer's own: Shift moves the crosshair, Alt(+Shift/Ctrl) drags slice intersections
        node = self.promptsNode()
        if node is not None and self.hoveredControlPoint(node) >= 0:
            return False  # on an existing click: the markups widget drags it (the list is unlocked)
        ras = self.xyToRas(callerInteractor.GetEventPosition(), viewWidget)
        background = bool(callerInteractor.GetControlKey()) or \
            self.scriptedEffect.integerParameter("BackgroundClicks") != 0
        self.addClick(ras, viewWidget.mrmlSliceNode(), background)
        return True

    def onKey(self, key):
        if key.lower() == TOGGLE_KIND_KEY:
            background = self.scriptedEffect.integerParameter("BackgroundClicks") == 0
            self.scriptedEffect.setParameter("BackgroundClicks", int(background))
            self.statusLabel.text = ("Clicks now mark the background" if background else
                                     "Clicks now mark the structure") + f" ({TOGGLE_KIND_KEY.upper()} toggles)."
            return True
        if key.lower() == UNDO_CLICK_KEY:
            self.onUndoClick()
            return True
        return False  # Delete / BackSpace on a hovered point: the markups widget deletes it

    def addClick(self, ras, sliceNode, background):
        """A click of the right kind at ``ras``, unless its view slices along another axis than the list's clicks."""
        _, _, gui, _ = core()
        node = self.promptsNode(create=True)
        sliceToRas = sliceNode.GetSliceToRAS()
        normal = [sliceToRas.GetElement(row, 2) for row in range(3)]
        refusal = self.otherAxisRefusal(node, normal)
        if refusal:
            self.statusLabel.text = refusal
            return
        kind = gui.click_kind(background, node.GetAttribute(PREVIEWED_ATTRIBUTE) == "1")
        index = node.AddControlPointWorld(vtk.vtkVector3d(*ras), "-" if kind == gui.BACKGROUND else "+")
        node.SetNthControlPointDescription(index, gui.click_description(kind))
        node.SetNthControlPointSelected(index, kind != gui.BACKGROUND)
        node.SetAttribute(VIEW_NORMAL_ATTRIBUTE, " ".join(f"{v:.6f}" for v in normal))
        self.onClicksChanged()

    def otherAxisRefusal(self, node, normal):
        """Why a click in a view with this normal is refused ("" when it is not): SPD slices one run along one axis,
        and clicks read along another axis than the view they were placed in would land on the wrong slices."""
        _, prompts, _, adapter = core()
        if node.GetNumberOfControlPoints() == 0:
            return ""
        try:
            volume, voxelPrompts, _, _ = self.inputs(limit=False)
        except Exception:  # noqa: BLE001 - no volume, or every click outside it: nothing to disagree with
            return ""
        import numpy as np

        sliceToRas = np.eye(4)
        sliceToRas[:3, 2] = normal
        axis = adapter.axis_from_slice_to_ras(sliceToRas, volume)
        if axis == voxelPrompts.axis:
            return ""
        return (f"Not placed: this point list's clicks are on {prompts.axis_name(voxelPrompts.axis, volume)} slices "
                f"and this view shows {prompts.axis_name(axis, volume)} slices; SPD segments along one direction. "
                "Click in a view of the same direction, or Clear the clicks to start over in this one.")

    def onClicksChanged(self):
        """After a click, a move or a deletion: the axis and counts in the status line, then the preview updated
        (Auto-update) or the engine set to work ahead."""
        _, prompts, gui, _ = core()
        self.updateButtons()
        try:
            volume, voxelPrompts, model, options = self.inputs()
        except Exception as exc:  # noqa: BLE001 - no points left, no source volume: say so
            self.statusLabel.text = gui.error_line(exc)
            return
        self.axisInfo = (int(voxelPrompts.axis), int(volume.shape[voxelPrompts.axis]))
        self.updateSliceRangeWidgets()
        node = self.promptsNode()
        kinds = [gui.kind_of_description(node.GetNthControlPointDescription(i))
                 for i in range(node.GetNumberOfControlPoints())]
        self.statusLabel.text = gui.clicks_line(kinds, prompts.axis_note(voxelPrompts, volume))
        if self.scriptedEffect.integerParameter("AutoUpdate"):
            self.startPreview((volume, voxelPrompts, model, options))
        else:
            self.ahead = gui.engine().encode_ahead(volume, voxelPrompts, model, options)

    # ------------------------------------------------------------------ run
    def options(self, pipeline, limit=True):
        effect = self.scriptedEffect
        sliceRange = None
        if limit and effect.integerParameter("LimitSlices"):
            sliceRange = (effect.integerParameter("FirstSlice"), effect.integerParameter("LastSlice"))
        return pipeline.SegmentOptions(mode=effect.parameter("Mode"), tau=effect.doubleParameter("Tau"),
                                       neighbours=effect.integerParameter("Neighbours"), slice_range=sliceRange,
                                       return_saliency=bool(effect.integerParameter("ShowSaliency"))).validate()

    def viewAxis(self, node, volume, adapter):
        """The axis of the slice view the list's clicks were placed in; None for a list made elsewhere."""
        text = node.GetAttribute(VIEW_NORMAL_ATTRIBUTE) if node is not None else None
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

    def inputs(self, limit=True):
        """(volume, voxel prompts, model, options) of a run, read from MRML on the main thread. Without a view
        (a picked point list) the axis comes from the clicks, preferring the model's trained orientations."""
        pipeline, prompts, gui, adapter = core()
        volume = self.sourceVolume(adapter)
        node = self.promptsNode()
        points = adapter.points_from_markups(node)
        model = self.modelName()
        axis = self.viewAxis(node, volume, adapter)
        preferred = pipeline.trained_axes(gui.model_header(model) or {}, volume) if axis is None else ()
        voxelPrompts = prompts.to_voxels(points, volume, axis=axis, preferred_axes=preferred)
        return volume, voxelPrompts, model, self.options(pipeline, limit)

    def modelName(self):
        """The chosen model file, else the chosen menu entry."""
        return self.textParameter("ModelFile") or self.scriptedEffect.parameter("Model")

    def onPreview(self):
        self.startPreview()

    def startPreview(self, inputs=None):
        """Send a Preview to the engine (a Preview still running is cancelled: the newest clicks win). The preview
        shown stays until the new one arrives."""
        _, _, gui, adapter = core()
        if self.run is not None:
            self.run.cancel()
            self.run = None
        try:
            adapter.check_slicer_version()
            volume, voxelPrompts, model, options = inputs or self.inputs()
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self.statusLabel.text = gui.error_line(exc) if self.promptsNode() else \
                "Click on the structure in a slice view first."
            return
        self.run, self.runVolume = gui.engine().segment(volume, voxelPrompts, model, options), volume
        self.runPoints = self.promptsNode()
        self.statusLabel.text = "Updating the preview..." if self.preview else \
            f"Segmenting {len(voxelPrompts)} points..."
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
            self.statusLabel.text = gui.progress_line(self.run, "Updating the preview" if self.preview else
                                                      "Segmenting")
            return
        run, volume, points, self.run, self.runVolume, self.runPoints = \
            self.run, self.runVolume, self.runPoints, None, None, None
        self.progressBar.visible = False
        try:
            self.showPreview(run.result(), volume)
        except Exception as exc:
            self.statusLabel.text = gui.error_line(exc)  # Cancelled, InputError, the engine died: nothing written
            if not type(exc).__module__.startswith("SPDSegmentLib"):
                logging.exception("SPD preview failed")
        else:
            if points is not None and points.GetScene() is not None:
                points.SetAttribute(PREVIEWED_ATTRIBUTE, "1")  # from now on, new clicks are corrections
        self.updateButtons()

    def showPreview(self, result, volume):
        """Show ``result``: the preview segmentation (its nodes reused, so Auto-update does not flicker), the
        saliency overlay and the audit lists, as the Show options ask."""
        _, _, gui, adapter = core()
        editorNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = editorNode.GetSegmentationNode()
        segmentId = editorNode.GetSelectedSegmentID()
        nodes = dict(self.preview["nodes"]) if self.preview else {}
        nodes = {k: n for k, n in nodes.items() if n is not None and n.GetScene() is not None}
        previewNode = nodes.get("preview")
        if previewNode is None:
            previewNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", PREVIEW_NAME)
            previewNode.CreateDefaultDisplayNodes()
            previewNode.SetHideFromEditors(True)
            previewNode.GetSegmentation().AddEmptySegment("preview", "SPD preview")
            nodes["preview"] = previewNode
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId) if segmentId else None
        previewNode.GetSegmentation().GetSegment("preview").SetColor(*(segment.GetColor() if segment else (1, 1, 0)))
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            adapter.oriented_image(result.mask, volume), previewNode, "preview")
        if self.scriptedEffect.integerParameter("ShowSaliency") and result.saliency is not None:
            if nodes.get("saliency") is None:
                composite = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
                if composite is not None:
                    self.previousForeground = (composite.GetForegroundVolumeID(), composite.GetForegroundOpacity())
            nodes["saliency"] = adapter.saliency_to_volume_node(result, volume, slicer.mrmlScene,
                                                                node=nodes.get("saliency"))
            slicer.util.setSliceViewerLayers(foreground=nodes["saliency"], foregroundOpacity=0.4)
        elif nodes.get("saliency") is not None:
            self.restoreForeground()
            slicer.mrmlScene.RemoveNode(nodes.pop("saliency"))
        audit = {k: n for k, n in nodes.items() if k in adapter.AUDIT_COLOURS}
        if self.scriptedEffect.integerParameter("ShowAudit") and result.audit:
            nodes.update(adapter.audit_to_markups_nodes(result, volume, slicer.mrmlScene, nodes=audit))
        else:
            for key, node in audit.items():
                slicer.mrmlScene.RemoveNode(nodes.pop(key))
        self.preview = {"result": result, "volume": volume, "nodes": nodes,
                        "segmentation": segmentationNode.GetID(),
                        "source": editorNode.GetSourceVolumeNode().GetID() if editorNode.GetSourceVolumeNode() else ""}
        self.updatePreviewDisplay()
        self.statusLabel.text = "Preview: " + gui.summary(result)

    def updatePreviewDisplay(self):
        """The preview's opacity and 3D surface as the display options say."""
        node = self.preview["nodes"].get("preview") if self.preview else None
        if node is None or node.GetScene() is None or node.GetDisplayNode() is None:
            return
        node.GetDisplayNode().SetOpacity(self.scriptedEffect.doubleParameter("PreviewOpacity"))
        show3D = self.scriptedEffect.integerParameter("PreviewShow3D") != 0
        hasSurface = node.GetSegmentation().ContainsRepresentation(
            slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName())
        if show3D and not hasSurface:
            node.CreateClosedSurfaceRepresentation()
        elif hasSurface and not show3D:
            node.RemoveClosedSurfaceRepresentation()

    def onApply(self):
        """Write the preview into the selected segment where SPD ran (its decoded slices; the segment keeps its
        content elsewhere), through the Segment Editor: its masking and overwrite settings apply, and one
        Undo reverts it."""
        if self.preview is None:
            return
        _, _, _, adapter = core()
        editorNode = self.scriptedEffect.parameterSetNode()
        if not editorNode.GetSelectedSegmentID():
            self.statusLabel.text = "Select the segment to write into (in the segment list), then Apply."
            return
        if not self.scriptedEffect.confirmCurrentSegmentVisible():
            return  # the user cancelled (the segment is hidden)
        if self.run is not None:  # an update in flight would replace what is being applied
            self.run.cancel()
            self.run = None
        result, volume = self.preview["result"], self.preview["volume"]
        segmentationNode = editorNode.GetSegmentationNode()
        reference = self.scriptedEffect.defaultModifierLabelmap()
        modes = {"add": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd,
                 "remove": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeRemove,
                 "set": slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet}
        ranOn = adapter.ran_on(result)
        steps = [(adapter.modifier_labelmap(array, volume, segmentationNode, reference), modes[mode])
                 for array, mode in adapter.modification_steps(result.mask, "set", ranOn)]
        self.scriptedEffect.saveStateForUndo()
        for modifier, mode in steps:
            self.scriptedEffect.modifySelectedSegmentByLabelmap(modifier, mode)
        self.clearPreview()
        self.statusLabel.text = f"Applied on {len(ranOn[1]) if ranOn else 'all'} slices (Undo reverts it)."

    def onCancel(self):
        if self.run is not None:
            self.run.cancel()  # the handle ends now; the engine stops at its next slice
            self.poll()
        else:
            self.clearPreview()
            self.statusLabel.text = "Preview discarded; the segment is unchanged."

    def restoreForeground(self):
        if self.previousForeground is not None:
            foregroundId, opacity = self.previousForeground
            foreground = slicer.mrmlScene.GetNodeByID(foregroundId) if foregroundId else None
            slicer.util.setSliceViewerLayers(foreground=foreground, foregroundOpacity=opacity)
            self.previousForeground = None

    def clearPreview(self):
        if self.preview is not None:
            self.restoreForeground()
            for node in self.preview["nodes"].values():
                if node is not None and node.GetScene() is not None:
                    slicer.mrmlScene.RemoveNode(node)
            self.preview = None
        self.updateButtons()

    def previewStillFits(self):
        """A kept preview belongs to the segmentation and source volume it was made for, and needs its nodes."""
        editorNode = self.scriptedEffect.parameterSetNode()
        source = editorNode.GetSourceVolumeNode()
        node = self.preview["nodes"].get("preview")
        return (node is not None and node.GetScene() is not None and editorNode.GetSegmentationNode() is not None
                and editorNode.GetSegmentationNode().GetID() == self.preview["segmentation"]
                and (source.GetID() if source is not None else "") == self.preview["source"])

    def preloadModel(self):
        """Have the engine load (and on first use convert) the chosen model, downloading nothing, while the
        user places the first clicks. A checkpoint still to download is named in the status line."""
        self.preload = core()[2].engine().load_model(self.modelName(), allow_download=False)

    def activate(self):
        """Selecting the effect: the engine starts and loads the model; a preview kept from before is shown
        again, as Grow from seeds keeps its own, if it still fits the segmentation and source volume."""
        self.active = True
        if self._sceneObserver is None:
            self._sceneObserver = slicer.mrmlScene.AddObserver(slicer.mrmlScene.StartCloseEvent,
                                                               self.onSceneStartClose)
        if self.preview is not None and not self.previewStillFits():
            self.clearPreview()
        self.observePoints(self.promptsNode())
        self.preloadModel()  # starts the engine on first use
        self.timer.start()
        self.updateButtons()

    def deactivate(self):
        """Another effect: work in flight stops, the preview stays (Apply or Cancel it on return)."""
        self.active = False
        self.stopWork()
        self.observePoints(None)
        self._volumeCopy = (None, None)  # release the copy of the source volume (a kept preview holds its own)
        self.progressBar.visible = False
        self.updateButtons()

    def onSceneStartClose(self, caller=None, event=None):
        """The scene closes: its nodes and voxels go, so does everything held of them."""
        self.stopWork()
        self.observePoints(None)
        self.preview = self.previousForeground = self.axisInfo = None
        self._volumeCopy = (None, None)

    def stopWork(self):
        """Cancel what the engine does for this effect; a reply arriving later is dropped."""
        self.timer.stop()
        for handle in (self.run, self.ahead, self.preload):
            if handle is not None:
                handle.cancel()
        self.run = self.runVolume = self.runPoints = self.ahead = self.preload = None

    def cleanup(self):
        """The effect is being deleted: nothing may keep it alive (Slicer issue 7392): the timer, every signal
        connection and observer made here are undone, and the preview's nodes removed."""
        self.stopWork()
        self.timer.disconnect("timeout()", self.poll)
        for widget, signal, slot in self._connections:
            widget.disconnect(signal, slot)
        self._connections = []
        self.observePoints(None)
        if self._sceneObserver is not None:
            slicer.mrmlScene.RemoveObserver(self._sceneObserver)
            self._sceneObserver = None
        self.clearPreview()
        self._volumeCopy = (None, None)
