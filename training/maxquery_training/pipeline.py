"""The training pipeline: plan → stage 1 (plain backbone) → stage 2 (MaxQuery) → model folder.

Work-directory layout (every step resumes from what is already there)::

    WORK/plan.json                    spacing, CT normalisation, planned strides/kernels/patch
    WORK/preprocessed/<split>/*.npz   cached preprocessed cases
    WORK/stage1/checkpoint.pt         the plain network (also the nnU-Net baseline)
    WORK/stage2[_<tag>]/checkpoint.pt the MaxQuery network
    WORK/mc_dropout/checkpoint.pt     the MC-dropout baseline: stage 1's recipe with dropout
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import astuple, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from maxquery.model_folder import load_model_folder
from maxquery.network import MaxQueryNet, NetworkConfig, PlainSegmentationNet
from maxquery.preprocessing import CTNormalization

from .classes import class_infos
from .config import StageConfig, TrainingConfig
from .dataset import DataError, PreprocessedDataset, compute_normalization, list_cases, median_spacing
from .distributed import DistInfo, barrier
from .planner import Topology, plan_network
from .trainer import CHECKPOINT, PatchValidation, StageTrainer, build_loss, load_checkpoint, seed_everything

log = logging.getLogger(__name__)
MC_DROPOUT_RUN = "mc_dropout"


PLAN_FILE = "plan.json"
TOPOLOGY_KEYS = ("strides", "kernel_sizes", "patch_size_zyx")  # what plan.json records of the planner


@dataclass(frozen=True)
class Plan:
    """What a run fixes from its data: target spacing, CT normalisation, and the network and patch
    planned for that spacing (``planner``)."""

    spacing_zyx: list[float]
    normalization: CTNormalization
    network: NetworkConfig
    patch_size_zyx: tuple[int, int, int]

    def to_dict(self) -> dict:
        return {"spacing_zyx": self.spacing_zyx, "normalization": self.normalization.to_dict(),
                **_topology_record(self.network, self.patch_size_zyx),
                "kmax_output_strides": list(self.network.kmax_output_strides)}


def _topology_record(network: NetworkConfig, patch_size_zyx) -> dict:
    return {"strides": [list(s) for s in network.strides], "kernel_sizes": [list(k) for k in network.kernel_sizes],
            "patch_size_zyx": list(patch_size_zyx)}


def run_network_config(config: TrainingConfig, plan: Plan, run: str) -> NetworkConfig:
    """The network of a run folder: only the MC-dropout baseline has dropout (``mc_dropout.dropout``)."""
    return replace(plan.network, dropout=config.mc_dropout.dropout) if run == MC_DROPOUT_RUN else plan.network


def make_plan(config: TrainingConfig, data_root: Path, work_dir: Path, dist_info: DistInfo) -> Plan:
    """Spacing (configured, or the median from the image headers), then the network planned for it,
    which refuses a config that cannot train before any image is read; then the CT normalisation.

    Spacing and normalisation are computed once, by rank 0, and kept in ``plan.json``; the network
    is planned again on every run from the recorded spacing and must match what is recorded.
    """
    path = work_dir / PLAN_FILE
    recorded = json.loads(path.read_text()) if path.is_file() else None
    if recorded is None:
        spacing = list(config.data.spacing_zyx or median_spacing(list_cases(data_root, "training")))
    else:
        spacing = recorded["spacing_zyx"]
    network, topology = _planned(config, spacing, recorded, path)
    if dist_info.is_main and (recorded is None or "strides" not in recorded):
        normalization = (CTNormalization.from_dict(recorded["normalization"]) if recorded
                         else compute_normalization(list_cases(data_root, "training"), config.data))
        plan = Plan(spacing, normalization, network, topology.patch_size_zyx)
        work_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # side-by-side runs may write it at once
        tmp.write_text(json.dumps(plan.to_dict(), indent=1))
        tmp.replace(path)
        log.info("plan: spacing %s mm, patch %s, strides %s, kernel sizes %s, kMaX blocks at output strides %s",
                 spacing, list(plan.patch_size_zyx), [list(s) for s in network.strides],
                 [list(k) for k in network.kernel_sizes], list(network.kmax_output_strides))
    barrier(dist_info)
    return read_plan(work_dir, config)


def read_plan(work_dir: Path, config: TrainingConfig) -> Plan:
    """The plan training made; exporting must use it as it is, never compute a new one.

    A plan.json written before planning existed holds no topology; it is planned from its spacing.
    """
    path = work_dir / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{work_dir} holds no training ({path.name} is missing); train first "
                                "(maxquery-train train ...) or pass the --work folder it was trained in")
    data = json.loads(path.read_text())
    network, topology = _planned(config, data["spacing_zyx"], data, path)
    return Plan(data["spacing_zyx"], CTNormalization.from_dict(data["normalization"]), network,
                topology.patch_size_zyx)


def _planned(config: TrainingConfig, spacing, recorded: dict | None, path: Path) -> tuple[NetworkConfig, Topology]:
    """The network planned for ``spacing``; refuses a config whose plan differs from the recorded one."""
    network, topology = plan_network(config, spacing)
    if recorded is not None and "strides" in recorded:
        now = _topology_record(network, topology.patch_size_zyx)
        before = {key: recorded[key] for key in TOPOLOGY_KEYS}
        if now != before:
            raise ValueError(f"{path} was planned as {before}, but the config now plans {now}; train in a new "
                             "--work folder, or restore the config's patch_size_zyx, min_feature_map_size "
                             "and network")
    return network, topology


def load_split(config: TrainingConfig, data_root: Path, work_dir: Path, plan: Plan, split: str,
               dist_info: DistInfo | None = None) -> PreprocessedDataset:
    """A split, preprocessed and cached in the work folder. With several ranks, rank 0 fills the
    cache before the others read it: ranks writing one cache at once race on its files."""
    def dataset() -> PreprocessedDataset:
        return PreprocessedDataset(data_root, split, config.data, work_dir / "preprocessed", plan.spacing_zyx,
                                   plan.normalization, allow_ood=split.startswith("test"))

    if dist_info is None or not dist_info.enabled:
        return dataset()
    if not dist_info.is_main:
        barrier(dist_info)
        return dataset()
    try:
        return dataset()
    finally:  # also when it fails, so that the other ranks fail on the same error instead of waiting
        barrier(dist_info)


def planned_config(config: TrainingConfig, plan: Plan) -> TrainingConfig:
    """The config with the planned (padded) patch, which the trainer samples."""
    return replace(config, patch_size_zyx=list(plan.patch_size_zyx))


def patch_validation(config: TrainingConfig, data_root: Path, work_dir: Path, plan: Plan,
                     dist_info: DistInfo) -> PatchValidation | None:
    """Validation patches from the dataset's ``validation`` split; None (and a log line) without one."""
    try:
        cases = load_split(config, data_root, work_dir, plan, "validation", dist_info).cases
    except DataError as err:
        log.info("no per-epoch validation: %s", err)
        return None
    return PatchValidation(cases, planned_config(config, plan), [c.name for c in class_infos(config.data)],
                           dist_info.device)


