"""DICOM series: every series in a folder, and whether its slices form a regular grid.

ITK stacks a series' slices as they come: with gantry tilt the slices are shifted sideways but
read as a straight stack, and with a missing slice the average spacing is used, so the slices
after the gap shift. Both give outputs in the wrong place; such series are refused with a message
that says how to regularise them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
_GAP_TOLERANCE = 0.1  # largest deviation of a slice gap from the median gap, as a fraction of it
_REGULARISE = ("resample it to a regular grid first (e.g. 3D Slicer's DICOM module with 'Acquisition geometry "
               "regularization' on, then save the volume as NRRD or NIfTI)")


@dataclass(frozen=True)
class DicomSeries:
    """One series in one folder: its SeriesInstanceUID, its files and its SeriesNumber ("" if none)."""

    folder: Path
    uid: str
    files: tuple[str, ...]
    number: str = ""


@dataclass(frozen=True)
class SeriesGeometry:
    size_xyz: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    direction: tuple[float, ...]


def find_series(folder: Path) -> list[DicomSeries]:
    """Every DICOM series directly in ``folder`` (not in its subfolders), largest first."""
    reader = sitk.ImageSeriesReader
    found = []
    for uid in reader.GetGDCMSeriesIDs(str(folder)):
        files = tuple(reader.GetGDCMSeriesFileNames(str(folder), uid))
        if files:
            found.append(DicomSeries(folder, uid, files, _tag(_reader(files[0]), "0020|0011")))
    return sorted(found, key=lambda s: -len(s.files))


def check_series(series: DicomSeries) -> SeriesGeometry:
    """Refuse a series whose slices are incomplete or do not form a regular, untilted grid."""
    headers = [_reader(f) for f in series.files]
    first = headers[0]
    rows, cols = int(_tag(first, "0028|0010") or 0), int(_tag(first, "0028|0011") or 0)
    frames = int(_tag(first, "0028|0008") or 1)
    for path, header in zip(series.files, headers):
        _check_file_size(path, header, rows, cols)
    pixel = [float(v) for v in (_tag(first, "0028|0030") or "1\\1").split("\\")]
    if len(headers) == 1 or frames > 1:
        reader = _reader(series.files[0])
        return SeriesGeometry(tuple(reader.GetSize()[:3]), tuple(reader.GetSpacing()[:3]), tuple(reader.GetDirection()))
    orientations = np.asarray([_numbers(h, "0020|0037", 6) for h in headers])
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        raise InputError(f"{series.folder}: the slices of series {series.uid} have different orientations; "
                         f"{_REGULARISE}")
    row, col = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, col)
    positions = np.asarray([_numbers(h, "0020|0032", 3) for h in headers])
    along = positions @ normal
    order = np.argsort(along)
    positions, along = positions[order], along[order]
    gaps = np.diff(along)
    median = float(np.median(gaps))
    if median <= 1e-3 or gaps.min() <= 1e-3 * median:
        raise InputError(f"{series.folder}: series {series.uid} has several slices at the same position (several "
                         f"acquisitions or echoes in one series?); export each acquisition as a series of its own")
    if np.abs(gaps - median).max() > _GAP_TOLERANCE * median:
        raise InputError(
            f"{series.folder}: the slices of series {series.uid} are not evenly spaced (gaps from {gaps.min():.2f} to "
            f"{gaps.max():.2f} mm: a slice is missing or the spacing changes); {_REGULARISE}"
        )
    sideways = positions - positions[0] - np.outer(along - along[0], normal)
    shift = float(np.linalg.norm(sideways, axis=1).max())
    if shift > 0.5 * min(pixel):
        tilt = float(np.degrees(np.arctan2(shift, along[-1] - along[0])))
        raise InputError(
            f"{series.folder}: the slices of series {series.uid} are shifted sideways along the stack by up to "
            f"{shift:.1f} mm (gantry tilt of about {tilt:.0f} degrees); {_REGULARISE}"
        )
    direction = np.column_stack([row, col, normal]).ravel()
    return SeriesGeometry((cols, rows, len(headers)), (pixel[1], pixel[0], median), tuple(float(d) for d in direction))


def _check_file_size(path: str, header: sitk.ImageFileReader, rows: int, cols: int) -> None:
    """An uncompressed slice file must be large enough for its pixels."""
    if _tag(header, "0002|0010").rstrip("\0 ") not in _UNCOMPRESSED:
        return
    frames = int(_tag(header, "0028|0008") or 1)
    bits = int(_tag(header, "0028|0100") or 16)
    samples = int(_tag(header, "0028|0002") or 1)
    needed = rows * cols * frames * samples * bits // 8
    if Path(path).stat().st_size < needed:
        raise InputError(f"{path} is incomplete: it is smaller than the {needed} bytes of pixels its header "
                         f"promises (copy the series again)")


def _reader(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise InputError(f"cannot read {path} as DICOM ({str(err).strip().splitlines()[-1]})") from err
    return reader




def _tag(reader: sitk.ImageFileReader, key: str) -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _numbers(reader: sitk.ImageFileReader, key: str, count: int) -> np.ndarray:
    try:
        values = np.asarray([float(v) for v in _tag(reader, key).split("\\")], float)
    except ValueError:
        values = np.empty(0)
    if values.size != count or not np.all(np.isfinite(values)):
        raise InputError(f"{reader.GetFileName()} lacks a valid DICOM tag {key} (image position/orientation); "
                         f"the series cannot be placed in space")
    return values
