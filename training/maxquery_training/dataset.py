"""Medical Segmentation Decathlon datasets: listing, checking and nnU-Net-style preprocessing.

A case is preprocessed once (reoriented to LPS, resampled to the target spacing, label values
mapped to class indices) and cached as ``.npz`` next to a ``fingerprint.json`` that records the
spacing and the CT normalisation, so a second run with the same settings reads the cache.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from maxquery.preprocessing import CTNormalization, resample_to_spacing, to_canonical

from .config import DataConfig

log = logging.getLogger(__name__)
# The ignore label: the class index that ``ood_label`` voxels get (test splits only). The one
# definition; the losses and the tests import it.
IGNORE_INDEX = 255


class DataError(ValueError):
    """A case that cannot be used; the message names the case and the problem."""


@dataclass(frozen=True)
class CaseFiles:
    case_id: str
    image: Path
    label: Path | None


def list_cases(root: str | Path, split: str = "training") -> list[CaseFiles]:
    """Cases of one split in ``dataset.json`` (``training``, ``validation``, ``test_inlier``, …).

    ``test`` in plain MSD datasets is a list of image paths without labels.
    """
    root = Path(root)
    manifest = root / "dataset.json"
    if not manifest.is_file():
        raise DataError(f"{root} is not a Decathlon dataset: dataset.json is missing")
    entries = json.loads(manifest.read_text()).get(split)
    if entries is None:
        raise DataError(f"{manifest} has no split {split!r}")
    cases = []
    for entry in entries:
        image = root / (entry["image"] if isinstance(entry, dict) else entry)
        label = root / entry["label"] if isinstance(entry, dict) and entry.get("label") else None
        case_id = image.name.removesuffix(".nii.gz").removesuffix(".nii").removesuffix("_0000")
        cases.append(CaseFiles(case_id, image, label))
    return cases


def read_case(case: CaseFiles) -> tuple[sitk.Image, sitk.Image | None]:
    """Read image and label in LPS; checks files and geometry, names the case on failure."""
    for path in (case.image, case.label):
        if path is not None and not path.is_file():
            raise DataError(f"case {case.case_id}: file {path} is missing")
    try:
        image = to_canonical(sitk.ReadImage(str(case.image), sitk.sitkFloat32))
        label = to_canonical(sitk.ReadImage(str(case.label), sitk.sitkUInt8)) if case.label else None
    except RuntimeError as err:
        raise DataError(f"case {case.case_id}: cannot read ({str(err).splitlines()[0]})") from err
    if label is not None:
        same = (
            image.GetSize() == label.GetSize()
            and np.allclose(image.GetSpacing(), label.GetSpacing(), rtol=1e-4)
            and np.allclose(image.GetOrigin(), label.GetOrigin(), atol=1e-3)
            and np.allclose(image.GetDirection(), label.GetDirection(), atol=1e-4)
        )
        if not same:
            raise DataError(
                f"case {case.case_id}: image and label geometries differ (size {image.GetSize()} vs "
                f"{label.GetSize()}, spacing {image.GetSpacing()} vs {label.GetSpacing()}); resample the label "
                "onto the image grid"
            )
    return image, label


def label_lookup(data: DataConfig, allow_ood: bool) -> np.ndarray:
    """A 256-entry table from label value to class index; unknown values map to -1."""
    table = np.full(256, -1, np.int16)
    for index, value in enumerate(data.label_values):
        table[value] = index
    for value in data.background:
        table[value] = 0
    if allow_ood and data.ood_label is not None:
        table[data.ood_label] = IGNORE_INDEX
    return table


def map_labels(label: np.ndarray, table: np.ndarray, case_id: str) -> np.ndarray:
    classes = table[label]
    if (classes < 0).any():
        unknown = sorted(set(np.unique(label[classes < 0]).tolist()))
        raise DataError(
            f"case {case_id}: label values {unknown} are neither background, organ, an inlier tumour nor the "
            "ood_label of the config; fix the labels or the config's data section"
        )
    return classes.astype(np.uint8)


def median_spacing(cases: list[CaseFiles]) -> list[float]:
    spacings = []
    for case in cases:
        if not case.image.is_file():  # reported by read_case when the case is used
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(case.image))
        reader.ReadImageInformation()
        direction = np.array(reader.GetDirection()).reshape(3, 3)
        # axis order after LPS reorientation: permute the spacing like DICOMOrient does
        order = np.abs(direction).argmax(axis=0)
        xyz = np.empty(3)
        xyz[order] = reader.GetSpacing()
        spacings.append(xyz[::-1])
    return [float(s) for s in np.median(np.array(spacings), axis=0)]


def compute_normalization(cases: list[CaseFiles], data: DataConfig, max_samples: int = 10_000_000) -> CTNormalization:
    """nnU-Net's CT statistics over the foreground (organ and tumour) voxels of the training cases,
    clipped to the configured ``ct_window`` or, without one, to the foreground's percentiles."""
    rng = np.random.default_rng(0)
    per_case = max(1, max_samples // max(1, len(cases)))
    samples = []
    for case in cases:
        try:
            image, label = read_case(case)
        except DataError:
            if data.skip_bad_cases:
                continue
            raise
        values = sitk.GetArrayViewFromImage(image)[np.isin(sitk.GetArrayViewFromImage(label), data.foreground_values)]
        if values.size > per_case:
            values = rng.choice(values, per_case, replace=False)
        samples.append(values)
    return CTNormalization.from_foreground(np.concatenate(samples), window=data.ct_window)


@dataclass
class PreprocessedCase:
    case_id: str
    image: np.ndarray  # (z, y, x) float32, normalised
    label: np.ndarray | None  # (z, y, x) uint8 class indices (IGNORE_INDEX for OOD voxels)
    class_locations: dict[int, np.ndarray]  # class index → (n, 3) voxel indices, for oversampling


def preprocess_case(
    case: CaseFiles, data: DataConfig, spacing: list[float], normalization: CTNormalization, allow_ood: bool = False
) -> PreprocessedCase:
    image, label = read_case(case)
    image = resample_to_spacing(image, spacing)
    array = normalization(sitk.GetArrayFromImage(image))
    classes = None
    locations: dict[int, np.ndarray] = {}
    if label is not None:
        label = resample_to_spacing(label, spacing, is_label=True)
        classes = map_labels(sitk.GetArrayFromImage(label), label_lookup(data, allow_ood), case.case_id)
        if not classes.any():
            raise DataError(f"case {case.case_id}: the label is empty (background only)")
        rng = np.random.default_rng(0)
        for index in range(1, len(data.label_values)):  # the foreground classes
            where = np.argwhere(classes == index)
            if len(where) > 2000:
                where = where[rng.choice(len(where), 2000, replace=False)]
            if len(where):
                locations[index] = where.astype(np.int16)
    return PreprocessedCase(case.case_id, array, classes, locations)


class PreprocessedDataset:
    """All cases of a split, preprocessed and cached; bad cases raise or are skipped and reported."""

    def __init__(
        self, root: str | Path, split: str, data: DataConfig, cache_dir: str | Path,
        spacing: list[float], normalization: CTNormalization, allow_ood: bool = False,
    ) -> None:
        self.cases: list[PreprocessedCase] = []
        self.skipped: list[str] = []
        cache = Path(cache_dir) / split
        cache.mkdir(parents=True, exist_ok=True)
        fingerprint = {"spacing_zyx": spacing, "normalization": normalization.to_dict(),
                       "label_values": data.label_values, "allow_ood": allow_ood}
        stamp = cache / "fingerprint.json"
        if not stamp.is_file() or json.loads(stamp.read_text()) != fingerprint:
            for old in cache.glob("*.npz"):
                old.unlink()
            tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")  # a reader never sees it half written
            tmp.write_text(json.dumps(fingerprint))
            tmp.replace(stamp)
        for case in list_cases(root, split):
            cached = cache / f"{case.case_id}.npz"
            try:
                if cached.is_file():
                    self.cases.append(_load_cached(cached, case.case_id))
                    continue
                item = preprocess_case(case, data, spacing, normalization, allow_ood)
            except DataError as err:
                if not data.skip_bad_cases:
                    raise
                log.warning("skipping %s", err)
                self.skipped.append(str(err))
                continue
            _save_cached(cached, item)
            self.cases.append(item)
        if not self.cases:
            raise DataError(f"no usable case in split {split!r} of {root}")


def _save_cached(path: Path, item: PreprocessedCase) -> None:
    arrays = {"image": item.image}
    if item.label is not None:
        arrays["label"] = item.label
    for index, where in item.class_locations.items():
        arrays[f"loc{index}"] = where
    # A name of its own per process: DDP ranks and side-by-side runs may cache the same case at once.
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _load_cached(path: Path, case_id: str) -> PreprocessedCase:
    with np.load(path) as f:
        locations = {int(k[3:]): f[k] for k in f.files if k.startswith("loc")}
        return PreprocessedCase(case_id, f["image"], f["label"] if "label" in f.files else None, locations)
