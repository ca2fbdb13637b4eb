"""What one inference returns: the single object every consumer (CLI, Slicer, evaluation) reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import SimpleITK as sitk

from ..model_folder import ModelCard


@dataclass(frozen=True)
class Lesion:
    """A connected region of predicted tumour or of calibrated anomaly above the threshold."""

    index: int
    source: str  # "tumor" (predicted tumour class) or "anomaly" (calibrated anomaly ≥ threshold)
    predicted_type: str  # class name of the majority predicted label inside the region
    volume_ml: float
    voxel_count: int
    mean_anomaly: float  # calibrated score, [0, 1]
    peak_anomaly: float  # calibrated score, [0, 1]
    center_lps: tuple[float, float, float]  # physical centre of mass, SimpleITK (LPS) coordinates, mm


@dataclass
class SegmentationResult:
    """All images share the input image's grid exactly (size, spacing, origin, direction).

    ``labels`` holds the card's label values (uint8); ``anomaly`` the calibrated MaxQuery score in
    [0, 1] (see ``maxquery.calibration``) inside the lesion search region (predicted organ and
    tumour grown by ``lesions.SEARCH_MARGIN_MM``), where the calibration holds, and 0 elsewhere;
    ``raw_scores`` every requested registry score, raw, higher = more anomalous, at every voxel
    (each resampled when first read). When the model card has no calibration ``anomaly`` is the
    paper's per-case min-max map; then, and when the run's settings differ from the calibration's
    (fast mode, mirroring, another overlap), ``calibrated`` is False and ``notes`` says why.
    """

    labels: sitk.Image
    anomaly: sitk.Image
    raw_scores: Mapping[str, sitk.Image]
    case_score: float  # case_scores[anomaly_score] on the anomaly map's scale (maxquery.metrics.case_score)
    lesions: list[Lesion]
    card: ModelCard
    anomaly_threshold: float
    device: str = "cpu"
    precision: str = "fp32"  # the network's compute type: fp32, bf16 or fp16
    timings: dict[str, float] = field(default_factory=dict)
    anomaly_score: str = "maxquery"  # the registry score that ``anomaly`` calibrates
    calibrated: bool = True  # False: no calibration in the card, or one fitted under other settings
    notes: list[str] = field(default_factory=list)  # caveats to show the user (fast mode, calibration)
    image: sitk.Image | None = None  # the input CT (same object, not a copy), for review pictures
    case_scores: dict[str, float] = field(default_factory=dict)  # per score: raw mean in the predicted tumour
    removed_by_postprocessing_ml: float | None = None  # None: every predicted region kept (postprocessing off)
    retyped_by_postprocessing_ml: float | None = None  # None: each voxel keeps its own type (step off)

    def summary(self) -> dict:
        """JSON-ready description of the case (what ``<name>_summary.json`` holds)."""
        return {
            "model": {"name": self.card.name, "version": self.card.version},
            "case_score": self.case_score,
            "raw_case_scores": self.case_scores,
            "anomaly_threshold": self.anomaly_threshold,
            "calibration": self.card.calibration.region if self.card.calibration else None,
            "anomaly_score": self.anomaly_score,
            "calibrated": self.calibrated,
            "notes": self.notes,
            "lesions": [asdict(lesion) for lesion in self.lesions],
            "classes": [c.to_dict() for c in self.card.classes],
            "device": self.device,
            "precision": self.precision,
            "postprocessing": {"keep_largest_component": self.removed_by_postprocessing_ml is not None,
                               "removed_ml": self.removed_by_postprocessing_ml,
                               "one_type_per_lesion": self.retyped_by_postprocessing_ml is not None,
                               "retyped_ml": self.retyped_by_postprocessing_ml},
            "timings_s": self.timings,
        }
