"""The training pipeline: plan → stage 1 (plain backbone) → stage 2 (MaxQuery) → model folder.

Work-directory layout (every step resumes from what is already there)::

    WORK/plan.json                    spacing and CT normalisation (nnU-Net's fingerprint)
    WORK/preprocessed/<split>/*.npz   cached preprocessed cases
    WORK/stage1/checkpoint.pt         the plain network (also the nnU-Net baseline)
    WORK/stage2[_<tag>]/checkpoint.pt the MaxQuery network
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from maxquery.network import MaxQueryNet, NetworkConfig, PlainSegmentationNet, small_config
from maxquery.preprocessing import CTNormalization

from .classes import class_infos
from .config import TrainingConfig
from .dataset import DataError, PreprocessedDataset, compute_normalization, list_cases, median_spacing
from .distributed import DistInfo, barrier
from .trainer import PatchValidation, StageTrainer, build_loss, load_checkpoint, seed_everything

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    spacing_zyx: list[float]
    normalization: CTNormalization

    def to_dict(self) -> dict:
        return {"spacing_zyx": self.spacing_zyx, "normalization": self.normalization.to_dict()}


def network_config(config: TrainingConfig) -> NetworkConfig:
    num_classes = len(config.data.label_values)
    if config.network_preset == "small":
        return small_config(num_classes, **config.network)
    if config.network_preset == "paper":
        return NetworkConfig(num_classes=num_classes, **config.network)
    raise ValueError(f"network_preset must be 'paper' or 'small', got {config.network_preset!r}")


def make_plan(config: TrainingConfig, data_root: Path, work_dir: Path, dist_info: DistInfo) -> Plan:
    """Target spacing (configured or median) and CT normalisation; computed once, by rank 0."""
    path = work_dir / "plan.json"
    if dist_info.is_main and not path.is_file():
        cases = list_cases(data_root, "training")
        spacing = config.data.spacing_zyx or median_spacing(cases)
        plan = Plan(list(spacing), compute_normalization(cases, config.data))
        work_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan.to_dict(), indent=1))
    barrier(dist_info)
    return read_plan(work_dir)


def read_plan(work_dir: Path) -> Plan:
    """The plan training made; exporting must use it as it is, never compute a new one."""
    path = work_dir / "plan.json"
    if not path.is_file():
        raise FileNotFoundError(f"{work_dir} holds no training ({path.name} is missing); train first "
                                "(maxquery-train train ...) or pass the --work folder it was trained in")
    data = json.loads(path.read_text())
    return Plan(data["spacing_zyx"], CTNormalization.from_dict(data["normalization"]))


def load_split(config: TrainingConfig, data_root: Path, work_dir: Path, plan: Plan, split: str) -> PreprocessedDataset:
    return PreprocessedDataset(data_root, split, config.data, work_dir / "preprocessed", plan.spacing_zyx,
                               plan.normalization, allow_ood=split.startswith("test"))


def patch_validation(config: TrainingConfig, data_root: Path, work_dir: Path, plan: Plan,
                     dist_info: DistInfo) -> PatchValidation | None:
    """Validation patches from the dataset's ``validation`` split; None (and a log line) without one."""
    try:
        cases = load_split(config, data_root, work_dir, plan, "validation").cases
    except DataError as err:
        log.info("no per-epoch validation: %s", err)
        return None
    return PatchValidation(cases, config, [c.name for c in class_infos(config.data)], dist_info.device)


def check_patch(config: TrainingConfig, net: NetworkConfig) -> None:
    stride = net.total_stride
    if any(p % s for p, s in zip(config.patch_size_zyx, stride)):
        raise ValueError(f"patch_size_zyx {config.patch_size_zyx} must be a multiple of the network stride {stride}")


def train_stage1(config: TrainingConfig, cases, work_dir: Path, plan: Plan, dist_info: DistInfo,
                 validation: PatchValidation | None = None) -> PlainSegmentationNet:
    net_cfg = network_config(config)
    check_patch(config, net_cfg)
    seed_everything(config.seed)
    model = PlainSegmentationNet(net_cfg)
    trainer = StageTrainer("stage1", model, build_loss("plain", config, [], ()), config.stage1, config,
                           cases, work_dir / "stage1", dist_info, plan.normalization, validation=validation)
    trainer.train()
    return model


def train_stage2(
    config: TrainingConfig, cases, work_dir: Path, plan: Plan, dist_info: DistInfo, tag: str = "",
    validation: PatchValidation | None = None,
) -> MaxQueryNet:
    """MaxQuery on the stage-1 backbone. ``tag`` names the run folder (e.g. ``noqd`` for the ablation)."""
    net_cfg = network_config(config)
    stage1 = work_dir / "stage1" / "checkpoint.pt"
    if not stage1.is_file():
        raise FileNotFoundError(f"stage 2 starts from the stage-1 backbone, but {stage1} does not exist; run stage 1 first")
    seed_everything(config.seed + 1)
    model = MaxQueryNet(net_cfg)
    plain_state = load_checkpoint(stage1)["model"]
    backbone_state = {k.removeprefix("backbone."): v for k, v in plain_state.items() if k.startswith("backbone.")}
    model.backbone.load_state_dict(backbone_state)
    roles = [c.role for c in class_infos(config.data)]
    loss = build_loss("maxquery", config, roles, net_cfg.query_groups)
    out = work_dir / ("stage2" + (f"_{tag}" if tag else ""))
    StageTrainer("stage2" + (f"_{tag}" if tag else ""), model, loss, config.stage2, config, cases, out,
                 dist_info, plan.normalization, backbone=model.backbone, validation=validation).train()
    return model


def load_trained(architecture: str, config: TrainingConfig, run_dir: Path) -> torch.nn.Module:
    net_cfg = network_config(config)
    model = MaxQueryNet(net_cfg) if architecture == "maxquery" else PlainSegmentationNet(net_cfg)
    state = load_checkpoint(run_dir / "checkpoint.pt")
    if state["epoch"] < (config.stage2 if architecture == "maxquery" else config.stage1).epochs:
        log.warning("%s has only %d epochs; exporting an unfinished model", run_dir, state["epoch"])
    model.load_state_dict(state["model"])
    return model.eval()
