"""Fixtures for the node-library tests: a fresh MRML scene and a result built from real CT.

The result is assembled directly (TotalSegmentator's labels for the same CT stand in for the
model's labels, a smooth map for the anomaly) because these tests check node building, not the
model; the end-to-end tests in Testing/ui run the real predictor.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "MaxQuerySlicer"))

from maxquery.calibration import AnomalyCalibration  # noqa: E402
from maxquery.inference.result import Lesion, SegmentationResult  # noqa: E402
from maxquery.model_folder import ClassInfo, ModelCard  # noqa: E402
from maxquery.network import small_config  # noqa: E402
from maxquery.preprocessing import CTNormalization  # noqa: E402

TOTALSEG_TO_CARD = {5: 1, 1: 2, 2: 3}  # liver → organ, spleen → "tumour A", right kidney → "tumour B"


@pytest.fixture
def scene():
    import slicer

    return slicer.vtkMRMLScene()


@pytest.fixture(scope="session")
def card() -> ModelCard:
    classes = [
        ClassInfo(0, "background", "background", (0.0, 0.0, 0.0)),
        ClassInfo(1, "liver", "organ", (0.87, 0.51, 0.40),
                  {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}),
        ClassInfo(2, "hepatocellular carcinoma", "tumor", (0.9, 0.1, 0.1)),
        ClassInfo(3, "metastasis", "tumor", (0.2, 0.4, 1.0)),
    ]
    calibration = AnomalyCalibration.fit("maxquery", np.linspace(-2, 2, 101))
    return ModelCard(name="test-card", architecture="maxquery", network=small_config(4), classes=classes,
                     spacing_zyx=(3.0, 3.0, 3.0), patch_size_zyx=(32, 64, 64),
                     normalization=CTNormalization(-1000, 1000, 0, 300), calibration=calibration)


@pytest.fixture(scope="session")
def ct_image(real_data) -> sitk.Image:
    return sitk.ReadImage(str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz"))


@pytest.fixture(scope="session")
def result(real_data, ct_image, card) -> SegmentationResult:
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(real_data / "totalsegmentator" / "example_seg.nii.gz")))
    labels = np.zeros(seg.shape, np.uint8)
    for source, target in TOTALSEG_TO_CARD.items():
        labels[seg == source] = target
    z, y, x = np.indices(seg.shape)
    anomaly = np.exp(-(((x - 40) / 15.0) ** 2 + ((y - 50) / 15.0) ** 2 + ((z - 15) / 8.0) ** 2)).astype(np.float32)
    images = []
    for array in (labels, anomaly):
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(ct_image)
        images.append(image)
    lesion = Lesion(1, "anomaly", "liver", 12.5, 463, 0.8, 0.99,
                    ct_image.TransformContinuousIndexToPhysicalPoint((40.0, 50.0, 15.0)))
    return SegmentationResult(labels=images[0], anomaly=images[1],
                              raw_scores={"maxquery": images[1]}, case_score=0.42, lesions=[lesion], card=card,
                              anomaly_threshold=0.5)
