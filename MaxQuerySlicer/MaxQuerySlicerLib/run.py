"""One inference in a worker thread, polled from the GUI thread.

The worker only computes (SimpleITK image in, ``SegmentationResult`` out) and never touches the
MRML scene, which is not thread-safe; the caller builds nodes after ``done``. Progress and the
outcome are plain attributes guarded by a lock, so any event loop (a QTimer in Slicer, a loop in a
script) can poll them.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class BackgroundRun:
    """``make_predictor()`` and ``predictor.predict`` run in the thread; ``cancel()`` stops them."""

    def __init__(self, make_predictor: Callable, image, anomaly_threshold: float):
        self._make_predictor = make_predictor
        self._image = image
        self._threshold = anomaly_threshold
        self._lock = threading.Lock()
        self.cancel_event = threading.Event()
        self.fraction, self.stage = 0.0, "Starting"
        self.result = None
        self.error: BaseException | None = None
        self.predictor = None
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._work, name="MaxQuery inference", daemon=True)

    def start(self) -> "BackgroundRun":
        self._thread.start()
        return self

    def _progress(self, fraction: float, stage: str) -> None:
        with self._lock:
            self.fraction, self.stage = float(fraction), str(stage)

    def _work(self) -> None:
        try:
            self._progress(0.0, "Loading model")
            self.predictor = self._make_predictor()
            result = self.predictor.predict(self._image, progress=self._progress, cancel=self.cancel_event,
                                            anomaly_threshold=self._threshold)
            with self._lock:
                self.result = result
        except BaseException as err:  # reported to the GUI thread, which decides what to show
            with self._lock:
                self.error = err

    def progress(self) -> tuple[float, str]:
        with self._lock:
            return self.fraction, self.stage

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    @property
    def cancelled(self) -> bool:
        from maxquery.errors import RunCancelled

        return isinstance(self.error, RunCancelled) or (self.done and self.cancel_event.is_set())

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.done
