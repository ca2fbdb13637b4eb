import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from monai import transforms as mt

from maxquery_training.augment import build_augmentation, sample_patch
from maxquery_training.config import AugmentationConfig, DataConfig, load_config
from maxquery_training.classes import class_infos
from maxquery_training.dataset import (
    IGNORE_INDEX, DataError, PreprocessedDataset, compute_normalization, label_lookup, list_cases, median_spacing,
)
from maxquery.preprocessing import CTNormalization


def _copy(tiny_msd, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(tiny_msd, root)
    return root


def _dataset(root, tmp_path, data=None, split="training"):
    data = data or DataConfig()
    cases = list_cases(root, "training")
    return PreprocessedDataset(root, split, data, tmp_path / "cache", median_spacing(cases),
                               compute_normalization(cases[-1:], data), allow_ood=split.startswith("test"))


def test_preprocessed_cases_are_cached_and_mapped(tiny_msd, tmp_path):
    ds = _dataset(tiny_msd, tmp_path)
    assert len(ds.cases) == 3
    case = ds.cases[0]
    assert case.image.dtype == np.float32 and case.label.max() <= 4
    assert 1 in case.class_locations  # liver voxels recorded for oversampling
    assert len(list((tmp_path / "cache" / "training").glob("*.npz"))) == 3
    again = _dataset(tiny_msd, tmp_path)
    np.testing.assert_array_equal(again.cases[0].image, case.image)


def test_ood_label_only_allowed_in_test_splits(tiny_msd, tmp_path):
    ds = _dataset(tiny_msd, tmp_path, split="test_ood")
    assert (ds.cases[0].label == IGNORE_INDEX).any()
    with pytest.raises(DataError, match=r"tiny_005.*\[9\]"):  # never in training labels
        PreprocessedDataset(tiny_msd, "test_ood", DataConfig(), tmp_path / "strict", [3.0, 3.0, 3.0],
                            compute_normalization(list_cases(tiny_msd)[-1:], DataConfig()), allow_ood=False)


def test_one_class_list_in_network_output_order():
    data = DataConfig(background=[0, 7], organ={1: "liver"}, tumors={3: "hcc", 2: "cyst"})
    assert data.label_values == [0, 1, 3, 2] and data.foreground_values == [1, 3, 2]
    assert [(c.value, c.name, c.role) for c in class_infos(data)] == data.classes
    table = label_lookup(data, allow_ood=False)
    assert [table[v] for v in (0, 7, 1, 3, 2)] == [0, 0, 1, 2, 3]


def test_a_label_of_background_values_only_is_empty(tiny_msd, tmp_path):
    """Every value in data.background is background: a label holding only those is empty."""
    root = _copy(tiny_msd, tmp_path)
    path = root / "labelsTr" / "tiny_000.nii.gz"
    label = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(label)
    only_background = sitk.GetImageFromArray(np.where(array > 0, 7, 0).astype(np.uint8))
    only_background.CopyInformation(label)
    sitk.WriteImage(only_background, str(path))
    with pytest.raises(DataError, match="tiny_000.*empty"):
        _dataset(root, tmp_path, DataConfig(background=[0, 7]))


def test_missing_file_names_the_case(tiny_msd, tmp_path):
    root = _copy(tiny_msd, tmp_path)
    (root / "labelsTr" / "tiny_001.nii.gz").unlink()
    with pytest.raises(DataError, match="tiny_001.*missing"):
        _dataset(root, tmp_path)


def test_geometry_mismatch_names_the_case(tiny_msd, tmp_path):
    root = _copy(tiny_msd, tmp_path)
    path = root / "labelsTr" / "tiny_002.nii.gz"
    label = sitk.ReadImage(str(path))
    label.SetSpacing([s * 2 for s in label.GetSpacing()])
    sitk.WriteImage(label, str(path))
    with pytest.raises(DataError, match="tiny_002.*geometries differ"):
        _dataset(root, tmp_path)


def test_unknown_label_and_empty_label(tiny_msd, tmp_path):
    root = _copy(tiny_msd, tmp_path)
    path = root / "labelsTr" / "tiny_000.nii.gz"
    label = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(label)
    array[0, 0, 0] = 7
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(label)
    sitk.WriteImage(bad, str(path))
    with pytest.raises(DataError, match=r"tiny_000.*\[7\]"):
        _dataset(root, tmp_path)
    empty = sitk.GetImageFromArray(np.zeros_like(array))
    empty.CopyInformation(label)
    sitk.WriteImage(empty, str(path))
    with pytest.raises(DataError, match="tiny_000.*empty"):
        _dataset(root, tmp_path)


def test_bad_cases_skipped_with_a_report_when_asked(tiny_msd, tmp_path):
    root = _copy(tiny_msd, tmp_path)
    (root / "imagesTr" / "tiny_001.nii.gz").unlink()
    ds = _dataset(root, tmp_path, DataConfig(skip_bad_cases=True))
    assert len(ds.cases) == 2 and len(ds.skipped) == 1 and "tiny_001" in ds.skipped[0]


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="dataset.json is missing"):
        list_cases(tmp_path)


def test_foreground_oversampling_centres_on_foreground(tiny_msd, tmp_path):
    case = _dataset(tiny_msd, tmp_path).cases[0]
    rng = np.random.default_rng(0)
    hits = [sample_patch(case, (8, 16, 16), rng, True)[1].any() for _ in range(20)]
    assert all(hits)
    image, label = sample_patch(case, (32, 96, 96), rng, False)  # larger than the case: padded
    assert image.shape == (32, 96, 96) and label.shape == (32, 96, 96)


def test_augmentation_flips_only_the_configured_axes():
    flips = [t for t in build_augmentation(AugmentationConfig(mirror_axes=[0, 1]), CTNormalization(-150, 350, 60, 80)).transforms
             if isinstance(t, mt.RandFlipd)]
    assert sorted(t.flipper.spatial_axis for t in flips) == [0, 1]
    assert load_config("cpu_demo").augmentation.mirror_axes == []  # laterality kept for the demo model


def test_config_overrides_and_unknown_keys():
    cfg = load_config("tiny", {"stage2.epochs": 7, "qd_loss": False})
    assert cfg.stage2.epochs == 7 and cfg.qd_loss is False
    with pytest.raises(ValueError, match="unknown settings"):
        load_config("tiny", {"stage2.epoch": 7})
    with pytest.raises(FileNotFoundError, match="bundled configs"):
        load_config("no-such-config")


def test_config_refuses_a_version_that_yaml_read_as_a_number(tmp_path):
    """``version: 1.10`` is the float 1.1 to YAML: two models would share a version; quoted it is kept."""
    from maxquery_training.cli import _parse_override

    config = tmp_path / "model.yaml"
    config.write_text("name: liver\nversion: 1.10\n")
    with pytest.raises(ValueError, match="quote it"):
        load_config(config)
    with pytest.raises(ValueError, match="quote it"):
        load_config("tiny", dict([_parse_override("version=1.10")]))
    assert load_config("tiny", dict([_parse_override('version="1.10"')])).version == "1.10"
