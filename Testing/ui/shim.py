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


class qMRMLSortFilterProxyModel(QtCore.QObject):
    """The filter part of Slicer's node combo box: node types, child types, hidden nodes, attributes."""

    def __init__(self, combo):
        super().__init__(combo)
        self._combo = combo
        self._hidden_ids: list[str] = []

    def hiddenNodeIDs(self):
        return list(self._hidden_ids)

    def setHiddenNodeIDs(self, ids):
        self._hidden_ids = [str(i) for i in ids]
        self._combo._refresh()


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    """Lists the scene's nodes like Slicer's: with Slicer's defaults (child node types shown, add and
    remove enabled, no "None" entry), so a .ui that relies on a setting it does not make fails."""

    currentNodeChanged = Signal(object)
    currentNodeIDChanged = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._node_types: list[str] = []
        self._show_child_node_types = True  # qMRMLSortFilterProxyModel's default
        self._show_hidden = False
        self._add_enabled = True  # qMRMLNodeComboBox's defaults
        self._remove_enabled = True
        self._none_enabled = False
        self._none_display = "None"
        self._attributes: list[tuple[str, str, object]] = []
        self._proxy = qMRMLSortFilterProxyModel(self)
        self.scene = None
        self._nodes: list = []
        self._observations = []
        self.currentIndexChanged.connect(self._emit_current)

    def _emit_current(self, _index=None):
        node = self.currentNode()
        self.currentNodeChanged.emit(node)
        self.currentNodeIDChanged.emit(node.GetID() if node is not None else "")

    def _make_property(getter_name, kind):  # noqa: N805 - builds Qt properties below
        attr = f"_{getter_name}"

        def get(self):
            return getattr(self, attr)

        def set_(self, value):
            setattr(self, attr, kind(value) if kind is not list else [str(v) for v in value])
            self._refresh()

        return Property(kind if kind is not list else "QStringList", get, set_)

    node_types = _make_property("node_types", list)
    nodeTypes = node_types
    showChildNodeTypes = _make_property("show_child_node_types", bool)
    showHidden = _make_property("show_hidden", bool)
    addEnabled = _make_property("add_enabled", bool)
    removeEnabled = _make_property("remove_enabled", bool)
    noneEnabled = _make_property("none_enabled", bool)
    noneDisplay = _make_property("none_display", str)
    del _make_property

    def sortFilterProxyModel(self):
        return self._proxy

    def addAttribute(self, node_type, name, value=None):
        self._attributes.append((node_type, name, value))
        self._refresh()

    def setMRMLScene(self, scene):
        if self.scene is not None:
            for tag in self._observations:
                self.scene.RemoveObserver(tag)
        self.scene = scene
        self._observations = [scene.AddObserver(event, lambda *_: self._refresh())
                              for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent)]
        self._refresh()

    def _accepts(self, node):
        if self._show_child_node_types:
            typed = any(node.IsA(t) for t in self._node_types)
        else:
            typed = node.GetClassName() in self._node_types
        if not typed or node.GetID() in self._proxy.hiddenNodeIDs():
            return False
        if node.GetHideFromEditors() and not self._show_hidden:
            return False
        for node_type, name, value in self._attributes:
            if node.IsA(node_type) and (node.GetAttribute(name) is None
                                        or (value is not None and node.GetAttribute(name) != str(value))):
                return False
        return True

    def _refresh(self):
        if self.scene is None:
            return
        current = self.currentNode()
        nodes = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())]
        self._nodes = ([None] if self._none_enabled else []) + [n for n in nodes if self._accepts(n)]
        self.blockSignals(True)
        self.clear()
        self.addItems([self._none_display if n is None else n.GetName() for n in self._nodes])
        if current in self._nodes:
            self.setCurrentIndex(self._nodes.index(current))
        else:
            self.setCurrentIndex(0 if self._none_enabled else -1)
        self.blockSignals(False)
        if current is not self.currentNode():
            self._emit_current()

    def nodes(self):
        """The nodes the user can pick (a test helper; Slicer's model offers the same list)."""
        return [n for n in self._nodes if n is not None]

    def currentNode(self):
        index = self.currentIndex()
        return self._nodes[index] if 0 <= index < len(self._nodes) else None

    def currentNodeID(self):
        node = self.currentNode()
        return node.GetID() if node is not None else ""

    def setCurrentNode(self, node):
        self.setCurrentIndex(self._nodes.index(node) if node in self._nodes else (0 if self._none_enabled else -1))


