"""Coded concepts of a model card's classes (DICOM style: coding scheme, code value, meaning)."""

from __future__ import annotations


def as_code(value) -> tuple[str, str, str] | None:
    """(scheme, code, meaning) from ``{"scheme", "code", "meaning"}``, DICOM's
    ``{"CodingSchemeDesignator", "CodeValue", "CodeMeaning"}`` or a 3-item list; None when empty."""
    if not value:
        return None
    if isinstance(value, dict):
        keys = (("scheme", "code", "meaning"), ("CodingSchemeDesignator", "CodeValue", "CodeMeaning"))
        for names in keys:
            if names[1] in value:
                return tuple(str(value.get(name, "")) for name in names)
        raise ValueError(f"terminology code {value!r} has neither 'code' nor 'CodeValue'")
    scheme, code, meaning = value
    return str(scheme), str(code), str(meaning)
