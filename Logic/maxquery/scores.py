"""Per-voxel out-of-distribution scores, higher = more anomalous.

Every score is computed in two steps so that a sliding-window predictor can serve them all:
``per_patch`` turns one network output into a per-voxel map that is averaged over overlapping
patches with the same Gaussian weights as the probabilities, and ``finalize`` (optional) works on
the whole aggregated volume (SML's standardisation, boundary suppression and dilated smoothing).

Scores: ``maxquery`` −maxₙ R (paper Eq. 9), ``maxquery_post`` −maxₙ M, ``msp`` −max_k softmax(Z),
``maxlogit`` −max_k Z, ``sml`` standardised max logit (Jung et al., ICCV 2021) and ``mc_dropout``
(predictive entropy over T stochastic passes, Kendall & Gal 2017).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from .network import MaskPrediction


@dataclass
class ScoreContext:
    """What ``finalize`` may need besides the aggregated map."""

    labels: np.ndarray | None = None  # predicted class indices (network output order) on the same grid
    sml_stats: dict | None = None  # MaxLogitStatistics.to_dict(): per predicted class voxels, mean, std
    spacing_zyx: tuple[float, float, float] | None = None  # of that grid, mm


@dataclass(frozen=True)
class AnomalyScore:
    name: str
    description: str
    per_patch: Callable[[MaskPrediction], torch.Tensor]
    finalize: Callable[[np.ndarray, ScoreContext], np.ndarray] | None = None
    needs_queries: bool = False
    stochastic_passes: bool = False


def _maxquery(out: MaskPrediction) -> torch.Tensor:
    return -out.query_responses.amax(dim=1)


def _maxquery_post(out: MaskPrediction) -> torch.Tensor:
    return -out.assignments.amax(dim=1)


def _msp(out: MaskPrediction) -> torch.Tensor:
    return -out.logits.softmax(dim=1).amax(dim=1)


def _max_logit(out: MaskPrediction) -> torch.Tensor:
    return out.logits.amax(dim=1)


def _neg_max_logit(out: MaskPrediction) -> torch.Tensor:
    return -_max_logit(out)


def predictive_entropy(mean_probabilities: torch.Tensor) -> torch.Tensor:
    """Entropy over classes (dim 1) of the MC-averaged softmax."""
    p = mean_probabilities.clamp_min(1e-8)
    return -(p * p.log()).sum(dim=1)


def mc_dropout_prediction(model: torch.nn.Module, x: torch.Tensor, passes: int) -> MaskPrediction:
    """Average softmax over ``passes`` forward passes with only the dropout layers stochastic.

    Returns a prediction whose logits are the log of the mean probabilities, so that
    ``softmax(logits)`` is the MC estimate. The model needs ``dropout`` > 0 in its configuration.
    """
    # Only layers that actually drop something: MaxQueryNet always holds an nn.Dropout(p=0) in its
    # FFNs, and passes through those would be identical while looking like a valid MC estimate.
    dropouts = [m for m in model.modules() if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout3d)) and m.p > 0]
    if passes < 1:
        raise ValueError(f"mc_dropout needs at least one forward pass, got passes={passes}")
    if not dropouts:
        raise ValueError("mc_dropout needs a network trained with dropout > 0; this one has no active dropout layer")
    states = [m.training for m in dropouts]
    try:
        for m in dropouts:
            m.train()
        mean = sum(_logits_of(model(x)).softmax(dim=1) for _ in range(passes)) / passes
    finally:
        for m, state in zip(dropouts, states):
            m.train(state)
    return MaskPrediction(mean.clamp_min(1e-8).log(), None)  # type: ignore[arg-type]


def _logits_of(output) -> torch.Tensor:
    return output.logits if isinstance(output, MaskPrediction) else output


# SML's post-processing with Jung et al.'s settings (ICCV 2021, official code): boundary width 4 and
# 4 suppression iterations, then a 7-tap Gaussian (sigma = 1 tap) dilated by 6. They are pixels of
# Cityscapes images; a pixel is taken here as the in-plane voxel of the paper's CT (0.76 mm,
# configs/paper.yaml), and the sizes are applied in mm, so that every grid gets the same physical
# filter (on the 3 mm demo grid: a 1-voxel boundary band, taps 2 voxels apart).
SML_PIXEL_MM = 0.76
SML_BOUNDARY_WIDTH_MM = 4 * SML_PIXEL_MM
SML_BOUNDARY_ITERATIONS = 4
SML_SMOOTHING_STEP_MM = 6 * SML_PIXEL_MM  # distance between neighbouring taps (Jung's dilation)
SML_SMOOTHING_TAPS = 7  # per axis; the Gaussian's sigma is one step
# A class predicted in fewer training voxels than this (neighbouring voxels are far from independent)
# or whose max logit hardly varies gets the pooled statistics of all classes instead of its own.
SML_MIN_CLASS_VOXELS = 1000
SML_MIN_STD_FRACTION = 0.01  # of the pooled standard deviation


class MaxLogitStatistics:
    """Per predicted class: voxel count, mean and standard deviation of the max logit.

    Streamed case by case with Chan et al.'s pairwise update (count, mean, sum of squared
    deviations), which stays exact over any number of voxels, unlike sums of squares.
    """

    def __init__(self, num_classes: int) -> None:
        self.count = np.zeros(num_classes)
        self.mean = np.zeros(num_classes)
        self.squares = np.zeros(num_classes)  # sum of squared deviations from the class mean
        self.cases = 0

    def update(self, max_logit: np.ndarray, class_indices: np.ndarray) -> None:
        """Add one case: its max logit map and predicted class indices on the same grid."""
        index = np.asarray(class_indices).ravel().astype(np.intp)
        values = np.asarray(max_logit, np.float64).ravel()
        k = len(self.count)
        count = np.bincount(index, minlength=k).astype(np.float64)
        mean = np.bincount(index, values, k) / np.maximum(count, 1)
        squares = np.bincount(index, (values - mean[index]) ** 2, k)
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / np.maximum(total, 1)
        self.squares += squares + delta**2 * self.count * count / np.maximum(total, 1)
        self.count = total
        self.cases += 1

    def to_dict(self) -> dict:
        """The model card's ``sml_stats``: the mean and std SML uses per class (``fallback`` lists
        the classes that got the pooled ones), with the voxel counts and cases they come from."""
        std = np.sqrt(self.squares / np.maximum(self.count, 1))
        mean, std, fallback = _with_pooled_fallback(self.count, self.mean, std)
        return {"voxels": self.count.astype(int).tolist(), "mean": mean.tolist(), "std": std.tolist(),
                "fallback": np.flatnonzero(fallback).tolist(), "cases": self.cases}


def sml_parameters(stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per class to standardise with, from a model card's ``sml_stats``.

    Cards written before the pooled fallback (no ``fallback`` entry) get it here, from their
    per-class voxel counts, so that a class seen in a handful of voxels (or none: std 1e-6)
    cannot turn tiny differences into huge scores.
    """
    try:
        count, mean, std = (np.asarray(stats[key], np.float64) for key in ("voxels", "mean", "std"))
    except KeyError as err:
        raise ValueError(f"the model card's SML statistics lack {err}; export the model again "
                         "(maxquery-train export) to store per-class voxel counts") from err
    if not (count.shape == mean.shape == std.shape) or not np.all(np.isfinite(mean) & np.isfinite(std)):
        raise ValueError("the model card's SML statistics are malformed (per-class voxels, mean and std "
                         "of equal length and finite); export the model again")
    if "fallback" not in stats:
        mean, std, _ = _with_pooled_fallback(count, mean, std)
    if not np.all(std > 0):
        raise ValueError("the model card's SML statistics hold a standard deviation that is not positive; "
                         "export the model again")
    return mean, std


