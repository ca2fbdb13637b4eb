"""Streamed OOD metrics against scikit-learn's exact values; case-level AUC; Dice.

While every distinct score has its own bin the figures equal scikit-learn's (1e-12); once bins
merge they must stay within the bounds the metrics report, and within 0.005, extreme scores included.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from maxquery.metrics import ConfusionCounts, DiceAccumulator, StreamingOODMetrics, case_score, dice, rank_auc

EXACT = 1e-12


def sklearn_fpr95(labels: np.ndarray, scores: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr, 0.95)])


def reference(labels, scores) -> dict[str, float]:
    return {
        "auroc": roc_auc_score(labels, scores),
        "aupr": average_precision_score(labels, scores),
        "fpr95": sklearn_fpr95(labels, scores),
    }


def assert_matches(metrics: StreamingOODMetrics, labels, scores, tolerance: float = EXACT):
    got, ref, bounds = metrics.summary(), reference(labels, scores), metrics.error_bounds()
    for key in ref:
        assert abs(got[key] - ref[key]) <= bounds[key] + EXACT, f"{key}: {got[key]} vs sklearn {ref[key]}, bound {bounds[key]}"
        assert got[key] == pytest.approx(ref[key], abs=tolerance), f"{key}: streamed {got[key]} vs sklearn {ref[key]}"


def make_data(seed: int, n: int = 6000, ties: bool = False):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.2
    scores = rng.normal(size=n) + 1.2 * labels
    if ties:
        scores = np.round(scores, 1)  # a few dozen distinct values, heavy ties across classes
    return labels, scores


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "tied"])
@pytest.mark.parametrize("seed", [0, 1])
def test_single_chunk_matches_sklearn(seed, ties):
    labels, scores = make_data(seed, ties=ties)
    metrics = StreamingOODMetrics()
    metrics.update(scores.reshape(10, 20, 30), labels.reshape(10, 20, 30))
    assert_matches(metrics, labels, scores)


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "tied"])
def test_chunks_with_growing_ranges_match_sklearn_exactly(ties):
    rng = np.random.default_rng(7)
    chunks = []
    # The first chunk is narrow; the later ones reach far outside it on both sides.
    for lo, hi in ((0.0, 1.0), (-3.0, 0.5), (0.2, 9.0), (-40.0, 60.0), (0.4, 0.6)):
        n = 3000
        labels = rng.random(n) < 0.3
        scores = rng.uniform(lo, hi, n) + 0.3 * (hi - lo) * labels
        if ties:
            scores = np.round(scores, 0)
        chunks.append((labels, scores))
    metrics = StreamingOODMetrics()
    for labels, scores in chunks:
        metrics.update(scores, labels)
    assert metrics.level == 0 and metrics.error_bounds() == {"auroc": 0.0, "aupr": 0.0, "fpr95": 0.0}
    assert_matches(metrics, np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]))


def extreme_case(n: int = 2_000_000, seed: int = 0):
    """The issue's case: 2 M voxels, 0.3 % OOD, and a few inlier voxels with extreme scores."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.003
    scores = (rng.normal(size=n) + 1.5 * labels).astype(np.float32)
    inliers = np.flatnonzero(~labels)
    scores[inliers[:3]] = (1e5, -1e5, 3e38)
    scores[inliers[3:6]] = (1e-30, -0.0, 0.0)  # tiny values and both zeros sort as scikit-learn sorts them
    return labels, scores


def test_extreme_scores_leave_the_figures_exact():
    labels, scores = extreme_case()
    metrics = StreamingOODMetrics()  # 2 M distinct scores: more than the bins, so neighbours merge
    for chunk in np.array_split(np.arange(labels.size), 4):
        metrics.update(scores[chunk], labels[chunk])
    assert metrics.level > 0 and len(metrics.keys) <= metrics.max_bins
    assert_matches(metrics, labels, scores, tolerance=0.005)
    bounds = metrics.error_bounds()
    assert bounds["auroc"] < 1e-4 and bounds["fpr95"] < 1e-4 and bounds["aupr"] < 1e-3


@pytest.mark.parametrize("max_bins", [64, 1024])
def test_merged_bins_stay_within_the_reported_bounds(max_bins):
    labels, scores = make_data(5, n=20000)
    scores = np.concatenate([scores, [1e6, -1e6]])
    labels = np.concatenate([labels, [False, True]])
    metrics = StreamingOODMetrics(max_bins=max_bins)
    metrics.update(scores, labels)
    assert len(metrics.keys) <= max_bins
    assert_matches(metrics, labels, scores, tolerance=1.0)  # the reported bounds are the check here
    if max_bins == 1024:  # a thousand bins already land within 0.005
        assert_matches(metrics, labels, scores, tolerance=0.005)


def test_merging_accumulators_equals_one_stream():
    labels, scores = make_data(6, n=9000)
    whole, parts = StreamingOODMetrics(max_bins=500), StreamingOODMetrics(max_bins=500)
    whole.update(scores, labels)
    for chunk in np.array_split(np.arange(labels.size), 3):
        case = StreamingOODMetrics(max_bins=500 if chunk[0] else 100_000)  # one case at a finer level
        case.update(scores[chunk], labels[chunk])
        parts.merge(case)
    assert parts.level == whole.level
    np.testing.assert_array_equal(parts.keys, whole.keys)
    np.testing.assert_array_equal(parts.positives, whole.positives)
    assert parts.summary() == whole.summary()


