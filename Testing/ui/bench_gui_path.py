"""The panel's inference time with Slicer's GIL behaviour, against the plain command line (a script
that prints figures, not a test).

The GUI path is the real widget on the PySide6 shim; between two polls the main thread sits in a
C call that keeps the GIL (``usleep`` through ``ctypes.PyDLL``), as PythonQt's idle event loop does.
``--thread`` also times what issue 9 replaced: the same Predictor in a Python thread under the same
loop (capped at ``--cap`` seconds). Runs alternate (CLI, GUI, CLI, GUI, …) so that both see the
same machine load. Run:

    PYTHONPATH=Logic:MaxQuerySlicer QT_QPA_PLATFORM=offscreen .venv/bin/python Testing/ui/bench_gui_path.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "MaxQuerySlicer")]

from test_gil import HOLD_MS, hold_gil  # noqa: E402

DEMO_CASE = REPO / "Resources" / "DemoData" / "liverbench_A_0085.nii.gz"
MODEL = REPO / "Resources" / "Models" / "maxquery-liver-demo"


def cli_seconds(case: Path, out: Path) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "maxquery.cli", "segment", str(case), "--model", str(MODEL), "--out",
                    str(out), "--device", "cpu", "--progress", "json"], check=True, capture_output=True)
    return time.monotonic() - start


def gui_seconds(app, widget, volume) -> float:
    widget.ui.inputSelector.setCurrentNode(volume)
    start = time.monotonic()
    widget.ui.applyButton.click()
    while widget.run is not None:
        hold_gil(HOLD_MS)
        app.processEvents()
    if "Done" not in widget.ui.statusLabel.text():
        raise RuntimeError(widget.ui.statusLabel.text())
    return time.monotonic() - start


def thread_seconds(app, image, cap: float) -> float:
    """The replaced design: Predictor.predict in a Python thread, main thread as PythonQt's."""
    from maxquery.inference import Predictor

    predictor = Predictor(MODEL, device="cpu")
    done = threading.Event()
    start = time.monotonic()
    threading.Thread(target=lambda: (predictor.predict(image), done.set()), daemon=True).start()
    while not done.is_set() and time.monotonic() - start < cap:
        hold_gil(HOLD_MS)
        app.processEvents()
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, default=DEMO_CASE)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--thread", action="store_true", help="also time a thread-based run (capped)")
    parser.add_argument("--cap", type=float, default=900.0)
    args = parser.parse_args()

    import shim
    import SimpleITK as sitk
    import slicer

    from MaxQuerySlicerLib import nodes

    scene = slicer.vtkMRMLScene()
    app = shim.install(scene)
    import MaxQuerySlicer

    parent = shim.QtWidgets.QWidget()
    widget = MaxQuerySlicer.MaxQuerySlicerWidget(parent)
    widget.setup()
    widget.params.model_folder, widget.params.device = str(MODEL), "cpu"
    image = sitk.ReadImage(str(args.case))
    volume = nodes.add_volume(scene, image, args.case.name.split(".")[0])
    print(f"case {args.case.name} {image.GetSize()}, GIL held {HOLD_MS} ms between polls", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            cli = cli_seconds(args.case, Path(folder) / f"cli{repeat}")
            gui = gui_seconds(app, widget, volume)
            print(f"run {repeat + 1}: plain command line {cli:.1f} s, GUI path {gui:.1f} s ({gui / cli:.2f}x)",
                  flush=True)
    if args.thread:
        seconds = thread_seconds(app, image, args.cap)
        print(f"thread-based run under the same loop: {seconds:.1f} s"
              f"{' (stopped at the cap)' if seconds >= args.cap else ''}", flush=True)
    widget.cleanup()


if __name__ == "__main__":
    main()