class ctkCollapsibleButton(QtWidgets.QGroupBox):
    def _text(self):
        return self.title()

    def _collapsed(self):
        return self.isCheckable() and not self.isChecked()

    def _set_collapsed(self, value):
        """A collapsed button shows only its title: the contents are hidden (the loader adds them later)."""
        if not self.isCheckable():
            self.setCheckable(True)
            self.toggled.connect(lambda _on: self._show_contents())
        self.setChecked(not value)
        QtCore.QTimer.singleShot(0, self._show_contents)

    def _show_contents(self):
        for child in self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
            child.setVisible(not self._collapsed())

    text = Property(str, _text, QtWidgets.QGroupBox.setTitle)
    collapsed = Property(bool, _collapsed, _set_collapsed)


class ctkSliderWidget(QtWidgets.QWidget):
    """A slider and a spin box sharing one float value, like CTK's: with ``tracking`` off (default on)
    ``valueChanged`` comes only when the slider is released, and ``valueIsChanging`` while it moves."""

    valueChanged = Signal(float)
    valueIsChanging = Signal(float)

    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.slider = QtWidgets.QSlider(QtCore.Qt.Horizontal)
        self.spinBox = QtWidgets.QDoubleSpinBox()
        layout.addWidget(self.slider)
        layout.addWidget(self.spinBox)
        self.slider.setRange(0, 1000)
        self.slider.sliderMoved.connect(lambda v: self.valueIsChanging.emit(self._fromSlider(v)))
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
    tracking = Property(bool, lambda self: self.slider.hasTracking(),
                        lambda self, v: (self.slider.setTracking(v), self.spinBox.setKeyboardTracking(v)))

    def setValue(self, value):
        self.spinBox.setValue(value)

    def value(self):
        return self.spinBox.value()

    def drag(self, values):
        """What a user's drag does: press, move through ``values``, release (a test helper)."""
        self.slider.setSliderDown(True)
        span = (self.spinBox.maximum() - self.spinBox.minimum()) or 1.0
        for value in values:
            self.slider.setSliderPosition(round(1000 * (value - self.spinBox.minimum()) / span))
        self.slider.setSliderDown(False)


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


class ctkDICOMIndexer:
    """CTK's indexer: ``addFile`` parses a DICOM file and inserts it into the database."""

    def addFile(self, database, path, copyFile=False):
        import pydicom

        dataset = pydicom.dcmread(str(path), stop_before_pixels=True)
        database.instances[str(dataset.SOPInstanceUID)] = str(path)


class DICOMDatabase:
    """``slicer.dicomDatabase``: SOP instance UID → file (what the module reads and adds to)."""

    def __init__(self):
        self.instances: dict[str, str] = {}

    def fileForInstance(self, uid):
        return self.instances.get(uid, "")


class SlicerApp(QtWidgets.QApplication):
    """``slicer.app``: PythonQt connects by signature string, e.g. ``connect("startupCompleted()", f)``."""

    startupCompleted = Signal()

    def connect(self, signature, slot):
        getattr(self, signature.split("(")[0]).connect(slot)


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


def _slicer():
    import slicer

    return slicer


