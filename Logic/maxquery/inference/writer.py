"""Writing one case's outputs: all or nothing.

Files are written into a hidden temporary folder inside the output folder and moved into place
only when every one of them was written, so an error never leaves a half-written case behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import SimpleITK as sitk

from ..io import write_segmentation_nrrd
from .result import SegmentationResult


def planned_outputs(out_dir: str | Path, name: str, scores: Iterable[str], png: bool = False) -> dict[str, Path]:
    """The files a case produces, by role: labels, segmentation, anomaly, anomaly_<score>, summary, png."""
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
) -> dict[str, Path]:
    """Write every output of ``result``; returns the final paths by role (see ``planned_outputs``)."""
    out_dir = Path(out_dir)
    paths = planned_outputs(out_dir, name, result.raw_scores, png)
    check_free(paths, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".maxquery-", dir=out_dir))
    try:
        staged = {role: staging / path.name for role, path in paths.items()}
        sitk.WriteImage(sitk.Cast(result.labels, sitk.sitkUInt8), str(staged["labels"]), useCompression=True)
        write_segmentation_nrrd(result.labels, result.card.classes, staged["segmentation"])
        sitk.WriteImage(sitk.Cast(result.anomaly, sitk.sitkFloat32), str(staged["anomaly"]), useCompression=True)
        for score, image in result.raw_scores.items():
            sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(staged[f"anomaly_{score}"]), useCompression=True)
        summary = {"case": name, **result.summary(), "outputs": {r: p.name for r, p in paths.items()}}
        staged["summary"].write_text(json.dumps(summary, indent=1))
        if png:
            from ..review import write_review_png

            write_review_png(result, staged["png"], title=name)
        for role, path in paths.items():
            os.replace(staged[role], path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths
