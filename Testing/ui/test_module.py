"""The module's classes as Slicer builds them: cooperative base classes, parameter node, lifetime.

The shim's base classes follow Slicer's (each ``__init__`` calls ``super().__init__()``), so a
class layout that breaks in Slicer breaks here too.
"""

import importlib
import sys
import types
from pathlib import Path

import pytest

import shim
from test_widget import load_ct, scene_node_ids, wait_for


def test_the_shim_base_classes_are_as_strict_as_slicers(app):
    class NeedsAScene:
        def __init__(self, scene):
            self.scene = scene

    class Inherits(shim.ScriptedLoadableModuleLogic, NeedsAScene):
        def __init__(self):
            shim.ScriptedLoadableModuleLogic.__init__(self)

    with pytest.raises(TypeError):  # what the old MaxQuerySlicerLogic did in Slicer 5.6+
        Inherits()


def test_module_logic_and_widget_build_as_in_slicer(app, scene):
    import MaxQuerySlicer

    parent = types.SimpleNamespace(path=MaxQuerySlicer.__file__)
    module = MaxQuerySlicer.MaxQuerySlicer(parent)
    assert "&" not in parent.title and parent.title.startswith("MaxQuery")
    logic = MaxQuerySlicer.MaxQuerySlicerLogic()
    assert logic.moduleName == "MaxQuerySlicer" and logic.core.scene is scene
    assert logic.core.parameters().node is logic.getParameterNode()  # Slicer's own parameter node
    logic.core.close()
    widget = MaxQuerySlicer.MaxQuerySlicerWidget()  # no parent: Slicer's generic test builds it like this
    assert widget.ui.applyButton.isEnabled() is False
    widget.cleanup()
    assert module.moduleName == "MaxQuerySlicer"


def test_parameter_node_survives_a_scene_clear(app, scene, widget, model_folder):
    node = widget.params.node
    scene.Clear(0)
    assert widget.logic.core.parameters().node is node
    assert node.GetAttribute("ModuleName") == "MaxQuerySlicer"
    assert scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
    widget.params.device = "cpu"  # the panel still writes to the node the scene keeps
    assert widget.ui.deviceComboBox.currentText() == "cpu"


def test_results_are_released_with_their_nodes_and_the_scene(app, scene, widget, real_data):
    volume = load_ct(scene, real_data, "example_ct_sm.nii.gz")
    widget.ui.inputSelector.setCurrentNode(volume)
    for _ in range(2):
        widget.ui.applyButton.click()
        wait_for(app, lambda: widget.run is None)
    core = widget.logic.core
    first, second = [core.held_results()[i] for i in (0, 1)]
    scene.RemoveNode(scene.GetNodeByID(first))
    assert core.held_results() == [second]
    scene.Clear(0)
    assert core.held_results() == []


def test_closing_the_scene_cancels_a_run_in_flight(app, scene, widget, real_data):
    volume = load_ct(scene, real_data, "example_ct.nii.gz")
    widget.ui.inputSelector.setCurrentNode(volume)
    widget.ui.applyButton.click()
    run = widget.run
    scene.Clear(0)
    assert widget.run is None and widget.logic.core.active_run is None
    assert run._process.poll() is not None and not run.work_dir.exists()
    before = scene_node_ids(scene)
    for _ in range(5):
        app.processEvents()
    assert scene_node_ids(scene) == before and not widget.timer.isActive()


def test_cleanup_stops_timers_and_observers_and_a_reload_works(app, scene, widget, real_data):
    import MaxQuerySlicer

    volume = load_ct(scene, real_data, "example_ct.nii.gz")
    widget.ui.inputSelector.setCurrentNode(volume)
    widget.ui.applyButton.click()
    run = widget.run
    widget.cleanup()
    assert not widget.timer.isActive() and not widget.tableTimer.isActive()
    assert widget.Observations == [] and widget.logic.core._observations == []
    assert run._process.poll() is not None and not run.work_dir.exists()
    # Developer mode's Reload: the module file is imported again and a new widget is built.
    reloaded = importlib.reload(sys.modules["MaxQuerySlicer"])
    assert reloaded is MaxQuerySlicer
    fresh = reloaded.MaxQuerySlicerWidget(shim.QtWidgets.QWidget())
    fresh.setup()
    try:
        assert fresh.params.node is widget.params.node
        assert scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
    finally:
        fresh.cleanup()


