"""Postprocessing (keep the largest foreground region, one type per lesion), on arrays and with the
bundled model on real CTs: the contrast-enhanced slab it was never trained on (LiverBench's
patient B) and the demo case."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from maxquery.inference import Predictor
from maxquery.demo import DEMO_CASE
from maxquery.inference.postprocessing import keep_largest_component, one_type_per_lesion, outside_largest_component
from maxquery.io import read_image
from maxquery.model_folder import ModelFolderError, ModelCard, read_model_card

DEMO_MODEL = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "maxquery-liver-demo"
TOTALSEGMENTATOR_LIVER = 5


def test_only_the_largest_region_is_kept_with_its_classes():
    labels = np.zeros((6, 12, 12), np.uint8)
    labels[1:5, 1:7, 1:7] = 1
    labels[2:4, 2:4, 2:4] = 3  # a tumour inside the organ stays
    labels[1:3, 9:11, 9:11] = 1  # a smaller organ-like region apart
    labels[4, 10, 1] = 4  # a tumour speck outside the organ
    kept = keep_largest_component(labels)
    assert (kept[1:5, 1:7, 1:7] == labels[1:5, 1:7, 1:7]).all()
    assert not kept[1:3, 9:11, 9:11].any() and kept[4, 10, 1] == 0


def test_regions_touching_at_a_corner_are_one_region():
    foreground = np.zeros((3, 3, 3), bool)
    foreground[0, 0, 0] = foreground[1, 1, 1] = True
    assert not outside_largest_component(foreground).any()
    assert not outside_largest_component(np.zeros((3, 3, 3), bool)).any()


def test_each_lesion_takes_the_type_most_of_its_voxels_have():
    labels = np.zeros((6, 12, 12), np.uint8)
    labels[:, :, :] = 1
    labels[1:4, 1:4, 1:4] = 3  # 27 voxels of hcc ...
    labels[1:4, 1:4, 4] = 4  # ... with a rim of 9 read as metastasis: one lesion
    labels[1:3, 8:10, 8:10] = 4  # a lesion apart keeps its own type
    labels[4, 8, 1] = 2  # a tie of one cyst voxel ...
    labels[4, 8, 2] = 4  # ... and one metastasis voxel goes to the type listed first
    voted = one_type_per_lesion(labels, (2, 3, 4))
    assert (voted[1:4, 1:4, 1:5] == 3).all()
    assert (voted[1:3, 8:10, 8:10] == 4).all() and (voted[4, 8, 1:3] == 2).all()
    untouched = ~np.isin(labels, (2, 3, 4))
    assert (voted[untouched] == labels[untouched]).all()
    assert (one_type_per_lesion(np.ones((2, 2, 2), np.uint8), (2, 3, 4)) == 1).all()


def test_the_card_keeps_the_decisions_and_refuses_a_non_boolean():
    data = read_model_card(DEMO_MODEL).to_dict()
    for step in ("keep_largest_component", "one_type_per_lesion"):
        assert getattr(ModelCard.from_dict(data | {step: True}), step) is True
        assert getattr(ModelCard.from_dict({k: v for k, v in data.items() if k != step}), step) is False  # older cards
        with pytest.raises(ModelFolderError, match=f"{step} must be true or false"):
            ModelCard.from_dict(data | {step: "yes"})


def test_bundled_model_gives_each_lesion_of_the_demo_case_one_type():
    """Without the step the bundled model splits lesions of the demo case between types; with it
    none is split, and the tumour keeps its extent. The step acts on the model grid; the labels
    checked are on the input grid, where linear resampling could in principle join two lesions
    one model voxel apart (it does not here)."""
    ct = sitk.ReadImage(str(DEMO_CASE))
    tumour_values = (2, 3, 4)
    labels, results = {}, {}
    for vote in (False, True):
        results[vote] = Predictor(DEMO_MODEL, device="cpu", one_type_per_lesion=vote).predict(ct)
        labels[vote] = sitk.GetArrayFromImage(results[vote].labels)

    def mixed_lesions(array):
        regions, count = ndimage.label(np.isin(array, tumour_values), np.ones((3, 3, 3)))
        return sum(len(np.unique(array[regions == i])) > 1 for i in range(1, count + 1))

    assert mixed_lesions(labels[False]) > 0
    assert mixed_lesions(labels[True]) == 0
    tumour = {vote: np.isin(array, tumour_values).sum() for vote, array in labels.items()}
    assert abs(tumour[True] - tumour[False]) <= 0.01 * tumour[False]  # the same on the model grid
    assert results[True].retyped_by_postprocessing_ml > 0 and results[False].retyped_by_postprocessing_ml is None
    assert any("one type per lesion" in note for note in results[True].notes)


def test_bundled_model_drops_the_organ_it_takes_for_liver_on_the_unseen_slab(real_data):
    """On patient B's slab the model also labels a region on the patient's left as liver; its
    card keeps only the largest region, which removes it and raises the Dice against
    TotalSegmentator's liver (the reference LiverBench takes for B)."""
    ts = real_data / "totalsegmentator"
    ct = read_image(ts / "example_ct_dicom")
    reference = sitk.Resample(sitk.ReadImage(str(ts / "example_seg_dicom.nii.gz")), ct, sitk.Transform(),
                              sitk.sitkNearestNeighbor)
    liver = sitk.GetArrayFromImage(reference) == TOTALSEGMENTATOR_LIVER
    assert read_model_card(DEMO_MODEL).keep_largest_component
    raw = Predictor(DEMO_MODEL, device="cpu", keep_largest_component=False).predict(ct)
    kept = Predictor(DEMO_MODEL, device="cpu").predict(ct)

    def organ_dice(result):
        organ = sitk.GetArrayFromImage(result.labels) > 0
        return 2 * (organ & liver).sum() / (organ.sum() + liver.sum())

    raw_organ = sitk.GetArrayFromImage(raw.labels) > 0
    assert ndimage.label(raw_organ, np.ones((3, 3, 3)))[1] > 1
    assert ndimage.label(sitk.GetArrayFromImage(kept.labels) > 0, np.ones((3, 3, 3)))[1] == 1
    assert organ_dice(kept) > organ_dice(raw) + 0.03, (organ_dice(raw), organ_dice(kept))
    assert any("largest organ region" in note for note in kept.notes)
    assert not any("largest organ region" in note for note in raw.notes)
