"""Reading CT images (NIfTI, NRRD, MHA, DICOM series) and checking that they are CT volumes.

Every reader returns a ``SimpleITK.Image``: it carries the geometry (origin, spacing, direction)
that all outputs must reproduce exactly. ``validate_ct`` refuses, with a message a user can act
on, what the network cannot meaningfully process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .terminology import as_code

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

# HU of air is about -1000, of fat about -100, of dense bone/metal a few thousand; values outside
# the FOV are often -2048/-3024. A CT in HU always holds something below water (air, fat), so an
# image that does not (a [0, 1] normalised volume, raw unsigned detector values, an 8-bit picture)
# or whose whole range is below -500 or narrower than 100 is refused.
_HU_MIN_PLAUSIBLE = -4096.0
_HU_MAX_PLAUSIBLE = 32767.0


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def case_name(path: str | Path) -> str:
    """The file name without its image suffix, or the folder name of a DICOM series."""
    path = Path(path)
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def dicom_series(folder: Path) -> list[str]:
    """File names of the largest DICOM series in ``folder`` (empty when there is none)."""
    reader = sitk.ImageSeriesReader
    series = [reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in reader.GetGDCMSeriesIDs(str(folder))]
    return list(max(series, key=len)) if series else []


def read_image(path: str | Path) -> sitk.Image:
    """Read an image file or a DICOM series folder; raise ``InputError`` when it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    try:
        if path.is_dir():
            files = dicom_series(path)
            if not files:
                raise InputError(f"{path} is a folder without a DICOM series; give an image file or a DICOM folder")
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown reason"
        raise InputError(f"cannot read {path} as an image ({first_line})") from err


def image_from_array(
    array_zyx: np.ndarray, spacing_xyz: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
) -> sitk.Image:
    """Wrap a (z, y, x) array with its geometry (spacing/origin in x, y, z order, LPS, mm)."""
    array = np.asarray(array_zyx)
    if array.ndim != 3:
        raise InputError(f"expected a 3D (z, y, x) array, got {array.ndim} dimensions {array.shape}")
    image = sitk.GetImageFromArray(array)
    try:
        image.SetSpacing([float(s) for s in spacing_xyz])
        image.SetOrigin([float(o) for o in origin])
        image.SetDirection([float(d) for d in np.asarray(direction, dtype=float).ravel()])
    except RuntimeError as err:
        raise InputError(f"invalid image geometry ({str(err).strip().splitlines()[-1]})") from err
    return image


def validate_ct(image: sitk.Image) -> None:
    """Raise ``InputError`` for a 2D/4D, vector, non-CT, NaN, constant or ill-posed image."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"expected a 3D scalar CT volume, got a {image.GetDimension()}D image with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    if min(image.GetSize()) < 2:
        raise InputError(f"the volume {image.GetSize()} is a single slice; a 3D CT with several slices is needed")
    spacing = np.asarray(image.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"invalid voxel spacing {tuple(spacing)}: every spacing must be positive")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-3:
        raise InputError("the image direction matrix is singular; the file's orientation is broken")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise InputError("the volume contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise InputError(f"the volume is empty: every voxel has the value {low}")
    if low < _HU_MIN_PLAUSIBLE or high > _HU_MAX_PLAUSIBLE or high < -500 or low >= 0 or high - low < 100:
        raise InputError(
            f"intensities {low:g}..{high:g} are not CT Hounsfield units (air is about -1000, soft tissue "
            f"0-100); give a CT volume with rescaled HU values"
        )


def write_segmentation_nrrd(labels: sitk.Image, classes: Sequence, path: str | Path) -> None:
    """Write a label map as a Slicer segmentation (``.seg.nrrd``): one shared layer, one segment
    per non-background class, with the header keys Slicer itself writes (``Segment<i>_Name`` …).

    ``classes`` are ``ClassInfo``s; a class whose terminology holds Slicer's ``category`` and
    ``type`` code triples gets a ``TerminologyEntry`` tag.
    """
    import nrrd  # pynrrd: only needed for this file format

    array = sitk.GetArrayViewFromImage(labels)  # (z, y, x)
    spacing = np.asarray(labels.GetSpacing())
    direction = np.asarray(labels.GetDirection()).reshape(3, 3)
    header = {
        "type": "unsigned char",
        "space": "left-posterior-superior",
        "space directions": (direction * spacing).T,  # one row per axis (x, y, z)
        "space origin": np.asarray(labels.GetOrigin()),
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    segments = [c for c in classes if c.role != "background"]
    for i, cls in enumerate(segments):
        present = np.nonzero(array == cls.value)
        if present[0].size:
            extent = " ".join(f"{int(a.min())} {int(a.max())}" for a in reversed(present))  # x, y, z
        else:
            extent = "0 -1 0 -1 0 -1"
        tags = "|"
        if {"category", "type"} <= set(cls.terminology):
            tags = f"TerminologyEntry:{_terminology_string(cls.terminology)}|"
        header.update({
            f"Segment{i}_ID": f"Segment_{cls.value}",
            f"Segment{i}_Name": cls.name,
            f"Segment{i}_NameAutoGenerated": "0",
            f"Segment{i}_Color": " ".join(f"{c:g}" for c in cls.color),
            f"Segment{i}_ColorAutoGenerated": "0",
            f"Segment{i}_LabelValue": str(cls.value),
            f"Segment{i}_Layer": "0",
            f"Segment{i}_Extent": extent,
            f"Segment{i}_Tags": tags,
        })
    nrrd.write(str(path), np.ascontiguousarray(array, dtype=np.uint8), header, index_order="C")


def _terminology_string(terminology: dict) -> str:
    """Slicer's ``TerminologyEntry`` tag: context~category~type~modifier~anatomic context~region~modifier."""
    def code(key: str) -> str:
        return "^".join(as_code(terminology.get(key)) or ("", "", ""))

    return "~".join([
        terminology.get("contextName", "Segmentation category and type - 3D Slicer General Anatomy list"),
        code("category"), code("type"), code("modifier"),
        terminology.get("anatomicContextName", ""), code("anatomicRegion"), code("anatomicRegionModifier"),
    ])