def test_device_choices_follow_what_the_core_supports():
    from MaxQuerySlicerLib.parameters import DEVICE_PATTERN, device_choices

    assert device_choices(0, False) == ["auto", "cpu"]
    assert device_choices(2, True) == ["auto", "cpu", "cuda:0", "cuda:1", "mps"]
    for device in device_choices(2, True):
        assert DEVICE_PATTERN.fullmatch(device)


@pytest.fixture
def factory_slicer(monkeypatch):
    """This environment's packages minus torch and psutil, as a Slicer without them would list them."""
    from MaxQuerySlicerLib import dependencies

    present = {n: v for n, v in dependencies.installed_versions().items() if n not in ("torch", "psutil")}
    monkeypatch.setattr(dependencies, "installed_versions", lambda paths=None: dict(present))
    return present


def pytorch_extension(answer):
    """The PyTorch extension's module as the installer sees it: ``installTorch`` returns None when declined."""
    calls = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, torchVersionRequirement=None, **kwargs):
            calls.append((askConfirmation, torchVersionRequirement))
            return answer

    return types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic), calls


def test_declining_torch_stops_with_a_message_and_installs_nothing(app, widget, factory_slicer, monkeypatch):
    module, calls = pytorch_extension(None)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", module)
    assert widget.ensureDependencies() is False
    assert calls == [(True, ">=2.1")]
    assert [m for m in shim.MESSAGES if m[0] == "pip"] == []
    assert any("PyTorch was not installed" in text for kind, text in shim.MESSAGES if kind == "error")


def test_without_the_pytorch_extension_torch_is_not_taken_from_pypi(app, widget, factory_slicer, monkeypatch):
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    assert widget.ensureDependencies() is False
    assert [m for m in shim.MESSAGES if m[0] == "pip"] == []
    assert any("PyTorch extension" in text for kind, text in shim.MESSAGES if kind == "error")


def test_pip_gets_only_the_missing_packages_and_pins_the_installed_ones(app, widget, factory_slicer, monkeypatch):
    import slicer

    module, calls = pytorch_extension(types.SimpleNamespace(__version__="2.4.0"))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", module)
    seen = []

    def pip_install(args, **kwargs):
        constraints = args[args.index("-c") + 1]
        seen.append((args[:args.index("-c")], open(constraints).read().splitlines()))

    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    assert widget.ensureDependencies() is False  # the fake installers installed nothing, and it says so
    assert calls and seen[0][0] == ["psutil>=5.9"]
    pins = seen[0][1]
    for name in ("numpy", "simpleitk", "pydicom", "scipy", "safetensors"):
        assert f"{name}=={factory_slicer[name]}" in pins
    assert any("Still missing" in text for kind, text in shim.MESSAGES if kind == "error")


def test_dicom_seg_export_is_added_to_the_dicom_database(app, scene, widget, real_data, tmp_path, monkeypatch):
    """The CT comes from the DICOM database (as Slicer's loader leaves it); the SEG joins it there."""
    import numpy as np
    import pydicom
    import SimpleITK as sitk
    import slicer

    from maxquery.inference.result import SegmentationResult
    from MaxQuerySlicerLib import nodes

    from MaxQuerySlicerLib.export import _with_sop_uids

    folder = tmp_path / "ct"  # the shared series has no SOP instance UIDs; a database needs them
    folder.mkdir()
    for source in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(real_data / "totalsegmentator" / "example_ct_dicom")):
        _with_sop_uids(pydicom.dcmread(source)).save_as(str(folder / Path(source).name))
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    database = shim.DICOMDatabase()
    for path in files:
        shim.ctkDICOMIndexer().addFile(database, path)
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    ct = reader.Execute()
    volume = nodes.add_volume(scene, ct, "dicom ct")
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(database.instances))
    labels = sitk.GetImageFromArray((sitk.GetArrayFromImage(ct) > 40).astype(np.uint8))
    labels.CopyInformation(ct)
    anomaly = sitk.Cast(labels, sitk.sitkFloat32)
    card = widget.logic.core.read_card(widget.logic.core.model_folder(widget.params))
    result = SegmentationResult(labels=labels, anomaly=anomaly, raw_scores={}, case_score=0.1, lesions=[], card=card,
                                anomaly_threshold=0.5)
    widget.logic.core.add_result(result, volume, widget.params)
    widget.updateGUIFromParameterNode()
    assert widget.ui.exportDicomSegButton.isEnabled()
    written = widget.onExport("dicom-seg", str(tmp_path / "seg.dcm"))
    uid = str(pydicom.dcmread(str(written), stop_before_pixels=True).SOPInstanceUID)
    assert database.fileForInstance(uid) == str(written)
    assert len(database.instances) == len(files) + 1 == 21
