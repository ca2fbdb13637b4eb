"""``maxquery segment`` end to end on a real CT: every output file, the Slicer segmentation read
back with slicerio, no overwriting, and a clean non-zero exit with nothing written on bad input."""

import gzip
import json
import struct

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from maxquery.cli import EXIT_USER_ERROR, main
from maxquery.precision import cpu_has_native_bf16
from maxquery.inference.writer import ANOMALY_STEP
from maxquery.model_folder import load_model_folder


@pytest.fixture(scope="module")
def ct(real_data):
    return real_data / "totalsegmentator/example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, model_dir, ct):
    out = tmp_path_factory.mktemp("out")
    assert main(["segment", str(ct), "--model", str(model_dir), "--out", str(out), "--scores", "maxquery,msp",
                 "--raw-maps", "--device", "cpu", "--png"]) == 0
    return out


def test_every_output_is_written_on_the_input_grid(outputs, ct):
    names = sorted(p.name for p in outputs.iterdir())
    assert names == sorted(f"example_ct_sm_{s}" for s in (
        "labels.nii.gz", "labels.seg.nrrd", "anomaly.nii.gz", "anomaly_maxquery.nii.gz", "anomaly_msp.nii.gz",
        "summary.json", "review.png"))
    reference = sitk.ReadImage(str(ct))
    for name in names:
        if name.endswith(".nii.gz"):
            image = sitk.ReadImage(str(outputs / name))
            assert (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()) == (
                reference.GetSize(), reference.GetSpacing(), reference.GetOrigin(), reference.GetDirection()), name
    assert sitk.ReadImage(str(outputs / "example_ct_sm_labels.nii.gz")).GetPixelID() == sitk.sitkUInt8
    assert sitk.ReadImage(str(outputs / "example_ct_sm_anomaly.nii.gz")).GetPixelID() == sitk.sitkFloat32
    summary = json.loads((outputs / "example_ct_sm_summary.json").read_text())
    assert summary["model"]["name"] == "untrained-demo" and summary["calibrated"] is False
    assert {"case_score", "lesions", "timings_s"} <= set(summary)
    assert (outputs / "example_ct_sm_review.png").read_bytes()[:4] == b"\x89PNG"


def test_default_outputs_are_compact_and_raw_maps_only_on_request(tmp_path, model_dir, ct, outputs):
    out = tmp_path / "default"
    assert main(["segment", str(ct), "--model", str(model_dir), "--out", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"example_ct_sm_{s}" for s in ("labels.nii.gz", "labels.seg.nrrd", "anomaly.nii.gz", "summary.json"))
    anomaly_file = out / "example_ct_sm_anomaly.nii.gz"
    with gzip.open(anomaly_file) as nifti:  # NIfTI-1 header: datatype at 70, scl_slope/scl_inter at 112
        header = nifti.read(348)
    assert struct.unpack_from("<h", header, 70)[0] == 512  # uint16 codes
    assert struct.unpack_from("<ff", header, 112) == pytest.approx((ANOMALY_STEP, 0.0))
    # Same values as the run with raw maps (deterministic), read back through the scale.
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(anomaly_file)))
    np.testing.assert_array_equal(values, sitk.GetArrayFromImage(sitk.ReadImage(str(outputs / anomaly_file.name))))
    assert values.min() >= 0.0 and values.max() <= 1.0 and values.max() > 0.5
    assert np.allclose(values / ANOMALY_STEP, np.rint(values / ANOMALY_STEP), atol=1e-3)
    summary = json.loads((out / "example_ct_sm_summary.json").read_text())
    assert summary["precision"] == ("bf16" if cpu_has_native_bf16()[0] else "fp32")
    raw_size = (outputs / "example_ct_sm_anomaly_maxquery.nii.gz").stat().st_size
    assert anomaly_file.stat().st_size < raw_size / 2


