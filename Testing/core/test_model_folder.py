"""Model folders (safetensors + JSON card), anomaly calibration and preprocessing."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from maxquery.calibration import AnomalyCalibration
from maxquery.model_folder import (
    CARD_NAME, WEIGHTS_NAME, ClassInfo, ModelCard, ModelFolderError, load_model_folder, read_model_card,
    save_model_folder,
)
from maxquery.network import build_network, small_config
from maxquery.preprocessing import CTNormalization, resample_to_spacing, spacing_zyx, to_canonical

torch.set_num_threads(1)

CLASSES = [
    ClassInfo(0, "background", "background", (0.0, 0.0, 0.0)),
    ClassInfo(1, "liver", "organ", (0.8, 0.4, 0.3)),
    ClassInfo(2, "tumour A", "tumor", (0.1, 0.9, 0.1), {"CodeValue": "108369006"}),
]


def tiny_config(**overrides):
    settings = dict(features=(8, 8, 16, 16, 16), query_dim=16, ffn_dim=32, num_heads=4)
    settings.update(overrides)
    return small_config(3, **settings)


def make_card(architecture="maxquery", config=None, calibration=None) -> ModelCard:
    return ModelCard(
        name="test model",
        architecture=architecture,
        network=config or tiny_config(),
        classes=list(CLASSES),
        spacing_zyx=(2.0, 0.8, 0.8),
        patch_size_zyx=(16, 32, 32),
        normalization=CTNormalization(-100.0, 250.0, 60.0, 40.0),
        calibration=calibration,
        sml_stats={"mean": [1.0, 2.0, 3.0], "std": [0.5, 0.5, 0.5]},
    )


def saved(tmp_path, architecture="maxquery", **card_args):
    torch.manual_seed(0)
    card = make_card(architecture, **card_args)
    network = build_network(architecture, card.network).eval()
    folder = save_model_folder(tmp_path / "model", card, network)
    return folder, card, network


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("architecture", ["maxquery", "plain"])
def test_save_load_round_trip_gives_equal_outputs(tmp_path, architecture):
    folder, card, network = saved(tmp_path, architecture)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CARD_NAME, WEIGHTS_NAME])
    loaded = load_model_folder(folder)
    assert loaded.card.to_dict() == card.to_dict()
    assert loaded.card.network == card.network and loaded.card.tumor_indices == [2]
    assert not loaded.network.training
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        a, b = network(x), loaded.network(x)
    if architecture == "maxquery":
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
        torch.testing.assert_close(b.query_responses, a.query_responses, rtol=0, atol=0)
    else:
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_calibration_round_trip_and_mapping(tmp_path):
    rng = np.random.default_rng(0)
    inliers = rng.normal(loc=-5.0, scale=2.0, size=20000)
    calibration = AnomalyCalibration.fit("maxquery", inliers)
    folder, _, _ = saved(tmp_path, calibration=calibration)
    again = read_model_card(folder).calibration
    assert again == calibration
    for q in (0.01, 0.1, 0.5, 0.9, 0.99):
        raw = np.quantile(inliers, q)
        assert float(again(np.array([raw]))[0]) == pytest.approx(q, abs=2e-3)
    # Empirical CDF: the fraction of inlier voxels at or above a threshold t is about 1 − t.
    calibrated = again(inliers)
    assert float(np.mean(calibrated >= 0.95)) == pytest.approx(0.05, abs=3e-3)
    probe = np.linspace(-30, 20, 1001)
    mapped = again(probe)
    assert np.all(np.diff(mapped) >= 0), "the calibrated score must be monotone in the raw score"
    assert mapped[0] == 0.0 and mapped[-1] == 1.0 and mapped.dtype == np.float32


def test_calibration_ties_and_validation():
    calibration = AnomalyCalibration.fit("maxquery", np.r_[np.zeros(900), np.linspace(1, 2, 100)], num_levels=101)
    assert float(calibration(np.array([0.0]))[0]) == pytest.approx(0.9, abs=0.011)  # ties: the upper level
    with pytest.raises(ValueError, match="no inlier"):
        AnomalyCalibration.fit("maxquery", np.array([]))
    with pytest.raises(ValueError, match="must increase"):
        AnomalyCalibration("maxquery", (0.0, 0.5, 0.4), (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="must not decrease"):
        AnomalyCalibration("maxquery", (0.0, 0.5, 1.0), (1.0, 0.0, 3.0))


def test_save_refuses_to_overwrite(tmp_path):
    folder, card, network = saved(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_model_folder(folder, card, network)
    changed = make_card()
    changed.description = "second version"
    save_model_folder(folder, changed, network, overwrite=True)
    assert read_model_card(folder).description == "second version"
    assert sorted(p.name for p in folder.iterdir()) == sorted([CARD_NAME, WEIGHTS_NAME])  # no leftovers


# ---------------------------------------------------------------- refusing broken folders


def test_missing_folder_and_card(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_model_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match=f"{CARD_NAME} is missing"):
        load_model_folder(tmp_path / "empty")


def test_corrupt_json_card(tmp_path):
    folder, _, _ = saved(tmp_path)
    text = (folder / CARD_NAME).read_text()
    (folder / CARD_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        load_model_folder(folder)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("spacing_zyx"), "lacks spacing_zyx"),
        (lambda d: d.update(format_version=99), "format 99"),
        (lambda d: d.update(architecture="resnet"), "unknown architecture"),
        (lambda d: d["classes"].pop(), "lists 2 classes"),
        (lambda d: d["classes"][2].update(role="lesion"), "role must be one of"),
        (lambda d: d["network"].update(query_groups=[16, 4, 11]), "query_groups"),
        (lambda d: d.update(patch_size_zyx=[16, 30, 32]), "not a multiple"),
        (lambda d: d.update(mirror_axes=[0, 3]), "mirror_axes"),
        (lambda d: d.update(normalization=[1, 2, 3, 4]), "model card is invalid"),
        (lambda d: d["classes"].__setitem__(1, "liver"), "model card is invalid"),
        (lambda d: d.update(network="small"), "model card is invalid"),
        (lambda d: d.update(calibration={"score": "maxquery", "levels": [0, 1], "values": [2, 1]}), "must not decrease"),
        # values that load but cannot be right (issue 13, item 7)
        (lambda d: d["normalization"].update(std=0.0), "std > 0"),
        (lambda d: d["normalization"].update(clip_low=300.0), "clip_low < clip_high"),
        (lambda d: d["classes"][2].update(value=1), "distinct"),
        (lambda d: d["classes"][2].update(value=300), "within 0-255"),
        (lambda d: d.update(spacing_zyx=[0.0, 0.8, 0.8]), "three positive"),
        (lambda d: d.update(spacing_zyx=[-2.0, 0.8, 0.8]), "three positive"),
        (lambda d: d.update(spacing_zyx=[0.8, 0.8]), "three positive"),
        (lambda d: d.update(patch_size_zyx=[1024, 1024, 1024]), "at most"),
        (lambda d: d["sml_stats"].update(std=[0.5, 0.0, 0.5]), "sml_stats"),
    ],
)
def test_invalid_cards_are_refused_with_the_problem_named(tmp_path, edit, message):
    folder, _, _ = saved(tmp_path)
    data = json.loads((folder / CARD_NAME).read_text())
    edit(data)
    (folder / CARD_NAME).write_text(json.dumps(data))
    with pytest.raises(ModelFolderError, match=message):
        load_model_folder(folder)


def test_missing_weights(tmp_path):
    folder, _, _ = saved(tmp_path)
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(ModelFolderError, match=f"{WEIGHTS_NAME} is missing"):
        load_model_folder(folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(tmp_path, damage):
    folder, _, _ = saved(tmp_path)
    path = folder / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 3], "garbage": b"\x07" * 4096, "empty": b""}[damage])
    with pytest.raises(ModelFolderError, match="cannot be read as safetensors"):
        load_model_folder(folder)


def test_weights_of_a_different_network_are_refused(tmp_path):
    folder, _, _ = saved(tmp_path)
    other = make_card(config=tiny_config(features=(8, 16, 16, 16, 16)))
    save_model_folder(tmp_path / "other", other, build_network("maxquery", other.network))
    (folder / WEIGHTS_NAME).write_bytes((tmp_path / "other" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ModelFolderError, match=r"do not match the network its card describes \(wrong shape: backbone"):
        load_model_folder(folder)
    plain = make_card("plain")
    save_model_folder(tmp_path / "plain", plain, build_network("plain", plain.network))
    (folder / WEIGHTS_NAME).write_bytes((tmp_path / "plain" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ModelFolderError, match="missing: .*unexpected: head"):
        load_model_folder(folder)


def test_weights_of_another_model_of_the_same_architecture_are_refused(tmp_path):
    folder, card, _ = saved(tmp_path)
    other = make_card()
    other.name = "another model"
    torch.manual_seed(1)
    save_model_folder(tmp_path / "other", other, build_network("maxquery", other.network))
    (folder / WEIGHTS_NAME).write_bytes((tmp_path / "other" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ModelFolderError, match="those of the model 'another model', not of 'test model'"):
        load_model_folder(folder)
    # Same name (the same recipe trained twice): the card's digest of its own weights tells them apart.
    torch.manual_seed(2)
    save_model_folder(tmp_path / "twin", make_card(), build_network("maxquery", card.network))
    (folder / WEIGHTS_NAME).write_bytes((tmp_path / "twin" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ModelFolderError, match="digest differs"):
        load_model_folder(folder)


def test_no_pickle_is_ever_loaded(tmp_path, monkeypatch):
    folder, _, network = saved(tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert load_model_folder(folder).card.name == "test model"
    # A torch.save pickle (which could run code) under the weights name is refused, not unpickled.
    monkeypatch.undo()
    torch.save(network.state_dict(), folder / WEIGHTS_NAME)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(ModelFolderError, match="cannot be read as safetensors"):
        load_model_folder(folder)


# ---------------------------------------------------------------- preprocessing


def test_ct_normalization_from_foreground():
    rng = np.random.default_rng(0)
    values = rng.normal(40.0, 30.0, size=50000)
    values[:100] = 3000.0  # metal
    values[100:200] = -1000.0  # air
    norm = CTNormalization.from_foreground(values)
    low, high = np.percentile(values, [0.5, 99.5])
    assert (norm.clip_low, norm.clip_high) == pytest.approx((low, high))
    clipped = np.clip(values, low, high)
    assert norm.mean == pytest.approx(clipped.mean()) and norm.std == pytest.approx(clipped.std())
    out = norm(values.astype(np.int16))
    assert out.dtype == np.float32
    assert out.max() == pytest.approx((high - norm.mean) / norm.std, rel=1e-4)
    assert out.min() == pytest.approx((low - norm.mean) / norm.std, rel=1e-4)
    assert CTNormalization.from_dict(norm.to_dict()) == norm
    with pytest.raises(ValueError, match="no foreground"):
        CTNormalization.from_foreground(np.array([]))


def make_image(size_xyz=(30, 20, 10), spacing=(0.7, 0.9, 2.5), direction=None, origin=(-12.0, 30.0, 105.0)):
    array = np.random.default_rng(1).integers(-1000, 1000, size=size_xyz[::-1]).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def test_resample_to_spacing_keeps_geometry_and_gives_the_expected_size():
    direction = (0, 1, 0, 1, 0, 0, 0, 0, -1)  # a permuted, flipped (but valid) direction
    image = make_image(direction=direction)
    target_zyx = (1.25, 1.8, 1.4)
    out = resample_to_spacing(image, target_zyx)
    assert spacing_zyx(out) == pytest.approx(target_zyx)
    assert out.GetSize() == (15, 10, 20)  # round(30·0.7/1.4), round(20·0.9/1.8), round(10·2.5/1.25)
    assert out.GetOrigin() == pytest.approx(image.GetOrigin())
    assert out.GetDirection() == pytest.approx(image.GetDirection())
    assert out.GetPixelID() == sitk.sitkFloat32
    labels = sitk.Cast(image > 0, sitk.sitkUInt8)
    out_labels = resample_to_spacing(labels, target_zyx, is_label=True)
    assert out_labels.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(out_labels))) <= {0, 1}
    # The voxel at the origin keeps its value (same first voxel centre, nearest neighbour).
    assert out_labels[0, 0, 0] == labels[0, 0, 0]
    assert resample_to_spacing(image, spacing_zyx(image)) is image


@pytest.mark.parametrize(
    "direction",
    [(-1, 0, 0, 0, 1, 0, 0, 0, -1), (0, -1, 0, 1, 0, 0, 0, 0, 1), (1, 0, 0, 0, 0, 1, 0, -1, 0)],
    ids=["flips", "swap-xy", "swap-yz"],
)
def test_to_canonical_gives_identity_direction_and_the_same_physical_points(direction):
    image = make_image(direction=direction)
    canonical = to_canonical(image)
    assert canonical.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert sorted(canonical.GetSpacing()) == pytest.approx(sorted(image.GetSpacing()))
    rng = np.random.default_rng(2)
    size = image.GetSize()
    for _ in range(50):
        index = tuple(int(rng.integers(0, n)) for n in size)
        point = image.TransformIndexToPhysicalPoint(index)
        new_index = canonical.TransformPhysicalPointToIndex(point)
        assert canonical.TransformIndexToPhysicalPoint(new_index) == pytest.approx(point)
        assert canonical[new_index] == image[index]


def test_saved_files_have_the_usual_permissions(tmp_path):
    """A model folder is shared between users: its files are as readable as any file the user writes."""
    folder, _, _ = saved(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "model_card.json"):
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