def _with_pooled_fallback(count: np.ndarray, mean: np.ndarray, std: np.ndarray):
    """A class with fewer than ``SML_MIN_CLASS_VOXELS`` training voxels, or a standard deviation
    below ``SML_MIN_STD_FRACTION`` of the pooled one, takes the pooled mean and standard deviation
    of all voxels. Returns the means, standard deviations and which classes fell back."""
    total = count.sum()
    pooled_mean = float((count * mean).sum() / max(total, 1))
    pooled_std = float(np.sqrt((count * (std**2 + (mean - pooled_mean) ** 2)).sum() / max(total, 1)))
    if not pooled_std > 0:
        raise ValueError(f"SML needs max logits that vary over the training voxels; got {int(total)} voxels "
                         f"with a standard deviation of {pooled_std:g}")
    fallback = (count < SML_MIN_CLASS_VOXELS) | (std < SML_MIN_STD_FRACTION * pooled_std)
    return np.where(fallback, pooled_mean, mean), np.where(fallback, pooled_std, std), fallback


def standardized_max_logit(max_logit: np.ndarray, labels: np.ndarray, stats: dict, spacing_zyx) -> np.ndarray:
    """SML (Jung et al. 2021) in 3D, returned negated so that higher = more anomalous.

    1. standardise the max logit with the mean/std of the predicted class (``sml_parameters``);
    2. boundary suppression: voxels near a class boundary take the mean of their non-boundary
       3×3×3 neighbours, in ``SML_BOUNDARY_ITERATIONS`` steps from a band ``SML_BOUNDARY_WIDTH_MM``
       wide down to the boundary itself (the standardised max logit is unreliable there);
    3. dilated smoothing: a Gaussian with taps ``SML_SMOOTHING_STEP_MM`` apart.
    """
    mean, std = sml_parameters(stats)
    if len(mean) <= int(labels.max(initial=0)):
        raise ValueError(f"the SML statistics cover {len(mean)} classes but the labels reach {int(labels.max())}")
    sml = ((max_logit - mean[labels]) / std[labels]).astype(np.float32)
    return -dilated_smoothing(suppress_boundaries(sml, labels, spacing_zyx), spacing_zyx)


