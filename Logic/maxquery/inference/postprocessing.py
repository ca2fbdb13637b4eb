"""nnU-Net's postprocessing: keep only the largest connected foreground region.

A model of one organ predicts the organ and its tumours as one connected region; a region apart
from it is a false positive (another organ of the same density taken for the liver, a tumour
speck outside the organ). As in nnU-Net, whether a model applies it is decided on its validation
cases (``maxquery_training.postprocessing``) and kept in the model card
(``keep_largest_component``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26-neighbourhood, as nnU-Net's (skimage's) default


def outside_largest_component(foreground: np.ndarray) -> np.ndarray:
    """The voxels of ``foreground`` (a 3D mask) that are not in its largest connected region."""
    components, count = ndimage.label(foreground, CONNECTIVITY)
    if count <= 1:
        return np.zeros(foreground.shape, bool)
    largest = 1 + int(np.bincount(components.ravel())[1:].argmax())
    return (components != 0) & (components != largest)


def keep_largest_component(labels: np.ndarray, background: int = 0) -> np.ndarray:
    """``labels`` with every foreground voxel outside the largest foreground region set to ``background``."""
    out = labels.copy()
    out[outside_largest_component(labels != background)] = background
    return out
