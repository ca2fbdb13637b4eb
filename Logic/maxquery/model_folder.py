"""The model folder: safetensors weights plus a JSON model card, validated on load.

Layout::

    <folder>/model_card.json     what the network is and how to feed it (see ModelCard)
    <folder>/model.safetensors   the weights; never a pickle, so an untrusted folder cannot run code

Everything inference needs to repeat training's preprocessing lives in the card.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .calibration import AnomalyCalibration
from .errors import MaxQueryError
from .network import ARCHITECTURES, NetworkConfig, build_network
from .preprocessing import CTNormalization

CARD_NAME = "model_card.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
ROLES = ("background", "organ", "tumor")
MAX_PATCH_VOXELS = 2**26  # 64 M voxels, 16x the largest nnU-Net patches: anything larger is a typo


class ModelFolderError(MaxQueryError, ValueError):
    """A model folder that is missing, corrupt or does not match its card."""


@dataclass(frozen=True)
class ClassInfo:
    """One output class: label value, display name, role, RGB colour (0-1) and terminology codes."""

    value: int
    name: str
    role: str
    color: tuple[float, float, float]
    terminology: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "ClassInfo":
        if data.get("role") not in ROLES:
            raise ModelFolderError(f"class {data.get('name')!r}: role must be one of {ROLES}, got {data.get('role')!r}")
        color = tuple(float(c) for c in data["color"])
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise ModelFolderError(f"class {data['name']!r}: color must be three floats in [0, 1]")
        return cls(int(data["value"]), str(data["name"]), data["role"], color, dict(data.get("terminology", {})))

    def to_dict(self) -> dict:
        return {"value": self.value, "name": self.name, "role": self.role, "color": list(self.color),
                "terminology": self.terminology}


@dataclass
class ModelCard:
    """What a model is, how to feed it and how well it did. Stored as ``model_card.json``.

    ``classes`` are listed in network output order; ``spacing_zyx`` and ``patch_size_zyx`` are in
    array order (z, y, x) after reorientation to LPS. ``mirror_axes`` are the array axes the model
    was trained flipped along: the only ones test-time mirroring may use (as in nnU-Net's plans).
    """

    name: str
    architecture: str
    network: NetworkConfig
    classes: list[ClassInfo]
    spacing_zyx: tuple[float, float, float]
    patch_size_zyx: tuple[int, int, int]
    normalization: CTNormalization
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    version: str = "0.1.0"
    description: str = ""
    calibration: AnomalyCalibration | None = None
    sml_stats: dict | None = None
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    maxquery_version: str = __version__
    format_version: int = FORMAT_VERSION
    weights_sha256: str | None = None  # of model.safetensors, recorded when the folder is saved
    # postprocessing (inference.postprocessing), each step applied when the validation cases gained from it
    keep_largest_component: bool = False
    one_type_per_lesion: bool = False

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ModelFolderError(f"unknown architecture {self.architecture!r}; expected one of {sorted(ARCHITECTURES)}")
        if len(self.classes) != self.network.num_classes:
            raise ModelFolderError(
                f"the card lists {len(self.classes)} classes but the network has {self.network.num_classes} outputs"
            )
        roles = [c.role for c in self.classes]
        if roles[0] != "background" or "tumor" not in roles:
            raise ModelFolderError("the first class must be the background and at least one class must be a tumour")
        try:
            self.network.check_patch_size(self.patch_size_zyx)
        except ValueError as err:
            raise ModelFolderError(str(err)) from None
        if not set(self.mirror_axes) <= {0, 1, 2}:
            raise ModelFolderError(f"mirror_axes {list(self.mirror_axes)} must be array axes among 0, 1, 2")
        self._check_values()

    def _check_values(self) -> None:
        """Values that load but cannot be right (they would give NaN maps or wrong labels)."""
        if len(self.spacing_zyx) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing_zyx):
            raise ModelFolderError(f"spacing_zyx {list(self.spacing_zyx)} must be three positive numbers of mm")
        if len(self.patch_size_zyx) != 3 or min(self.patch_size_zyx) < 1 or \
                math.prod(self.patch_size_zyx) > MAX_PATCH_VOXELS:
            raise ModelFolderError(f"patch_size_zyx {list(self.patch_size_zyx)} must be three positive sizes of at "
                                   f"most {MAX_PATCH_VOXELS} voxels in all")
        values = [c.value for c in self.classes]
        if any(not 0 <= v <= 255 for v in values) or len(set(values)) != len(values):
            raise ModelFolderError(f"class values {values} must be distinct and within 0-255 (the labels are uint8)")
        norm = self.normalization
        numbers = (norm.clip_low, norm.clip_high, norm.mean, norm.std)
        if not all(math.isfinite(v) for v in numbers) or norm.std <= 0 or norm.clip_low >= norm.clip_high:
            raise ModelFolderError(f"the normalisation {norm.to_dict()} is impossible: it needs finite values, "
                                   f"std > 0 and clip_low < clip_high")
        if self.sml_stats is not None:
            stds = self.sml_stats.get("std", []) if isinstance(self.sml_stats, dict) else []
            if len(stds) != len(self.classes) or not all(math.isfinite(v) and v > 0 for v in stds):
                raise ModelFolderError("sml_stats must give one positive std per class")

    @property
    def foreground_values(self) -> list[int]:
        """Label values of the organ and tumour classes (every class but the background), output order."""
        return [c.value for c in self.classes if c.role != "background"]

    @property
    def tumor_values(self) -> list[int]:
        """Label values of the tumour classes, output order."""
        return [c.value for c in self.classes if c.role == "tumor"]

    @property
    def tumor_indices(self) -> list[int]:
        """Output channels (not label values) of the tumour classes."""
        return [i for i, c in enumerate(self.classes) if c.role == "tumor"]

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "maxquery_version": self.maxquery_version,
            "architecture": self.architecture,
            "network": self.network.to_dict(),
            "classes": [c.to_dict() for c in self.classes],
            "spacing_zyx": list(self.spacing_zyx),
            "patch_size_zyx": list(self.patch_size_zyx),
            "normalization": self.normalization.to_dict(),
            "mirror_axes": list(self.mirror_axes),
            "query_groups": list(self.network.query_groups),
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "sml_stats": self.sml_stats,
            "training": self.training,
            "metrics": self.metrics,
            "weights_sha256": self.weights_sha256,
            "keep_largest_component": self.keep_largest_component,
            "one_type_per_lesion": self.one_type_per_lesion,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ModelCard":
        if not isinstance(data, dict):
            raise ModelFolderError("the model card must be a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelFolderError(
                f"model card format {version!r} is not supported by this maxquery ({__version__}, reads format "
                f"{FORMAT_VERSION}); update the extension or re-export the model"
            )
        required = ("name", "architecture", "network", "classes", "spacing_zyx", "patch_size_zyx", "normalization")
        missing = [key for key in required if key not in data]
        if missing:
            raise ModelFolderError(f"the model card lacks {', '.join(missing)}")
        try:
            return cls(
                name=data["name"],
                architecture=data["architecture"],
                network=NetworkConfig.from_dict(data["network"]),
                classes=[ClassInfo.from_dict(c) for c in data["classes"]],
                spacing_zyx=tuple(float(s) for s in data["spacing_zyx"]),
                patch_size_zyx=tuple(int(s) for s in data["patch_size_zyx"]),
                normalization=CTNormalization.from_dict(data["normalization"]),
                mirror_axes=tuple(int(a) for a in data.get("mirror_axes", (0, 1, 2))),
                version=str(data.get("version", "0.0.0")),
                description=data.get("description", ""),
                calibration=AnomalyCalibration.from_dict(data["calibration"]) if data.get("calibration") else None,
                sml_stats=data.get("sml_stats"),
                training=data.get("training", {}),
                metrics=data.get("metrics", {}),
                maxquery_version=data.get("maxquery_version", "unknown"),
                weights_sha256=data.get("weights_sha256"),
                keep_largest_component=_boolean(data.get("keep_largest_component", False), "keep_largest_component"),
                one_type_per_lesion=_boolean(data.get("one_type_per_lesion", False), "one_type_per_lesion"),
            )
        except ModelFolderError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # e.g. a list where an object belongs
            raise ModelFolderError(f"the model card is invalid: {err}") from err


@dataclass
class LoadedModel:
    card: ModelCard
    network: torch.nn.Module
    folder: Path


def _usual_permissions(path: Path) -> None:
    """What a plain ``open(..., "w")`` would give: 0666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_model_folder(folder: str | Path, card: ModelCard, network: torch.nn.Module, overwrite: bool = False) -> Path:
    """Write weights and card; both files appear atomically (written aside, then renamed). The
    weights name their model, and the card records their digest (``card.weights_sha256``)."""
    folder = Path(folder)
    if (folder / CARD_NAME).exists() and not overwrite:
        raise FileExistsError(f"{folder} already holds a model; pass overwrite=True to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt", "name": card.name})
        card.weights_sha256 = _sha256(Path(tmp) / WEIGHTS_NAME)
        _usual_permissions(Path(tmp) / WEIGHTS_NAME)  # safetensors writes 0600
        os.replace(os.path.join(tmp, WEIGHTS_NAME), folder / WEIGHTS_NAME)
    write_model_card(folder, card)
    return folder