def test_segmentation_reads_back_with_slicerio(outputs, model_dir):
    segmentation = slicerio.read_segmentation(str(outputs / "example_ct_sm_labels.seg.nrrd"))
    labels_image = sitk.ReadImage(str(outputs / "example_ct_sm_labels.nii.gz"))
    labels = sitk.GetArrayFromImage(labels_image)
    segments = {s["name"]: s for s in segmentation["segments"]}
    assert set(segments) == {"liver", "liver tumour type 1", "liver tumour type 2"}
    assert segments["liver"]["labelValue"] == 1 and segments["liver"]["color"] == pytest.approx([0.87, 0.51, 0.42])
    np.testing.assert_array_equal(segmentation["voxels"], labels.transpose(2, 1, 0))  # slicerio is (i, j, k)
    ijk_to_lps = np.asarray(segmentation["ijkToLPS"])
    direction = np.asarray(labels_image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(ijk_to_lps[:3, :3], direction * np.asarray(labels_image.GetSpacing()), atol=1e-6)
    np.testing.assert_allclose(ijk_to_lps[:3, 3], labels_image.GetOrigin(), atol=1e-4)


def test_existing_outputs_are_kept_without_overwrite(outputs, model_dir, ct, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in outputs.iterdir()}
    code = main(["segment", str(ct), "--model", str(model_dir), "--out", str(outputs), "--device", "cpu"])
    assert code == EXIT_USER_ERROR and "--overwrite" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in outputs.iterdir()} == before


def _write(path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array)
    if image.GetDimension() == 3:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def _ct():
    array = np.full((8, 16, 16), -1000, np.int16)
    array[2:6, 4:12, 4:12] = 40
    return array


@pytest.mark.parametrize("make", [
    lambda d: (d / "garbage.nii.gz").write_bytes(b"no image") and d / "garbage.nii.gz",
    lambda d: _write(d / "flat.nii.gz", _ct()[0]),
    lambda d: _write(d / "four_d.nii.gz", np.stack([_ct(), _ct()])),
    lambda d: _write(d / "unit.nii.gz", (_ct() + 1000) / 1040.0),
    lambda d: _write(d / "nan.mha", np.where(_ct() > 0, np.nan, _ct()).astype(np.float32)),
    lambda d: _write(d / "empty.nii.gz", np.zeros((8, 16, 16), np.int16)),
], ids=["unreadable", "2d", "4d", "not-hu", "nan", "empty"])
def test_bad_input_exits_non_zero_and_writes_nothing(tmp_path, model_dir, make, capsys):
    source = tmp_path / "in"
    source.mkdir()
    path = make(source)
    out = tmp_path / "out"
    assert main(["segment", str(path), "--model", str(model_dir), "--out", str(out), "--device", "cpu"]) == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip()
    assert error.startswith("maxquery: error:") and "\n" not in error
    assert not out.exists() or not any(out.iterdir())


def test_missing_or_mismatched_model_folder(tmp_path, model_dir, ct, capsys):
    assert main(["segment", str(ct), "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == EXIT_USER_ERROR
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_card.json").write_text((model_dir / "model_card.json").read_text())
    (broken / "model.safetensors").write_bytes(b"junk")
    assert main(["segment", str(ct), "--model", str(broken), "--out", str(tmp_path / "o")]) == EXIT_USER_ERROR
    assert "safetensors" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_postprocessing_flags_skip_the_models_postprocessing(tmp_path, real_data, repo_dir):
    """The bundled model keeps the largest region (its card says so): on B's source slab it also
    finds an organ apart from the liver. One region by default, more with --keep-all-regions; with
    --keep-mixed-lesion-types no lesion is retyped. The summary says which steps ran and how much
    they changed."""
    from scipy import ndimage

    model = repo_dir / "Resources" / "Models" / "maxquery-liver-demo"
    regions, summaries = {}, {}
    for flags in ([], ["--keep-all-regions", "--keep-mixed-lesion-types"]):
        out = tmp_path / f"out{len(flags)}"
        assert main(["segment", str(real_data / "totalsegmentator" / "example_ct_dicom"), "--model", str(model),
                     "--out", str(out), "--device", "cpu", *flags]) == 0
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(next(out.glob("*_labels.nii.gz")))))
        regions[bool(flags)] = ndimage.label(labels > 0, np.ones((3, 3, 3)))[1]
        summaries[bool(flags)] = json.loads(next(out.glob("*_summary.json")).read_text())["postprocessing"]
    assert regions[False] == 1 < regions[True]
    assert summaries[False]["keep_largest_component"] is True and summaries[False]["removed_ml"] > 10
    assert summaries[False]["one_type_per_lesion"] is load_model_folder(model).card.one_type_per_lesion
    assert summaries[True] == {"keep_largest_component": False, "removed_ml": None, "one_type_per_lesion": False,
                               "retyped_ml": None}
