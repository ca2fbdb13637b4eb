"""The evaluation region: the organ with its lesions, dilated by ``ORGAN_MARGIN_MM`` (the lesion
search's margin, ``maxquery.inference.lesions``).

OOD localisation is scored (and the anomaly calibrated) inside this region, where a radiologist
looks for lesions; the paper's whole-volume figures are reported beside it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from maxquery.inference.lesions import ORGAN_MARGIN_MM, grow_mask


def organ_region(
    label: np.ndarray, foreground_values: Iterable[int], spacing_zyx: Sequence[float],
    margin_mm: float = ORGAN_MARGIN_MM,
) -> np.ndarray:
    """Voxels within ``margin_mm`` of any voxel whose label is in ``foreground_values``."""
    return grow_mask(np.isin(label, list(foreground_values)), spacing_zyx, margin_mm)
