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
