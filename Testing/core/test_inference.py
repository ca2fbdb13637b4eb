"""Whole-CT inference on real CT volumes: geometry, physical-space consistency, aggregation,
calibration, lesion table, progress and cancellation.

The model is a small MaxQuery network with seeded random weights written and read through the
real model folder code. Its class head is scaled up so that the labels follow the (spatially
varying) query assignments and all four classes appear: an untrained head at its initial scale
gives one label almost everywhere, which would make the label comparisons below vacuous.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from maxquery.calibration import AnomalyCalibration
from maxquery.demo import build_untrained_model
from maxquery.errors import InputError, ResourceError, RunCancelled
from maxquery.inference import Predictor, find_lesions
from maxquery.inference.resources import MemoryEstimate, check_fits
from maxquery.inference.sliding_window import (
    gaussian_importance, mirror_axis_sets, mirrored, patch_starts, sliding_window,
)
from maxquery.io import read_image
from maxquery.model_folder import load_model_folder, save_model_folder
from maxquery.preprocessing import resample_to_spacing, to_canonical

PATCH = (16, 48, 48)
SPACING = (5.0, 5.0, 5.0)
LIGHT = dict(features=(8, 16, 32, 64, 96), query_dim=32, ffn_dim=64)  # CPU-cheap, same architecture


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, real_data):
    folder = build_untrained_model(tmp_path_factory.mktemp("model") / "m", seed=1, patch_size_zyx=PATCH,
                                   spacing_zyx=SPACING, **LIGHT)
    loaded = load_model_folder(folder)
    with torch.no_grad():
        loaded.network.class_head[-1].weight.mul_(10.0)
        loaded.network.class_head[-1].bias.mul_(10.0)
    save_model_folder(folder, loaded.card, loaded.network, overwrite=True)
    # Calibrate on the raw score inside the predicted foreground of a real case, as training does.
    result = Predictor(folder, device="cpu").predict(read_image(real_data / "totalsegmentator/example_ct_sm.nii.gz"))
    raw = sitk.GetArrayFromImage(result.raw_scores["maxquery"])
    loaded.card.calibration = AnomalyCalibration.fit("maxquery", raw[sitk.GetArrayFromImage(result.labels) != 0])
    save_model_folder(folder, loaded.card, loaded.network, overwrite=True)
    return folder


@pytest.fixture(scope="session")
def predictor(model_dir):
    return Predictor(model_dir, device="cpu", scores=("maxquery", "msp", "maxlogit", "maxquery_post"))


@pytest.fixture(scope="session")
def ct_sm(real_data):
    return read_image(real_data / "totalsegmentator/example_ct_sm.nii.gz")


@pytest.fixture(scope="session")
def ct_sm_result(predictor, ct_sm):
    return predictor.predict(ct_sm)


def _geometry(image: sitk.Image):
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _onto(image: sitk.Image, reference: sitk.Image, interpolator) -> sitk.Image:
    """Resample through physical space; edge voxels that rounding puts outside take the nearest value."""
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, 0.0, image.GetPixelID(), True)


def _all_images(result):
    return {"labels": result.labels, "anomaly": result.anomaly, **{f"raw {n}": im for n, im in result.raw_scores.items()}}


def test_predictor_api(predictor):
    assert predictor.device == torch.device("cpu") and predictor.fell_back_to_cpu is False
    assert predictor.card.name == "untrained-demo" and predictor.card.calibration is not None
    assert [s.name for s in predictor.scores] == ["maxquery", "msp", "maxlogit", "maxquery_post"]


@pytest.mark.parametrize("case", ["totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/example_ct_dicom",
                                  "dcmqi/ct-3slice"])
def test_every_output_has_the_input_geometry(predictor, real_data, case):
    image = read_image(real_data / case)
    result = predictor.predict(image)
    for name, output in _all_images(result).items():
        assert _geometry(output) == _geometry(image), name
    labels = sitk.GetArrayViewFromImage(result.labels)
    assert result.labels.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(labels)) <= {c.value for c in predictor.card.classes}
    anomaly = sitk.GetArrayViewFromImage(result.anomaly)
    assert result.anomaly.GetPixelID() == sitk.sitkFloat32 and anomaly.min() >= 0.0 and anomaly.max() <= 1.0
    assert set(result.raw_scores) == {"maxquery", "msp", "maxlogit", "maxquery_post"}
    msp = sitk.GetArrayViewFromImage(result.raw_scores["msp"])
    assert msp.min() >= -1.0 - 1e-5 and msp.max() <= -1.0 / 4 + 1e-5  # −max softmax of 4 classes
    assert result.image is image


def test_labels_are_varied_enough_for_the_consistency_tests(ct_sm_result):
    # The random network labels ~73 isolated model voxels as tumour classes; resampling the
    # probabilities (not the argmax) keeps each only near its centre, hence a few dozen input voxels.
    values, counts = np.unique(sitk.GetArrayViewFromImage(ct_sm_result.labels), return_counts=True)
    assert len(values) >= 3 and np.sort(counts)[-2] >= 30


def test_reoriented_copy_gives_the_same_result_in_physical_space(predictor, ct_sm, ct_sm_result):
    # RAS input → flip x and y (LPS-aligned) and permute the axes: the same voxels in physical space.
    copy = sitk.PermuteAxes(sitk.Flip(ct_sm, [True, True, False]), [2, 0, 1])
    assert copy.GetDirection() != ct_sm.GetDirection()
    result = predictor.predict(copy)
    assert _geometry(result.labels) == _geometry(copy)
    # The network sees the identical array; only argmax near-ties of the random network may flip
    # with floating-point noise between runs.
    back = sitk.GetArrayFromImage(_onto(result.labels, ct_sm, sitk.sitkNearestNeighbor))
    assert (back != sitk.GetArrayViewFromImage(ct_sm_result.labels)).mean() < 0.001
    raw_back = _onto(result.raw_scores["maxquery"], ct_sm, sitk.sitkLinear)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(raw_back),
                               sitk.GetArrayViewFromImage(ct_sm_result.raw_scores["maxquery"]), atol=1e-4)


def test_oblique_copy_keeps_its_geometry_and_voxels(predictor, ct_sm, ct_sm_result):
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    oblique = sitk.Image(ct_sm)
    oblique.SetDirection((np.asarray(ct_sm.GetDirection()).reshape(3, 3) @ rotation).ravel().tolist())
    result = predictor.predict(oblique)
    for name, output in _all_images(result).items():
        assert _geometry(output) == _geometry(oblique), name
    # Same voxel array, only placed obliquely: the network sees the same input, voxel by voxel.
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result.labels),
                                  sitk.GetArrayViewFromImage(ct_sm_result.labels))


def test_sliding_window_equals_one_pass_when_the_volume_fits_one_patch(model_dir, real_data):
    # An LPS-aligned crop of one patch's size at the model spacing is exactly one patch: no padding, no resampling.
    # fp32 as the one pass below: on a CPU with native bf16 "auto" would run bf16 (test_precision compares them).
    predictor = Predictor(model_dir, device="cpu", precision="fp32")
    ct = resample_to_spacing(to_canonical(read_image(real_data / "totalsegmentator/example_ct.nii.gz")),
                             tuple(reversed(SPACING)))
    crop = sitk.RegionOfInterest(ct, list(reversed(PATCH)), [10, 10, 30])
    assert crop.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    result = predictor.predict(crop)
    volume = predictor.card.normalization(sitk.GetArrayFromImage(crop))
    with torch.no_grad():
        out = predictor.network(torch.from_numpy(volume)[None, None])
    expected = (-out.query_responses.amax(dim=1))[0].numpy()
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(result.raw_scores["maxquery"]), expected, atol=1e-4)
    expected_labels = np.asarray([c.value for c in predictor.card.classes])[out.logits[0].argmax(0).numpy()]
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result.labels), expected_labels)


def test_sliding_window_weights_normalise_and_patches_cover_the_volume():
    volume = torch.randn(40, 70, 90)
    calls = []

    def identity(x):
        calls.append(x.shape[0])
        return x.clone()

    out = sliding_window(volume, identity, 1, (16, 32, 32), overlap=0.5, batch_size=3)
    torch.testing.assert_close(out[0], volume)  # Gaussian weights cancel for an exact per-voxel map
    starts = patch_starts((40, 70, 90), (16, 32, 32), 0.5)
    assert len(starts) == sum(calls) == 4 * 4 * 5
    assert max(s[2] for s in starts) == 90 - 32 and min(s[2] for s in starts) == 0
    weights = gaussian_importance((16, 32, 32))
    assert weights.max() == 1.0 and weights.min() > 0 and weights[8, 16, 16] == 1.0
    small = sliding_window(torch.randn(5, 7, 9), identity, 1, (16, 32, 32), pad_value=-3.0)
    assert small.shape == (1, 5, 7, 9)


def test_mirroring_averages_the_flips_of_the_allowed_axes_only():
    assert len(mirror_axis_sets((0, 1, 2))) == 7 and mirror_axis_sets((2,)) == ((2,),)
    assert mirror_axis_sets(()) == ()
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 1, 2, 3, 4)
    ramp = torch.linspace(0, 1, 4)  # a position-dependent network: flips change its answer

    def fn(v):
        return v * ramp

    expected = (fn(x) + fn(x.flip(4)).flip(4)) / 2
    torch.testing.assert_close(mirrored(fn, mirror_axis_sets((2,)))(x), expected)


def test_mirroring_is_refused_for_a_model_trained_without_flips(tmp_path):
    folder = build_untrained_model(tmp_path / "m", seed=1, patch_size_zyx=PATCH, spacing_zyx=SPACING, **LIGHT)
    loaded = load_model_folder(folder)
    loaded.card.mirror_axes = ()
    save_model_folder(folder, loaded.card, loaded.network, overwrite=True)
    assert load_model_folder(folder).card.mirror_axes == ()
    with pytest.raises(ValueError, match="trained without mirroring"):
        Predictor(folder, device="cpu", mirror=True)
    Predictor(folder, device="cpu")  # without mirroring it loads


def test_calibrated_anomaly_and_case_score(ct_sm_result, predictor):
    assert ct_sm_result.calibrated and ct_sm_result.anomaly_score == "maxquery"
    anomaly = sitk.GetArrayViewFromImage(ct_sm_result.anomaly)
    raw = sitk.GetArrayViewFromImage(ct_sm_result.raw_scores["maxquery"])
    foreground = sitk.GetArrayViewFromImage(ct_sm_result.labels) != 0
    # The calibration was fitted on this case's foreground: about 1 % of it lies above 0.99.
    assert 0.002 < (anomaly[foreground] >= 0.99).mean() < 0.03
    assert np.corrcoef(anomaly[foreground], raw[foreground])[0, 1] > 0.8  # monotone map of the raw score
    assert 0.0 <= ct_sm_result.case_score <= 1.0
    summary = ct_sm_result.summary()
    assert summary["calibrated"] is True and summary["model"]["name"] == "untrained-demo"


def test_missing_calibration_falls_back_to_min_max_and_says_so(tmp_path, ct_sm):
    folder = build_untrained_model(tmp_path / "m", seed=1, patch_size_zyx=PATCH, spacing_zyx=(6.0, 6.0, 6.0), **LIGHT)
    result = Predictor(folder, device="cpu").predict(ct_sm)
    assert result.calibrated is False and any("calibration" in note for note in result.notes)
    anomaly = sitk.GetArrayViewFromImage(result.anomaly)
    inside = anomaly > 0
    assert anomaly.max() <= 1.0 and inside.sum() > 1000
    raw = sitk.GetArrayViewFromImage(result.raw_scores["maxquery"])[inside]
    assert np.corrcoef(anomaly[inside], raw)[0, 1] > 0.95  # the min-max map: affine in the raw score


def test_fast_mode_runs_coarser_and_keeps_the_geometry(model_dir, ct_sm):
    fast = Predictor(model_dir, device="cpu", fast=True)
    assert fast.spacing_zyx == tuple(2 * s for s in fast.card.spacing_zyx)
    result = fast.predict(ct_sm)
    assert _geometry(result.anomaly) == _geometry(ct_sm) and any("fast mode" in n for n in result.notes)
    # The calibration was fitted at the model spacing: a fast run is marked uncalibrated, with why.
    assert result.calibrated is False and result.summary()["calibrated"] is False
    assert any("not calibrated for this run" in n and "10 x 10 x 10 mm" in n for n in result.notes)


@pytest.mark.parametrize("settings, reason", [(dict(overlap=0.25), "overlap 0.25"), (dict(fast=True), "fitted at 5 x 5 x 5")])
def test_calibration_holds_only_under_the_settings_it_was_fitted_with(model_dir, settings, reason):
    card = load_model_folder(model_dir).card
    assert Predictor(model_dir, device="cpu").calibration_mismatch == []  # fitted with the defaults
    mismatch = Predictor(model_dir, device="cpu", **settings).calibration_mismatch
    assert len(mismatch) == 1 and reason in mismatch[0]
    recorded = AnomalyCalibration.fit("maxquery", np.arange(10.0), conditions=Predictor(
        model_dir, device="cpu", overlap=0.25).calibration_conditions())
    assert AnomalyCalibration.from_dict(recorded.to_dict()) == recorded
    assert recorded.mismatches({"spacing_zyx": list(SPACING), "overlap": 0.25, "mirror": False}, card.spacing_zyx) == []
    assert "mirroring on" in recorded.mismatches({"spacing_zyx": list(SPACING), "overlap": 0.25, "mirror": True},
                                                 card.spacing_zyx)[0]


def test_labels_follow_the_resampled_probabilities_not_model_voxel_blocks(predictor, ct_sm, ct_sm_result):
    """On an input finer than the model grid, nearest-neighbour labels are constant over the input
    voxels nearest to one model voxel (staircases); labels from resampled probabilities are not."""
    grid = resample_to_spacing(to_canonical(ct_sm), predictor.spacing_zyx)

    def model_index(i):  # continuous model-grid index of input index i (x, y, z)
        return np.asarray(grid.TransformPhysicalPointToContinuousIndex(ct_sm.TransformIndexToPhysicalPoint(i)))

    offset = model_index([0, 0, 0])
    matrix = np.stack([model_index(e) - offset for e in np.eye(3, dtype=int).tolist()], axis=1)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in ct_sm.GetSize()], indexing="ij"), -1).reshape(-1, 3)
    nearest = np.rint(index @ matrix.T + offset).astype(int)
    labels = sitk.GetArrayViewFromImage(ct_sm_result.labels)[tuple(index[:, ::-1].T)]
    block = np.ravel_multi_index((nearest - nearest.min(0)).T, np.ptp(nearest, 0) + 1)
    order = np.argsort(block, kind="stable")
    starts = np.flatnonzero(np.diff(block[order], prepend=-1))
    mixed = np.count_nonzero(np.minimum.reduceat(labels[order], starts) != np.maximum.reduceat(labels[order], starts))
    assert mixed > 20


def test_lesion_table_on_a_known_layout(predictor):
    labels = np.zeros((20, 30, 40), np.uint8)
    labels[2:18, 2:28, 2:38] = 1  # organ
    labels[5:9, 5:10, 5:11] = 2  # tumour, 4 × 5 × 6 voxels
    anomaly = np.zeros(labels.shape, np.float32)
    anomaly[12:15, 20:24, 30:32] = 0.995  # anomalous region, 3 × 4 × 2 voxels, inside the organ
    anomaly[0, 0, 0] = 1.0  # outside the foreground and its margin: ignored
    images = []
    for array in (labels, anomaly):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((2.0, 2.0, 2.0))
        image.SetOrigin((10.0, 20.0, 30.0))
        images.append(image)
    lesions = find_lesions(*images, predictor.card, threshold=0.99, margin_mm=1.0, min_volume_ml=0.0)
    assert [(l.source, l.voxel_count) for l in lesions] == [("tumor", 120), ("anomaly", 24)]
    tumour, region = lesions
    assert tumour.predicted_type == "liver tumour type 1" and tumour.volume_ml == pytest.approx(120 * 8 / 1000)
    assert tumour.center_lps == pytest.approx((10 + 2 * 7.5, 20 + 2 * 7, 30 + 2 * 6.5))
    assert region.predicted_type == "liver" and region.peak_anomaly == pytest.approx(0.995)


def test_progress_is_monotone_and_cancel_stops_the_run(predictor, ct_sm):
    seen = []
    predictor.predict(ct_sm, progress=lambda fraction, stage: seen.append((fraction, stage)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {"preprocessing", "sliding window", "postprocessing"} <= {s for _, s in seen}

    cancel = threading.Event()

    def stop_in_the_window(fraction, stage):
        if stage == "sliding window":
            cancel.set()

    with pytest.raises(RunCancelled):
        predictor.predict(ct_sm, progress=stop_in_the_window, cancel=cancel)


def test_bad_inputs_raise_input_error(predictor):
    good = np.full((8, 16, 16), -1000, np.int16)
    good[2:6, 4:12, 4:12] = 40
    with pytest.raises(InputError, match="NaN"):
        predictor.predict_array(np.where(good > 0, np.nan, good).astype(np.float32), (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="empty"):
        predictor.predict_array(np.zeros((8, 16, 16), np.int16), (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="Hounsfield"):
        predictor.predict_array((good + 1000) / 1040.0, (1.0, 1.0, 1.0))
    with pytest.raises(InputError):
        predictor.predict_array(good, (1.0, 0.0, 1.0))
    with pytest.raises(InputError):
        predictor.predict_array(good, (1.0, 1.0, 1.0), direction=(1, 0, 0, 1, 0, 0, 0, 0, 1))
    with pytest.raises(InputError, match="3D"):
        predictor.predict(sitk.GetImageFromArray(good[0]))


def test_memory_check_refuses_with_advice():
    with pytest.raises(ResourceError, match="fast mode"):
        check_fits(MemoryEstimate(host_bytes=2**60, network_bytes=0), torch.device("cpu"), fast=False)
    check_fits(MemoryEstimate(host_bytes=2**20, network_bytes=2**20), torch.device("cpu"), fast=False)
