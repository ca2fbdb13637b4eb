"""Display names, colours and SNOMED CT terminology for the classes a model card lists.

Codes follow DICOM's conventions (category + type, scheme SCT) so Slicer and DICOM SEG can show
them; a class with no known code gets an empty terminology and a generated colour.
"""

from __future__ import annotations

import colorsys

from maxquery.model_folder import ClassInfo

from .config import DataConfig

_ANATOMY = {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"}
_ALTERED = {"scheme": "SCT", "code": "49755003", "meaning": "Morphologically Altered Structure"}

KNOWN_CLASSES: dict[str, tuple[tuple[float, float, float], dict]] = {
    "liver": ((0.86, 0.57, 0.40), {"category": _ANATOMY, "type": {"scheme": "SCT", "code": "10200004", "meaning": "Liver"}}),
    "pancreas": ((0.98, 0.82, 0.56), {"category": _ANATOMY, "type": {"scheme": "SCT", "code": "15776009", "meaning": "Pancreas"}}),
    "cyst": ((0.33, 0.73, 0.95), {"category": _ALTERED, "type": {"scheme": "SCT", "code": "441457006", "meaning": "Cyst"}}),
    "hcc": ((0.90, 0.22, 0.21), {"category": _ALTERED, "type": {"scheme": "SCT", "code": "25370001", "meaning": "Hepatocellular carcinoma"}}),
    "metastasis": ((0.61, 0.35, 0.71), {"category": _ALTERED, "type": {"scheme": "SCT", "code": "14799000", "meaning": "Neoplasm, metastatic"}}),
}


def _fallback_color(index: int) -> tuple[float, float, float]:
    return colorsys.hsv_to_rgb((0.13 + 0.318 * index) % 1.0, 0.65, 0.9)


def class_infos(data: DataConfig) -> list[ClassInfo]:
    """Classes in network output order: background, organ(s), inlier tumour types."""
    infos = []
    for index, (value, name, role) in enumerate(data.classes):
        color, terminology = KNOWN_CLASSES.get(name.lower(), (_fallback_color(index), {}))
        if role == "background":
            color, terminology = (0.0, 0.0, 0.0), {}
        infos.append(ClassInfo(int(value), name, role, tuple(round(c, 3) for c in color), terminology))
    return infos
