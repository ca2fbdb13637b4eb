"""Reading the command line's files back for the scene: the one place that knows their formats.

The child process writes ``<case>_labels.nii.gz``, ``<case>_anomaly.nii.gz`` (calibrated score)
and ``<case>_summary.json``; ``read_case_outputs`` turns them into the few things the node
library needs. If the command line's output formats change, only this module follows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk


@dataclass
class CaseOutputs:
    """What ``nodes`` reads from a result (the same names as the core's ``SegmentationResult``)."""

    labels: sitk.Image  # the card's label values, uint8, on the input grid
    anomaly: sitk.Image  # calibrated anomaly, float32 in [0, 1], same grid
    case_score: float
    lesions: list
    card: object
    anomaly_threshold: float
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def read_calibrated_anomaly(path: Path) -> sitk.Image:
    """The calibrated anomaly map as float32 in [0, 1]."""
    return sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)


def read_case_outputs(paths: dict[str, Path], card, case_info: dict | None = None) -> CaseOutputs:
    """``paths`` are the roles the child reported (``labels``, ``anomaly``, ``summary``, …)."""
    from maxquery.inference.result import Lesion

    missing = [role for role in ("labels", "anomaly", "summary") if role not in paths or not Path(paths[role]).is_file()]
    if missing:
        raise FileNotFoundError(f"the run reported no {', '.join(missing)} file; see the log")
    summary = json.loads(Path(paths["summary"]).read_text())
    labels = sitk.Cast(sitk.ReadImage(str(paths["labels"])), sitk.sitkUInt8)
    anomaly = read_calibrated_anomaly(paths["anomaly"])
    lesions = [Lesion(**{**item, "center_lps": tuple(item["center_lps"])}) for item in summary["lesions"]]
    info = case_info or {}
    return CaseOutputs(labels=labels, anomaly=anomaly, case_score=float(summary["case_score"]), lesions=lesions,
                       card=card, anomaly_threshold=float(summary["anomaly_threshold"]),
                       device=str(summary.get("device", info.get("device", "cpu"))),
                       notes=list(summary.get("notes", [])), seconds=float(info.get("seconds", 0.0)))
