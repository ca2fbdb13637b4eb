"""A tiny Decathlon dataset made from a real CT: the upper-abdomen TotalSegmentator example, cropped,
with its liver label (TotalSegmentator id 5) and one painted sphere of an inlier tumour type per case."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

LIVER_ID = 5


def _sphere(shape, centre, radius):
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2


def write_case(root: Path, folder: str, case_id: str, image: np.ndarray, label: np.ndarray, reference: sitk.Image):
    for sub, array, kind in ((f"images{folder}", image, sitk.sitkInt16), (f"labels{folder}", label, sitk.sitkUInt8)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        out = sitk.Cast(sitk.GetImageFromArray(array), kind)
        out.CopyInformation(reference)
        sitk.WriteImage(out, str(root / sub / f"{case_id}.nii.gz"))
    return {"image": f"./images{folder}/{case_id}.nii.gz", "label": f"./labels{folder}/{case_id}.nii.gz"}


@pytest.fixture(scope="session")
def tiny_msd(real_data, tmp_path_factory) -> Path:
    """Three training cases, one validation case, one inlier and one OOD test case."""
    ts = real_data / "totalsegmentator"
    ct = sitk.ReadImage(str(ts / "example_ct_sm.nii.gz"))
    seg = sitk.ReadImage(str(ts / "example_seg.nii.gz"))
    liver = sitk.GetArrayFromImage(seg) == LIVER_ID
    zs, ys, xs = np.nonzero(liver)
    box = (slice(0, 24), slice(max(0, ys.min() - 4), ys.min() + 60), slice(max(0, xs.min() - 4), xs.min() + 60))
    image = sitk.GetArrayFromImage(ct)[box].astype(np.int16)
    liver = liver[box]
    reference = ct[box[2].start:box[2].stop, box[1].start:box[1].stop, box[0].start:box[0].stop]
    centre = np.argwhere(liver).mean(axis=0).astype(int)
    root = tmp_path_factory.mktemp("tiny_msd")
    manifest = {"name": "tiny", "modality": {"0": "CT"}, "ood_label": 9,
                "labels": {"0": "background", "1": "liver", "2": "cyst", "3": "hcc", "4": "metastasis"}}
    splits = {"training": [], "validation": [], "test_inlier": [], "test_ood": []}
    plan = [("training", "Tr", 2, 0), ("training", "Tr", 3, 1), ("training", "Tr", 4, 2), ("validation", "Val", 2, 3),
            ("test_inlier", "Ts", 3, 4), ("test_ood", "Ts", 9, 5)]
    for split, folder, lesion_label, i in plan:
        label = liver.astype(np.uint8)
        sphere = _sphere(label.shape, centre + np.array([0, (i % 3) - 1, (i % 2) * 2]), 3) & liver
        label[sphere] = lesion_label
        shifted = image.copy()
        shifted[sphere] = {2: 5, 3: 90, 4: 20, 9: 300}[lesion_label]
        splits[split].append(write_case(root, folder, f"tiny_{i:03d}", shifted, label, reference))
    manifest.update(splits, numTraining=len(splits["training"]))
    (root / "dataset.json").write_text(json.dumps(manifest))
    return root
