"""The module's settings, stored as parameters of a scripted-module node so the scene keeps them.

Plain string parameters and node references (rather than Slicer's parameterNodeWrapper, which needs
the full application) keep this usable in scripts and in tests against bare MRML.
"""

from __future__ import annotations

import importlib.util
import re

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # what the core's select_device accepts
QUALITIES = ("normal", "fast")
DEFAULTS = {"ModelFolder": "", "Device": "auto", "Quality": "normal", "Threshold": "0.99", "Opacity": "0.5",
            "Show3D": "false"}
REFERENCES = ("InputVolume", "OutputSegmentation", "Segmentation", "AnomalyVolume", "LesionTable")


def device_choices(cuda_count: int, mps: bool) -> list[str]:
    """The devices to offer: auto and cpu always, then each CUDA GPU, then Apple's MPS."""
    return ["auto", "cpu"] + [f"cuda:{i}" for i in range(cuda_count)] + (["mps"] if mps else [])


def available_devices() -> list[str]:
    """``device_choices`` for this machine (auto and cpu only until torch is installed)."""
    if importlib.util.find_spec("torch") is None:
        return device_choices(0, False)
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return device_choices(torch.cuda.device_count() if torch.cuda.is_available() else 0, mps)


class Parameters:
    """Typed view of a ``vtkMRMLScriptedModuleNode``; unset values read as ``DEFAULTS``."""

    def __init__(self, node):
        self.node = node

    def _get(self, key: str) -> str:
        value = self.node.GetParameter(key)
        return value if value else DEFAULTS[key]

    def _set(self, key: str, value: str) -> None:
        if self.node.GetParameter(key) != value:
            self.node.SetParameter(key, value)

    @property
    def model_folder(self) -> str:
        return self._get("ModelFolder")

    @model_folder.setter
    def model_folder(self, value: str) -> None:
        self._set("ModelFolder", str(value))

    @property
    def device(self) -> str:
        return self._get("Device")

    @device.setter
    def device(self, value: str) -> None:
        if not DEVICE_PATTERN.fullmatch(str(value)):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
        self._set("Device", value)

    @property
    def quality(self) -> str:
        return self._get("Quality")

    @quality.setter
    def quality(self, value: str) -> None:
        if value not in QUALITIES:
            raise ValueError(f"quality must be one of {QUALITIES}, got {value!r}")
        self._set("Quality", value)

    @property
    def threshold(self) -> float:
        return float(self._get("Threshold"))

    @threshold.setter
    def threshold(self, value: float) -> None:
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError("the anomaly threshold is a calibrated score in [0, 1]")
        self._set("Threshold", repr(float(value)))

    @property
    def opacity(self) -> float:
        return float(self._get("Opacity"))

    @opacity.setter
    def opacity(self, value: float) -> None:
        self._set("Opacity", repr(min(max(float(value), 0.0), 1.0)))

    @property
    def show_3d(self) -> bool:
        return self._get("Show3D") == "true"

    @show_3d.setter
    def show_3d(self, value: bool) -> None:
        self._set("Show3D", "true" if value else "false")

    def reference(self, role: str):
        if role not in REFERENCES:
            raise KeyError(role)
        return self.node.GetNodeReference(role)

    def set_reference(self, role: str, node) -> None:
        if role not in REFERENCES:
            raise KeyError(role)
        self.node.SetNodeReferenceID(role, node.GetID() if node is not None else None)
