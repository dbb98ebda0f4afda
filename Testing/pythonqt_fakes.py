"""Qt, CTK and desktop-Slicer stand-ins that behave like PythonQt where the GUIs' correctness depends on it.

In Slicer, a widget setter emits its signal at once (``spin.value = 3`` runs every slot connected to
``valueChanged(int)`` before the next line), ``blockSignals`` silences that, and an effect's ``setParameter``
runs ``updateGUIFromMRML`` of every effect before it returns. MagicMock widgets do none of this, so bugs
that live in that order (a slider refreshed from an old parameter before it is read) pass unseen. These
fakes do it, on real MRML (slicer-core):

- widgets (:data:`QT_CLASSES`, :data:`CTK_CLASSES`, ``qMRMLNodeComboBox``) whose setters emit synchronously,
  only when the value changes, clamped as Qt clamps; ``connect``/``disconnect`` in PythonQt's string form and
  the ``widget.signal.connect`` form; a slot gets as many of the signal's arguments as it takes;
- :func:`load_ui`: a Qt Designer ``.ui`` file built into those widgets (properties in file order, as uic sets
  them, and the file's signal/slot connections), so a renamed or missing widget fails a test;
- :class:`ScriptedEffect`: the C++ half of a scripted segment editor effect on a real segment editor node;
- :func:`parameter_node_wrapper_module`: ``slicer.parameterNodeWrapper`` (typed parameters in a real
  ``vtkMRMLScriptedModuleNode``, ``connectGui`` through the widgets' ``SlicerParameterName`` property, GUI
  refreshed from the node on every change, as Slicer's does);
- :class:`SegmentEditorWidget`: the Segment Editor module's editor widget, its undo kept by its own editor logic.

Anything not here raises AttributeError, so a typo in a GUI file fails instead of passing silently.
"""
from __future__ import annotations

import inspect
import types
import typing
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional


# ---------------------------------------------------------------- signals

def _positional_capacity(slot: Callable) -> Optional[int]:
    """How many positional arguments ``slot`` takes (None: any number), as PythonQt decides what to pass."""
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return None
    count = 0
    for parameter in parameters:
        if parameter.kind == parameter.VAR_POSITIONAL:
            return None
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            count += 1
    return count


class Signal:
    """One Qt signal of one object: slots run synchronously, in connection order, unless signals are blocked."""

    def __init__(self, owner: "QObject", name: str):
        self.owner, self.name, self.slots = owner, name, []

    def connect(self, slot: Callable) -> bool:
        self.slots.append(slot)
        return True

    def disconnect(self, slot: Optional[Callable] = None) -> bool:
        if slot is None:
            found = bool(self.slots)
            self.slots.clear()
            return found
        for index, connected in enumerate(self.slots):
            if connected == slot:
                del self.slots[index]
                return True
        return False

    def emit(self, *args) -> None:
        if self.owner.signalsBlocked():
            return
        for slot in list(self.slots):
            capacity = _positional_capacity(slot)
            slot(*(args if capacity is None else args[:capacity]))


def _signal_name(signature: str) -> str:
    return signature.split("(", 1)[0].strip()


# ---------------------------------------------------------------- objects and widgets

class QObject:
    SIGNALS: tuple = ("destroyed",)

    def __init__(self, *args, **kwargs):
        self.__dict__["_signals"] = {}
        self.__dict__["_properties"] = {}
        self.__dict__["_blocked"] = False
        self.__dict__["_children"] = []
        self.objectName = ""
        parent = args[0] if args and isinstance(args[0], QObject) else None
        if parent is not None:
            parent._children.append(self)

    def __getattr__(self, name):
        if name in self.all_signals():
            return self.signal(name)
        raise AttributeError(f"{type(self).__name__} fake has no attribute {name!r}")

    @classmethod
    def all_signals(cls) -> set:
        return {s for klass in cls.__mro__ for s in getattr(klass, "SIGNALS", ())}

    def signal(self, name: str) -> Signal:
        if name not in self.all_signals():
            raise AttributeError(f"{type(self).__name__} has no signal {name!r}")
        return self._signals.setdefault(name, Signal(self, name))

    def connect(self, signature: str, slot: Callable) -> bool:
        """PythonQt's ``obj.connect("valueChanged(int)", slot)``."""
        return self.signal(_signal_name(signature)).connect(slot)

    def disconnect(self, signature: str, slot: Optional[Callable] = None) -> bool:
        return self.signal(_signal_name(signature)).disconnect(slot)

    def connections(self) -> int:
        """How many slots are connected to this object's signals (tests check a cleanup leaves none)."""
        return sum(len(s.slots) for s in self._signals.values())

    def emit(self, name: str, *args) -> None:
        self.signal(name).emit(*args)

    def blockSignals(self, block: bool) -> bool:
        was = self._blocked
        self.__dict__["_blocked"] = bool(block)
        return was

    def signalsBlocked(self) -> bool:
        return self._blocked

    def property(self, name: str):
        return self._properties.get(name)

    def setProperty(self, name: str, value) -> bool:
        self._properties[name] = value
        return True

    def setObjectName(self, name: str) -> None:
        self.objectName = name

    def children(self) -> list:
        return list(self._children)

    def findChildren(self, kind=None) -> list:
        found = []
        for child in self._children:
            if kind is None or isinstance(child, kind):
                found.append(child)
            found.extend(child.findChildren(kind))
        return found

    def findChild(self, kind, name: str = ""):
        return next((c for c in self.findChildren(kind) if not name or c.objectName == name), None)

    def setParent(self, parent) -> None:
        if parent is not None:
            parent._children.append(self)


