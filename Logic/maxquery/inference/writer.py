"""Writing one case's outputs: all or nothing.

Files are written into a hidden temporary folder inside the output folder and moved into place
only when every one of them was written and checked, so an error, a full disk or a signal never
leaves a half-written case behind. The temporary folder names its host and process, so that one
left by a killed process is removed by the next run.

What each file keeps, and why it is enough:
- labels (``_labels.nii.gz``, ``.seg.nrrd``): uint8 label values, exact.
- calibrated anomaly (``_anomaly.nii.gz``): uint16 codes with the NIfTI ``scl_slope``
  ``ANOMALY_STEP`` (readers such as ITK, Slicer and nibabel return code × step as float).
  The calibration is an empirical CDF on 2001 levels (steps of 5e-4), so a step of 1e-4 is
  finer than anything the calibration can tell apart: no threshold decision changes. The map is 0
  outside the lesion search region, so the file compresses to a few MB instead of 250 MB of
  float32 noise.
- raw scores (``_anomaly_<score>.nii.gz``, only when asked for): float32, every voxel, unscaled.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import WriteFailed
from ..image_files import check_header
from ..io import write_segmentation_nrrd
from .result import SegmentationResult

STAGING_PREFIX = ".maxquery-"
ANOMALY_STEP = 1e-4  # calibrated score per uint16 code in the anomaly file
# NIfTI-1 header: sizeof_hdr, dim[8] (int16), vox_offset and scl_slope/scl_inter (float32)
_NIFTI1_HEADER_SIZE, _NIFTI_DIM_OFFSET, _VOX_OFFSET_OFFSET, _SCL_SLOPE_OFFSET = 348, 40, 108, 112


def planned_outputs(out_dir: str | Path, name: str, scores: Iterable[str] = (), png: bool = False) -> dict[str, Path]:
    """The files a case produces, by role: labels, segmentation, anomaly, anomaly_<score> for each
    raw map asked for, summary, png."""
    out_dir = Path(out_dir)
    paths = {
        "labels": out_dir / f"{name}_labels.nii.gz",
        "segmentation": out_dir / f"{name}_labels.seg.nrrd",
        "anomaly": out_dir / f"{name}_anomaly.nii.gz",
        **{f"anomaly_{s}": out_dir / f"{name}_anomaly_{s}.nii.gz" for s in scores},
        "summary": out_dir / f"{name}_summary.json",
    }
    if png:
        paths["png"] = out_dir / f"{name}_review.png"
    return paths


def check_free(paths: dict[str, Path], overwrite: bool) -> None:
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} already exists{f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''}; "
            f"pass --overwrite to replace, or choose another output folder"
        )


def write_outputs(
    result: SegmentationResult, out_dir: str | Path, name: str, overwrite: bool = False, png: bool = False,
    source: dict | None = None, raw_maps: Sequence[str] = (), timings: dict[str, float] | None = None,
) -> dict[str, Path]:
    """Write the outputs of ``result``, with the raw maps of the scores in ``raw_maps``; returns the
    final paths by role (see ``planned_outputs``). ``source`` (input path, SeriesInstanceUID) is
    recorded in the summary; ``timings`` receives the seconds per file. Raises ``WriteFailed``
    when a file cannot be written completely; nothing of the case is then left."""
    out_dir = Path(out_dir)
    unknown = [s for s in raw_maps if s not in result.raw_scores]
    if unknown:
        raise ValueError(f"no raw map for {', '.join(unknown)}; this run computed {', '.join(result.raw_scores)}")
    paths = planned_outputs(out_dir, name, raw_maps, png)
    check_free(paths, overwrite)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{_owner()}-", dir=out_dir))
    except OSError as err:
        raise WriteFailed(f"cannot write into {out_dir} ({err.strerror or err}); choose another output folder") from err
    try:
        staged = {role: staging / path.name for role, path in paths.items()}
        timings = {} if timings is None else timings
        clock = time.perf_counter()

        def done(role: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[f"write {role}"] = round(now - clock, 3)
            clock = now

        write_image(sitk.Cast(result.labels, sitk.sitkUInt8), staged["labels"])
        done("labels")
        write_segmentation_nrrd(result.labels, result.card.classes, staged["segmentation"])
        done("segmentation")
        write_quantised_nifti(result.anomaly, staged["anomaly"], ANOMALY_STEP)
        done("anomaly")
        for score in raw_maps:
            write_image(sitk.Cast(result.raw_scores[score], sitk.sitkFloat32), staged[f"anomaly_{score}"])
            done(f"anomaly_{score}")
        summary = {"case": name, **({"input": source} if source else {}), **result.summary(),
                   "outputs": {r: p.name for r, p in paths.items()}}
        staged["summary"].write_text(json.dumps(summary, indent=1))
        if png:
            from ..review import write_review_png

            write_review_png(result, staged["png"], title=name)
            done("png")
        for path in staged.values():
            _sync(path)
        with _signals_deferred():  # a case is moved into place whole or not at all
            for role, path in paths.items():
                os.replace(staged[role], path)
    except OSError as err:
        if isinstance(err, WriteFailed):
            raise
        raise WriteFailed(f"writing the outputs of {name} into {out_dir} failed ({err.strerror or err}); nothing "
                          f"of this case was kept. Free disk space or choose another output folder") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def write_image(image: sitk.Image, path: Path) -> None:
    """Write a compressed image with ITK and check that it holds all its data: ITK's NIfTI writer
    reports a short write (full disk) on the terminal but does not raise."""
    try:
        sitk.WriteImage(image, str(path), useCompression=True)
    except RuntimeError as err:
        raise WriteFailed(f"ITK could not write {path.name} ({str(err).strip().splitlines()[-1]})") from err
    _check_complete(path)


def _check_complete(path: Path) -> None:
    header = check_header(path) if path.is_file() else None
    if header is None or not header.is_complete():
        raise WriteFailed(f"{path.name} was not written completely (is the disk full?)")


def write_quantised_nifti(image: sitk.Image, path: Path, step: float) -> None:
    """A map in [0, 1] as gzip-compressed NIfTI of uint16 codes round(value / step), scl_slope = step.

    SimpleITK cannot set scl_slope, so the header comes from SimpleITK writing a one-voxel image
    of the same geometry; its size fields and scale are then set, and the codes appended. Only
    the box holding non-zero values is quantised (the map is mostly zero).
    """
    values = sitk.GetArrayViewFromImage(image)
    if step * np.iinfo(np.uint16).max < 1.0:
        raise ValueError(f"step {step} cannot code values up to 1 in uint16")
    codes = np.zeros(values.shape, np.uint16)
    box = _nonzero_box(values)
    if box is not None:
        scaled = np.multiply(values[box], 1.0 / step, dtype=np.float32)
        np.rint(scaled, out=scaled)
        codes[box] = np.clip(scaled, 0, np.iinfo(np.uint16).max, out=scaled)
    header = _nifti_header(image, sitk.sitkUInt16, path.parent)
    struct.pack_into("<8h", header, _NIFTI_DIM_OFFSET, 3, *image.GetSize(), 1, 1, 1, 1)
    struct.pack_into("<ff", header, _SCL_SLOPE_OFFSET, step, 0.0)
    with gzip.open(path, "wb", compresslevel=1) as nifti:  # level 6 is 2x slower and 7 % smaller here
        nifti.write(header)
        nifti.write(memoryview(codes).cast("B"))


def _nonzero_box(values: np.ndarray) -> tuple[slice, ...] | None:
    axes = [np.flatnonzero(values.any(axis=tuple(a for a in range(values.ndim) if a != axis)))
            for axis in range(values.ndim)]
    return None if axes[0].size == 0 else tuple(slice(a[0], a[-1] + 1) for a in axes)


def _nifti_header(image: sitk.Image, pixel_type: int, folder: Path) -> bytearray:
    """The NIfTI-1 header (and its 4 extension bytes) SimpleITK writes for ``image``'s geometry."""
    voxel = sitk.Image([1, 1, 1], pixel_type)
    voxel.SetSpacing(image.GetSpacing())
    voxel.SetOrigin(image.GetOrigin())
    voxel.SetDirection(image.GetDirection())
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        sitk.WriteImage(voxel, str(Path(tmp) / "header.nii"), useCompression=False)
        data = (Path(tmp) / "header.nii").read_bytes()
    if struct.unpack_from("<i", data)[0] != _NIFTI1_HEADER_SIZE:
        raise ValueError("SimpleITK did not write a NIfTI-1 header; cannot store the map's scale")
    offset = int(struct.unpack_from("<f", data, _VOX_OFFSET_OFFSET)[0])
    return bytearray(data[:offset])


def remove_stale_staging(out_dir: str | Path) -> None:
    """Remove the temporary folders that killed runs of this host left in ``out_dir``."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    host = _owner().rsplit("-", 1)[0]
    for folder in out_dir.glob(f"{STAGING_PREFIX}{host}-*"):
        pid = folder.name[len(STAGING_PREFIX) + len(host) + 1:].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _owner() -> str:
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sync(path: Path) -> None:
    """Flush a written file to the disk, so that a deferred write error (full disk) shows here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done (main thread, POSIX); elsewhere a no-op."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
