"""The bundled demo model: a valid, calibrated model folder whose labels do not depend on the grid.

A trained network is needed for the physical-space check: a random one flips its labels (and, through
the argmax of the k-means cross-attention, its whole query assignment) with the tiny input changes
that resampling brings, so it cannot tell a geometry bug from chaos.
"""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from maxquery.inference import Predictor
from maxquery.io import read_image
from maxquery.model_folder import load_model_folder

DEMO_MODEL = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "maxquery-liver-demo"


@pytest.fixture(scope="module")
def predictor():
    return Predictor(DEMO_MODEL, device="cpu")


def test_bundled_model_folder_is_valid_and_small():
    loaded = load_model_folder(DEMO_MODEL)
    card = loaded.card
    size_mb = sum(p.stat().st_size for p in DEMO_MODEL.iterdir()) / 2**20
    assert size_mb < 25, size_mb
    assert card.calibration is not None and card.calibration.score == "maxquery"
    assert card.sml_stats is not None
    assert [c.role for c in card.classes] == ["background", "organ", "tumor", "tumor", "tumor"]
    assert card.metrics, "the card carries the evaluation figures"


def test_resampled_copy_gives_the_same_labels_in_physical_space(predictor, real_data):
    ct = read_image(real_data / "totalsegmentator" / "example_ct_sm.nii.gz")
    fine = sitk.Resample(ct, [2 * n for n in ct.GetSize()[:2]] + [ct.GetSize()[2]], sitk.Transform(),
                         sitk.sitkLinear, ct.GetOrigin(), (1.5, 1.5, 3.0), ct.GetDirection(), -1024.0, sitk.sitkInt16)
    coarse_labels = sitk.GetArrayFromImage(predictor.predict(ct).labels)
    fine_result = predictor.predict(fine)
    assert fine_result.labels.GetSize() == fine.GetSize() and fine_result.labels.GetSpacing() == fine.GetSpacing()
    back = sitk.GetArrayFromImage(sitk.Resample(fine_result.labels, ct, sitk.Transform(), sitk.sitkNearestNeighbor))
    liver = coarse_labels == 1
    assert liver.sum() > 1000, "the demo model finds the liver"
    dice = 2 * np.logical_and(liver, back == 1).sum() / (liver.sum() + (back == 1).sum())
    assert dice > 0.9, dice
    # Where the two disagree, they do so within one voxel of a label boundary.
    boundary = np.zeros_like(liver)
    for value in np.unique(coarse_labels):
        region = coarse_labels == value
        boundary |= region ^ ndimage.binary_erosion(region)
    near_boundary = ndimage.binary_dilation(boundary, iterations=1)
    disagree = coarse_labels != back
    assert disagree[~near_boundary].mean() < 0.005, disagree[~near_boundary].mean()


def test_review_picture_of_the_demo_case_shows_its_unseen_lesion(predictor):
    """`make demo`'s picture is centred on the most suspicious region, and its axial view cuts
    the demo case's unseen-type lesion (label 9 of the shipped reference)."""
    from maxquery.preprocessing import to_canonical
    from maxquery.review import focus_point

    demo = DEMO_MODEL.parents[2] / "Resources" / "DemoData"
    result = predictor.predict(read_image(demo / "liverbench_A_0085.nii.gz"))
    canonical = to_canonical(result.image)
    x, y, z = focus_point(result, canonical)
    reference = sitk.GetArrayFromImage(to_canonical(read_image(demo / "liverbench_A_0085_reference_labels.nii.gz")))
    assert (reference[z] == 9).any(), "the axial view misses the unseen lesion"
    assert (reference[max(z - 3, 0):z + 4, max(y - 10, 0):y + 11, max(x - 10, 0):x + 11] > 1).any(), \
        "the picture is not centred on a lesion"