# The base classes below follow Base/Python/slicer/ScriptedLoadableModule.py: each __init__ calls
# super().__init__() without arguments, so a class that inherits one of them and something else
# gets that other class's __init__ called with no arguments too, exactly as in Slicer.
class ScriptedLoadableModule:
    def __init__(self, parent):
        super().__init__()
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""
        slicer = _slicer()
        if not hasattr(slicer, "selfTests"):
            slicer.selfTests = {}
        slicer.selfTests[self.moduleName] = self.runTest

    def runTest(self, msec=100, **kwargs):
        module = sys.modules[type(self).__module__]
        test = getattr(module, self.moduleName + "Test")()
        test.runTest(**kwargs)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        super().__init__()
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Widget"):
            self.moduleName = self.moduleName[:-6]
        slicer = _slicer()
        self.developerMode = slicer.util.settingsValue("Developer/DeveloperMode", False, converter=slicer.util.toBool)
        if not parent:
            self.parent = qMRMLWidget()
            self.parent.setLayout(QtWidgets.QVBoxLayout())
            self.parent.setMRMLScene(slicer.mrmlScene)
        else:
            self.parent = parent
        if self.parent.layout() is None:  # Slicer's module panel always has one
            self.parent.setLayout(QtWidgets.QVBoxLayout())
        self.layout = self.parent.layout()
        if not parent:
            self.setup()
            self.parent.show()

    def setup(self):
        pass

    def cleanup(self):
        pass

    def resourcePath(self, relative):
        return os.path.join(os.path.dirname(sys.modules[type(self).__module__].__file__), "Resources", relative)


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        super().__init__()
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Logic"):
            self.moduleName = self.moduleName[:-5]
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        scene = _slicer().mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node:
            if node.GetAttribute("ModuleName") != self.moduleName:
                node.SetAttribute("ModuleName", self.moduleName)
            return node
        return scene.AddNode(self.createParameterNode())

    def createParameterNode(self):
        scene = _slicer().mrmlScene
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(scene.GenerateUniqueName(self.moduleName))
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def __init__(self, *args, **kwargs):
        self.moduleTestNames = []
        super().__init__(*args, **kwargs)
        super(unittest.TestCase, self).__init__()

    def delayDisplay(self, message, requestedDelay=None, msec=None):
        MESSAGES.append(("delay", message))


class SampleDataLogic:
    """Slicer's SampleData registry: sources registered by name, fetched with urllib (file:// URIs
    too) into a cache folder, checked against their checksum and loaded as volumes."""

    sources: dict[str, dict] = {}
    cache = None

    @staticmethod
    def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                       nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                       loadFileTypes=None, loadFiles=None, loadFileProperties={}, checksums=None,
                                       loadFileType=None):
        SampleDataLogic.sources[sampleName] = dict(category=category, uris=uris, fileNames=fileNames,
                                                   nodeNames=nodeNames, checksums=checksums)

    def downloadSample(self, sampleName):
        import hashlib
        import tempfile
        import urllib.request

        source = self.sources[sampleName]
        cache = SampleDataLogic.cache or tempfile.mkdtemp(prefix="sampledata-")
        SampleDataLogic.cache = cache
        path = os.path.join(cache, source["fileNames"])
        urllib.request.urlretrieve(source["uris"], path)
        if source["checksums"]:
            algo, digest = source["checksums"].split(":")
            with open(path, "rb") as handle:
                if hashlib.new(algo.lower(), handle.read()).hexdigest() != digest:
                    raise ValueError(f"checksum mismatch for {path}")
        return loadVolume(path, {"name": source["nodeNames"]})


def loadVolume(path, properties={}):
    """slicer.util.loadVolume: a scalar volume node from a file (SimpleITK reads it here)."""
    import SimpleITK as sitk

    from MaxQuerySlicerLib import nodes

    slicer = _slicer()
    name = properties.get("name") or os.path.basename(path).split(".")[0]
    return nodes.add_volume(slicer.mrmlScene, sitk.ReadImage(str(path)), name)


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
    ctk.ctkDICOMIndexer = ctkDICOMIndexer
    sys.modules["ctk"] = ctk
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    sys.modules["slicer.ScriptedLoadableModule"] = slm
    slicer.ScriptedLoadableModule = slm
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = SampleDataLogic
    sample_data.downloadSample = lambda name: SampleDataLogic().downloadSample(name)
    sys.modules["SampleData"] = sample_data
    slicer.mrmlScene = scene
    app = QtWidgets.QApplication.instance() or SlicerApp([])
    app.setOrganizationName("MaxQueryShim")  # qt.QSettings() needs one; tests point it at a temporary folder
    app.setApplicationName("Slicer")
    slicer.app = app
    for name, function in (("loadUI", loadUI), ("childWidgetVariables", childWidgetVariables),
                           ("WaitCursor", WaitCursor), ("errorDisplay", _record("error")),
                           ("infoDisplay", _record("info")), ("confirmYesNoDisplay", _record("confirm")),
                           ("confirmOkCancelDisplay", _record("confirm")),
                           ("loadVolume", loadVolume),
                           ("pip_install", lambda requirement, **kwargs: MESSAGES.append(("pip", requirement)))):
        setattr(slicer.util, name, function)
    return app