def suppress_boundaries(values: np.ndarray, labels: np.ndarray, spacing_zyx) -> np.ndarray:
    """Jung et al.'s iterative boundary suppression, with the band's width in mm."""
    edge = ndimage.maximum_filter(labels, size=3, mode="nearest") != ndimage.minimum_filter(labels, size=3, mode="nearest")
    if not edge.any():
        return values
    distance = ndimage.distance_transform_edt(~edge, sampling=spacing_zyx)  # mm to the nearest edge voxel
    footprint = np.ones((3, 3, 3), np.float32)
    step = SML_BOUNDARY_WIDTH_MM / SML_BOUNDARY_ITERATIONS
    for iteration in range(SML_BOUNDARY_ITERATIONS):
        band = distance <= SML_BOUNDARY_WIDTH_MM - step * (iteration + 1) + 1e-6  # the last: the edge only
        valid = (~band).astype(np.float32)
        sums = ndimage.correlate(values * valid, footprint, mode="nearest")
        counts = ndimage.correlate(valid, footprint, mode="nearest")
        values = np.where(band & (counts > 0), sums / np.maximum(counts, 1), values).astype(np.float32)
    return values


def dilated_smoothing(values: np.ndarray, spacing_zyx) -> np.ndarray:
    """Separable Gaussian with ``SML_SMOOTHING_TAPS`` taps per axis about ``SML_SMOOTHING_STEP_MM``
    apart (a whole number of voxels, at least 1); weights from the taps' true distances in mm."""
    half = SML_SMOOTHING_TAPS // 2
    for axis, spacing in enumerate(spacing_zyx):
        step = max(1, round(SML_SMOOTHING_STEP_MM / spacing))
        weights = np.exp(-0.5 * (np.arange(-half, half + 1) * step * spacing / SML_SMOOTHING_STEP_MM) ** 2)
        kernel = np.zeros(2 * half * step + 1)
        kernel[::step] = weights / weights.sum()
        values = ndimage.correlate1d(values, kernel, axis=axis, mode="nearest")
    return values


def _finalize_sml(aggregated: np.ndarray, ctx: ScoreContext) -> np.ndarray:
    if ctx.sml_stats is None or ctx.labels is None:
        raise ValueError(
            "the 'sml' score needs per-class max-logit statistics from training data; this model "
            "folder has none (train with maxquery-train, which stores them, or drop 'sml')"
        )
    if ctx.spacing_zyx is None:
        raise ValueError("the 'sml' score needs the voxel spacing of the grid it runs on")
    return standardized_max_logit(aggregated, ctx.labels, ctx.sml_stats, ctx.spacing_zyx)


SCORES: dict[str, AnomalyScore] = {
    s.name: s
    for s in (
        AnomalyScore("maxquery", "MaxQuery, negative maximal pre-softmax query response", _maxquery,
                     needs_queries=True),
        AnomalyScore("maxquery_post", "negative maximal post-softmax cluster assignment", _maxquery_post,
                     needs_queries=True),
        AnomalyScore("msp", "negative maximum softmax probability", _msp),
        AnomalyScore("maxlogit", "negative maximum logit", _neg_max_logit),
        AnomalyScore("sml", "negative standardised max logit with boundary suppression and dilated smoothing",
                     _max_logit, finalize=_finalize_sml),
        AnomalyScore("mc_dropout", "predictive entropy over stochastic forward passes with dropout on",
                     lambda out: predictive_entropy(out.logits.softmax(dim=1)), stochastic_passes=True),
    )
}


def get_score(name: str) -> AnomalyScore:
    if name not in SCORES:
        raise ValueError(f"unknown anomaly score {name!r}; available: {', '.join(SCORES)}")
    return SCORES[name]
