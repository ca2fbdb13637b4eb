"""Anomaly calibration: maps a raw score to the fraction of inlier voxels scoring lower.

The raw MaxQuery score −maxₙ R has no fixed scale, and the paper's per-case min-max normalisation
makes a threshold mean something different in every case. The model folder therefore stores
quantiles of the raw score over inlier validation voxels (inside the dilated organ). The
calibrated score of a voxel is the empirical CDF of those inlier scores at its raw score, so a
threshold t on the calibrated map flags about a fraction 1 − t of inlier organ voxels: t = 0.99
means an expected false-alarm rate of 1 % of inlier organ voxels.

That statement holds only for maps made the way the calibration samples were: on the same grid,
with the same sliding-window overlap and mirroring. ``conditions`` records those settings and
``mismatches`` names every way a run differs, so that the predictor can mark such a map as
uncalibrated instead of showing a false-alarm rate that does not hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class AnomalyCalibration:
    score: str
    levels: tuple[float, ...]  # increasing CDF levels in [0, 1]
    values: tuple[float, ...]  # the raw-score quantile at each level (non-decreasing)
    region: str = "inlier validation voxels inside the dilated organ"
    # inference settings of the samples: spacing_zyx (mm), overlap, mirror. Cards written before
    # these were recorded were all fitted at the model spacing, overlap 0.5, without mirroring.
    conditions: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        levels, values = np.asarray(self.levels), np.asarray(self.values)
        if levels.ndim != 1 or levels.shape != values.shape or levels.size < 2:
            raise ValueError("calibration needs two equally long lists (levels, values) of at least 2 entries")
        if np.any(np.diff(levels) <= 0) or np.any(np.diff(values) < 0) or levels[0] < 0 or levels[-1] > 1:
            raise ValueError("calibration levels must increase within [0, 1] and values must not decrease")

    @classmethod
    def fit(cls, score: str, inlier_scores: np.ndarray, num_levels: int = 2001, conditions: dict | None = None,
            ) -> "AnomalyCalibration":
        samples = np.asarray(inlier_scores, dtype=np.float64).ravel()
        if samples.size == 0:
            raise ValueError("no inlier voxels to calibrate the anomaly score on")
        levels = np.linspace(0.0, 1.0, num_levels)
        values = np.maximum.accumulate(np.quantile(samples, levels))
        return cls(score, tuple(levels.tolist()), tuple(values.tolist()), conditions=dict(conditions or {}))

    def mismatches(self, run: dict, model_spacing_zyx) -> list[str]:
        """How a run's settings (same keys as ``conditions``) differ from the calibration's."""
        fitted = {"spacing_zyx": list(model_spacing_zyx), "overlap": 0.5, "mirror": False, **self.conditions}
        reasons = []
        if not np.allclose(fitted["spacing_zyx"], run["spacing_zyx"], rtol=1e-4):
            reasons.append(f"the network ran at {_mm(run['spacing_zyx'])} mm, the calibration was fitted at "
                           f"{_mm(fitted['spacing_zyx'])} mm")
        if abs(float(fitted["overlap"]) - float(run["overlap"])) > 1e-6:
            reasons.append(f"sliding-window overlap {run['overlap']:g}, the calibration used {fitted['overlap']:g}")
        if bool(fitted["mirror"]) != bool(run["mirror"]):
            reasons.append(f"test-time mirroring {'on' if run['mirror'] else 'off'}, the calibration had it "
                           f"{'on' if fitted['mirror'] else 'off'}")
        return reasons

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """Calibrated score in [0, 1]; ties between equal quantiles resolve to the upper level."""
        values, levels = np.asarray(self.values), np.asarray(self.levels)
        unique_values, last = np.unique(values[::-1], return_index=True)
        upper_levels = levels[::-1][last]
        return np.interp(np.asarray(raw, np.float64), unique_values, upper_levels).astype(np.float32)

    def to_dict(self) -> dict:
        return {"score": self.score, "region": self.region, "conditions": self.conditions,
                "levels": list(self.levels), "values": list(self.values)}

    @classmethod
    def from_dict(cls, data: dict) -> "AnomalyCalibration":
        return cls(data["score"], tuple(data["levels"]), tuple(data["values"]), data.get("region", cls.region),
                   dict(data.get("conditions", {})))


def _mm(spacing_zyx) -> str:
    return " x ".join(f"{float(s):g}" for s in spacing_zyx)
