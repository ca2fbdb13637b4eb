"""Geometry and intensity preprocessing shared by training and inference (nnU-Net style).

Arrays are always in SimpleITK's array order (z, y, x); spacings given as ``spacing_zyx`` follow
the same order. Images are first reoriented to LPS so that array axes mean the same thing in every
case, then resampled to the model's spacing, then CT-normalised with the model card's statistics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

CANONICAL_ORIENTATION = "LPS"


def to_canonical(image: sitk.Image) -> sitk.Image:
    """Reorient (axis permutation/flips only, no interpolation) so the direction is LPS-aligned."""
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def spacing_zyx(image: sitk.Image) -> tuple[float, float, float]:
    return tuple(float(s) for s in reversed(image.GetSpacing()))


def resample_to_spacing(image: sitk.Image, target_zyx: Sequence[float], is_label: bool = False) -> sitk.Image:
    """Resample onto a grid with the same origin, direction and extent at ``target_zyx`` spacing.

    Labels use nearest neighbour, images B-spline of order 3 (nnU-Net's choice) unless the
    spacing is unchanged, in which case the image is returned as it is.
    """
    target_xyz = tuple(float(s) for s in reversed(target_zyx))
    old_spacing, old_size = image.GetSpacing(), image.GetSize()
    if np.allclose(old_spacing, target_xyz, rtol=1e-5):
        return image
    new_size = [max(1, int(round(n * s / t))) for n, s, t in zip(old_size, old_spacing, target_xyz)]
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkBSpline
    default = 0 if is_label else float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(
        image, new_size, sitk.Transform(), interpolator, image.GetOrigin(), target_xyz,
        image.GetDirection(), default, image.GetPixelID() if is_label else sitk.sitkFloat32,
    )


def resample_like(image: sitk.Image, reference: sitk.Image, is_label: bool = False) -> sitk.Image:
    """Resample through physical space onto ``reference``'s grid (used to go back to the input)."""
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, 0.0, image.GetPixelID())


@dataclass(frozen=True)
class CTNormalization:
    """nnU-Net's CT scheme: clip to foreground percentiles, then z-score with foreground stats."""

    clip_low: float
    clip_high: float
    mean: float
    std: float

    @classmethod
    def from_foreground(cls, values: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5,
                        window: Sequence[float] | None = None) -> "CTNormalization":
        """Clip to ``window`` (HU) if given, else to the percentiles; z-score with the clipped stats."""
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:
            raise ValueError("no foreground voxels to compute the CT normalisation from")
        if window is not None:
            if len(window) != 2 or not window[0] < window[1]:
                raise ValueError(f"ct_window must be [low, high] HU with low < high; got {window!r}")
            low, high = window
        else:
            low, high = np.percentile(values, [low_pct, high_pct])
        clipped = np.clip(values, low, high)
        return cls(float(low), float(high), float(clipped.mean()), float(max(clipped.std(), 1e-6)))

    def __call__(self, array: np.ndarray) -> np.ndarray:
        out = np.clip(array.astype(np.float32), self.clip_low, self.clip_high)
        return (out - np.float32(self.mean)) / np.float32(self.std)

    def to_dict(self) -> dict:
        return {"scheme": "ct", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "CTNormalization":
        if data.get("scheme", "ct") != "ct":
            raise ValueError(f"unsupported intensity normalisation scheme {data.get('scheme')!r}")
        return cls(float(data["clip_low"]), float(data["clip_high"]), float(data["mean"]), float(data["std"]))
