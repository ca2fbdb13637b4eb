"""The cases one command-line run stands for, each under a name no other case of the run has.

INPUT is an image file, a folder holding one or several DICOM series, or a folder of cases:
image files, DICOM series in the folder itself, and DICOM series in its subfolders. Every series
is a case of its own; nothing in the folder is silently left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .dicom import DicomSeries, find_series
from .errors import InputError, OutputError
from .io import IMAGE_SUFFIXES, case_name, is_image_file


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    series: DicomSeries | None = None

    def source(self) -> dict:
        """What the case's summary records about its input."""
        return {"path": str(self.path.resolve()), "series_instance_uid": self.series.uid if self.series else None}


def find_cases(path: Path) -> list[Case]:
    """Every case ``path`` stands for; refuses an empty folder and two cases with the same name."""
    if path.is_file():
        return [Case(case_name(path), path)]
    if not path.is_dir():
        raise InputError(f"{path} does not exist")
    entries = sorted(path.iterdir())
    cases = [Case(case_name(p), p) for p in entries if is_image_file(p)]
    cases += _series_cases(path)
    for folder in (p for p in entries if p.is_dir()):
        cases += _series_cases(folder)
    if not cases:
        raise InputError(f"{path} holds no image file ({', '.join(IMAGE_SUFFIXES)}) and no DICOM series")
    _check_unique(cases)
    return cases


def _series_cases(folder: Path) -> list[Case]:
    """One case per series: named after the folder, plus the SeriesNumber (or the UID's end) when
    the folder holds several series."""
    series = find_series(folder)
    if len(series) == 1:
        return [Case(folder.name, folder, series[0])]
    numbers = [s.number for s in series]
    by_number = all(numbers) and len(set(numbers)) == len(numbers)
    return [Case(f"{folder.name}_series{s.number}" if by_number else f"{folder.name}_{s.uid.split('.')[-1][-8:]}",
                 folder, s) for s in series]


def _check_unique(cases: list[Case]) -> None:
    seen: dict[str, Case] = {}
    for case in cases:
        other = seen.setdefault(case.name.casefold(), case)
        if other is not case:
            raise OutputError(
                f"two inputs would be written under the same case name {case.name!r} ({other.path.name} and "
                f"{case.path.name}); rename one of them or run them into different output folders"
            )

