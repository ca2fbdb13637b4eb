"""The two-stage recipe of paper §4.2 with resumable, atomic checkpoints.

Stage 1 pre-trains the backbone with the plain head. Stage 2 builds the MaxQuery network on the
stage-1 backbone and trains it with the backbone frozen for the first epochs, then at a reduced
learning rate. RAdam, polynomial decay per iteration, gradient clipping. Precision as configured
(``precision``: bf16 autocast where the CPU or GPU has it, fp16 with loss scaling on older GPUs);
weights and optimiser state stay fp32.

After every epoch the model is validated on a fixed set of validation patches, as nnU-Net does
(its "pseudo Dice": Dice per class over all patches together), and, for MaxQuery, the query usage
of every stage is measured on them; both go to the log, the history and TensorBoard.

A checkpoint (model, optimiser, epoch, loss history, RNG) is written atomically after every epoch;
running the same command again resumes from it. Each epoch's data stream is seeded from
(seed, epoch, rank), so a resumed run sees the data the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from maxquery.network import MaxQueryNet, MaxQueryOutput
from maxquery.preprocessing import CTNormalization
from maxquery.precision import select_precision
from maxquery.query_usage import QueryUsage, stage_responses

from .augment import PatchStream, build_augmentation, sample_patch
from .config import StageConfig, TrainingConfig
from .dataset import IGNORE_INDEX, PreprocessedCase
from .distributed import DistInfo, barrier, mean_across_ranks
from .losses import MaxQueryLoss, SegmentationLoss

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def poly_lr(base: float, iteration: int, total: int, exponent: float) -> float:
    return base * (1.0 - min(iteration, total - 1) / total) ** exponent


def save_checkpoint(path: Path, state: dict) -> None:
    """Write aside then rename, so a kill never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class StageTrainer:
    """Trains one stage in ``out_dir``; ``train()`` resumes from ``out_dir/checkpoint.pt``."""

    def __init__(
        self, name: str, model: nn.Module, loss_fn: nn.Module, stage: StageConfig, config: TrainingConfig,
        cases: list[PreprocessedCase], out_dir: str | Path, dist_info: DistInfo,
        normalization: CTNormalization, backbone: nn.Module | None = None,
        validation: "PatchValidation | None" = None, initialized_from: dict | None = None,
    ) -> None:
        self.name = name
        self.model = model.to(dist_info.device)
        self.loss_fn = loss_fn.to(dist_info.device)
        self.stage = stage
        self.config = config
        self.cases = cases
        self.out_dir = Path(out_dir)
        self.dist = dist_info
        self.backbone = backbone  # stage 2: frozen first, then at backbone_lr_multiplier
        self.validation = validation
        self.initialized_from = initialized_from  # the model folder a fine-tuning run started from
        self.augmentation = build_augmentation(config.augmentation, normalization)
        backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
        groups = [{"params": [p for p in model.parameters() if id(p) not in backbone_ids], "lr_multiplier": 1.0}]
        if backbone is not None:
            groups.append({"params": list(backbone.parameters()), "lr_multiplier": stage.backbone_lr_multiplier})
        self.optimizer = torch.optim.RAdam(groups, lr=stage.learning_rate, betas=tuple(stage.betas),
                                           weight_decay=stage.weight_decay)
        self.precision = select_precision(config.precision, dist_info.device)
        self.autocast = self.precision.dtype
        self.scaler = torch.amp.GradScaler(dist_info.device.type, enabled=self.autocast == torch.float16)
        self.epoch = 0
        self.history: list[dict[str, float]] = []

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    @property
    def finished(self) -> bool:
        """All epochs done, or the requested stop (``stage.stop_after_epoch``) reached."""
        return self.epoch >= (min(self.stage.stop_after_epoch, self.stage.epochs) or self.stage.epochs)

    def _backbone_frozen(self, epoch: int) -> bool:
        return self.backbone is not None and epoch < self.stage.freeze_backbone_epochs

    def resume(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        state = load_checkpoint(self.checkpoint_path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the config decides, not the checkpoint (lr is set per step)
            group["betas"] = tuple(self.stage.betas)
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.initialized_from = state.get("initialized_from")
        torch.set_rng_state(state["torch_rng"])
        if self.dist.is_main:
            log.info("%s: resumed at epoch %d from %s", self.name, self.epoch, self.checkpoint_path)
        return True

    def _save(self) -> None:
        if not self.dist.is_main:
            return
        save_checkpoint(self.checkpoint_path, {
            "epoch": self.epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "history": self.history, "torch_rng": torch.get_rng_state(),
            "initialized_from": self.initialized_from,
        })

    def _wrapped(self, frozen: bool) -> nn.Module:
        if self.backbone is not None:
            self.backbone.requires_grad_(not frozen)
        if not self.dist.enabled:
            return self.model
        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    def _loader(self, epoch: int) -> DataLoader:
        seed = self.config.seed + 1000 * epoch + self.dist.rank
        stream = PatchStream(self.cases, tuple(self.config.patch_size_zyx), self.augmentation,
                             self.config.foreground_oversample, seed)
        return DataLoader(stream, batch_size=self.config.batch_size, num_workers=self.config.num_workers)

    def train(self, on_epoch_end: Callable[[int, dict], None] | None = None) -> list[dict[str, float]]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resume()
        writer = _summary_writer(self.out_dir / "tensorboard") if self.dist.is_main else None
        iters = self.stage.iterations_per_epoch
        total_iters = self.stage.epochs * iters
        if self.dist.is_main:
            log.info("%s: %s on %s (%s)", self.name, self.precision.name, self.dist.device, self.precision.reason)
        while not self.finished:
            epoch = self.epoch
            frozen = self._backbone_frozen(epoch)
            model = self._wrapped(frozen)
            model.train()
            sums: dict[str, float] = {}
            batches = iter(self._loader(epoch))
            bar = tqdm(range(iters), desc=f"{self.name} epoch {epoch + 1}/{self.stage.epochs}",
                       disable=not self.dist.is_main, leave=False, dynamic_ncols=True)
            start = time.time()
            for i in bar:
                for group in self.optimizer.param_groups:
                    group["lr"] = poly_lr(self.stage.learning_rate, epoch * iters + i, total_iters,
                                          self.stage.poly_exponent) * group["lr_multiplier"]
                images, labels = next(batches)
                images, labels = images.to(self.dist.device), labels.to(self.dist.device)
                terms = self._step(model, images, labels)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value
                bar.set_postfix(loss=f"{terms['loss']:.3f}", it_s=f"{(i + 1) / (time.time() - start):.2f}",
                                frozen=frozen)
            seconds = time.time() - start
            means = {k: mean_across_ranks(v / iters, self.dist) for k, v in sums.items()}
            means.update(epoch=epoch + 1, seconds=seconds, iterations_per_second=iters / seconds,
                         lr=self.optimizer.param_groups[0]["lr"])
            if self.validation is not None and self.dist.is_main:
                means.update(self.validation.evaluate(self.model, self.autocast))
            self.history.append(means)
            self.epoch = epoch + 1
            self._save()
            barrier(self.dist)
            if writer is not None:
                for key, value in means.items():
                    if key != "epoch":
                        writer.add_scalar(f"{self.name}/{key}", value, self.epoch)
                writer.flush()
            if self.dist.is_main:
                log.info("%s epoch %d/%d: %s", self.name, self.epoch, self.stage.epochs, _epoch_line(means))
            if on_epoch_end is not None:
                on_epoch_end(self.epoch, means)
        if writer is not None:
            writer.close()
        if self.backbone is not None:
            self.backbone.requires_grad_(True)
        return self.history

    def _step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.dist.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            output = model(images)
        if isinstance(output, MaxQueryOutput):
            terms = self.loss_fn(output, labels)
        else:
            terms = {"loss": self.loss_fn(output, labels)}
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.model.parameters(), 12.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(f"{self.name}: the loss became {terms['loss'].item()}; lower the learning rate")
        return {k: float(v.detach()) for k, v in terms.items()}


class PatchValidation:
    """A fixed set of validation patches (one around a random foreground voxel and one anywhere, per
    case, seeded) on which every epoch measures Dice per class and the query usage."""

    def __init__(self, cases: list[PreprocessedCase], config: TrainingConfig, class_names: list[str],
                 device: torch.device, batch_size: int = 2) -> None:
        rng = np.random.default_rng(config.seed)
        patch = tuple(config.patch_size_zyx)
        pairs = [sample_patch(case, patch, rng, force) for case in cases for force in (True, False)]
        self.images = torch.from_numpy(np.stack([image for image, _ in pairs]))[:, None]
        self.labels = torch.from_numpy(np.stack([label for _, label in pairs]).astype(np.int64))
        self.class_names = class_names
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast: torch.dtype | None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        num_classes = len(self.class_names)
        tp, fp, fn = (np.zeros(num_classes, np.int64) for _ in range(3))
        usage = None
        for start in range(0, len(self.images), self.batch_size):
            images = self.images[start:start + self.batch_size].to(self.device)
            labels = self.labels[start:start + self.batch_size].to(self.device)
            with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
                output = model(images, with_aux=True) if isinstance(model, MaxQueryNet) else model(images)
            logits = output.logits if isinstance(output, MaxQueryOutput) else output
            if isinstance(output, MaxQueryOutput):
                usage = usage or QueryUsage.for_network(model.config.query_groups, len(output.aux))
                usage.update(stage_responses(output))
            predicted = logits.argmax(dim=1)
            valid = labels != IGNORE_INDEX
            for k in range(1, num_classes):
                pred_k, true_k = (predicted == k) & valid, labels == k
                tp[k] += int((pred_k & true_k).sum())
                fp[k] += int((pred_k & ~true_k).sum())
                fn[k] += int((~pred_k & true_k).sum())
        model.train(was_training)
        dice = {name: 2 * tp[k] / max(2 * tp[k] + fp[k] + fn[k], 1) for k, name in enumerate(self.class_names) if k}
        result = {f"val_dice/{name}": float(value) for name, value in dice.items()}
        result["val_dice/mean"] = float(np.mean(list(dice.values())))
        if usage is not None:
            for stage, groups in usage.summary().items():
                for group, row in groups.items():
                    result[f"queries_used/{stage}/{group}"] = float(row["queries_used"])
                    result[f"voxel_share/{stage}/{group}"] = row["voxel_share"]
            unused = usage.unused_groups()
            if unused:
                log.warning("query groups that win no voxel on the validation patches: %s", ", ".join(unused))
        return result


def _epoch_line(means: dict[str, float]) -> str:
    """Losses, speed and validation Dice, and the final stage's queries used per group."""
    parts = [f"{k}={v:.4f}" for k, v in means.items()
             if k != "epoch" and not k.startswith(("queries_used/", "voxel_share/"))]
    used = [f"{k.rsplit('/', 1)[1]} {int(v)}" for k, v in means.items() if k.startswith("queries_used/final/")]
    if used:
        parts.append("final queries used: " + ", ".join(used))
    return ", ".join(parts)


def _summary_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in the 'training' extra
        log.warning("tensorboard is not installed; no TensorBoard logs (pip install 'maxquery-slicer[training]')")
        return None
    return SummaryWriter(str(path))


def build_loss(architecture: str, config: TrainingConfig, roles: list[str], groups) -> nn.Module:
    if architecture == "plain":
        return SegmentationLoss()
    return MaxQueryLoss(roles, groups, config.qd_weight, config.qd_loss, config.deep_supervision)
