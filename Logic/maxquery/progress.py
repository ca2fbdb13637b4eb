"""How the command line reports progress: a bar for people, or JSON lines for a parent process.

``--progress json`` is what the Slicer module reads when it runs ``maxquery segment`` in a child
process: stdout then carries only JSON objects, one per line and flushed at once, so the parent
can follow a run it cannot share memory with. Every object has an ``event`` key:

- ``start``: ``cases`` (their number);
- ``progress``: ``case``, ``fraction`` (0–1 within the case) and ``stage``;
- ``case_done``: ``case``, ``outputs`` (role → absolute path), ``case_score``, ``regions``,
  ``seconds``, ``device`` and ``notes``;
- ``done``: ``outputs`` (case → role → absolute path), the last line of a successful run.

Errors still go to stderr with the command line's exit status; the parent shows that log.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, TextIO

KINDS = ("bar", "json")
ProgressCallback = Callable[[float, str], None]


class BarReporter:
    """A tqdm bar per case on stderr and a one-line summary per case on stdout."""

    def __init__(self, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.stdout, self.stderr = stdout or sys.stdout, stderr or sys.stderr

    def start(self, cases: int) -> None:
        pass

    @contextlib.contextmanager
    def case(self, name: str) -> Iterator[ProgressCallback]:
        from tqdm import tqdm

        with tqdm(total=100, desc=name, unit="%", bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}",
                  file=self.stderr, leave=False) as bar:
            def progress(fraction: float, stage: str) -> None:
                bar.set_description(f"{name} ({stage})")
                bar.update(max(0.0, 100 * fraction - bar.n))

            yield progress

    def case_done(self, name: str, result, written: dict[str, Path]) -> None:
        print(f"{name}: case score {result.case_score:.3f}, {len(result.lesions)} region(s), "
              f"{result.timings['total']:.1f} s on {result.device} -> {written['summary'].parent}", file=self.stdout)
        for note in result.notes:
            print(f"  note: {note}", file=self.stdout)

    def done(self, outputs: dict[str, dict[str, Path]]) -> None:
        pass


class JsonReporter:
    """One JSON object per line on stdout (see the module docstring for the events)."""

    def __init__(self, stdout: TextIO | None = None) -> None:
        self.stdout = stdout or sys.stdout

    def _emit(self, event: str, **fields) -> None:
        self.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        self.stdout.flush()

    def start(self, cases: int) -> None:
        self._emit("start", cases=cases)

    @contextlib.contextmanager
    def case(self, name: str) -> Iterator[ProgressCallback]:
        yield lambda fraction, stage: self._emit("progress", case=name, fraction=round(float(fraction), 4),
                                                 stage=str(stage))

    def case_done(self, name: str, result, written: dict[str, Path]) -> None:
        self._emit("case_done", case=name, outputs=_paths(written), case_score=float(result.case_score),
                   regions=len(result.lesions), seconds=float(result.timings.get("total", 0.0)),
                   device=str(result.device), notes=list(result.notes))

    def done(self, outputs: dict[str, dict[str, Path]]) -> None:
        self._emit("done", outputs={name: _paths(paths) for name, paths in outputs.items()})


def _paths(written: dict[str, Path]) -> dict[str, str]:
    return {role: str(Path(path).resolve()) for role, path in written.items()}


def reporter(kind: str) -> BarReporter | JsonReporter:
    if kind not in KINDS:
        raise ValueError(f"unknown progress kind {kind!r}; choose from {', '.join(KINDS)}")
    return JsonReporter() if kind == "json" else BarReporter()