def run_stage_config(config: TrainingConfig, run: str) -> StageConfig:
    """The schedule of a plain run folder: stage 1's, or the MC-dropout baseline's own."""
    return config.mc_dropout.stage(config.stage1) if run == MC_DROPOUT_RUN else config.stage1


def _stage1_checkpoint(work_dir: Path) -> Path:
    path = work_dir / "stage1" / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"this run starts from the trained stage-1 network, but {path} does not exist; "
                                "run stage 1 first (maxquery-train train ... --stage 1)")
    return path


def train_stage1(
    config: TrainingConfig, plan: Plan, cases, work_dir: Path, dist_info: DistInfo,
    validation: PatchValidation | None = None, run: str = "stage1",
) -> PlainSegmentationNet:
    """The plain network; ``run="mc_dropout"`` trains the MC-dropout baseline with the same recipe,
    or fine-tunes it from the trained stage-1 network (``mc_dropout.from_stage1``)."""
    seed_everything(config.seed)
    model = PlainSegmentationNet(run_network_config(config, plan, run))
    if run == MC_DROPOUT_RUN and config.mc_dropout.from_stage1:
        model.load_state_dict(load_checkpoint(_stage1_checkpoint(work_dir))["model"])  # dropout has no weights
    trainer = StageTrainer(run, model, build_loss("plain", config, [], ()), run_stage_config(config, run),
                           planned_config(config, plan), cases, work_dir / run, dist_info, plan.normalization,
                           validation=validation)
    trainer.train()
    return model


