"""A review picture of one result: axial, coronal and sagittal slices through the most anomalous
region, with the CT (abdominal window), the calibrated anomaly in a perceptual colour map
(inferno, readable in grey and by colour-blind readers) and the outline of every segment.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .inference.lesions import search_region
from .inference.result import SegmentationResult
from .preprocessing import spacing_zyx, to_canonical

CT_WINDOW = (-160.0, 240.0)  # abdominal soft-tissue window (level 40, width 400)
OVERLAY_FROM = 0.5  # calibrated anomaly below this is not drawn, so the anatomy stays visible
# The overlay is drawn only where the lesion table looks (around the predicted organ): the
# calibration describes organ voxels, and far from the organ a high score means nothing.


def focus_point(result: SegmentationResult, canonical: sitk.Image) -> tuple[int, int, int]:
    """(x, y, z) index in ``canonical`` of the most suspicious region of the lesion table, else of
    the highest anomaly voxel.

    Suspicion is the region's anomaly mass (mean calibrated anomaly × volume), whatever found it
    (predicted tumour or high anomaly): calibrated peaks saturate at 1, so ranking by peak lets a
    single stray voxel far from the organ take the picture from a lesion of several millilitres.
    """
    if result.lesions:
        lesion = max(result.lesions, key=lambda l: l.mean_anomaly * l.volume_ml)
        index = canonical.TransformPhysicalPointToIndex(lesion.center_lps)
        if all(0 <= i < n for i, n in zip(index, canonical.GetSize())):
            return tuple(index)
    anomaly = sitk.GetArrayFromImage(to_canonical(result.anomaly))
    z, y, x = np.unravel_index(int(np.argmax(anomaly)), anomaly.shape)
    return int(x), int(y), int(z)


def write_review_png(result: SegmentationResult, path: str | Path, title: str = "") -> Path:
    """Draw the three orthogonal views (radiological convention: patient's right on the left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if result.image is None:
        raise ValueError("the result does not carry its input CT; cannot draw a review picture")
    ct = to_canonical(result.image)
    arrays = {name: sitk.GetArrayFromImage(to_canonical(image))
              for name, image in (("labels", result.labels), ("anomaly", result.anomaly))}
    arrays["ct"] = sitk.GetArrayViewFromImage(ct)
    arrays["anomaly"] = np.where(search_region(arrays["labels"], spacing_zyx(ct)), arrays["anomaly"], 0.0)
    sx, sy, sz = ct.GetSpacing()
    x, y, z = focus_point(result, ct)
    views = [  # (title, slicer, row spacing, column spacing, origin) in LPS array order (z, y, x)
        ("axial", lambda a: a[z], sy, sx, "upper"),
        ("coronal", lambda a: a[:, y], sz, sx, "lower"),
        ("sagittal", lambda a: a[:, :, x], sz, sy, "lower"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6), facecolor="black")
    for ax, (name, cut, row_mm, col_mm, origin) in zip(axes, views):
        anomaly = cut(arrays["anomaly"])
        ax.imshow(cut(arrays["ct"]), cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], origin=origin,
                  aspect=row_mm / col_mm, interpolation="nearest")
        overlay = ax.imshow(np.ma.masked_less(anomaly, OVERLAY_FROM), cmap="inferno", vmin=0.0, vmax=1.0,
                            alpha=0.6, origin=origin, aspect=row_mm / col_mm, interpolation="nearest")
        labels = cut(arrays["labels"])
        for cls in result.card.classes:
            if cls.role != "background" and (labels == cls.value).any():
                ax.contour(labels == cls.value, levels=[0.5], colors=[cls.color], linewidths=0.8, origin=origin)
        ax.set_title(name, color="white")
        ax.axis("off")
    colorbar = fig.colorbar(overlay, ax=axes, fraction=0.015, pad=0.01)
    colorbar.set_label("calibrated anomaly" if result.calibrated else "min-max anomaly (uncalibrated)", color="white")
    colorbar.ax.tick_params(colors="white")
    heading = f"{title}  model {result.card.name} {result.card.version}  case score {result.case_score:.3f}"
    fig.suptitle(heading.strip(), color="white")
    handles = [plt.Line2D([], [], color=c.color, label=c.name) for c in result.card.classes if c.role != "background"]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white")
    path = Path(path)
    fig.savefig(path, dpi=100, facecolor="black")
    plt.close(fig)
    return path