def write_model_card(folder: str | Path, card: ModelCard) -> None:
    """Replace the card alone (e.g. to record evaluation figures), atomically."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        with open(os.path.join(tmp, CARD_NAME), "w") as f:
            json.dump(card.to_dict(), f, indent=1)
        os.replace(os.path.join(tmp, CARD_NAME), folder / CARD_NAME)


def read_model_card(folder: str | Path) -> ModelCard:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist or is not a folder")
    card_path = folder / CARD_NAME
    if not card_path.is_file():
        raise ModelFolderError(f"{folder} is not a MaxQuery model folder: {CARD_NAME} is missing")
    try:
        data = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{card_path} is not valid JSON ({err}); the folder is corrupt") from err
    return ModelCard.from_dict(data)


def load_model_folder(folder: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Read and validate a model folder; the network comes back in eval mode on ``device``."""
    folder = Path(folder)
    card = read_model_card(folder)
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise ModelFolderError(f"{folder}: {WEIGHTS_NAME} is missing")
    try:
        state = load_file(str(weights_path), device="cpu")
        with safe_open(str(weights_path), "pt") as f:
            named = (f.metadata() or {}).get("name")
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFolderError(f"{weights_path} cannot be read as safetensors ({err}); the file is corrupt") from err
    network = build_network(card.architecture, card.network)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        details = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if keys
        )
        raise ModelFolderError(f"the weights in {folder} do not match the network its card describes ({details})")
    if named != card.name:
        raise ModelFolderError(f"the weights in {folder} are those of the model {named!r}, not of {card.name!r} that "
                               f"the card describes; put the card and weights of one model together")
    if card.weights_sha256 and card.weights_sha256 != _sha256(weights_path):
        raise ModelFolderError(f"the weights in {folder} are not the ones its card was saved with (their digest "
                               f"differs); put the card and weights of one model together")
    network.load_state_dict(state)
    return LoadedModel(card, network.to(device).eval(), folder)


def _boolean(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ModelFolderError(f"the model card's {key} must be true or false, not {value!r}")
    return value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
