"""Inference must run at full speed while Slicer's main thread holds the GIL.

PythonQt does not release the GIL while Slicer's event loop idles; Python code in another thread
then runs only while the main thread happens to run Python (a timer tick). Here the main thread
does the same: between two polls it sits in a C call that keeps the GIL (``usleep`` through
``ctypes.PyDLL``, which, unlike ``ctypes.CDLL``, does not release it). A run in a Python thread
would make no progress inside those calls; the child process does.
"""

import ctypes
import ctypes.util
import subprocess
import sys
import threading
import time

import pytest

from test_widget import load_ct

HOLD_MS = 90  # the main thread holds the GIL this long between two polls (PythonQt's idle loop)
_libc = ctypes.PyDLL(ctypes.util.find_library("c"))


def hold_gil(ms: float) -> None:
    """Block the calling thread in C for ``ms`` milliseconds without releasing the GIL."""
    _libc.usleep(int(ms * 1000))


pytestmark = pytest.mark.skipif(not hasattr(_libc, "usleep"), reason="needs POSIX usleep")


def test_holding_the_gil_in_c_starves_a_python_thread():
    """The simulation is strict: a Python thread gets (almost) nothing done while the main thread waits in C."""
    count = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    worker = threading.Thread(target=spin, daemon=True)
    worker.start()
    time.sleep(0.2)
    start = count[0]
    time.sleep(0.5)  # releases the GIL: the thread runs
    free = count[0] - start
    start = count[0]
    hold_gil(500)  # keeps it: the thread cannot run Python
    held = count[0] - start
    stop.set()
    worker.join()
    assert free > 10_000 and held < free / 10, (free, held)  # at most a switch interval or two slip through


def test_the_panel_runs_at_full_speed_while_the_main_thread_holds_the_gil(app, scene, widget, real_data,
                                                                          model_folder, tmp_path):
    """The plain command line runs the same case at the same time, so both see the same machine load."""
    ct_path = real_data / "totalsegmentator" / "example_ct_sm.nii.gz"
    volume = load_ct(scene, real_data, "example_ct_sm.nii.gz")
    widget.ui.inputSelector.setCurrentNode(volume)
    start = time.monotonic()
    cli = subprocess.Popen([sys.executable, "-m", "maxquery.cli", "segment", str(ct_path), "--model",
                            str(model_folder), "--out", str(tmp_path / "cli"), "--device", "cpu", "--progress", "json"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    widget.ui.applyButton.click()
    cli_seconds, values = None, []
    while widget.run is not None:
        hold_gil(HOLD_MS)
        app.processEvents()  # the poll timer fires here, as between two of PythonQt's idle waits
        values.append(widget.ui.progressBar.value())
        if cli_seconds is None and cli.poll() is not None:
            cli_seconds = time.monotonic() - start
        assert cli_seconds is None or time.monotonic() - start < 10 * cli_seconds + 60, "the run crawls"
    gui_seconds = time.monotonic() - start
    assert cli.wait() == 0
    cli_seconds = cli_seconds or time.monotonic() - start
    print(f"\nGUI path with the GIL held between polls: {gui_seconds:.1f} s; "
          f"plain command line at the same time: {cli_seconds:.1f} s")
    assert "Done" in widget.ui.statusLabel.text(), widget.ui.statusLabel.text()
    assert widget.params.reference("Segmentation") is not None
    assert len(set(values)) > 3  # progress arrived while the main thread was busy
    # The thread-based design this replaced crawls under this loop (bench_gui_path.py --thread times it).
    assert gui_seconds < 1.5 * cli_seconds + 5.0, (gui_seconds, cli_seconds)
