"""Each registry score must rank a planted outlier voxel highest on constructed network outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maxquery.network import MaskPrediction, MaxQueryNet, PlainSegmentationNet, small_config
from maxquery.scores import (
    SCORES, SML_MIN_CLASS_VOXELS, MaxLogitStatistics, ScoreContext, dilated_smoothing, get_score,
    mc_dropout_prediction, predictive_entropy, sml_parameters, standardized_max_logit, suppress_boundaries,
)

torch.set_num_threads(1)

SHAPE = (6, 7, 8)
PLANT = (3, 2, 5)
N, K = 6, 4


def flat_index(index=PLANT, shape=SHAPE) -> int:
    return int(np.ravel_multi_index(index, shape))


def ranks_planted_highest(score_map: torch.Tensor | np.ndarray) -> bool:
    values = np.asarray(score_map, dtype=np.float64)
    values = values.reshape(-1) if values.ndim == 3 else values[0].reshape(-1)
    others = np.delete(values, flat_index())
    return bool(values[flat_index()] > others.max())


def responses(kind: str) -> torch.Tensor:
    """(1, N, *SHAPE) query responses; the planted voxel differs as ``kind`` says."""
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(1, N, *SHAPE, generator=gen) * 0.1
    winner = torch.randint(0, N, SHAPE, generator=gen)
    r.scatter_add_(1, winner[None, None], torch.full((1, 1, *SHAPE), 6.0))  # one confident query each
    if kind == "weak_but_peaked":  # every query responds weakly, one still dominates the others
        r[(0, slice(None), *PLANT)] = torch.tensor([1.0] + [-8.0] * (N - 1))
    elif kind == "strong_but_flat":  # several queries respond equally (and strongly)
        r[(0, slice(None), *PLANT)] = 9.0
    return r


def logits(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(1, K, *SHAPE, generator=gen) * 0.1
    winner = torch.randint(0, K, SHAPE, generator=gen)
    z.scatter_add_(1, winner[None, None], torch.full((1, 1, *SHAPE), 5.0))
    if kind == "flat":  # the classes cannot be told apart, at the usual max-logit level
        z[(0, slice(None), *PLANT)] = 5.0
    elif kind == "low_but_peaked":  # low max logit, still one clear class
        z[(0, slice(None), *PLANT)] = torch.tensor([1.0] + [-9.0] * (K - 1))
    return z


def prediction(r_kind: str = "none", z_kind: str = "none") -> MaskPrediction:
    return MaskPrediction(logits(z_kind), responses(r_kind))


def test_registry_has_the_six_scores():
    assert set(SCORES) == {"maxquery", "maxquery_post", "msp", "maxlogit", "sml", "mc_dropout"}
    assert SCORES["maxquery"].needs_queries and SCORES["maxquery_post"].needs_queries
    assert SCORES["mc_dropout"].stochastic_passes and SCORES["sml"].finalize is not None


def test_maxquery_uses_pre_softmax_responses():
    out = prediction(r_kind="weak_but_peaked")
    score = get_score("maxquery").per_patch(out)
    assert score.shape == (1, *SHAPE)
    torch.testing.assert_close(score, -out.query_responses.amax(dim=1))  # Eq. 9
    assert ranks_planted_highest(score)
    # The same voxel is confidently assigned after the softmax: the post-softmax score misses it.
    assert not ranks_planted_highest(get_score("maxquery_post").per_patch(out))


def test_maxquery_post_uses_the_cluster_assignment():
    out = prediction(r_kind="strong_but_flat")
    score = get_score("maxquery_post").per_patch(out)
    torch.testing.assert_close(score, -out.query_responses.softmax(dim=1).amax(dim=1))
    assert ranks_planted_highest(score)
    assert not ranks_planted_highest(get_score("maxquery").per_patch(out))


def test_msp_flags_flat_logits():
    out = prediction(z_kind="flat")
    assert ranks_planted_highest(get_score("msp").per_patch(out))
    assert not ranks_planted_highest(get_score("maxlogit").per_patch(out))


def test_maxlogit_flags_a_low_max_logit():
    out = prediction(z_kind="low_but_peaked")
    score = get_score("maxlogit").per_patch(out)
    torch.testing.assert_close(score, -out.logits.amax(dim=1))
    assert ranks_planted_highest(score)
    assert not ranks_planted_highest(get_score("msp").per_patch(out))


def test_mc_dropout_score_is_predictive_entropy():
    out = prediction(z_kind="flat")
    score = get_score("mc_dropout").per_patch(out)
    assert ranks_planted_highest(score)
    assert float(score.max()) == pytest.approx(np.log(K), abs=1e-4)  # uniform over K classes
    p = torch.tensor([[0.5, 0.25, 0.25]]).reshape(1, 3, 1)
    assert float(predictive_entropy(p)) == pytest.approx(-(0.5 * np.log(0.5) + 0.5 * np.log(0.25)))


# ---------------------------------------------------------------- SML


STATS = {"mean": [10.0, 2.0], "std": [2.0, 0.5], "voxels": [50_000, 20_000]}
MM = (1.0, 1.0, 1.0)


def two_class_labels(shape=(20, 20, 20)) -> np.ndarray:
    labels = np.zeros(shape, np.int64)
    labels[:, :, 10:] = 1
    return labels


def test_sml_standardises_with_the_predicted_class_statistics():
    labels = two_class_labels()
    mean, std = np.array(STATS["mean"])[labels], np.array(STATS["std"])[labels]
    z = 1.5
    max_logit = mean + z * std  # a constant standardised value everywhere
    sml = standardized_max_logit(max_logit, labels, STATS, MM)
    np.testing.assert_allclose(sml, -z, atol=1e-5)  # suppression and smoothing keep a constant
    # Raw max logits differ by 8.75 between the classes; standardised they do not differ at all.
    assert np.ptp(max_logit) > 8


def test_sml_ranks_a_planted_interior_outlier_highest_despite_a_boundary_spike():
    labels = two_class_labels()
    z = np.zeros(labels.shape)
    interior, spike = (10, 10, 4), (10, 10, 9)  # spike sits on the class boundary (x = 9 | 10)
    z[interior], z[spike] = -3.0, -8.0
    mean, std = np.array(STATS["mean"])[labels], np.array(STATS["std"])[labels]
    max_logit = (mean + z * std).astype(np.float32)
    # Without standardisation, every voxel of class 1 looks more anomalous than the interior outlier.
    assert -max_logit[interior] < -max_logit[0, 0, 15]

    out = MaskPrediction(torch.from_numpy(max_logit)[None, None], None)  # a one-class "logit" map
    score = get_score("sml")
    aggregated = score.per_patch(out)[0].numpy()
    np.testing.assert_array_equal(aggregated, max_logit)  # per patch: the raw max logit
    ctx = ScoreContext(labels=labels, sml_stats=STATS, spacing_zyx=MM)
    final = score.finalize(aggregated, ctx)
    assert final.shape == labels.shape
    assert np.unravel_index(np.argmax(final), final.shape) == interior
    # Without boundary suppression the spike would win: the suppression is what saves the ranking.
    plain_z = -(max_logit - mean) / std
    assert plain_z[spike] > plain_z[interior]


def test_sml_without_statistics_says_what_is_missing():
    with pytest.raises(ValueError, match="statistics"):
        get_score("sml").finalize(np.zeros((4, 4, 4)), ScoreContext(labels=np.zeros((4, 4, 4), int)))
    with pytest.raises(ValueError, match="spacing"):
        get_score("sml").finalize(np.zeros((4, 4, 4)), ScoreContext(labels=np.zeros((4, 4, 4), int), sml_stats=STATS))
    with pytest.raises(ValueError, match="voxel counts"):
        sml_parameters({"mean": [1.0], "std": [1.0]})


def test_max_logit_statistics_are_exact_over_streamed_cases():
    rng = np.random.default_rng(0)
    cases = []
    for n in (30_000, 5_000, 60_000):
        classes = rng.choice(3, n, p=(0.8, 0.15, 0.05))
        # A large offset with a small spread: sums of squares lose it all in float64.
        cases.append((1e8 + rng.normal(size=n) * 0.01 * (1 + classes), classes))
    statistics = MaxLogitStatistics(4)  # class 3 is never predicted
    for values, classes in cases:
        statistics.update(values.reshape(-1, 10, 10) if values.size % 100 == 0 else values, classes)
    values = np.concatenate([c[0] for c in cases])
    classes = np.concatenate([c[1] for c in cases])
    stats = statistics.to_dict()
    assert stats["cases"] == 3 and stats["voxels"] == [int((classes == k).sum()) for k in range(4)]
    for k in range(3):
        assert stats["mean"][k] == pytest.approx(values[classes == k].mean(), rel=1e-13)
        assert stats["std"][k] == pytest.approx(values[classes == k].std(), rel=1e-6)
    assert stats["fallback"] == [3]


def test_a_rarely_predicted_class_uses_the_pooled_statistics_not_a_tiny_std():
    rng = np.random.default_rng(1)
    labels = np.zeros((20, 20, 20), np.int64)
    labels[:, :, 10:] = 1
    labels[10, 10, 3:5] = 2  # class 2: two voxels, the same max logit in training
    max_logit = np.where(labels == 1, 6.0, 9.0) + rng.normal(size=labels.shape) * 0.3
    max_logit[labels == 2] = 4.0
    statistics = MaxLogitStatistics(3)
    statistics.update(max_logit, labels)
    stats = statistics.to_dict()
    assert stats["voxels"][2] == 2 < SML_MIN_CLASS_VOXELS and stats["fallback"] == [2]
    mean, std = sml_parameters(stats)
    pooled = max_logit.std()
    assert std[2] == pytest.approx(pooled) and mean[2] == pytest.approx(max_logit.mean())
    assert std[:2] == pytest.approx([max_logit[labels == k].std() for k in (0, 1)])
    assert stats["std"] == pytest.approx(std.tolist())  # the card holds what SML uses
    # At test time class 2's max logit is a little off: a moderate score, not millions.
    test_logit = max_logit.copy()
    test_logit[labels == 2] = 4.5
    assert np.abs(standardized_max_logit(test_logit, labels, stats, MM)).max() < 20
    # A card written by the old export (std 1e-6 for a class without voxels) is read the same way.
    old = {"mean": [9.0, 6.0, 0.0], "std": [0.3, 0.3, 1e-6], "voxels": [4000, 4000, 0]}
    assert sml_parameters(old)[1][2] > 0.3 and sml_parameters(old)[1][0] == 0.3


def test_boundary_band_is_jungs_width_in_mm():
    labels = np.zeros((5, 5, 20), np.int64)
    labels[..., 10:] = 1  # boundary between x = 9 and x = 10
    values = np.zeros(labels.shape, np.float32)
    values[2, 2, 6] = 10.0  # 3 voxels from the boundary voxel x = 9
    fine = suppress_boundaries(values, labels, (0.76, 0.76, 0.76))  # 2.3 mm: inside the 3.04 mm band
    coarse = suppress_boundaries(values, labels, (3.0, 3.0, 3.0))  # 9 mm: outside it
    assert fine[2, 2, 6] == 0.0 and coarse[2, 2, 6] == 10.0
    spike = values.copy()
    spike[2, 2, 9] = 10.0  # on the boundary itself: suppressed on every grid
    assert suppress_boundaries(spike, labels, (3.0, 3.0, 3.0))[2, 2, 9] == 0.0


def test_dilated_smoothing_reaches_the_same_distance_in_mm_on_any_grid():
    impulse = np.zeros((31, 41, 41), np.float32)
    impulse[15, 20, 20] = 1.0
    smoothed = dilated_smoothing(impulse, (3.0, 0.76, 0.76))
    assert smoothed.sum() == pytest.approx(1.0, abs=1e-5)
    along_z = np.flatnonzero(smoothed[:, 20, 20]) - 15
    along_y = np.flatnonzero(smoothed[15, :, 20]) - 20
    assert along_y.tolist() == [-18, -12, -6, 0, 6, 12, 18]  # Jung et al.: 7 taps, dilation 6
    assert along_z.tolist() == [-6, -4, -2, 0, 2, 4, 6]  # 4.56 mm taps on a 3 mm axis: every 2 voxels


# ---------------------------------------------------------------- MC dropout passes


def tiny_net(cls, dropout: float):
    config = small_config(3, features=(8, 8, 16, 16, 16), query_dim=16, ffn_dim=32, num_heads=4, dropout=dropout)
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.mark.parametrize("cls", [MaxQueryNet, PlainSegmentationNet])
def test_mc_dropout_passes_vary_and_leave_the_model_deterministic(cls):
    net = tiny_net(cls, dropout=0.3)
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        first = mc_dropout_prediction(net, x, passes=1).logits
        second = mc_dropout_prediction(net, x, passes=1).logits
        assert not torch.allclose(first, second), "dropout passes should differ"
        averaged = mc_dropout_prediction(net, x, passes=3).logits
        torch.testing.assert_close(averaged.exp().sum(dim=1), torch.ones(1, 16, 32, 32), atol=1e-4, rtol=0)
        # Afterwards the model is back in eval mode: two plain calls agree exactly.
        a, b = net(x), net(x)
    a = a.logits if hasattr(a, "logits") else a
    b = b.logits if hasattr(b, "logits") else b
    assert torch.equal(a, b)
    assert not any(m.training for m in net.modules())


@pytest.mark.parametrize("cls", [MaxQueryNet, PlainSegmentationNet])
def test_mc_dropout_refuses_a_network_without_dropout(cls):
    net = tiny_net(cls, dropout=0.0)
    with pytest.raises(ValueError, match="dropout > 0"):
        mc_dropout_prediction(net, torch.randn(1, 1, 16, 32, 32), passes=2)


def test_mc_dropout_needs_a_pass():
    with pytest.raises(ValueError, match="at least one"):
        mc_dropout_prediction(tiny_net(PlainSegmentationNet, 0.3), torch.randn(1, 1, 16, 32, 32), passes=0)


def test_unknown_score_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown anomaly score 'maxqueri'.*maxquery"):
        get_score("maxqueri")
