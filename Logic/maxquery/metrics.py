"""Evaluation metrics with OOD as the positive class, streamed over many whole volumes.

Voxel-level AUROC, AUPR (average precision) and FPR at 95 % TPR need only the ranking of the
scores, so ``StreamingOODMetrics`` keeps, per distinct score, how many OOD and inlier voxels have
it: exactly scikit-learn's figures, ties included, for any score values (a voxel at 1e5 changes
nothing for the others, unlike a histogram over the score range).

Memory is bounded by ``max_bins`` entries. A score is stored under an integer key that sorts like
the float64 value; when more distinct keys arrive than fit, the key's last bit is dropped (neigh-
bouring values merge, the ranking between bins stays exact) until they fit. The resolution is then
relative to each value (a bin spans about 2**(level - 52) of its magnitude), so extreme values
cost bins of their own, never resolution elsewhere. Scores sharing a bin count as tied; how far
that can move each figure is computed from the counts (``error_bounds``) and is 0 while every
distinct score has its own bin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class StreamingOODMetrics:
    """Accumulate (score, is_ood) pairs volume by volume; ask for AUROC / AUPR / FPR95 at the end."""

    def __init__(self, max_bins: int = 2**18) -> None:
        if max_bins < 2:
            raise ValueError(f"max_bins must be at least 2, got {max_bins}")
        self.max_bins = max_bins
        self.level = 0  # low key bits dropped: 0 = every distinct score has its own bin
        self.keys = np.zeros(0, np.uint64)  # increasing
        self.positives = np.zeros(0, np.int64)
        self.negatives = np.zeros(0, np.int64)

    def update(self, scores: np.ndarray, is_ood: np.ndarray, mask: np.ndarray | None = None) -> None:
        scores = np.asarray(scores, dtype=np.float64).ravel()
        is_ood = np.asarray(is_ood, dtype=bool).ravel()
        if mask is not None:
            keep = np.asarray(mask, dtype=bool).ravel()
            scores, is_ood = scores[keep], is_ood[keep]
        if scores.size == 0:
            return
        if not np.isfinite(scores).all():
            raise ValueError("scores contain NaN or infinite values")
        keys = _sort_keys(scores) >> np.uint64(self.level)
        pos_keys, pos_counts = np.unique(keys[is_ood], return_counts=True)
        neg_keys, neg_counts = np.unique(keys[~is_ood], return_counts=True)
        self._add(np.concatenate([pos_keys, neg_keys]),
                  np.concatenate([pos_counts, np.zeros_like(neg_counts)]),
                  np.concatenate([np.zeros_like(pos_counts), neg_counts]))

    def merge(self, other: "StreamingOODMetrics") -> None:
        """Add everything ``other`` holds (e.g. one case's figures into several subsets)."""
        if other.level > self.level:
            self._coarsen(other.level - self.level)
        self._add(other.keys >> np.uint64(self.level - other.level), other.positives, other.negatives)

    def _add(self, keys: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> None:
        """Add counts under keys of the current level, then coarsen until the bins fit."""
        merged, where = np.unique(np.concatenate([self.keys, keys]), return_inverse=True)
        self.keys = merged
        self.positives = np.bincount(where, np.concatenate([self.positives, positives]), len(merged)).astype(np.int64)
        self.negatives = np.bincount(where, np.concatenate([self.negatives, negatives]), len(merged)).astype(np.int64)
        if len(self.keys) > self.max_bins:  # the fewest dropped bits that fit (a binary search)
            low, high = 1, 63 - self.level  # at 63 bits dropped only the sign is left: 2 bins
            while low < high:
                middle = (low + high) // 2
                shifted = self.keys >> np.uint64(middle)
                if 1 + np.count_nonzero(shifted[1:] != shifted[:-1]) <= self.max_bins:
                    high = middle
                else:
                    low = middle + 1
            self._coarsen(low)

    def _coarsen(self, bits: int) -> None:
        """Drop ``bits`` more key bits; bins whose keys become equal are summed."""
        self.level += bits
        keys = self.keys >> np.uint64(bits)
        if keys.size:
            starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
            self.keys = keys[starts]
            self.positives = np.add.reduceat(self.positives, starts)
            self.negatives = np.add.reduceat(self.negatives, starts)

    def _curve(self) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Cumulative true/false positives for thresholds from the highest bin down."""
        tp = np.cumsum(self.positives[::-1])
        fp = np.cumsum(self.negatives[::-1])
        n_pos, n_neg = int(tp[-1]) if tp.size else 0, int(fp[-1]) if fp.size else 0
        if n_pos == 0 or n_neg == 0:
            raise ValueError(
                f"OOD metrics need both classes; got {n_pos} OOD and {n_neg} inlier voxels"
            )
        return tp, fp, n_pos, n_neg

    def auroc(self) -> float:
        tp, fp, n_pos, n_neg = self._curve()
        tpr = np.concatenate([[0.0], tp / n_pos])
        fpr = np.concatenate([[0.0], fp / n_neg])
        return float(np.trapezoid(tpr, fpr))

    def aupr(self) -> float:
        """Average precision, as scikit-learn's ``average_precision_score`` computes it."""
        tp, fp, n_pos, _ = self._curve()
        precision = tp / (tp + fp)  # every bin holds at least one voxel
        recall_steps = np.diff(np.concatenate([[0.0], tp / n_pos]))
        return float(np.sum(recall_steps * precision))

    def fpr_at_tpr(self, target: float = 0.95) -> float:
        tp, fp, n_pos, n_neg = self._curve()
        first = int(np.searchsorted(tp / n_pos, target - 1e-12))
        return float(fp[min(first, len(fp) - 1)] / n_neg)

    def error_bounds(self, target: float = 0.95) -> dict[str, float]:
        """How far each figure can lie from the exact (scikit-learn) one; all 0 at level 0.

        Within a bin the order of OOD and inlier voxels is unknown: AUROC counts those pairs as
        half, off by at most half of them; FPR95 takes the bin's last threshold, off by at most
        the bin's inlier share; the precision of an OOD voxel inside a bin differs from the bin's
        by at most the bin's count over the count down to the bin's end.
        """
        if self.level == 0:
            return {"auroc": 0.0, "aupr": 0.0, "fpr95": 0.0}
        tp, fp, n_pos, n_neg = self._curve()
        pos, neg = self.positives[::-1], self.negatives[::-1]
        first = min(int(np.searchsorted(tp / n_pos, target - 1e-12)), len(fp) - 1)
        return {
            "auroc": float(0.5 * np.sum(pos * neg) / (n_pos * n_neg)),
            "aupr": float(np.sum(pos / n_pos * np.where(pos + neg > 1, (pos + neg) / (tp + fp), 0.0))),
            "fpr95": float(neg[first] / n_neg),
        }

    @property
    def has_both_classes(self) -> bool:
        return bool(self.positives.sum() > 0 and self.negatives.sum() > 0)

    def summary(self) -> dict[str, float]:
        return {"auroc": self.auroc(), "aupr": self.aupr(), "fpr95": self.fpr_at_tpr(0.95)}

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        tp, fp, n_pos, n_neg = self._curve()
        return np.concatenate([[0.0], fp / n_neg]), np.concatenate([[0.0], tp / n_pos])

    def pr_curve(self) -> tuple[np.ndarray, np.ndarray]:
        tp, fp, n_pos, _ = self._curve()
        return tp / n_pos, tp / (tp + fp)


_SIGN_BIT = np.uint64(1 << 63)


def _sort_keys(scores: np.ndarray) -> np.ndarray:
    """uint64 keys that sort as the float64 ``scores`` do (IEEE 754: flip the negatives' bits)."""
    bits = (scores + 0.0).view(np.uint64)  # + 0.0 turns -0.0 into 0.0: equal scores, equal keys
    flip = (np.uint64(0) - (bits >> np.uint64(63))) | _SIGN_BIT  # all bits for negatives, else the sign
    return bits ^ flip


def rank_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U with midranks for ties); for case-level detection."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"case-level AUC needs OOD and inlier cases; got {n_pos} and {n_neg}")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def case_score(raw: np.ndarray, tumour_mask: np.ndarray) -> float:
    """Case-level anomaly (paper §4.2): the mean raw score inside the predicted tumour region.

    The one definition: the predictor takes it on the model grid, where the network ran, so the
    figure does not depend on the input's voxel size, for every score
    (``SegmentationResult.case_scores``); the evaluation's case-level AUC ranks these. The case
    score a user sees (summary, Slicer) is the same value on the anomaly map's scale: calibrated
    (monotone, so the ranking of cases is unchanged), or per-case min-max without calibration.
    A case with no predicted tumour voxel scores the minimum of its map: nothing to flag.
    """
    tumour_mask = np.asarray(tumour_mask, dtype=bool)
    if not tumour_mask.any():
        return float(np.min(raw))
    return float(np.mean(raw[tumour_mask], dtype=np.float64))


def dice(prediction: np.ndarray, reference: np.ndarray, label: int) -> float:
    """Dice of one label; NaN when the label is absent from both (excluded from means)."""
    p, r = prediction == label, reference == label
    denom = int(p.sum()) + int(r.sum())
    if denom == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(p, r).sum()) / denom


