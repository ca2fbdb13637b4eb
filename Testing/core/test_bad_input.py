"""Bad input is refused before the work starts, nothing is lost, nothing is silently wrong (issue 13).

Every malformed input is made here from the real CTs in ``../shared/data/real``: truncated and
NaN-holding copies, sheared or zero-spacing headers, DICOM series with a gantry tilt or a missing
slice, folders with two series or two files of one name, a header that promises terabytes, an
unwritable output folder, a full disk (a file-size limit on the process) and SIGTERM while the
outputs are written.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from maxquery import cli
from maxquery.cases import find_cases
from maxquery.cli import EXIT_INTERNAL_ERROR, EXIT_RESOURCES, EXIT_USER_ERROR, main
from maxquery.errors import InputError
from maxquery.inference import Predictor
from maxquery.io import read_image, validate_ct

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ct_path(real_data):
    return real_data / "totalsegmentator/example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def ct(ct_path):
    return sitk.ReadImage(str(ct_path))


@pytest.fixture
def no_inference(monkeypatch):
    """The run must be refused before any case is computed."""
    def forbidden(*args, **kwargs):
        raise AssertionError("inference ran although the run should have been refused before it")

    monkeypatch.setattr(Predictor, "predict", forbidden)


def run(args, model_dir, out):
    return main(["segment", *map(str, args), "--model", str(model_dir), "--out", str(out), "--device", "cpu"])


def refused(capsys, code, *words):
    error = capsys.readouterr().err
    assert "Traceback" not in error, error
    assert all(w in error for w in words), error
    return code


# ---------------------------------------------------------------- 1: a result is never lost


def test_two_inputs_with_one_case_name_are_refused_before_any_work(tmp_path, model_dir, ct, no_inference, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    sitk.WriteImage(ct, str(folder / "patient.nii.gz"))
    sitk.WriteImage(ct, str(folder / "patient.nrrd"))
    out = tmp_path / "out"
    code = run([folder, "--overwrite"], model_dir, out)
    assert refused(capsys, code, "same case name", "patient") == EXIT_USER_ERROR
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------- 2, 3: incomplete files, NaN


def _cut(path: Path, keep: float | int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    return path


@pytest.mark.parametrize("name, keep", [
    ("ct.nii.gz", 5000), ("ct.nii", 0.9), ("ct.nii.gz", 0.9), ("ct.nrrd", 0.9), ("ct.mha", 0.5), ("ct.nhdr", 0.9),
], ids=["nii.gz-5kB", "nii-90%", "nii.gz-90%", "nrrd-90%", "mha-zlib-50%", "nhdr-raw-90%"])
def test_truncated_files_are_refused(tmp_path, ct, name, keep):
    path = tmp_path / name
    sitk.WriteImage(ct, str(path), useCompression=name.endswith((".mha", ".nrrd")))
    assert read_image(path).GetSize() == ct.GetSize()  # intact, it reads
    _cut(tmp_path / ("ct.raw" if name == "ct.nhdr" else name), keep)
    with pytest.raises(InputError, match="incomplete|cannot read"):
        read_image(path)


def test_a_truncated_nifti_is_refused_by_the_command_line(tmp_path, model_dir, ct_path, no_inference, capsys):
    path = tmp_path / "cut.nii.gz"
    shutil.copy(ct_path, path)
    _cut(path, 5000)
    assert refused(capsys, run([path], model_dir, tmp_path / "out"), "cut.nii.gz") == EXIT_USER_ERROR
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["ct.nii", "ct.nii.gz", "ct.nrrd", "ct.mha"])
def test_nan_or_inf_in_a_float_file_is_refused(tmp_path, ct, value, name):
    array = sitk.GetArrayFromImage(ct).astype(np.float32)
    array[array < -900] = value  # the air
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ct)
    sitk.WriteImage(image, str(tmp_path / name))
    with pytest.raises(InputError, match="NaN or infinite"):
        read_image(tmp_path / name)


def test_a_float_nifti_without_nan_is_read(tmp_path, ct):
    sitk.WriteImage(sitk.Cast(ct, sitk.sitkFloat32), str(tmp_path / "ct.nii.gz"))
    validate_ct(read_image(tmp_path / "ct.nii.gz"))


# ---------------------------------------------------------------- 4, 9: geometry ITK would change


def _patch_nifti(path: Path, edit) -> Path:
    """Apply ``edit(bytearray)`` to the (decompressed) NIfTI header of ``path``."""
    compressed = path.name.endswith(".gz")
    data = bytearray(gzip.decompress(path.read_bytes()) if compressed else path.read_bytes())
    edit(data)
    path.write_bytes(gzip.compress(bytes(data)) if compressed else bytes(data))
    return path


def _shear_sform(data: bytearray) -> None:
    srow_x = list(struct.unpack("<4f", data[280:296]))
    srow_x[2] += 0.35 * 3.0  # x moves 0.35 mm per mm of z: the axes are sheared by about 19 degrees
    data[280:296] = struct.pack("<4f", *srow_x)


@pytest.mark.parametrize("name", ["ct.nii", "ct.nii.gz"])
def test_a_sheared_nifti_is_refused(tmp_path, ct, name):
    sitk.WriteImage(ct, str(tmp_path / name))
    _patch_nifti(tmp_path / name, _shear_sform)
    assert sitk.ReadImage(str(tmp_path / name)).GetSize() == ct.GetSize()  # ITK reads it, orthogonalised
    with pytest.raises(InputError, match="not orthogonal"):
        read_image(tmp_path / name)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.__setitem__(slice(88, 92), struct.pack("<f", 0.0)), "spacing"),  # pixdim[3] = 0
    (lambda d: d.__setitem__(slice(88, 92), struct.pack("<f", -3.0)), "spacing"),
    (lambda d: d.__setitem__(slice(88, 92), struct.pack("<f", float("nan"))), "spacing"),
], ids=["z-spacing-0", "z-spacing-negative", "z-spacing-nan"])
def test_nifti_spacing_that_itk_would_replace_is_refused(tmp_path, ct, edit, message):
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    _patch_nifti(tmp_path / "ct.nii.gz", edit)
    with pytest.raises(InputError, match=message):
        read_image(tmp_path / "ct.nii.gz")


@pytest.mark.parametrize("old, new, message", [
    (b"ElementSpacing = 3 3 3", b"ElementSpacing = 3 3 -3", "positive"),
    (b"ElementSpacing = 3 3 3", b"ElementSpacing = 3 3 0", "positive"),
    (b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 1 0 0 0 1 0 0.4 0 1", "not orthogonal"),
], ids=["mha-negative-spacing", "mha-zero-spacing", "mha-sheared"])
def test_impossible_metaimage_geometry_is_refused(tmp_path, ct, old, new, message):
    image = sitk.Image(ct)
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / "ct.mha"))
    data = (tmp_path / "ct.mha").read_bytes()
    assert old in data
    (tmp_path / "ct.mha").write_bytes(data.replace(old, new, 1))
    with pytest.raises(InputError, match=message):
        read_image(tmp_path / "ct.mha")


def test_a_sheared_nrrd_is_refused(tmp_path, ct):
    image = sitk.Image(ct)
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    data = (tmp_path / "ct.nrrd").read_bytes()
    header_end = data.index(b"\n\n")
    header = data[:header_end].replace(b"space directions: (3,0,0) (0,3,0) (0,0,3)",
                                       b"space directions: (3,0,0) (0,3,0) (1,0,3)")
    assert header != data[:header_end]
    (tmp_path / "ct.nrrd").write_bytes(header + data[header_end:])
    with pytest.raises(InputError, match="not orthogonal"):
        read_image(tmp_path / "ct.nrrd")


# ---------------------------------------------------------------- 5, 6: DICOM series


@pytest.fixture
def dicom_copy(tmp_path, real_data):
    folder = tmp_path / "series"
    shutil.copytree(real_data / "totalsegmentator/example_ct_dicom", folder)
    return folder


def _edit_dicom(folder: Path, edit) -> None:
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path)


def test_dicom_with_gantry_tilt_is_refused(dicom_copy):
    tilt = np.radians(20)

    def tilted(ds):  # rows tilted about the x axis; the table still moves along z
        ds.ImageOrientationPatient = [1, 0, 0, 0, float(np.cos(tilt)), float(-np.sin(tilt))]
    _edit_dicom(dicom_copy, tilted)
    with pytest.raises(InputError, match="gantry tilt of about 20 degrees"):
        read_image(dicom_copy)


def test_dicom_with_a_missing_slice_is_refused(dicom_copy):
    middle = sorted(dicom_copy.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))[10]
    middle.unlink()
    with pytest.raises(InputError, match="not evenly spaced"):
        read_image(dicom_copy)


def test_dicom_with_two_slices_at_one_position_is_refused(dicom_copy):
    first = sorted(dicom_copy.iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".1"
    ds.save_as(dicom_copy / "duplicate.dcm")
    with pytest.raises(InputError, match="same position"):
        read_image(dicom_copy)


def test_every_series_of_a_folder_is_a_case(tmp_path, real_data, ct_path):
    folder = tmp_path / "study"
    shutil.copytree(real_data / "totalsegmentator/example_ct_dicom", folder)
    for path in (real_data / "dcmqi/ct-3slice").iterdir():
        shutil.copy(path, folder / f"dcmqi_{path.name}")
    shutil.copy(ct_path, folder / "volume.nii.gz")
    cases = find_cases(folder)
    names = sorted(c.name for c in cases)
    assert len(set(names)) == 3 and names[2] == "volume" and all(n.startswith("study_") for n in names[:2])
    series = {c.series.uid: len(c.series.files) for c in cases if c.series}
    assert sorted(series.values()) == [3, 20]
    with pytest.raises(InputError, match="holds 2 DICOM series"):
        read_image(folder)


def test_summary_records_input_path_and_series_uid(tmp_path, real_data, ct_path, model_dir):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in (real_data / "dcmqi/ct-3slice").iterdir():
        shutil.copy(path, folder / path.name)
    shutil.copy(ct_path, folder / "volume.nii.gz")
    out = tmp_path / "out"
    assert run([folder], model_dir, out) == 0
    dicom = json.loads((out / "mixed_summary.json").read_text())
    assert dicom["input"] == {"path": str(folder.resolve()), "series_instance_uid":
                              "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"}
    nifti = json.loads((out / "volume_summary.json").read_text())
    assert nifti["input"] == {"path": str((folder / "volume.nii.gz").resolve()), "series_instance_uid": None}


# ---------------------------------------------------------------- 8: options


@pytest.mark.parametrize("option, value", [
    ("--threshold", "1.5"), ("--threshold", "-1"), ("--threshold", "nan"), ("--threshold", "0"),
    ("--batch-size", "0"), ("--batch-size", "-2"), ("--overlap", "1"), ("--overlap", "inf"),
    ("--device", "gpu"), ("--scores", "maxquery,unknown"),
])
def test_impossible_option_values_are_refused(tmp_path, model_dir, ct_path, option, value, capsys):
    with pytest.raises(SystemExit) as stop:
        run([ct_path, option, value], model_dir, tmp_path / "out")
    assert stop.value.code == EXIT_USER_ERROR
    assert option in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 9: values that are not HU, tiny volumes


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_rescaled_values_are_refused(ct, scale):
    image = sitk.Cast(sitk.Cast(ct, sitk.sitkFloat32) * scale, sitk.sitkInt16)
    with pytest.raises(InputError, match="not Hounsfield"):
        validate_ct(image)


def _without_air(ct):
    """A crop inside the body with its few gas voxels raised to fat: a CT with no air at all."""
    return sitk.Maximum(ct[30:90, 30:80, :], -150)


def test_a_volume_without_air_gets_a_warning(ct):
    warnings = validate_ct(_without_air(ct))
    assert len(warnings) == 1 and "no air" in warnings[0]
    assert validate_ct(ct) == []


def test_a_tiny_volume_is_refused(ct):
    with pytest.raises(InputError, match="only 5 x 5 x 5 voxels"):
        validate_ct(ct[50:55, 50:55, 10:15])


def test_a_warning_reaches_the_summary(tmp_path, model_dir, ct):
    sitk.WriteImage(_without_air(ct), str(tmp_path / "crop.nii.gz"))
    out = tmp_path / "out"
    assert run([tmp_path / "crop.nii.gz"], model_dir, out) == 0
    assert any("no air" in note for note in json.loads((out / "crop_summary.json").read_text())["notes"])


# ---------------------------------------------------------------- 10, 13: checked before the work


def test_an_output_folder_that_is_a_file_is_refused_first(tmp_path, model_dir, ct_path, no_inference, capsys):
    (tmp_path / "out").write_text("a file")
    assert refused(capsys, run([ct_path], model_dir, tmp_path / "out"), "is an existing file") == EXIT_USER_ERROR


def test_an_unwritable_output_folder_is_refused_first(tmp_path, model_dir, ct_path, no_inference, capsys):
    if os.geteuid() == 0:  # root writes into read-only folders; /proc/self takes no new files even for root
        out = Path("/proc/self/maxquery-out")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        out = tmp_path / "ro" / "out"
    assert refused(capsys, run([ct_path], model_dir, out), "cannot write into") == EXIT_USER_ERROR


def test_a_folder_run_refuses_an_unwritable_folder_before_any_case(tmp_path, model_dir, ct, no_inference, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b"):
        sitk.WriteImage(ct, str(folder / f"{name}.nii.gz"))
    assert run([folder], model_dir, folder) == EXIT_USER_ERROR  # the input folder itself
    assert "input folder" in capsys.readouterr().err


def test_a_header_promising_terabytes_is_refused_before_reading(tmp_path, model_dir, monkeypatch, no_inference, capsys):
    path = tmp_path / "huge.nrrd"
    header = (b"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 4000 4000 4000\n"
              b"space directions: (1,0,0) (0,1,0) (0,0,1)\nkinds: domain domain domain\nendian: little\n"
              b"encoding: raw\nspace origin: (0,0,0)\n\n")
    path.write_bytes(header + b"\0" * 2**20)

    def no_reading(*args, **kwargs):
        raise AssertionError("the voxels were read")

    monkeypatch.setattr(sitk, "ReadImage", no_reading)
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", no_reading)
    assert refused(capsys, run([path], model_dir, tmp_path / "out"), "GiB") == EXIT_RESOURCES


# ---------------------------------------------------------------- 11, 12: disk full, SIGTERM


def _cli_process(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("Logic", "training"))}
    return subprocess.Popen([sys.executable, "-m", "maxquery.cli", "segment", *map(str, args), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, **kwargs)


def test_a_full_disk_leaves_nothing_and_says_so(tmp_path, model_dir, ct_path):
    """A file-size limit makes every write beyond 64 kB fail as on a full disk (ITK's NIfTI writer
    then reports a short write without raising)."""
    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    process = _cli_process([ct_path, "--model", model_dir, "--out", out], preexec_fn=limit)
    _, error = process.communicate(timeout=300)
    assert process.returncode == EXIT_RESOURCES, error
    assert "Traceback" not in error and ("is the disk full" in error or "nothing of this case was kept" in error)
    assert list(out.iterdir()) == []  # no partial output, no temporary folder


def test_sigterm_while_writing_leaves_nothing(tmp_path, model_dir, real_data):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".maxquery-{socket.gethostname().replace('-', '_')}-999999999-x"  # left by a killed run
    stale.mkdir()
    (stale / "partial.nii.gz").write_bytes(b"partial")
    ct = real_data / "tcia_hcc048/hcc048_pv_ct.nii.gz"  # 16 M voxels: writing takes seconds
    process = _cli_process([ct, "--model", model_dir, "--out", out, "--scores", "maxquery,msp"])
    deadline = time.monotonic() + 400
    while not any(p != stale for p in out.glob(".maxquery-*")):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, error = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, error
    assert "interrupted (SIGTERM)" in error and "Traceback" not in error
    assert list(out.iterdir()) == []  # neither partial outputs nor temporary folders, the stale one included


# ---------------------------------------------------------------- 14: exit codes


def test_folder_with_a_bad_case_writes_the_good_ones_and_exits_2(tmp_path, model_dir, ct, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    sitk.WriteImage(ct, str(folder / "good.nii.gz"))
    sitk.WriteImage(ct, str(folder / "bad.nii"))
    _cut(folder / "bad.nii", 0.5)
    out = tmp_path / "out"
    code = run([folder], model_dir, out)
    error = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and "bad: error:" in error and "1 of 2 cases were not segmented: bad" in error
    assert (out / "good_summary.json").is_file() and not list(out.glob("bad_*"))


def test_an_internal_error_gives_1_with_a_traceback(tmp_path, model_dir, ct_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Predictor, "predict", broken)
    assert run([ct_path], model_dir, tmp_path / "out") == EXIT_INTERNAL_ERROR
    error = capsys.readouterr().err
    assert "Traceback" in error and "internal error" in error


# ---------------------------------------------------------------- 15: messages and help


def test_help_lists_options_with_defaults_outputs_and_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "-i INPUT" in text and "-o OUT" in text and "-m MODEL" in text
    for option in ("--device", "--overwrite", "--overlap", "--batch-size", "--threshold", "--scores"):
        assert option in text
    for default in ("(default: auto)", "(default: 0.5)", "(default: 0.99)", "(default: 2)", "(default: maxquery)"):
        assert default in text
    assert "exit codes" in text and "143" in text and "_summary.json" in text


def test_short_forms_and_cuda_index_are_accepted():
    args = cli.build_parser().parse_args(["segment", "-i", "ct.nii.gz", "-o", "out", "-m", "model",
                                          "--device", "cuda:3"])
    assert (args.input_option, args.out, args.model, args.device) == (Path("ct.nii.gz"), Path("out"), Path("model"),
                                                                     "cuda:3")


def test_itk_warnings_are_off_during_a_run_and_restored(tmp_path, model_dir, ct_path, monkeypatch):
    seen = []
    original = cli.read_image

    def spy(*args, **kwargs):
        seen.append(sitk.ProcessObject.GetGlobalWarningDisplay())
        return original(*args, **kwargs)

    monkeypatch.setattr(cli, "read_image", spy)
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    assert run([ct_path], model_dir, tmp_path / "out") == 0
    assert seen == [False] and sitk.ProcessObject.GetGlobalWarningDisplay() == before


@pytest.mark.parametrize("argv, options", [
    (["train", "--help"], ("--stage", "--device")),
    (["export", "--help"], ("--overwrite", "--device")),
])
def test_training_help_explains_every_option(argv, options, capsys):
    from maxquery_training.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    text = capsys.readouterr().out
    assert "``" not in text
    for option in options:
        block = text[text.index(f"  {option}"):].split("\n  --")[0]
        assert len(block.split()) > 3, block  # the option, its metavar and a real help text


def test_evaluation_help_gives_defaults(capsys):
    from maxquery_training.evaluate import main as evaluate

    with pytest.raises(SystemExit):
        evaluate(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text
    for option in ("--margin-mm", "--mc-passes", "--overlap", "--device"):
        assert "(default:" in text[text.index(f"  {option}"):].split("\n  --")[0], option
