"""Fixtures for the widget tests: the shim, a scene with three slice views, and a real model folder.

The model is the bundled demo model when it is installed; otherwise a small untrained MaxQuery
network with a fitted calibration is written once per session. Either way the real ``Predictor``
runs it: nothing about the model is mocked.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "MaxQuerySlicer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import shim  # noqa: E402

SLICE_VIEWS = ("Red", "Yellow", "Green")
SLICE_TO_RAS = {  # Slicer's axial, sagittal and coronal presets (rotation part of SliceToRAS)
    "Red": ((-1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "Yellow": ((0, 0, 1), (-1, 0, 0), (0, 1, 0)),
    "Green": ((-1, 0, 0), (0, 0, 1), (0, 1, 0)),
}


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory) -> Path:
    from MaxQuerySlicerLib.logic import bundled_model_folder

    bundled = bundled_model_folder()
    if bundled is not None:
        return bundled
    import torch
    from maxquery.calibration import AnomalyCalibration
    from maxquery.model_folder import ClassInfo, ModelCard, save_model_folder
    from maxquery.network import build_network, small_config
    from maxquery.preprocessing import CTNormalization

    torch.manual_seed(0)
    config = small_config(4, features=(8, 16, 32, 64, 64), query_dim=32, ffn_dim=64)
    classes = [ClassInfo(0, "background", "background", (0, 0, 0)),
               ClassInfo(1, "liver", "organ", (0.87, 0.51, 0.40)),
               ClassInfo(2, "tumour A", "tumor", (0.9, 0.1, 0.1)),
               ClassInfo(3, "tumour B", "tumor", (0.2, 0.4, 1.0))]
    card = ModelCard(name="untrained-test-model", architecture="maxquery", network=config, classes=classes,
                     spacing_zyx=(3.0, 3.0, 3.0), patch_size_zyx=(32, 64, 64),
                     normalization=CTNormalization(-1000.0, 1000.0, 0.0, 300.0),
                     calibration=AnomalyCalibration.fit("maxquery", np.random.default_rng(0).normal(size=1000)))
    return save_model_folder(tmp_path_factory.mktemp("model") / "untrained", card, build_network("maxquery", config))


@pytest.fixture
def scene():
    import slicer

    scene = slicer.vtkMRMLScene()
    scene.slice_logics = []
    for name in SLICE_VIEWS:
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLScene(scene)
        node = logic.AddSliceNode(name)
        # Slicer's layout manager gives each view its preset (radiological: patient right on screen
        # left); without the application the node starts as identity, i.e. mirrored.
        rows = SLICE_TO_RAS[name]
        matrix = node.GetSliceToRAS()
        for i in range(3):
            for j in range(3):
                matrix.SetElement(i, j, rows[i][j])
        node.UpdateMatrices()
        scene.slice_logics.append(logic)
    return scene


@pytest.fixture
def app(scene, tmp_path):
    app = shim.install(scene)
    # qt.QSettings() of every test starts empty, in a folder of its own
    shim.QtCore.QSettings.setDefaultFormat(shim.QtCore.QSettings.IniFormat)
    shim.QtCore.QSettings.setPath(shim.QtCore.QSettings.IniFormat, shim.QtCore.QSettings.UserScope,
                                  str(tmp_path / "settings"))
    shim.MESSAGES.clear()
    return app


@pytest.fixture
def widget(app, scene, model_folder):
    import MaxQuerySlicer

    parent = app and shim.QtWidgets.QWidget()
    widget = MaxQuerySlicer.MaxQuerySlicerWidget(parent)
    widget.setup()
    widget.params.model_folder = str(model_folder)
    widget.params.device = "cpu"
    parent.resize(460, 900)
    parent.show()
    yield widget
    widget.cleanup()
    parent.close()