def test_mask_selects_voxels_and_perfect_separation():
    scores = np.array([0.1, 0.2, 0.9, 0.8, 5.0])
    is_ood = np.array([0, 0, 1, 1, 0], bool)
    mask = np.array([1, 1, 1, 1, 0], bool)  # the 5.0 inlier is outside the evaluated region
    metrics = StreamingOODMetrics()
    metrics.update(scores, is_ood, mask=mask)
    assert metrics.summary() == pytest.approx({"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}, abs=1e-9)
    unmasked = StreamingOODMetrics()
    unmasked.update(scores, is_ood)
    assert unmasked.auroc() == pytest.approx(roc_auc_score(is_ood, scores), abs=EXACT)
    assert unmasked.auroc() < 0.9


def test_curves_are_monotone_and_bounded():
    labels, scores = make_data(4)
    metrics = StreamingOODMetrics()
    metrics.update(scores, labels)
    fpr, tpr = metrics.roc_curve()
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == pytest.approx(1) and tpr[-1] == pytest.approx(1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    recall, precision = metrics.pr_curve()
    assert np.all((precision >= 0) & (precision <= 1)) and np.all(np.diff(recall) >= 0)


def test_errors_for_one_class_and_bad_scores():
    metrics = StreamingOODMetrics()
    metrics.update(np.random.default_rng(0).normal(size=100), np.zeros(100, bool))
    for method in (metrics.auroc, metrics.aupr, metrics.fpr_at_tpr):
        with pytest.raises(ValueError, match="both classes"):
            method()
    with pytest.raises(ValueError, match="both classes"):
        StreamingOODMetrics().summary()  # nothing at all
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="NaN or infinite"):
            StreamingOODMetrics().update(np.array([0.1, bad, 0.3]), np.array([0, 1, 0], bool))
    with pytest.raises(ValueError, match="at least 2"):
        StreamingOODMetrics(max_bins=1)


# ---------------------------------------------------------------- case level


@pytest.mark.parametrize("ties", [False, True])
def test_rank_auc_equals_sklearn_exactly(ties):
    rng = np.random.default_rng(11)
    labels = rng.random(300) < 0.4
    scores = rng.normal(size=300) + labels
    if ties:
        scores = np.round(scores)
    assert rank_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert rank_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert rank_auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert rank_auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5


def test_rank_auc_needs_both_classes():
    with pytest.raises(ValueError, match="OOD and inlier"):
        rank_auc([0.1, 0.2], [1, 1])


def test_case_score_is_the_mean_inside_the_predicted_tumour():
    anomaly = np.arange(24, dtype=float).reshape(2, 3, 4)
    mask = np.zeros(anomaly.shape, bool)
    mask[1, 2, 1:3] = True  # values 21, 22
    assert case_score(anomaly, mask) == pytest.approx(21.5)
    assert case_score(anomaly, np.zeros_like(mask)) == 0.0  # no tumour: the case minimum


# ---------------------------------------------------------------- Dice


def test_dice_values():
    ref = np.array([[0, 1, 1, 2], [0, 1, 2, 2]])
    pred = np.array([[0, 1, 0, 2], [1, 1, 2, 0]])
    assert dice(pred, ref, 1) == pytest.approx(2 * 2 / (3 + 3))
    assert dice(pred, ref, 2) == pytest.approx(2 * 2 / (3 + 2))
    assert dice(ref, ref, 2) == 1.0
    assert dice(pred, ref, 3) != dice(pred, ref, 3)  # absent from both: NaN
    assert dice(np.full((2, 2), 3), np.zeros((2, 2), int), 3) == 0.0


def test_dice_accumulator_skips_absent_labels():
    acc = DiceAccumulator((1, 2))
    case1 = acc.update(np.array([1, 1, 0, 2]), np.array([1, 0, 0, 2]))
    assert case1 == pytest.approx({1: 2 / 3, 2: 1.0})
    case2 = acc.update(np.array([1, 0, 0, 0]), np.array([1, 1, 0, 0]))  # label 2 absent in both
    assert case2[1] == pytest.approx(2 / 3) and np.isnan(case2[2])
    assert acc.mean() == pytest.approx({1: 2 / 3, 2: 1.0})
    assert np.isnan(DiceAccumulator((5,)).mean()[5])


def test_confusion_counts_reference_by_predicted():
    confusion = ConfusionCounts(reference_values=(0, 1, 2, 9), predicted_values=(0, 1, 2))
    reference = np.array([0, 0, 1, 1, 1, 2, 2, 9, 9, 9, 5])  # 5: a value in neither list, not counted
    prediction = np.array([0, 1, 1, 1, 2, 1, 2, 2, 2, 0, 0])
    case = confusion.update(prediction, reference)
    assert case.tolist() == [[1, 1, 0], [0, 2, 1], [0, 1, 1], [1, 0, 2]]
    confusion.update(np.array([2, 2]), np.array([2, 2]))
    assert confusion.counts[2].tolist() == [0, 1, 3]
    assert confusion.counts[3].tolist() == [1, 0, 2]  # the unseen type mostly read as class 2
    assert not ConfusionCounts((0, 1), (0, 1)).counts.any()
    with pytest.raises(ValueError, match="differ in shape"):
        confusion.update(np.zeros(3, int), np.zeros(4, int))
