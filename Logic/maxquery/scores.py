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

    labels: np.ndarray | None = None  # predicted label map on the same grid
    sml_stats: dict | None = None  # {"mean": [...K], "std": [...K]} per predicted class


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


def standardized_max_logit(
    max_logit: np.ndarray, labels: np.ndarray, stats: dict, boundary_width: int = 2, smoothing_dilation: int = 3,
) -> np.ndarray:
    """SML (Jung et al. 2021) in 3D, returned negated so that higher = more anomalous.

    1. standardise the max logit with the mean/std of the predicted class over training voxels;
    2. boundary suppression: on class boundaries (width ``boundary_width`` voxels) replace the value
       by the mean of the non-boundary values in a 3×3×3 neighbourhood, iterated inward;
    3. dilated smoothing: a 3×3×3 Gaussian-weighted mean with dilation ``smoothing_dilation``.
    """
    mean = np.asarray(stats["mean"], dtype=np.float32)
    std = np.asarray(stats["std"], dtype=np.float32)
    sml = (max_logit - mean[labels]) / np.maximum(std[labels], 1e-6)
    boundary = np.zeros(labels.shape, bool)
    for value in np.unique(labels):
        region = labels == value
        boundary |= region & ~ndimage.binary_erosion(region, iterations=boundary_width, border_value=1)
    footprint = np.ones((3, 3, 3), np.float32)
    for _ in range(boundary_width):
        if not boundary.any():
            break
        valid = (~boundary).astype(np.float32)
        sums = ndimage.convolve(sml * valid, footprint, mode="nearest")
        counts = ndimage.convolve(valid, footprint, mode="nearest")
        fill = boundary & (counts > 0)
        sml = np.where(fill, sums / np.maximum(counts, 1), sml)
        boundary &= ~fill
    kernel = np.zeros((2 * smoothing_dilation + 1,) * 3, np.float32)
    taps = np.exp(-0.5 * np.array([-1.0, 0.0, 1.0]) ** 2)
    weights = taps[:, None, None] * taps[None, :, None] * taps[None, None, :]
    kernel[::smoothing_dilation, ::smoothing_dilation, ::smoothing_dilation] = weights / weights.sum()
    return -ndimage.convolve(sml.astype(np.float32), kernel, mode="nearest")


def _finalize_sml(aggregated: np.ndarray, ctx: ScoreContext) -> np.ndarray:
    if ctx.sml_stats is None or ctx.labels is None:
        raise ValueError(
            "the 'sml' score needs per-class max-logit statistics from training data; this model "
            "folder has none (train with maxquery-train, which stores them, or drop 'sml')"
        )
    return standardized_max_logit(aggregated, ctx.labels, ctx.sml_stats)


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
