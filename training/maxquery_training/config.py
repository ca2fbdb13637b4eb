"""Training configuration, read from YAML (see ``configs/``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
import re
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, but ``1e-3`` (no dot) is a number, not a string."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(text: str) -> Any:
    """Config text (a file, or a ``--set`` value) as Python values."""
    return yaml.load(text, Loader=_ConfigLoader)


@dataclass
class DataConfig:
    """Which label values are background, organ and inlier tumour types; ``ood_label`` marks
    unseen-type voxels that may appear in test labels only."""

    background: list[int] = field(default_factory=lambda: [0])
    organ: dict[int, str] = field(default_factory=lambda: {1: "liver"})
    tumors: dict[int, str] = field(default_factory=lambda: {2: "cyst", 3: "hcc", 4: "metastasis"})
    ood_label: int | None = 9
    spacing_zyx: list[float] | None = None  # None: the median spacing of the training cases
    # Fixed CT clipping window [low, high] in HU; None: nnU-Net's 0.5/99.5 foreground percentiles.
    # A fixed window keeps every contrast phase a user may bring inside it, whatever phases the
    # training data had (percentiles of an unenhanced liver clip a portal-venous one).
    ct_window: list[float] | None = None
    skip_bad_cases: bool = False

    @property
    def classes(self) -> list[tuple[int, str, str]]:
        """(label value, name, role) in network output order: background, organ(s), tumour types.

        The one definition of the class list: label values, foreground values and the model card's
        classes all derive from it. Every value in ``background`` maps to the first class.
        """
        return [(self.background[0], "background", "background"),
                *((int(v), name, "organ") for v, name in self.organ.items()),
                *((int(v), name, "tumor") for v, name in self.tumors.items())]

    @property
    def label_values(self) -> list[int]:
        """Training label values in network output order (class index = position)."""
        return [value for value, _, _ in self.classes]

    @property
    def foreground_values(self) -> list[int]:
        """Label values of the organ and inlier tumour classes: every class but the background."""
        return [value for value, _, role in self.classes if role != "background"]


@dataclass
class AugmentationConfig:
    """nnU-Net-style augmentation probabilities and ranges (MONAI transforms)."""

    rotation_deg: float = 15.0
    rotation_prob: float = 0.2
    scale_range: tuple[float, float] = (0.85, 1.25)
    scale_prob: float = 0.2
    elastic_prob: float = 0.0
    brightness_prob: float = 0.15
    gamma_prob: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    noise_prob: float = 0.1
    noise_std: float = 0.1
    mirror_prob: float = 0.5
    # contrast phase: organ region and whole image shifted by up to these HU (0 = off)
    contrast_prob: float = 0.0
    organ_shift_hu: float = 40.0
    global_shift_hu: float = 20.0
    # field of view: the patch cut to a slab of this many slices (min, max), air beyond it
    slab_prob: float = 0.0
    slab_slices: tuple[int, int] = (8, 20)
    # Array axes (z, y, x) = (0, 1, 2) flipped in training and, as nnU-Net does, the only ones
    # test-time mirroring may use. Leave out x when left-right laterality matters and training is short.
    mirror_axes: list[int] = field(default_factory=lambda: [0, 1, 2])


@dataclass
class StageConfig:
    epochs: int = 10
    iterations_per_epoch: int = 50
    learning_rate: float = 1e-4
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    freeze_backbone_epochs: int = 0  # stage 2: backbone frozen for these first epochs
    backbone_lr_multiplier: float = 0.1  # stage 2: after unfreezing
    # RAdam's (β1, β2). With β2 = 0.999 its variance rectification keeps the step below half of
    # Adam's for the first ~500 iterations: negligible in the paper's 250 000, most of a short CPU run.
    betas: tuple[float, float] = (0.9, 0.999)
    # Stop after this epoch's checkpoint (0: run to ``epochs``); the schedule stays that of ``epochs``,
    # so a later run without it continues as if uninterrupted, e.g. with other settings from there.
    stop_after_epoch: int = 0

    def __post_init__(self) -> None:
        if self.stop_after_epoch < 0:
            raise ValueError(f"stop_after_epoch must be 0 (run to the end) or an epoch number, not {self.stop_after_epoch}")


@dataclass
class MCDropoutConfig:
    """The MC-dropout baseline (Kendall & Gal 2017; paper Tab. 1): the stage-1 plain network trained
    with channel dropout ``dropout`` after each decoder stage, sampled at test time."""

    dropout: float = 0.1
    # Fine-tune from the trained stage-1 network instead of training from scratch (when CPU time
    # does not allow a second full stage 1): ``epochs`` at ``learning_rate``, stage 1's other settings.
    from_stage1: bool = False
    epochs: int = 0
    learning_rate: float = 1.0e-3

    def __post_init__(self) -> None:
        if self.from_stage1 and self.epochs < 1:
            raise ValueError(f"mc_dropout.epochs must be at least 1 to fine-tune from stage 1, not {self.epochs}")

    def stage(self, stage1: "StageConfig") -> "StageConfig":
        """The schedule the baseline trains with: stage 1's, or its fine-tuning schedule."""
        return replace(stage1, epochs=self.epochs, learning_rate=self.learning_rate) if self.from_stage1 else stage1


