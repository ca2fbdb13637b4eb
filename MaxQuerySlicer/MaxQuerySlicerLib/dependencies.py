"""Which Python packages the module needs inside Slicer, and how to install the missing ones.

Slicer ships its own SimpleITK, numpy and vtk; installing other builds of them breaks Slicer, so
they are checked but never installed. torch comes from the PyTorch extension's installer when it is
present (it picks the CUDA build that matches the driver), from pip otherwise.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

SHIPPED_WITH_SLICER = ("SimpleITK", "numpy", "vtk")


@dataclass(frozen=True)
class Requirement:
    module: str  # import name
    pip: str  # pip requirement


REQUIREMENTS = (
    Requirement("torch", "torch>=2.1"),
    Requirement("monai", "monai>=1.3"),
    Requirement("safetensors", "safetensors>=0.4"),
    Requirement("scipy", "scipy>=1.10"),
    Requirement("skimage", "scikit-image>=0.21"),
    Requirement("highdicom", "highdicom>=0.22"),
    Requirement("psutil", "psutil>=5.9"),
    Requirement("nrrd", "pynrrd>=1.0"),
)


def missing() -> list[Requirement]:
    """Requirements whose module cannot be found (nothing is imported, so this is fast)."""
    return [r for r in REQUIREMENTS if importlib.util.find_spec(r.module) is None]


def missing_shipped() -> list[str]:
    """Packages Slicer should have shipped; if any is absent the installation is broken."""
    return [name for name in SHIPPED_WITH_SLICER if importlib.util.find_spec(name) is None]


def pip_requirements(requirements: list[Requirement], torch_via_extension: bool) -> list[str]:
    """What to hand to pip: never a Slicer-shipped package, and not torch if its extension installs it."""
    return [r.pip for r in requirements
            if r.module not in SHIPPED_WITH_SLICER and not (torch_via_extension and r.module == "torch")]


def describe(requirements: list[Requirement]) -> str:
    return ", ".join(r.pip for r in requirements)
