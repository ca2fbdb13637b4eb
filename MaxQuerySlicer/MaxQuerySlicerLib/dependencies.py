"""Which Python packages the module needs inside Slicer, and a plan that installs only what is missing.

Only what the run-time path imports is asked for (the child process: torch, safetensors, psutil,
scipy, pynrrd; not monai or scikit-image, which only training uses). Nothing already installed is
ever replaced: pip gets a constraints file pinning every installed distribution to its present
version, so a requirement that would need another numpy, SimpleITK, pydicom or torch fails instead
of breaking Slicer or another extension. torch is never handed to pip: it comes from the PyTorch
extension's installer, which picks the CUDA build for the driver. highdicom is planned only when a
DICOM SEG is first exported, in a release that works with the pydicom Slicer ships.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass, field
from pathlib import Path

SHIPPED_WITH_SLICER = ("SimpleITK", "numpy", "vtk")  # a Slicer without them is broken; never installed


@dataclass(frozen=True)
class Requirement:
    module: str  # import name
    pip: str  # pip requirement

    @property
    def name(self) -> str:
        return canonical(re.split(r"[<>=!~ \[;]", self.pip, maxsplit=1)[0])


TORCH = Requirement("torch", "torch>=2.1")
RUNTIME = (
    TORCH,
    Requirement("safetensors", "safetensors>=0.4"),
    Requirement("psutil", "psutil>=5.9"),
    Requirement("scipy", "scipy>=1.10"),
    Requirement("nrrd", "pynrrd>=1.0"),
)


def canonical(name: str) -> str:
    """PEP 503 name: what pip compares (``SimpleITK`` and ``simpleitk`` are one distribution)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions(paths: list[str] | None = None) -> dict[str, str]:
    """Canonical distribution name → version of everything installed (on ``paths``, else ``sys.path``)."""
    importlib.invalidate_caches()
    found = {}
    for dist in importlib.metadata.distributions(**({"path": paths} if paths is not None else {})):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), dist.version)
    return found


def highdicom_requirement(pydicom_version: str | None) -> Requirement:
    """highdicom ≥ 0.23 needs pydicom 3; Slicer ≤ 5.10 ships pydicom 2.4 (0.22 excludes 2.4.0 only)."""
    if pydicom_version is not None and int(pydicom_version.split(".")[0]) < 3:
        return Requirement("highdicom", "highdicom>=0.22,<0.23")
    return Requirement("highdicom", "highdicom>=0.23")


@dataclass
class InstallPlan:
    """``pip``: requirements to install; ``torch_from_extension``: torch is missing and must come
    from PyTorchUtils; ``constraints``: ``name==version`` for every installed distribution;
    ``broken``: Slicer packages that are absent (reinstall Slicer)."""

    pip: list[str] = field(default_factory=list)
    torch_from_extension: bool = False
    constraints: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)

    @property
    def needed(self) -> bool:
        return bool(self.pip or self.torch_from_extension)

    def describe(self) -> str:
        return ", ".join((["torch (through the PyTorch extension)"] if self.torch_from_extension else []) + self.pip)

    def write_constraints(self, folder: Path) -> Path:
        path = Path(folder) / "maxquery-constraints.txt"
        path.write_text("".join(f"{line}\n" for line in self.constraints))
        return path


def make_plan(requirements=RUNTIME, installed: dict[str, str] | None = None) -> InstallPlan:
    """What to install for ``requirements`` given ``installed`` (``installed_versions()`` by default)."""
    installed = installed_versions() if installed is None else installed
    plan = InstallPlan(constraints=[f"{name}=={version}" for name, version in sorted(installed.items())])
    plan.broken = [name for name in SHIPPED_WITH_SLICER if canonical(name) not in installed]
    for requirement in requirements:
        if requirement.name in installed:
            continue  # present in some version: never replaced
        if requirement.name == TORCH.name:
            plan.torch_from_extension = True
        else:
            plan.pip.append(requirement.pip)
    return plan


def dicom_seg_plan(installed: dict[str, str] | None = None) -> InstallPlan:
    """highdicom for the first DICOM SEG export, matched to the installed pydicom."""
    installed = installed_versions() if installed is None else installed
    return make_plan([highdicom_requirement(installed.get("pydicom"))], installed)
