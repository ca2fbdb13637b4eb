"""Postprocessing of the labels: keep the largest foreground region; give each lesion one type.

A model of one organ predicts the organ and its tumours as one connected region; a region apart
from it is a false positive (another organ of the same density taken for the liver, a tumour
speck outside the organ): nnU-Net keeps only the largest region. A lesion has one type, but a
voxel-wise argmax can split one lesion between types (an HCC with a rim read as metastasis); the
second step gives every connected tumour region the type most of its voxels have. As in nnU-Net,
whether a model applies each step is decided on its validation cases
(``maxquery_training.postprocessing``) and kept in the model card (``keep_largest_component``,
``one_type_per_lesion``).
"""

from __future__ import annotations

from collections.abc import Sequence

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


def one_type_per_lesion(labels: np.ndarray, tumour_values: Sequence[int]) -> np.ndarray:
    """``labels`` with every connected tumour region (voxels of any of ``tumour_values``) set to the
    type most of its voxels have; a tie goes to the type listed first. Other labels are unchanged."""
    values = np.asarray(tumour_values)
    tumour = np.isin(labels, values)
    components, count = ndimage.label(tumour, CONNECTIVITY)
    if count == 0:
        return labels.copy()
    votes = np.stack([np.bincount(components[labels == v], minlength=count + 1) for v in values], axis=1)
    out = labels.copy()
    out[tumour] = values[votes.argmax(axis=1)][components[tumour]]
    return out