def train_stage2(
    config: TrainingConfig, plan: Plan, cases, work_dir: Path, dist_info: DistInfo, tag: str = "",
    validation: PatchValidation | None = None, init_from: Path | None = None,
) -> MaxQueryNet:
    """MaxQuery on the stage-1 backbone, or fine-tuned from a MaxQuery model folder (``init_from``,
    nnU-Net's ``-pretrained_weights``). ``tag`` names the run folder (e.g. ``noqd`` for the ablation)."""
    seed_everything(config.seed + 1)
    model = MaxQueryNet(plan.network)
    name = "stage2" + (f"_{tag}" if tag else "")
    out = work_dir / name
    initialized_from = None
    if (out / CHECKPOINT).is_file():
        pass  # the trainer resumes it, whatever it started from
    elif init_from is not None:
        initialized_from = _load_model_folder_weights(model, init_from, plan)
    else:
        plain_state = load_checkpoint(_stage1_checkpoint(work_dir))["model"]
        backbone_state = {k.removeprefix("backbone."): v for k, v in plain_state.items() if k.startswith("backbone.")}
        model.backbone.load_state_dict(backbone_state)
    roles = [c.role for c in class_infos(config.data)]
    loss = build_loss("maxquery", config, roles, plan.network.query_groups)
    StageTrainer(name, model, loss, config.stage2, planned_config(config, plan),
                 cases, out, dist_info, plan.normalization, backbone=model.backbone, validation=validation,
                 initialized_from=initialized_from).train()
    return model


def _load_model_folder_weights(model: MaxQueryNet, folder: Path, plan: Plan) -> dict:
    """Copy a MaxQuery model folder's weights into ``model``; refuse a folder made for other input
    (spacing, normalisation) or another network, which would train on what it cannot read.
    Returns what the card of the new model records of its start."""
    loaded = load_model_folder(folder)  # safetensors, validated against its card
    card = loaded.card
    problems = []
    if card.architecture != "maxquery":
        problems.append(f"it is a {card.architecture!r} model, not a MaxQuery one")
    if card.network != plan.network:
        problems.append(f"its network {card.network} differs from the planned {plan.network}")
    if not np.allclose(card.spacing_zyx, plan.spacing_zyx):
        problems.append(f"its spacing {list(card.spacing_zyx)} mm differs from the plan's {plan.spacing_zyx}")
    ours, theirs = astuple(plan.normalization), astuple(card.normalization)
    if not np.allclose(ours, theirs, rtol=1e-4):
        problems.append(f"its CT normalisation {card.normalization} differs from the plan's {plan.normalization}")
    if problems:
        raise ValueError(f"cannot start from {folder}: " + "; ".join(problems) + ". Fine-tune from a model "
                         "trained with the same config and spacing, or train from stage 1 without --init-from")
    model.load_state_dict(loaded.network.state_dict())
    log.info("stage 2 starts from the weights of %s (%s)", card.name, folder)
    return {"model": card.name, "weights_sha256": card.weights_sha256,
            "epochs": card.training.get("epochs"), "run": card.training.get("run")}


def load_trained(architecture: str, config: TrainingConfig, plan: Plan, run_dir: Path) -> torch.nn.Module:
    net_cfg = run_network_config(config, plan, run_dir.name)
    model = MaxQueryNet(net_cfg) if architecture == "maxquery" else PlainSegmentationNet(net_cfg)
    state = load_checkpoint(run_dir / "checkpoint.pt")
    if state["epoch"] < (config.stage2 if architecture == "maxquery" else run_stage_config(config, run_dir.name)).epochs:
        log.warning("%s has only %d epochs; exporting an unfinished model", run_dir, state["epoch"])
    model.load_state_dict(state["model"])
    return model.eval()
