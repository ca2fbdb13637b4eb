"""Turn a trained run into a model folder: card, weights, postprocessing, SML statistics and anomaly
calibration.

SML needs the mean and standard deviation of the max logit per predicted class over the voxels
of the training cases (``sml``). The calibration stores quantiles of the raw anomaly score over
inlier validation voxels inside the organ region (``regions.organ_region``), so the calibrated
score of a voxel reads as the fraction of inlier organ voxels scoring lower. Both come from the
same predictor a user runs, so they match inference exactly.
"""

from __future__ import annotations

import logging
import platform
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from maxquery.calibration import AnomalyCalibration
from maxquery.inference import Predictor
from maxquery.model_folder import ModelCard, save_model_folder

from .classes import class_infos
from .config import TrainingConfig
from .dataset import list_cases, read_case
from .pipeline import MC_DROPOUT_RUN, Plan, load_trained, run_network_config
from .postprocessing import decide_postprocessing
from .regions import organ_region
from .sml import sml_statistics
from .trainer import load_checkpoint

log = logging.getLogger(__name__)
MAX_CALIBRATION_SAMPLES = 2_000_000
# run folder → (architecture, QD loss used, model-name suffix); see pipeline.train_stage2's tags
RUNS = {"stage2": ("maxquery", True, ""), "stage2_noqd": ("maxquery", False, "-noqd"), "stage1": ("plain", None, "-plain"),
        MC_DROPOUT_RUN: ("plain", None, "-mc-dropout")}
MC_DROPOUT_DESCRIPTION = ("MC-dropout baseline (Kendall & Gal 2017; MaxQuery paper, Tab. 1): the plain network "
                          "trained with dropout {p:g}; its anomaly score is the predictive entropy over stochastic "
                          "passes (mc_dropout). Not a MaxQuery model.")


def build_card(config: TrainingConfig, plan: Plan, run: str, training: dict) -> ModelCard:
    architecture, _, suffix = RUNS[run]
    network = run_network_config(config, plan, run)
    if run == MC_DROPOUT_RUN:
        training = training | {"baseline": MC_DROPOUT_RUN, "fine_tuned_from_stage1": config.mc_dropout.from_stage1}
    return ModelCard(
        name=config.name + suffix, version=config.version, architecture=architecture, network=network,
        classes=class_infos(config.data),
        spacing_zyx=tuple(plan.spacing_zyx), patch_size_zyx=tuple(plan.patch_size_zyx),
        normalization=plan.normalization, mirror_axes=tuple(config.augmentation.mirror_axes),
        description=MC_DROPOUT_DESCRIPTION.format(p=network.dropout) if run == MC_DROPOUT_RUN else config.description,
        training=training,
    )


def last_validation(history: list[dict]) -> dict:
    """The last epoch's validation Dice per class and query usage, nested as the card keeps them."""
    if not history or "val_dice/mean" not in history[-1]:
        return {}
    last = history[-1]
    out: dict = {"validation_dice": {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("val_dice/")}}
    usage: dict = {}
    for key, value in last.items():
        kind, _, rest = key.partition("/")
        if kind in ("queries_used", "voxel_share"):
            stage, group = rest.split("/")
            usage.setdefault(stage, {}).setdefault(group, {})[kind] = value
    if usage:
        out["query_usage"] = usage
        out["query_usage_unused"] = [f"{stage}/{group}" for stage, groups in usage.items()
                                     for group, row in groups.items() if row["queries_used"] == 0]
    return out


def calibration_samples(predictor: Predictor, cases, config: TrainingConfig, score: str) -> np.ndarray:
    """Raw ``score`` at inlier voxels of the organ region of each validation case."""
    rng = np.random.default_rng(0)
    per_case = MAX_CALIBRATION_SAMPLES // max(1, len(cases))
    samples = []
    for case in tqdm(cases, desc="calibration", leave=False):
        image, label = read_case(case)
        result = predictor.predict(image)
        raw = sitk.GetArrayViewFromImage(result.raw_scores[score])
        reference = sitk.GetArrayViewFromImage(label)
        spacing = tuple(reversed(label.GetSpacing()))
        values = raw[organ_region(reference, config.data.foreground_values, spacing)]
        if values.size > per_case:
            values = rng.choice(values, per_case, replace=False)
        samples.append(values)
    return np.concatenate(samples)


def export_model(
    config: TrainingConfig, data_root: Path, work_dir: Path, plan: Plan, run: str, out: Path,
    overwrite: bool = False, device: str = "auto",
) -> Path:
    if run not in RUNS:
        raise ValueError(f"unknown run {run!r}; choose one of {', '.join(RUNS)}")
    architecture, qd_loss, _ = RUNS[run]
    run_dir = work_dir / run
    if not (run_dir / "checkpoint.pt").is_file():
        raise FileNotFoundError(f"{run_dir / 'checkpoint.pt'} does not exist; train the {run!r} run first "
                                "(maxquery-train train ...) or pass the --work folder it was trained in")
    network = load_trained(architecture, config, plan, run_dir)
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    history = checkpoint["history"]
    training = {
        "dataset": str(Path(data_root).name),
        "training_cases": len(list_cases(data_root, "training")),
        "validation_cases": len(list_cases(data_root, "validation")),
        "run": run, "epochs": len(history), "final_loss": history[-1]["loss"] if history else None,
        "qd_loss": qd_loss, "precision": config.precision,
        "trained_on": f"{platform.machine()} {torch.__version__}", "date": date.today().isoformat(),
        **last_validation(history),
    }
    if checkpoint.get("initialized_from"):
        training["initialized_from"] = checkpoint["initialized_from"]
    for unused in training.get("query_usage_unused", []):
        log.warning("%s: the %s queries win no voxel on the validation patches", run, unused)
    card = build_card(config, plan, run, training)
    # the baseline's anomaly map is its own method's score, calibrated like MaxQuery's
    score = "maxquery" if architecture == "maxquery" else "mc_dropout" if run == MC_DROPOUT_RUN else "maxlogit"
    validation = list_cases(data_root, "validation")
    with tempfile.TemporaryDirectory() as tmp:
        save_model_folder(tmp, card, network)
        decide_postprocessing(tmp, validation, card, device)
        predictor = Predictor(tmp, device=device, scores=(score, "maxlogit"),
                              keep_largest_component=card.keep_largest_component,
                              one_type_per_lesion=card.one_type_per_lesion)
        if run != MC_DROPOUT_RUN:  # the baseline is evaluated with mc_dropout only
            training_cases = list_cases(data_root, "training")
            card.sml_stats = sml_statistics(predictor, training_cases[:config.training_cases_for_sml or None])
        torch.manual_seed(0)  # the baseline's dropout masks: the same calibration from the same run
        samples = calibration_samples(predictor, validation[:config.validation_cases_for_calibration or None],
                                      config, score)
        conditions = predictor.calibration_conditions()  # the predictor marks runs that differ
    card.calibration = AnomalyCalibration.fit(score, samples, conditions=conditions)
    log.info("calibrated %s on %d inlier validation voxels", score, samples.size)
    return save_model_folder(out, card, network, overwrite=overwrite)
