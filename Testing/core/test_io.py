"""Reading real CT files and refusing what is no CT volume."""

import numpy as np
import pytest
import SimpleITK as sitk

from maxquery.errors import InputError
from maxquery.io import case_name, image_from_array, read_image, validate_ct


@pytest.mark.parametrize("case, size", [("totalsegmentator/example_ct_sm.nii.gz", (122, 101, 30)),
                                        ("totalsegmentator/example_ct_dicom", (512, 512, 20)),
                                        ("dcmqi/ct-3slice", (512, 512, 3))])
def test_real_ct_is_read_and_accepted(real_data, case, size):
    image = read_image(real_data / case)
    assert image.GetSize() == size
    validate_ct(image)


def test_case_names():
    assert case_name("/a/b/case_01.nii.gz") == "case_01" and case_name("/a/series") == "series"


def test_unreadable_and_missing_files(tmp_path):
    garbage = tmp_path / "broken.nii.gz"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="cannot read"):
        read_image(garbage)
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "missing.nii.gz")
    with pytest.raises(InputError, match="DICOM"):
        read_image(tmp_path)


def _ct(shape=(8, 16, 16)):
    array = np.full(shape, -1000, np.int16)
    array[2:6, 4:12, 4:12] = 40
    return array


@pytest.mark.parametrize("array, message", [
    (_ct()[0], "3D"),
    (np.where(_ct() > 0, np.nan, _ct()).astype(np.float32), "NaN"),
    (np.full((8, 16, 16), 7, np.int16), "empty"),
    ((_ct() + 1000) / 1040.0, "Hounsfield"),  # normalised to [0, 1]
    (_ct() - 2000, "Hounsfield"),  # everything below -500
    ((_ct() + 1024).astype(np.uint16), "Hounsfield"),  # raw unsigned values, no rescale
])
def test_non_ct_volumes_are_refused(array, message):
    with pytest.raises(InputError, match=message):
        validate_ct(sitk.GetImageFromArray(array))


def test_four_dimensional_and_bad_geometry_are_refused():
    with pytest.raises(InputError, match="3D"):
        validate_ct(sitk.GetImageFromArray(np.stack([_ct(), _ct()])))  # 4D
    with pytest.raises(InputError):
        image_from_array(_ct(), (1.0, -1.0, 1.0))
    with pytest.raises(InputError):
        image_from_array(_ct(), (1.0, 1.0, 1.0), direction=(1, 0, 0, 1, 0, 0, 0, 0, 1))
    validate_ct(image_from_array(_ct(), (0.8, 0.8, 2.5), origin=(1, 2, 3), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)))


def test_seg_nrrd_carries_the_cards_coded_terminology(tmp_path):
    import nrrd

    from maxquery.io import write_segmentation_nrrd
    from maxquery.model_folder import ClassInfo

    liver = {"category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
             "type": {"scheme": "SCT", "code": "10200004", "meaning": "Liver"},
             "modifier": ["SCT", "7771000", "Left"]}  # the key the Slicer library reads too
    classes = [ClassInfo(0, "background", "background", (0.0, 0.0, 0.0)),
               ClassInfo(1, "liver", "organ", (0.9, 0.5, 0.4), liver)]
    labels = sitk.GetImageFromArray(np.pad(np.ones((2, 3, 4), np.uint8), 1))
    write_segmentation_nrrd(labels, classes, tmp_path / "s.seg.nrrd")
    tags = nrrd.read_header(str(tmp_path / "s.seg.nrrd"))["Segment0_Tags"]
    assert "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~SCT^7771000^Left~" in tags
