"""Anomaly calibration: maps a raw score to the fraction of inlier voxels scoring lower.

The raw MaxQuery score −maxₙ R has no fixed scale, and the paper's per-case min-max normalisation
makes a threshold mean something different in every case. The model folder therefore stores
quantiles of the raw score over inlier validation voxels (inside the dilated organ). The
calibrated score of a voxel is the empirical CDF of those inlier scores at its raw score, so a
threshold t on the calibrated map flags about a fraction 1 − t of inlier organ voxels: t = 0.99
means an expected false-alarm rate of 1 % of inlier organ voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AnomalyCalibration:
    score: str
    levels: tuple[float, ...]  # increasing CDF levels in [0, 1]
    values: tuple[float, ...]  # the raw-score quantile at each level (non-decreasing)
    region: str = "inlier validation voxels inside the dilated organ"

    def __post_init__(self) -> None:
        levels, values = np.asarray(self.levels), np.asarray(self.values)
        if levels.ndim != 1 or levels.shape != values.shape or levels.size < 2:
            raise ValueError("calibration needs two equally long lists (levels, values) of at least 2 entries")
        if np.any(np.diff(levels) <= 0) or np.any(np.diff(values) < 0) or levels[0] < 0 or levels[-1] > 1:
            raise ValueError("calibration levels must increase within [0, 1] and values must not decrease")

    @classmethod
    def fit(cls, score: str, inlier_scores: np.ndarray, num_levels: int = 2001) -> "AnomalyCalibration":
        samples = np.asarray(inlier_scores, dtype=np.float64).ravel()
        if samples.size == 0:
            raise ValueError("no inlier voxels to calibrate the anomaly score on")
        levels = np.linspace(0.0, 1.0, num_levels)
        values = np.maximum.accumulate(np.quantile(samples, levels))
        return cls(score, tuple(levels.tolist()), tuple(values.tolist()))

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """Calibrated score in [0, 1]; ties between equal quantiles resolve to the upper level."""
        values, levels = np.asarray(self.values), np.asarray(self.levels)
        unique_values, last = np.unique(values[::-1], return_index=True)
        upper_levels = levels[::-1][last]
        return np.interp(np.asarray(raw, np.float64), unique_values, upper_levels).astype(np.float32)

    def to_dict(self) -> dict:
        return {"score": self.score, "region": self.region, "levels": list(self.levels), "values": list(self.values)}

    @classmethod
    def from_dict(cls, data: dict) -> "AnomalyCalibration":
        return cls(data["score"], tuple(data["levels"]), tuple(data["values"]), data.get("region", cls.region))
