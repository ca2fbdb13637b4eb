"""Model-card terminology → Slicer's serialised terminology entry (DICOM coded concepts).

A card class may carry ``terminology = {"category": code, "type": code, "modifier": code}`` where a
code is ``{"scheme", "code", "meaning"}``, DICOM-style ``{"CodingSchemeDesignator", "CodeValue",
"CodeMeaning"}`` or a ``[scheme, code, meaning]`` list. Classes without codes get a generic entry by
role, so every segment exported to DICOM SEG still has a valid category and type.
"""

from __future__ import annotations

from maxquery.terminology import as_code

CONTEXT = "MaxQuery"
ANATOMY = ("SCT", "123037004", "Anatomical Structure")
ALTERED = ("SCT", "49755003", "Morphologically Altered Structure")
DEFAULTS = {
    "organ": {"category": ANATOMY, "type": ("SCT", "91723000", "Anatomical structure")},
    "tumor": {"category": ALTERED, "type": ("SCT", "108369006", "Neoplasm")},
    "candidate": {"category": ALTERED, "type": ("SCT", "4147007", "Mass")},
}


def codes_for(role: str, terminology: dict | None) -> dict[str, tuple[str, str, str] | None]:
    """category/type/modifier codes for a class, falling back to the role's defaults."""
    terminology = terminology or {}
    defaults = DEFAULTS.get(role, DEFAULTS["organ"])
    return {
        "category": as_code(terminology.get("category")) or defaults["category"],
        "type": as_code(terminology.get("type")) or defaults["type"],
        "modifier": as_code(terminology.get("modifier")),
    }


def serialize(codes: dict) -> str:
    """Slicer's terminology string (``context~category~type~modifier~...``) via Slicer's own serializer."""
    import slicer

    entry = slicer.vtkSlicerTerminologyEntry()
    entry.SetTerminologyContextName(CONTEXT)
    for key, target in (("category", entry.GetCategoryObject()), ("type", entry.GetTypeObject()),
                        ("modifier", entry.GetTypeModifierObject())):
        if codes.get(key):
            scheme, code, meaning = codes[key]
            target.SetCodingSchemeDesignator(scheme)
            target.SetCodeValue(code)
            target.SetCodeMeaning(meaning)
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry)