class QWidget(QObject):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.enabled, self.visible, self.toolTip = True, True, ""
        self.__dict__["_layout"] = None

    def setEnabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def isEnabled(self) -> bool:
        return self.enabled

    def setVisible(self, visible: bool) -> None:
        self.visible = bool(visible)

    def isVisible(self) -> bool:
        return self.visible

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False

    def setToolTip(self, text: str) -> None:
        self.toolTip = str(text)

    def isWidgetType(self) -> bool:
        return True

    def setLayout(self, layout) -> None:
        self.__dict__["_layout"] = layout
        self._children.append(layout)

    def layout(self):
        return self._layout


class QFrame(QWidget):
    pass


class QLabel(QWidget):
    def __init__(self, text: str = "", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.text, self.wordWrap = str(text), False

    def setText(self, text: str) -> None:
        self.text = str(text)


class QAbstractButton(QWidget):
    SIGNALS = ("clicked", "toggled", "pressed", "released")
    ALWAYS_CHECKABLE = False

    def __init__(self, text: str = "", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.text = str(text)
        self.__dict__["_checked"] = False
        self.__dict__["_checkable"] = self.ALWAYS_CHECKABLE

    @property
    def checkable(self) -> bool:
        return self._checkable

    @checkable.setter
    def checkable(self, value: bool) -> None:
        self.__dict__["_checkable"] = bool(value)

    def setCheckable(self, value: bool) -> None:
        self.checkable = value

    @property
    def checked(self) -> bool:
        return self._checked

    @checked.setter
    def checked(self, value: bool) -> None:
        value = bool(value) and self._checkable
        if value == self._checked:
            return
        self.__dict__["_checked"] = value
        self._emit_check(value)

    def _emit_check(self, value: bool) -> None:
        self.emit("toggled", value)

    def setChecked(self, value: bool) -> None:
        self.checked = value

    def isChecked(self) -> bool:
        return self.checked

    def setText(self, text: str) -> None:
        self.text = str(text)

    def click(self) -> None:
        """A user's click: nothing when disabled; a checkable button toggles first, then ``clicked``."""
        if not self.enabled:
            return
        if self._checkable:
            self.checked = not self._checked
        self.emit("clicked", self._checked)


class QPushButton(QAbstractButton):
    pass


class QToolButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    SIGNALS = ("stateChanged",)
    ALWAYS_CHECKABLE = True

    def _emit_check(self, value: bool) -> None:
        self.emit("stateChanged", 2 if value else 0)
        self.emit("toggled", value)

    def checkState(self) -> int:
        return 2 if self.checked else 0

    def setCheckState(self, state: int) -> None:
        self.checked = int(state) != 0


class QRadioButton(QAbstractButton):
    ALWAYS_CHECKABLE = True


class QSpinBox(QWidget):
    SIGNALS = ("valueChanged", "editingFinished")
    CAST = int

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__.update(_value=self.CAST(0), _minimum=self.CAST(0), _maximum=self.CAST(99))
        self.singleStep, self.suffix, self.prefix, self.specialValueText = self.CAST(1), "", "", ""

    def _clamp(self, value):
        return min(max(self.CAST(value), self._minimum), self._maximum)

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value) -> None:
        value = self._clamp(value)
        if value == self._value:
            return
        self.__dict__["_value"] = value
        self.emit("valueChanged", value)

    def setValue(self, value) -> None:
        self.value = value

    @property
    def minimum(self):
        return self._minimum

    @minimum.setter
    def minimum(self, value) -> None:
        self.setRange(value, max(self.CAST(value), self._maximum))

    @property
    def maximum(self):
        return self._maximum

    @maximum.setter
    def maximum(self, value) -> None:
        self.setRange(min(self.CAST(value), self._minimum), value)

    def setMinimum(self, value) -> None:
        self.minimum = value

    def setMaximum(self, value) -> None:
        self.maximum = value

    def setRange(self, minimum, maximum) -> None:
        """As Qt: the range is set, then the value clamped into it (emitting when that changes it)."""
        self.__dict__.update(_minimum=self.CAST(minimum), _maximum=max(self.CAST(minimum), self.CAST(maximum)))
        self.value = self._value

    def setSuffix(self, text: str) -> None:
        self.suffix = str(text)

    def setPrefix(self, text: str) -> None:
        self.prefix = str(text)

    def setSingleStep(self, step) -> None:
        self.singleStep = self.CAST(step)


class QDoubleSpinBox(QSpinBox):
    CAST = float

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decimals = 2

    def _clamp(self, value):
        return round(super()._clamp(value), int(self.decimals))


class ctkSliderWidget(QDoubleSpinBox):
    """ctkSliderWidget: range 0..99, two decimals, ``valueChanged(double)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pageStep, self.spinBoxVisible, self.tracking = 10.0, True, True


class QComboBox(QWidget):
    SIGNALS = ("currentIndexChanged", "currentTextChanged", "activated")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__.update(_items=[], _index=-1)
        self.editable = False

    def count(self) -> int:
        return len(self._items)

    def _set_index(self, index: int) -> None:
        if index == self._index:
            return
        self.__dict__["_index"] = index
        self.emit("currentIndexChanged", index)
        self.emit("currentTextChanged", self.currentText)

    def addItem(self, text: str, data=None) -> None:
        """As Qt: the first item added to an empty combo box becomes current (and says so)."""
        self._items.append((str(text), data))
        if self._index < 0:
            self._set_index(0)

    def addItems(self, texts) -> None:
        for text in texts:
            self.addItem(text)

    def clear(self) -> None:
        self._items.clear()
        self._set_index(-1)

    @property
    def currentIndex(self) -> int:
        return self._index

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        index = int(index)
        self._set_index(index if -1 <= index < len(self._items) else -1)

    def setCurrentIndex(self, index: int) -> None:
        self.currentIndex = index

    @property
    def currentText(self) -> str:
        return self._items[self._index][0] if self._index >= 0 else ""

    @currentText.setter
    def currentText(self, text: str) -> None:
        self.setCurrentText(text)

    def setCurrentText(self, text: str) -> None:
        index = self.findText(text)
        if index >= 0:
            self.currentIndex = index

    @property
    def currentData(self):
        return self._items[self._index][1] if self._index >= 0 else None

    def itemText(self, index: int) -> str:
        return self._items[index][0]

    def itemData(self, index: int):
        return self._items[index][1]

    def findText(self, text: str) -> int:
        return next((i for i, (t, _) in enumerate(self._items) if t == str(text)), -1)

    def findData(self, data) -> int:
        return next((i for i, (_, d) in enumerate(self._items) if d == data), -1)


class ctkComboBox(QComboBox):
    pass


def _emitting(attribute: str, signal: str, convert=str):
    """A property whose setter emits ``signal`` with the new value, only when it changes (as Qt's setters do)."""

    def set_value(self, value) -> None:
        value = convert(value)
        if value != self.__dict__.get(attribute):
            self.__dict__[attribute] = value
            self.emit(signal, value)

    return property(lambda self: self.__dict__.get(attribute, convert()), set_value)


class QLineEdit(QWidget):
    SIGNALS = ("textChanged", "editingFinished", "returnPressed")
    text = _emitting("_text", "textChanged")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.readOnly, self.placeholderText = False, ""

    def setText(self, value: str) -> None:
        self.text = value


class ctkPathLineEdit(QWidget):
    SIGNALS = ("currentPathChanged", "validInputChanged")
    Dirs, Files, Drives, NoDot, NoDotDot, Readable, Writable, Executable = 1, 2, 4, 8, 16, 32, 64, 128
    currentPath = _emitting("_path", "currentPathChanged")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.filters, self.nameFilters, self.label = self.Files, [], ""

    def setCurrentPath(self, value: str) -> None:
        self.currentPath = value


class QProgressBar(QWidget):
    SIGNALS = ("valueChanged",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.minimum, self.maximum, self.value, self.format, self.textVisible = 0, 100, 0, "%p%", True

    def setValue(self, value: int) -> None:
        self.value = int(value)

    def setMaximum(self, value: int) -> None:
        self.maximum = int(value)

    def setMinimum(self, value: int) -> None:
        self.minimum = int(value)

    def setFormat(self, text: str) -> None:
        self.format = str(text)

    def reset(self) -> None:
        self.value = self.minimum


class QPlainTextEdit(QWidget):
    SIGNALS = ("textChanged",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lines: List[str] = []
        self.readOnly, self.maximumBlockCount = False, 0

    def appendPlainText(self, text: str) -> None:
        self.lines.append(str(text))
        if self.maximumBlockCount:
            del self.lines[:-self.maximumBlockCount]

    def setMaximumBlockCount(self, count: int) -> None:
        self.maximumBlockCount = int(count)

    def clear(self) -> None:
        self.lines.clear()

    def toPlainText(self) -> str:
        return "\n".join(self.lines)

    @property
    def plainText(self) -> str:
        return self.toPlainText()


class ctkCollapsibleButton(QAbstractButton):
    SIGNALS = ("contentsCollapsed",)
    collapsed = _emitting("_collapsed", "contentsCollapsed", bool)


class QLayout(QObject):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if args and isinstance(args[0], QWidget):
            args[0].__dict__["_layout"] = self
        self.items: List[Any] = []

    def _add(self, item) -> None:
        if item is not None and not isinstance(item, str):
            self.items.append(item)
            if isinstance(item, QObject) and item not in self._children:
                self._children.append(item)

    def addWidget(self, widget, *args) -> None:
        self._add(widget)

    def addLayout(self, layout, *args) -> None:
        self._add(layout)

    def addStretch(self, *args) -> None:
        pass

    def addSpacing(self, *args) -> None:
        pass

    def addRow(self, *items) -> None:
        for item in items:
            self._add(item)

    def setContentsMargins(self, *args) -> None:
        pass


class QHBoxLayout(QLayout):
    pass


class QVBoxLayout(QLayout):
    pass


class QFormLayout(QLayout):
    pass


class QGridLayout(QLayout):
    pass


class QTimer(QObject):
    """``start``/``stop`` only record; a test runs the slot (or ``timeout.emit()``) when it wants a tick."""
    SIGNALS = ("timeout",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.interval, self.singleShot, self.active = 0, False, False

    def setInterval(self, milliseconds: int) -> None:
        self.interval = int(milliseconds)

    def setSingleShot(self, value: bool) -> None:
        self.singleShot = bool(value)

    def start(self, milliseconds: Optional[int] = None) -> None:
        if milliseconds is not None:
            self.interval = int(milliseconds)
        self.active = True

    def stop(self) -> None:
        self.active = False

    def isActive(self) -> bool:
        return self.active


class QIcon:
    def __init__(self, *args):
        self.args = args


class QProcessEnvironment:
    def __init__(self, values=None):
        self.values: Dict[str, str] = dict(values or {})

    @staticmethod
    def systemEnvironment() -> "QProcessEnvironment":
        import os

        return QProcessEnvironment(os.environ)

    def value(self, name: str, default: str = "") -> str:
        return self.values.get(name, default)

    def insert(self, name: str, value: str) -> None:
        self.values[name] = str(value)


class QProcess(QObject):
    """Records the program it is asked to start; ``finish`` (tests) ends it like the real one would."""
    SIGNALS = ("readyReadStandardOutput", "finished", "started", "errorOccurred")
    NotRunning, Starting, Running = 0, 1, 2
    SeparateChannels, MergedChannels = 0, 1
    NormalExit, CrashExit = 0, 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started_with, self.output, self._state = None, b"", self.NotRunning
        self.environment = self.channel_mode = None

    def setProcessChannelMode(self, mode) -> None:
        self.channel_mode = mode

    def setProcessEnvironment(self, environment) -> None:
        self.environment = environment

    def start(self, program: str, arguments) -> None:
        self.started_with, self._state = (program, list(arguments)), self.Running

    def state(self) -> int:
        return self._state

    def kill(self) -> None:
        self.finish(-9, self.CrashExit)

    def readAllStandardOutput(self) -> bytes:
        data, self.output = self.output, b""
        return data

    def write_output(self, data: bytes) -> None:
        self.output += data
        self.emit("readyReadStandardOutput")

    def finish(self, code: int, status: int = 0) -> None:
        self._state = self.NotRunning
        self.emit("finished", code, status)


class qMRMLWidget(QWidget):
    SIGNALS = ("mrmlSceneChanged",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["_scene"] = None

    def setMRMLScene(self, scene) -> None:
        self.__dict__["_scene"] = scene
        self.emit("mrmlSceneChanged", scene)

    def mrmlScene(self):
        return self._scene


class qMRMLNodeComboBox(qMRMLWidget):
    """The node selector on a real scene: ``nodeTypes``, none / add / remove flags, ``currentNodeChanged``.
    With ``noneEnabled`` off it selects the first matching node when the scene is set, as Slicer's does."""
    SIGNALS = ("currentNodeChanged", "currentNodeIDChanged", "nodeAdded", "nodeActivated")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nodeTypes: List[str] = []
        self.noneEnabled = self.addEnabled = self.removeEnabled = self.renameEnabled = False
        self.showHidden, self.showChildNodeTypes, self.selectNodeUponCreation = False, True, True
        self.noneDisplay, self.baseName = "None", ""
        self.__dict__["_node"] = None

    def nodes(self) -> list:
        scene = self.mrmlScene()
        if scene is None:
            return []
        found = []
        for index in range(scene.GetNumberOfNodes()):
            node = scene.GetNthNode(index)
            if any(node.IsA(t) if self.showChildNodeTypes else node.GetClassName() == t for t in self.nodeTypes) \
                    and (self.showHidden or not node.GetHideFromEditors()):
                found.append(node)
        return found

    def setMRMLScene(self, scene) -> None:
        self.__dict__["_scene"] = scene
        if self._node is not None and (scene is None or self._node.GetScene() is not scene):
            self.setCurrentNode(None)
        if self._node is None and not self.noneEnabled and self.nodes():
            self.setCurrentNode(self.nodes()[0])

    def currentNode(self):
        node = self._node
        return node if node is not None and node.GetScene() is self.mrmlScene() else None

    def currentNodeID(self) -> str:
        node = self.currentNode()
        return node.GetID() if node is not None else ""

    def setCurrentNode(self, node) -> None:
        if node is self.currentNode():
            return
        self.__dict__["_node"] = node
        self.emit("currentNodeChanged", node)
        self.emit("currentNodeIDChanged", node.GetID() if node is not None else "")

    def setCurrentNodeID(self, node_id: str) -> None:
        scene = self.mrmlScene()
        self.setCurrentNode(scene.GetNodeByID(node_id) if scene is not None and node_id else None)


QT_CLASSES = {c.__name__: c for c in (
    QObject, QWidget, QFrame, QLabel, QAbstractButton, QPushButton, QToolButton, QCheckBox, QRadioButton, QSpinBox,
    QDoubleSpinBox, QComboBox, QLineEdit, QProgressBar, QPlainTextEdit, QLayout, QHBoxLayout, QVBoxLayout,
    QFormLayout, QGridLayout, QTimer, QIcon, QProcess, QProcessEnvironment)}
CTK_CLASSES = {c.__name__: c for c in (ctkSliderWidget, ctkPathLineEdit, ctkCollapsibleButton, ctkComboBox)}
SLICER_WIDGET_CLASSES = {c.__name__: c for c in (qMRMLWidget, qMRMLNodeComboBox)}


def qt_module() -> types.ModuleType:
    module = types.ModuleType("qt")
    module.__dict__.update(QT_CLASSES)
    module.Qt = types.SimpleNamespace(Unchecked=0, PartiallyChecked=1, Checked=2)
    return module


def ctk_module() -> types.ModuleType:
    module = types.ModuleType("ctk")
    module.__dict__.update(CTK_CLASSES)
    return module


# ---------------------------------------------------------------- .ui files

def _property_value(element):
    """A Designer property's value element as Python (string, bool, number, double, stringlist, enum, set)."""
    tag, text = element.tag, (element.text or "").strip()
    if tag == "bool":
        return text == "true"
    if tag == "number":
        return int(text)
    if tag == "double":
        return float(text)
    if tag == "stringlist":
        return [(s.text or "") for s in element.findall("string")]
    if tag in ("enum", "set"):
        return text
    if tag == "string":
        return element.text or ""
    return None


def _apply_property(widget, name: str, value, dynamic: bool) -> None:
    if dynamic:
        widget.setProperty(name, value)
        return
    if isinstance(value, str) and "::" in value:  # e.g. ctkPathLineEdit::Dirs|ctkPathLineEdit::Writable
        flags = 0
        for part in value.split("|"):
            flags |= getattr(type(widget), part.split("::")[-1].strip(), 0)
        value = flags
    if name in ("geometry", "sizePolicy", "minimumSize", "maximumSize", "alignment", "orientation"):
        return  # layout only
    setattr(widget, name, value)


def load_ui(path) -> QWidget:
    """A ``.ui`` file as fake widgets: every widget of its class (an unknown class fails), its properties set in
    file order as uic sets them, its layouts holding their items, its ``<connections>`` made."""
    classes = {**QT_CLASSES, **CTK_CLASSES, **SLICER_WIDGET_CLASSES}
    root_element = ElementTree.parse(str(path)).getroot()
    by_name: Dict[str, QObject] = {}

    def build(element, parent):
        kind = element.get("class")
        if kind not in classes:
            raise AssertionError(f"{Path(path).name}: widget class {kind!r} has no fake in pythonqt_fakes")
        widget = classes[kind](parent) if element.tag == "widget" else classes[kind]()
        widget.objectName = element.get("name", "")
        if widget.objectName:
            by_name[widget.objectName] = widget
        for child in element:
            if child.tag == "property":
                value_element = next(iter(child), None)
                if value_element is not None:
                    _apply_property(widget, child.get("name"), _property_value(value_element),
                                    child.get("stdset") == "0")
            elif child.tag == "layout":
                layout = build(child, None)
                widget.setLayout(layout) if isinstance(widget, QWidget) else widget._add(layout)
            elif child.tag == "widget":
                build(child, widget)
            elif child.tag == "item":
                for item in child:
                    if item.tag in ("widget", "layout"):
                        built = build(item, None)
                        widget._add(built)
        return widget

    root = build(root_element.find("widget"), None)
    for connection in root_element.findall("connections/connection"):
        sender, receiver = by_name[connection.findtext("sender")], by_name[connection.findtext("receiver")]
        slot = getattr(receiver, _signal_name(connection.findtext("slot")))
        sender.connect(connection.findtext("signal"), slot)
    return root


def child_widget_variables(widget) -> types.SimpleNamespace:
    """``slicer.util.childWidgetVariables``: every named child widget as an attribute."""
    return types.SimpleNamespace(**{w.objectName: w for w in widget.findChildren(QWidget) if w.objectName})


# ---------------------------------------------------------------- the scripted effect's C++ half

class ScriptedEffect:
    """``qSlicerSegmentEditorScriptedEffect`` on a real segment editor node: parameters are its attributes
    "<effect>.<name>", an empty value is never stored, reading a missing one is recorded as the qCritical Slicer
    logs, and a changed value runs every registered effect's ``updateGUIFromMRML`` before it returns."""

    ModificationModeSet, ModificationModeAdd, ModificationModeRemove, ModificationModeRemoveAll = 0, 1, 2, 3

    def __init__(self, name: str, editor_node, editor_logic, observers: Optional[list] = None):
        self.name, self.editor_node, self.editor_logic = name, editor_node, editor_logic
        self.observers = observers if observers is not None else []  # effects told of parameter changes
        self.critical: List[str] = []  # parameters read while not defined
        self.confirm = 1  # confirmCurrentSegmentVisible: 0 = the user declined
        self.options: List[Any] = []  # widgets added to the options frame
        self.perSegment = self.requireSegments = True

    def parameterSetNode(self):
        return self.editor_node

    def _key(self, name: str) -> str:
        return f"{self.name}.{name}"

    def parameterDefined(self, name: str) -> bool:
        return bool(self.editor_node.GetAttribute(self._key(name)))

    def setParameterDefault(self, name: str, value) -> None:
        if not self.parameterDefined(name):
            self.setParameter(name, value)

    def setParameter(self, name: str, value) -> None:
        old = self.editor_node.GetAttribute(self._key(name))
        text = str(value)
        if (old is None and text == "") or text == old:
            return  # qSlicerSegmentEditorAbstractEffect::setCommonParameter: no change, no event
        self.editor_node.SetAttribute(self._key(name), text)
        for effect in list(self.observers):  # EffectParameterModified -> updateGUIFromMRML, synchronously
            effect.updateGUIFromMRML()

    def parameter(self, name: str) -> str:
        if not self.parameterDefined(name):
            self.critical.append(name)
            return ""
        return self.editor_node.GetAttribute(self._key(name))

    def integerParameter(self, name: str) -> int:
        return int(float(self.parameter(name) or 0))

    def doubleParameter(self, name: str) -> float:
        return float(self.parameter(name) or 0)

    def nodeReference(self, name: str):
        return self.editor_node.GetNodeReference(self._key(name))

    def setNodeReference(self, name: str, node) -> None:
        self.editor_node.SetNodeReferenceID(self._key(name), node.GetID() if node is not None else None)

    def addOptionsWidget(self, widget) -> None:
        self.options.append(widget)

    def addLabeledOptionsWidget(self, label: str, widget):
        self.options.append(widget)
        return widget

    def confirmCurrentSegmentVisible(self) -> int:
        return self.confirm

    def defaultModifierLabelmap(self):
        self.editor_logic.ResetModifierLabelmapToDefault()
        return self.editor_logic.GetModifierLabelmap()

    def saveStateForUndo(self) -> None:
        self.editor_logic.SaveStateForUndo()

    def modifySelectedSegmentByLabelmap(self, modifier, mode, *rest) -> None:
        """The overloads (modifier, mode[, bypassMasking]) and (modifier, mode, extent[, bypassMasking])."""
        extent = rest[0] if rest and isinstance(rest[0], (list, tuple)) else None
        bypass = bool(rest[-1]) if rest and not isinstance(rest[-1], (list, tuple)) else False
        if extent is not None and len(extent) != 6:
            raise AssertionError("modifySelectedSegmentByLabelmap: extent must have 6 int values")
        segmentation_node = self.editor_node.GetSegmentationNode()
        segment_id = self.editor_node.GetSelectedSegmentID() or ""
        logic = self.editor_logic  # the C++ side casts the effect's mode to the logic's enum
        mode = (logic.ModificationModeSet, logic.ModificationModeAdd, logic.ModificationModeRemove,
                logic.ModificationModeRemoveAll)[int(mode)]
        if extent is None:
            self.editor_logic.ModifySegmentByLabelmap(segmentation_node, segment_id, modifier, mode,
                                                      self.perSegment, bypass)
        else:
            self.editor_logic.ModifySegmentByLabelmap(segmentation_node, segment_id, modifier, mode, list(extent),
                                                      self.perSegment, bypass)


def build_effect(effect_class, editor_node, editor_logic, name: str = "SPD"):
    """A scripted effect as the Segment Editor builds it: options frame, then defaults, then connected to parameter
    changes (qMRMLSegmentEditorWidget::setMRMLSegmentEditorNode), then one GUI update.
    Returns (effect, ScriptedEffect)."""
    observers: list = []
    scripted = ScriptedEffect(name, editor_node, editor_logic, observers)
    effect = effect_class(scripted)
    effect.setupOptionsFrame()
    effect.setMRMLDefaults()
    observers.append(effect)
    effect.updateGUIFromMRML()
    return effect, scripted


class AbstractScriptedSegmentEditorEffect:
    """``SegmentEditorEffects.AbstractScriptedSegmentEditorEffect``: what the SPD effect uses of it."""

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    def xyToRas(self, xy, viewWidget):
        return viewWidget.xy_to_ras(xy)


def segment_editor_effects_module() -> types.ModuleType:
    module = types.ModuleType("SegmentEditorEffects")
    module.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    return module


class SegmentEditorWidget:
    """The Segment Editor module's ``qMRMLSegmentEditorWidget`` (``segmenteditor.widgetRepresentation().self().
    editor``): its own singleton editor node and logic, whose history is the Segment Editor's undo. ``paint``
    stands for an edit made with one of its effects (state saved, then the modification)."""

    def __init__(self, scene):
        import slicer

        self.node = scene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
        if self.node is None:
            self.node = slicer.vtkMRMLSegmentEditorNode()
            self.node.SetSingletonTag("SegmentEditor")
            scene.AddNode(self.node)
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self.logic.SetSegmentEditorNode(self.node)
        self.logic.SetMaximumNumberOfUndoStates(10)  # as SegmentEditor.py sets it

    def mrmlSegmentEditorNode(self):
        return self.node

    def segmentationNode(self):
        return self.node.GetSegmentationNode()

    def setSegmentationNode(self, node) -> None:
        self.node.SetAndObserveSegmentationNode(node)

    def saveStateForUndo(self) -> None:
        self.logic.SaveStateForUndo()

    def undo(self) -> None:
        self.logic.Undo()

    def redo(self) -> None:
        self.logic.Redo()

    def paint(self, segment_id: str, modifier) -> None:
        self.logic.SaveStateForUndo()
        self.logic.ModifySegmentByLabelmap(self.segmentationNode(), segment_id, modifier,
                                           self.logic.ModificationModeAdd, False, False)


# ---------------------------------------------------------------- slicer.parameterNodeWrapper

class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value {value} must be within [{self.minimum}, {self.maximum}]")


class Choice:
    def __init__(self, choices):
        self.choices = list(choices)

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"Value {value!r} must be one of {self.choices}")


def _split(annotated):
    if typing.get_origin(annotated) is typing.Annotated:
        base, *extras = typing.get_args(annotated)
        return base, extras
    return annotated, []


def _node_classes(base) -> Optional[tuple]:
    import slicer

    options = typing.get_args(base) if typing.get_origin(base) is typing.Union else (base,)
    options = tuple(o for o in options if o is not type(None))
    if options and all(isinstance(o, type) and issubclass(o, slicer.vtkMRMLNode) for o in options):
        return options
    return None


class _Connector:
    """One widget bound to one parameter, with the real connectors' widget rules."""

    def __init__(self, widget, base, extras):
        self.widget, self.base, self.nodes = widget, base, _node_classes(base)
        within = next((e for e in extras if isinstance(e, WithinRange)), None)
        choice = next((e for e in extras if isinstance(e, Choice)), None)
        if self.nodes is not None:
            assert isinstance(widget, qMRMLNodeComboBox), f"{widget.objectName}: a node needs a qMRMLNodeComboBox"
            widget.nodeTypes = [c.__name__ for c in self.nodes]
            self.signal = "currentNodeChanged"
        elif base is bool:
            assert type(widget) in (QCheckBox, QPushButton), f"{widget.objectName}: bool needs a QCheckBox"
            self.signal = "stateChanged" if isinstance(widget, QCheckBox) else "toggled"
        elif isinstance(widget, QComboBox):
            assert choice is not None, f"{widget.objectName}: a QComboBox needs the Choice annotation"
            self.choices = choice.choices
            widget.clear()
            for c in self.choices:
                widget.addItem(str(c))
            self.signal = "currentIndexChanged"
        elif base in (int, float) and type(widget) in (QSpinBox, QDoubleSpinBox, ctkSliderWidget):
            assert not (type(widget) is QSpinBox and base is float), f"{widget.objectName}: float in a QSpinBox"
            assert within is not None or type(widget) is not ctkSliderWidget, "ctkSliderWidget needs WithinRange"
            if within is not None:
                widget.setRange(within.minimum, within.maximum)
            self.signal = "valueChanged"
        elif base is str and type(widget) is QLineEdit:
            self.signal = "textChanged"
        else:
            raise RuntimeError(f"Unable to create GUI connector from datatype '{base}' to widget type "
                               f"'{type(widget).__name__}'")

    def read(self):
        w = self.widget
        if self.nodes is not None:
            return w.currentNode()
        if self.base is bool:
            return w.checked
        if isinstance(w, QComboBox):
            return self.choices[w.currentIndex]
        if isinstance(w, QLineEdit):
            return w.text
        return self.base(w.value)

    def write(self, value) -> None:
        w = self.widget
        if self.nodes is not None:
            w.setCurrentNode(value)
        elif self.base is bool:
            w.checked = bool(value)
        elif isinstance(w, QComboBox):
            w.currentIndex = self.choices.index(value)
        elif isinstance(w, QLineEdit):
            w.text = value
        else:
            w.value = value


def parameter_node_wrapper_module() -> types.ModuleType:
    """A stand-in for ``slicer.parameterNodeWrapper`` (module with parameterNodeWrapper, WithinRange, Choice)."""
    import slicer
    import vtk

    def wrap(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        parameters = {}
        for name, annotated in hints.items():
            base, extras = _split(annotated)
            default = getattr(cls, name, None)
            if default is None and base in (str, int, float, bool):
                default = base()
            parameters[name] = (base, extras, default)

        def serialise(node, name, base, value):
            if _node_classes(base) is not None:
                node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                node.SetParameter(name, repr(value) if base is str else str(value))

        def deserialise(node, name, base):
            if _node_classes(base) is not None:
                return node.GetNodeReference(name)
            text = node.GetParameter(name)
            if base is bool:
                return text == "True"
            if base is str:
                import ast

                return ast.literal_eval(text)
            return base(text)

        def __init__(self, parameterNode):
            self.parameterNode = parameterNode
            self._guis, self._tags, self._updating = {}, {}, False
            for name, (base, extras, default) in parameters.items():
                present = parameterNode.GetNodeReferenceID(name) if _node_classes(base) is not None else \
                    parameterNode.GetParameter(name)
                if not present and _node_classes(base) is None:
                    serialise(parameterNode, name, base, default)

        def getter(name):
            return lambda self: deserialise(self.parameterNode, name, parameters[name][0])

        def setter(name):
            def set_value(self, value):
                base, extras, _ = parameters[name]
                for extra in extras:
                    extra.validate(value)
                with slicer.util.NodeModify(self.parameterNode):
                    serialise(self.parameterNode, name, base, value)
            return set_value

        def update_gui(self):
            if self._updating:
                return
            self._updating = True
            try:
                with slicer.util.NodeModify(self.parameterNode):
                    for mapping in self._guis.values():
                        for name, connector in mapping.items():
                            connector.write(getattr(self, name))
            finally:
                self._updating = False

        def connectGui(self, ui):
            mapping = {}
            for widget in vars(ui).values():
                parameter = widget.property("SlicerParameterName") if isinstance(widget, QObject) else None
                if parameter:
                    if parameter not in parameters:
                        raise ValueError(f"Cannot find a param with the given name: {parameter}")
                    base, extras, _ = parameters[parameter]
                    mapping[parameter] = _Connector(widget, base, extras)
            tag = len(self._guis) + len(self._tags) + 1
            self._guis[tag] = mapping
            for name, connector in mapping.items():
                connector.write(getattr(self, name))

                def changed(*unused, name=name, connector=connector):
                    with slicer.util.NodeModify(self.parameterNode):
                        if not self._updating:
                            setattr(self, name, connector.read())

                connector.callback = changed
                connector.widget.signal(connector.signal).connect(changed)
            self._tags[tag] = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent,
                                                             lambda caller, event: update_gui(self))
            return tag

        def disconnectGui(self, tag):
            for connector in self._guis.pop(tag, {}).values():
                connector.widget.signal(connector.signal).disconnect(connector.callback)
            if tag in self._tags:
                self.parameterNode.RemoveObserver(self._tags.pop(tag))

        namespace = dict(
            __init__=__init__, connectGui=connectGui, disconnectGui=disconnectGui, allParameters=parameters,
            StartModify=lambda self: self.parameterNode.StartModify(),
            EndModify=lambda self, was: self.parameterNode.EndModify(was),
            AddObserver=lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback,
                                                                                                  priority),
            RemoveObserver=lambda self, tag: self.parameterNode.RemoveObserver(tag),
            Modified=lambda self: self.parameterNode.Modified())
        for name in parameters:
            namespace[name] = property(getter(name), setter(name))
        return type(cls.__name__, (), namespace)

    module = types.ModuleType("slicer.parameterNodeWrapper")
    module.parameterNodeWrapper = wrap
    module.WithinRange, module.Choice = WithinRange, Choice
    return module


# ---------------------------------------------------------------- slicer.ScriptedLoadableModule

def scripted_loadable_module(scene_getter: Callable[[], Any], module_folder) -> types.ModuleType:
    """``slicer.ScriptedLoadableModule`` for a module in ``module_folder``: the widget base with a layout and
    ``resourcePath``; the logic base whose ``getParameterNode`` is the scene's singleton parameter node."""
    import slicer

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = type(self).__name__

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent or types.SimpleNamespace(isEntered=False)
            self.moduleName = type(self).__name__[:-len("Widget")]
            self.layout = QVBoxLayout()

        def setup(self):
            pass

        def resourcePath(self, filename):
            return str(Path(module_folder) / "Resources" / filename)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[:-len("Logic")]

        def getParameterNode(self):
            scene = scene_getter()
            node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag(self.moduleName)
                node.SetAttribute("ModuleName", self.moduleName)
                scene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest:
        pass

    module = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    return module


# ---------------------------------------------------------------- putting the fakes in place

class Application:
    """``slicer.app`` as the GUIs use it: the version, the home folder, signal connections (recorded)."""

    def __init__(self, major: int = 5, minor: int = 10):
        self.majorVersion, self.minorVersion, self.slicerHome = major, minor, ""
        self.connections: List[tuple] = []

    def connect(self, signal: str, slot: Callable) -> bool:
        self.connections.append((signal, slot))
        return True


def install(monkeypatch, scene) -> types.SimpleNamespace:
    """Put the fakes where the module and the effect import them from, on ``scene`` (real MRML). Returns what the
    tests look at: the recorded ``setSliceViewerLayers`` and ``errorDisplay`` calls and the application."""
    import sys

    import slicer

    calls = types.SimpleNamespace(layers=[], errors=[], app=Application())
    for name, module in (("qt", qt_module()), ("ctk", ctk_module()),
                         ("SegmentEditorEffects", segment_editor_effects_module()),
                         ("slicer.parameterNodeWrapper", parameter_node_wrapper_module()),
                         ("slicer.ScriptedLoadableModule",
                          scripted_loadable_module(lambda: slicer.mrmlScene,
                                                   Path(__file__).resolve().parents[1] / "SPDSegment"))):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", calls.app, raising=False)
    monkeypatch.setattr(slicer, "qMRMLNodeComboBox", qMRMLNodeComboBox, raising=False)
    monkeypatch.setattr(slicer, "qSlicerSegmentEditorAbstractEffect", ScriptedEffect, raising=False)
    monkeypatch.setattr(slicer.util, "loadUI", load_ui, raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", child_widget_variables, raising=False)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kw: calls.layers.append(kw), raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: calls.errors.append(text), raising=False)
    return calls
