"""The lesion table: connected regions of predicted tumour and of high calibrated anomaly.

Anomaly regions are searched only inside the predicted foreground (organ and tumour) grown by
``ORGAN_MARGIN_MM``, because the calibration describes inlier voxels in and around the organ:
outside it (air, bowel gas, bone) a high score means nothing clinically.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..model_folder import ModelCard
from .result import Lesion

_FULL_CONNECTIVITY = np.ones((3, 3, 3), bool)
# The organ region: the organ and its lesions grown by this margin. One definition for the anomaly
# calibration (fitted on inlier voxels of this region), the evaluation's 'organ' figures and the
# lesion search, so that a calibrated score is only read where it was fitted. 5 mm keeps a lesion
# on the organ's surface and the partial-volume rim, and little of the neighbouring organs.
ORGAN_MARGIN_MM = 5.0


def grow_mask(mask: np.ndarray, spacing_zyx, margin_mm: float) -> np.ndarray:
    """Voxels within ``margin_mm`` (Euclidean, in mm) of ``mask``."""
    if not mask.any() or margin_mm <= 0:
        return mask
    return ndimage.distance_transform_edt(~mask, sampling=spacing_zyx) <= margin_mm


def search_region(labels: np.ndarray, spacing_zyx, margin_mm: float = ORGAN_MARGIN_MM) -> np.ndarray:
    """Predicted foreground (organ and tumour) grown by ``margin_mm``."""
    return grow_mask(labels != 0, spacing_zyx, margin_mm)


def find_lesions(
    labels: sitk.Image, anomaly: sitk.Image, card: ModelCard, threshold: float = 0.99,
    margin_mm: float = ORGAN_MARGIN_MM, min_volume_ml: float = 0.1, max_regions: int = 50,
) -> list[Lesion]:
    """Tumour components first, then anomaly components, each sorted by volume (largest first).

    ``labels`` holds the card's label values and ``anomaly`` the calibrated score on the same
    grid. Regions smaller than ``min_volume_ml`` are dropped (single noisy voxels) and at most
    ``max_regions`` of each source are kept.
    """
    label_array = sitk.GetArrayViewFromImage(labels)
    anomaly_array = sitk.GetArrayViewFromImage(anomaly)
    spacing_zyx = tuple(reversed(labels.GetSpacing()))
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    names = {c.value: c.name for c in card.classes}
    tumour_values = card.tumor_values
    masks = {
        "tumor": np.isin(label_array, tumour_values),
        "anomaly": (anomaly_array >= threshold) & search_region(label_array, spacing_zyx, margin_mm),
    }
    lesions: list[Lesion] = []
    for source, mask in masks.items():
        components, count = ndimage.label(mask, structure=_FULL_CONNECTIVITY)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
        keep = [i for i in np.argsort(-sizes, kind="stable") if sizes[i] * voxel_ml >= min_volume_ml][:max_regions]
        boxes = ndimage.find_objects(components)
        for i in keep:
            box = boxes[i]
            inside = components[box] == i + 1
            region_labels = label_array[box][inside]
            if source == "tumor":
                region_labels = region_labels[np.isin(region_labels, tumour_values)]
            values = anomaly_array[box][inside]
            centre_zyx = np.argwhere(inside).mean(axis=0) + [s.start for s in box]
            centre = labels.TransformContinuousIndexToPhysicalPoint([float(c) for c in centre_zyx[::-1]])
            lesions.append(Lesion(
                index=len(lesions) + 1,
                source=source,
                predicted_type=names.get(int(np.bincount(region_labels).argmax()), "unknown"),
                volume_ml=float(sizes[i] * voxel_ml),
                voxel_count=int(sizes[i]),
                mean_anomaly=float(values.mean()),
                peak_anomaly=float(values.max()),
                center_lps=tuple(float(c) for c in centre),
            ))
    return lesions
