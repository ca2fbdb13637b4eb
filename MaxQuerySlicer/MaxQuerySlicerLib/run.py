"""One inference in a child process: ``maxquery segment --progress json`` under Slicer's own Python.

Why a process and not a thread: PythonQt keeps the GIL while Slicer's event loop idles, so a Python
thread would only run while the GUI thread happens to run Python (a timer tick), and inference
would crawl. A child process runs at full speed whatever the GUI does, can be killed at once, and
if it crashes Slicer survives. The input goes to the child as a file in a private temporary
folder; the child's stdout (JSON lines) and stderr (its log) go to files in the same folder, so no
pipe can fill up and block it while the GUI is busy. ``poll()`` reads what arrived since the last
call; nothing here touches the MRML scene or imports Qt.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOG_TAIL_LINES = 15
INPUT_NAME = "input"  # the case name the child gives the outputs


def python_executable() -> str:
    """Slicer's Python launcher (``PythonSlicer``) when there is one, else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def core_root() -> Path:
    """The folder holding the ``maxquery`` package, which the child puts first on its path."""
    import importlib.util

    spec = importlib.util.find_spec("maxquery")
    if spec is None or not spec.origin:
        raise ModuleNotFoundError("the maxquery package is not installed with this module")
    return Path(spec.origin).resolve().parent.parent


class _GrowingFile:
    """A file another process appends to: ``new_lines()`` returns the complete lines added since the
    last call (a line still being written is returned next time)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return complete.decode("utf-8", "replace").splitlines()


class ChildRunError(RuntimeError):
    """The child failed; the message says how and ends with the tail of its log."""


class ChildRun:
    """``start()`` launches; call ``poll()`` regularly; ``cancel()`` kills the child and deletes its files.

    ``outputs`` (role → path of the case's files) is set once the child reported ``done``; the
    files live in ``work_dir`` until ``cleanup()``.
    """

    def __init__(self, image, model_folder: Path, device: str, fast: bool, threshold: float,
                 python: str | None = None) -> None:
        self.work_dir = Path(tempfile.mkdtemp(prefix="maxquery-run-"))
        self.input_path = self.work_dir / f"{INPUT_NAME}.nrrd"
        self.out_dir = self.work_dir / "outputs"
        self.stdout_path, self.log_path = self.work_dir / "progress.jsonl", self.work_dir / "log.txt"
        self._image, self._python = image, python or python_executable()
        self.command = [self._python, "-m", "maxquery.cli", "segment", str(self.input_path), "--model",
                        str(model_folder), "--out", str(self.out_dir), "--device", device,
                        "--threshold", repr(float(threshold)), "--progress", "json", *(["--fast"] if fast else [])]
        self.fraction, self.stage = 0.0, "Starting"
        self.case_info: dict = {}
        self.outputs: dict[str, Path] | None = None
        self.cancelled = False
        self.returncode: int | None = None
        self.started = time.monotonic()
        self._process: subprocess.Popen | None = None
        self._stdout, self._log = _GrowingFile(self.stdout_path), _GrowingFile(self.log_path)

    def start(self) -> "ChildRun":
        import SimpleITK as sitk

        try:
            sitk.WriteImage(self._image, str(self.input_path))
            self._image = None  # the child reads the file; do not keep a second copy of the CT here
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([str(core_root())] + [p for p in [env.get("PYTHONPATH")] if p])
            env["PYTHONUNBUFFERED"] = "1"
            flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # no console window on Windows
            with open(self.stdout_path, "wb") as stdout, open(self.log_path, "wb") as stderr:
                self._process = subprocess.Popen(self.command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                                 cwd=str(self.work_dir), env=env, creationflags=flags)
        except BaseException:
            self.cleanup()
            raise
        return self

    # --- following the child ------------------------------------------------------------------
    def poll(self) -> list[str]:
        """Read the child's new progress events and log lines; returns the new log lines."""
        if self._process is None:
            return []
        exited = self._process.poll() is not None  # checked first, so no line written before exit is missed
        for event in self._new_events():
            self._apply(event)
        log = self._log.new_lines()
        if exited and self.returncode is None:
            self.returncode = self._process.returncode
        return log

    def _new_events(self) -> list[dict]:
        events = []
        for line in self._stdout.new_lines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a stray print from a library; the log keeps the details
        return events

    def _apply(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress":
            self.fraction, self.stage = float(event["fraction"]), str(event["stage"])
        elif kind == "case_done":
            self.case_info = event
            self.fraction, self.stage = 1.0, "reading the results"
        elif kind == "done":
            self.outputs = {role: Path(path) for role, path in event["outputs"][INPUT_NAME].items()}

    def progress(self) -> tuple[float, str]:
        return self.fraction, self.stage

    @property
    def done(self) -> bool:
        return self.returncode is not None or self.cancelled

    def wait(self, timeout: float | None = None, interval: float = 0.1) -> bool:
        """Poll until the child exits (scripts, the self-test); returns whether it did."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.done and (end is None or time.monotonic() < end):
            self.poll()
            if not self.done:
                time.sleep(interval)
        return self.done

    def check(self) -> dict[str, Path]:
        """The outputs of a finished run, or ``ChildRunError`` with the tail of the child's log."""
        if self.cancelled:
            raise ChildRunError("the run was cancelled")
        if self.returncode is None:
            raise RuntimeError("the run has not finished")
        if self.returncode != 0 or self.outputs is None:
            raise ChildRunError(f"MaxQuery stopped with exit status {self.returncode}.\n{self.log_tail()}")
        return self.outputs

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return "(the child process wrote no log)"
        tail = [line for line in text.splitlines() if line.strip()][-lines:]
        return "\n".join(tail) if tail else "(the child process wrote no log)"

    # --- stopping -----------------------------------------------------------------------------
    def cancel(self) -> None:
        """Kill the child (at once: it holds nothing worth saving) and delete its files."""
        self.cancelled = True
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)
