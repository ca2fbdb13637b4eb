"""Reading CT images (NIfTI, NRRD, MHA, DICOM series) and checking that they are CT volumes.

Every reader returns a ``SimpleITK.Image``: it carries the geometry (origin, spacing, direction)
that all outputs must reproduce exactly. Before ITK reads a voxel, the file's own header is
checked (``image_files``, ``dicom``): the data it promises are all there, finite, fit in memory,
and lie on a grid that ITK represents exactly. ``validate_ct`` then refuses, with a message a user
can act on, what the network cannot meaningfully process, and returns warnings for what it can
process but a user should know.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import psutil
import SimpleITK as sitk

from .dicom import DicomSeries, check_series, find_series
from .errors import InputError, ResourceError
from .image_files import FileHeader, check_data, check_header, check_itk_geometry
from .terminology import as_code

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

# HU of air is about -1000, of fat about -100, of dense bone/metal a few thousand; values outside
# the FOV are often -2048/-3024. A CT in HU always holds something below water (air, fat), so an
# image that does not (a [0, 1] normalised volume, raw unsigned detector values, an 8-bit picture)
# or whose whole range is below -500 or narrower than 100 is refused.
_HU_MIN_PLAUSIBLE = -4096.0
_HU_MAX_PLAUSIBLE = 32767.0
# Where a CT in HU has air, its most common air value lies near -1000 (lung a little higher).
_AIR_MODE_HU = (-1150.0, -800.0)
_MIN_AXIS_VOXELS = 16  # at least two axes this long: a smaller volume holds no recognisable anatomy
_ORTHONORMAL_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ImageInfo:
    """What the headers say about an image, before its voxels are read."""

    size_xyz: tuple[int, ...]
    spacing_xyz: tuple[float, ...]
    direction: tuple[float, ...]
    voxel_bytes: int  # the voxel buffer ITK will allocate
    header: FileHeader | None = None  # the raw file header (None for DICOM)
    series: DicomSeries | None = None


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


def only_series(folder: Path) -> DicomSeries:
    """The single DICOM series in ``folder``; refuses a folder with none or several."""
    series = find_series(folder)
    if not series:
        raise InputError(f"{folder} is a folder without a DICOM series; give an image file or a DICOM folder")
    if len(series) > 1:
        listed = ", ".join(f"{s.uid} ({len(s.files)} files)" for s in series)
        raise InputError(f"{folder} holds {len(series)} DICOM series ({listed}); give the folder to the command line, "
                         f"which segments each series as a case of its own, or put each series in a folder")
    return series[0]


def inspect_image(path: str | Path, series: DicomSeries | None = None) -> ImageInfo:
    """Check the headers (geometry, completeness of DICOM slices, memory for the voxels) without
    reading the voxels; ``series`` picks one series of a DICOM folder."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if path.is_dir():
        series = series or only_series(path)
        geometry = check_series(series)
        info = ImageInfo(geometry.size_xyz, geometry.spacing_xyz, geometry.direction,
                         4 * int(np.prod(geometry.size_xyz)), series=series)
    else:
        header = check_header(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as err:
            raise InputError(f"cannot read {path} as an image ({_last_line(err)})") from err
        _check_scalar_3d(reader.GetDimension(), reader.GetNumberOfComponents())
        if header is not None:
            check_itk_geometry(path, header, reader)
        size = tuple(reader.GetSize())
        pixel_bytes = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID()).GetSizeOfPixelComponent()
        voxel_bytes = int(np.prod(size, dtype=np.int64)) * reader.GetNumberOfComponents() * pixel_bytes
        info = ImageInfo(size, tuple(reader.GetSpacing()), tuple(reader.GetDirection()), voxel_bytes, header)
    _check_fits(path, info)
    return info


def read_image(path: str | Path, series: DicomSeries | None = None, info: ImageInfo | None = None) -> sitk.Image:
    """Read an image file or a DICOM series; raise ``InputError`` when it cannot be read or its
    header is not kept, ``ResourceError`` when its voxels cannot fit (``info``: what
    ``inspect_image`` already found, to save inspecting twice)."""
    path = Path(path)
    info = info or inspect_image(path, series)
    try:
        if info.series is not None:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(list(info.series.files))
            return reader.Execute()
        if info.header is not None:
            check_data(path, info.header)
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(f"cannot read {path} as an image ({_last_line(err)})") from err
    except OSError as err:
        raise InputError(f"cannot read {path} ({err.strerror or err})") from err


def _check_fits(path: Path, info: ImageInfo) -> None:
    free = psutil.virtual_memory().available
    if info.voxel_bytes > free:
        size = " x ".join(str(n) for n in info.size_xyz)
        raise ResourceError(
            f"{path}: its header promises {size} voxels ({info.voxel_bytes / 2**30:.1f} GiB), more than the "
            f"{free / 2**30:.1f} GiB of free memory; if the file is right, crop or downsample it first"
        )


def _last_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[-1] if text else "unknown reason"


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
        raise InputError(f"invalid image geometry ({_last_line(err)})") from err
    return image


def validate_ct(image: sitk.Image) -> list[str]:
    """Raise ``InputError`` for a 2D/4D, vector, tiny, non-CT, NaN, constant or ill-posed image;
    return warnings (plain sentences) for what can be processed but deserves a look."""
    _check_scalar_3d(image.GetDimension(), image.GetNumberOfComponentsPerPixel())
    size = image.GetSize()
    if min(size) < 2:
        raise InputError(f"the volume {size} is a single slice; a 3D CT with several slices is needed")
    if sorted(size)[1] < _MIN_AXIS_VOXELS:
        raise InputError(f"the volume is only {' x '.join(map(str, size))} voxels; a CT needs at least "
                         f"{_MIN_AXIS_VOXELS} voxels along two axes to show any anatomy")
    spacing = np.asarray(image.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"invalid voxel spacing {tuple(spacing)}: every spacing must be positive")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or np.abs(direction.T @ direction - np.eye(3)).max() > _ORTHONORMAL_TOLERANCE:
        raise InputError("the image direction matrix is not orthonormal (sheared or broken axes); resample the "
                         "image to an orthogonal grid first")
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
    return _air_warnings(array, low)


def _check_scalar_3d(dimension: int, components: int) -> None:
    if dimension != 3 or components != 1:
        raise InputError(f"expected a 3D scalar CT volume, got a {dimension}D image with {components} component(s) "
                         f"per voxel")


def _air_warnings(array: np.ndarray, low: float) -> list[str]:
    """Refuse a volume whose air is not near -1000 (values rescaled away from HU); warn when the
    volume holds no air at all, so that the check could not be made."""
    sample = array.reshape(-1)[:: max(1, array.size // 4_000_000)]
    air = sample[sample <= -500]
    if low <= -1500:  # a constant fill outside the field of view is no air
        air = air[air != low]
    if air.size < 1e-3 * sample.size:
        return [f"the volume holds no air (its lowest value is {low:g}), so it could not be checked that its values "
                f"are Hounsfield units; if they are not, the labels and anomaly maps are meaningless"]
    counts, edges = np.histogram(air, bins=np.arange(_HU_MIN_PLAUSIBLE, -499.0, 25.0))
    mode = float(edges[np.argmax(counts)] + 12.5)
    if not _AIR_MODE_HU[0] <= mode <= _AIR_MODE_HU[1]:
        raise InputError(
            f"the air in this volume lies at about {mode:g} instead of -1000: its values are not Hounsfield units "
            f"(rescaled?); give the CT with its values in HU"
        )
    return []


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
