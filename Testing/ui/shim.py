"""Just enough of Slicer's Python environment, on PySide6, to run the module's widget in a test.

``install(scene)`` provides: a ``qt`` module (PySide6's QtCore/QtGui/QtWidgets names), the CTK and
qMRML widgets the .ui file uses, ``slicer.ScriptedLoadableModule``, ``slicer.mrmlScene`` and the
few ``slicer.util`` dialogs and loaders the widget calls. Dialog answers are scripted through
``ANSWERS``. The MRML side is the real slicer-core; only the GUI toolkit is stood in for.
"""

from __future__ import annotations

import os
import sys
import types
import unittest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402
from PySide6.QtCore import Property, Signal  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402

ANSWERS = {"confirm": True}
MESSAGES: list[tuple[str, str]] = []


class qMRMLWidget(QtWidgets.QWidget):
    def setMRMLScene(self, scene):
        self.mrmlScene = scene


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    """Lists the scene's nodes of ``nodeTypes`` and follows node additions and removals."""

    currentNodeChanged = Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.nodeTypes = []
        self.scene = None
        self._nodes = []
        self.currentIndexChanged.connect(lambda _index: self.currentNodeChanged.emit(self.currentNode()))

    def setMRMLScene(self, scene):
        self.scene = scene
        for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent):
            scene.AddObserver(event, lambda *_: self._refresh())
        self._refresh()

    def _refresh(self):
        current = self.currentNode()
        nodes = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())]
        self._nodes = [n for n in nodes if any(n.IsA(t) for t in self.nodeTypes) and not n.GetHideFromEditors()]
        self.blockSignals(True)
        self.clear()
        self.addItems([n.GetName() for n in self._nodes])
        self.setCurrentIndex(self._nodes.index(current) if current in self._nodes else -1)
        self.blockSignals(False)
        if current is not self.currentNode():
            self.currentNodeChanged.emit(self.currentNode())

    def currentNode(self):
        index = self.currentIndex()
        return self._nodes[index] if 0 <= index < len(self._nodes) else None

    def setCurrentNode(self, node):
        self.setCurrentIndex(self._nodes.index(node) if node in self._nodes else -1)


class ctkCollapsibleButton(QtWidgets.QGroupBox):
    def _text(self):
        return self.title()

    text = Property(str, _text, QtWidgets.QGroupBox.setTitle)


class ctkSliderWidget(QtWidgets.QWidget):
    """A slider and a spin box sharing one float value, like CTK's."""

    valueChanged = Signal(float)

    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.slider = QtWidgets.QSlider(QtCore.Qt.Horizontal)
        self.spinBox = QtWidgets.QDoubleSpinBox()
        layout.addWidget(self.slider)
        layout.addWidget(self.spinBox)
        self.slider.setRange(0, 1000)
        self.slider.valueChanged.connect(lambda v: self.spinBox.setValue(self._fromSlider(v)))
        self.spinBox.valueChanged.connect(self._spinChanged)

    def _fromSlider(self, v):
        return self.spinBox.minimum() + (self.spinBox.maximum() - self.spinBox.minimum()) * v / 1000.0

    def _spinChanged(self, value):
        span = (self.spinBox.maximum() - self.spinBox.minimum()) or 1.0
        self.slider.blockSignals(True)
        self.slider.setValue(round(1000 * (value - self.spinBox.minimum()) / span))
        self.slider.blockSignals(False)
        self.valueChanged.emit(value)

    decimals = Property(int, lambda self: self.spinBox.decimals(), lambda self, v: self.spinBox.setDecimals(v))
    minimum = Property(float, lambda self: self.spinBox.minimum(), lambda self, v: self.spinBox.setMinimum(v))
    maximum = Property(float, lambda self: self.spinBox.maximum(), lambda self, v: self.spinBox.setMaximum(v))
    singleStep = Property(float, lambda self: self.spinBox.singleStep(), lambda self, v: self.spinBox.setSingleStep(v))

    def setValue(self, value):
        self.spinBox.setValue(value)

    def value(self):
        return self.spinBox.value()


CUSTOM_WIDGETS = (qMRMLWidget, qMRMLNodeComboBox, ctkCollapsibleButton, ctkSliderWidget)


def loadUI(path):
    loader = QUiLoader()
    for cls in CUSTOM_WIDGETS:
        loader.registerCustomWidget(cls)
    widget = loader.load(path)
    if widget is None:
        raise RuntimeError(f"could not load {path}: {loader.errorString()}")
    return widget


def childWidgetVariables(widget):
    ui = types.SimpleNamespace()
    for child in widget.findChildren(QtCore.QObject):
        if child.objectName():
            setattr(ui, child.objectName(), child)
    return ui


class WaitCursor:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _record(kind):
    def show(text, *args, **kwargs):
        MESSAGES.append((kind, text))
        return ANSWERS["confirm"]
    return show


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        pass


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent if parent is not None else QtWidgets.QWidget()
        if self.parent.layout() is None:
            self.parent.setLayout(QtWidgets.QVBoxLayout())
        self.layout = self.parent.layout()

    def setup(self):
        pass

    def resourcePath(self, relative):
        return os.path.join(os.path.dirname(sys.modules[type(self).__module__].__file__), "Resources", relative)


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=0):
        MESSAGES.append(("delay", message))


def install(scene):
    """Make ``import qt``, ``import ctk`` and the Slicer application names resolve; returns the app."""
    import slicer
    import slicer.util

    qt = types.ModuleType("qt")
    for module in (QtCore, QtGui, QtWidgets):
        for name in dir(module):
            if name.startswith("Q"):
                setattr(qt, name, getattr(module, name))
    qt.Qt = QtCore.Qt
    sys.modules["qt"] = qt
    ctk = types.ModuleType("ctk")
    ctk.ctkCollapsibleButton, ctk.ctkSliderWidget = ctkCollapsibleButton, ctkSliderWidget
    sys.modules["ctk"] = ctk
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    sys.modules["slicer.ScriptedLoadableModule"] = slm
    slicer.ScriptedLoadableModule = slm
    slicer.mrmlScene = scene
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    slicer.app = app
    for name, function in (("loadUI", loadUI), ("childWidgetVariables", childWidgetVariables),
                           ("WaitCursor", WaitCursor), ("errorDisplay", _record("error")),
                           ("infoDisplay", _record("info")), ("confirmYesNoDisplay", _record("confirm")),
                           ("confirmOkCancelDisplay", _record("confirm")),
                           ("pip_install", lambda requirement: MESSAGES.append(("pip", requirement)))):
        setattr(slicer.util, name, function)
    return app