@dataclass
class DiceAccumulator:
    """Per-case Dice per label, averaged over the cases where the label is present."""

    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        self.values: dict[int, list[float]] = {label: [] for label in self.labels}

    def update(self, prediction: np.ndarray, reference: np.ndarray) -> dict[int, float]:
        case = {label: dice(prediction, reference, label) for label in self.labels}
        self.add(case)
        return case

    def add(self, case: dict[int, float]) -> None:
        """Add one case's Dice values (as ``update`` returns them), e.g. to several accumulators."""
        for label, value in case.items():
            if not np.isnan(value):
                self.values[label].append(value)

    def mean(self) -> dict[int, float]:
        return {label: float(np.mean(v)) if v else float("nan") for label, v in self.values.items()}


class ConfusionCounts:
    """Voxel counts of reference class x predicted class, summed over cases: which type a model
    takes for which (a cyst read as liver, an unseen lesion read as a known tumour type).

    Values outside ``reference_values`` / ``predicted_values`` are not counted."""

    def __init__(self, reference_values: tuple[int, ...], predicted_values: tuple[int, ...]) -> None:
        self.reference_values = tuple(reference_values)
        self.predicted_values = tuple(predicted_values)
        self.counts = np.zeros((len(self.reference_values), len(self.predicted_values)), dtype=np.int64)

    @staticmethod
    def _indices(array: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
        flat = np.asarray(array, dtype=np.int64).ravel()
        lookup = np.full(max(*values, int(flat.max(initial=0))) + 1, -1, dtype=np.int64)
        lookup[list(values)] = np.arange(len(values))
        return np.where(flat >= 0, lookup[np.clip(flat, 0, None)], -1)

    def update(self, prediction: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """Add one case; returns its counts (to add to other accumulators, e.g. a subset's)."""
        if prediction.shape != reference.shape:
            raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} differ in shape")
        ref = self._indices(reference, self.reference_values)
        pred = self._indices(prediction, self.predicted_values)
        keep = (ref >= 0) & (pred >= 0)
        n_pred = len(self.predicted_values)
        case = np.bincount(ref[keep] * n_pred + pred[keep], minlength=self.counts.size).reshape(self.counts.shape)
        self.add(case)
        return case

    def add(self, counts: np.ndarray) -> None:
        self.counts += counts
