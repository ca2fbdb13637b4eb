"""nnU-Net's postprocessing (keep the largest foreground region), on arrays and with the bundled
model on the contrast-enhanced slab it was never trained on (LiverBench's patient B)."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from maxquery.inference import Predictor
from maxquery.inference.postprocessing import keep_largest_component, outside_largest_component
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


def test_the_card_keeps_the_decision_and_refuses_a_non_boolean():
    data = read_model_card(DEMO_MODEL).to_dict()
    assert ModelCard.from_dict(data | {"keep_largest_component": True}).keep_largest_component is True
    assert ModelCard.from_dict({k: v for k, v in data.items() if k != "keep_largest_component"}) \
        .keep_largest_component is False  # cards written before it existed
    with pytest.raises(ModelFolderError, match="keep_largest_component must be true or false"):
        ModelCard.from_dict(data | {"keep_largest_component": "yes"})


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
