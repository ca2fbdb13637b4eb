"""The child-process run without a model: following a growing output file, and a child that fails."""

import sys

import pytest
import SimpleITK as sitk

from MaxQuerySlicerLib import run


def test_growing_file_returns_only_complete_lines(tmp_path):
    path = tmp_path / "progress.jsonl"
    reader = run._GrowingFile(path)
    assert reader.new_lines() == []  # not written yet
    path.write_bytes(b'{"a": 1}\n{"b"')
    assert reader.new_lines() == ['{"a": 1}']
    with open(path, "ab") as handle:
        handle.write(b': 2}\n')
    assert reader.new_lines() == ['{"b": 2}']
    assert reader.new_lines() == []


def test_a_child_that_fails_reports_its_log_tail_and_cleans_up(tmp_path):
    """Any interpreter that exits with an error stands in for a crashed child here."""
    image = sitk.Image(8, 8, 8, sitk.sitkInt16)
    child = run.ChildRun(image, tmp_path / "no-model", "cpu", False, 0.99, python=sys.executable)
    child.command = [sys.executable, "-c", "import sys; print('line one', file=sys.stderr); "
                     "print('the real reason', file=sys.stderr); sys.exit(3)"]
    child.start()
    assert child.input_path.is_file()  # the CT went to the child as a file
    assert child.wait(timeout=60)
    with pytest.raises(run.ChildRunError) as caught:
        child.check()
    assert "exit status 3" in str(caught.value) and str(caught.value).endswith("line one\nthe real reason")
    child.cleanup()
    assert not child.work_dir.exists()


def test_json_progress_lines_are_what_child_run_reads(tmp_path):
    """The command line's reporter and ChildRun agree on the protocol (one JSON object per line)."""
    import io
    import types

    from maxquery.progress import JsonReporter

    stream = io.StringIO()
    report = JsonReporter(stream)
    written = {"labels": tmp_path / "input_labels.nii.gz", "summary": tmp_path / "input_summary.json"}
    result = types.SimpleNamespace(case_score=0.25, lesions=[1, 2], timings={"total": 3.5}, device="cpu",
                                   notes=["no GPU could be used; the run was on the CPU"])
    report.start(1)
    with report.case(run.INPUT_NAME) as progress:
        progress(0.5, "sliding window")
    report.case_done(run.INPUT_NAME, result, written)
    report.done({run.INPUT_NAME: written})

    child = run.ChildRun(sitk.Image(4, 4, 4, sitk.sitkInt16), tmp_path, "cpu", False, 0.99)
    try:
        child.stdout_path.write_text(stream.getvalue())
        child._process = types.SimpleNamespace(poll=lambda: 0, returncode=0)  # an exited child
        child.poll()
        assert child.progress() == (1.0, "reading the results")
        assert child.case_info["notes"] == result.notes and child.case_info["regions"] == 2
        assert child.check() == {role: path.resolve() for role, path in written.items()}
    finally:
        child.cleanup()
