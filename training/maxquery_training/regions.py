"""The evaluation region: the organ with its lesions, dilated by a margin in millimetres.

OOD localisation is scored (and the anomaly calibrated) inside this region, where a radiologist
looks for lesions; the paper's whole-volume figures are reported beside it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

DEFAULT_MARGIN_MM = 5.0


def organ_region(
    label: np.ndarray, foreground_values: Iterable[int], spacing_zyx: Sequence[float],
    margin_mm: float = DEFAULT_MARGIN_MM,
) -> np.ndarray:
    """Voxels within ``margin_mm`` of any voxel whose label is in ``foreground_values``."""
    inside = np.isin(label, list(foreground_values))
    if not inside.any():
        return inside
    distance = ndimage.distance_transform_edt(~inside, sampling=spacing_zyx)
    return distance <= margin_mm