@dataclass
class TrainingConfig:
    name: str = "maxquery-model"
    version: str = "0.1.0"  # the model card's; raise it whenever a model of this name is retrained
    description: str = ""
    network: dict[str, Any] = field(default_factory=dict)  # NetworkConfig overrides
    network_preset: str = "paper"  # "paper" or "small" (maxquery.network.small_config)
    # The requested patch; the plan (maxquery_training.planner) derives strides and kernel sizes
    # from it and the spacing, and pads it to a multiple of the total stride, as nnU-Net does.
    patch_size_zyx: list[int] = field(default_factory=lambda: [64, 128, 128])
    min_feature_map_size: int = 4  # smallest bottleneck edge (voxels) the plan pools down to (nnU-Net: 4)
    batch_size: int = 2
    foreground_oversample: float = 0.33
    qd_loss: bool = True
    qd_weight: float = 0.1
    deep_supervision: bool = True
    precision: str = "auto"  # auto | fp32 | bf16 (maxquery.precision): autocast, fp32 weights
    seed: int = 0
    num_workers: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=StageConfig)
    mc_dropout: MCDropoutConfig = field(default_factory=MCDropoutConfig)
    validation_cases_for_calibration: int = 0  # 0: all validation cases
    training_cases_for_sml: int = 0  # the SML statistics' cases; 0: all training cases

    def __post_init__(self) -> None:
        if not isinstance(self.version, str):
            raise ValueError(f"version must be text, got {self.version!r}: YAML reads 1.10 as the number 1.1, so "
                             "quote it (version: \"1.10\"; --set 'version=\"1.10\"')")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingConfig":
        nested = {"data": DataConfig, "augmentation": AugmentationConfig, "stage1": StageConfig, "stage2": StageConfig,
                  "mc_dropout": MCDropoutConfig}
        _check_keys(cls, data, "config")
        if "dropout" in data.get("network", {}):
            raise ValueError("network.dropout: MaxQuery and its plain backbone train without dropout; dropout "
                             "belongs to the MC-dropout baseline: set mc_dropout.dropout and train it with "
                             "maxquery-train train --baseline mc_dropout")
        kwargs = {}
        for key, value in data.items():
            if key in nested:
                _check_keys(nested[key], value, key)
                kwargs[key] = nested[key](**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)


def _check_keys(cls: type, data: dict, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where}: unknown settings {sorted(unknown)}; known: {sorted(known)}")


def load_config(path_or_name: str | Path, overrides: dict[str, Any] | None = None) -> TrainingConfig:
    """Load a YAML file, or a bundled config by name (``paper``, ``cpu_demo``, ``tiny``)."""
    path = Path(path_or_name)
    if not path.is_file():
        path = CONFIG_DIR / f"{path_or_name}.yaml"
    if not path.is_file():
        bundled = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no config file {path_or_name!r}; bundled configs: {bundled}")
    data = read_yaml(path.read_text()) or {}
    for dotted, value in (overrides or {}).items():
        target = data
        *parents, leaf = dotted.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return TrainingConfig.from_dict(data)
