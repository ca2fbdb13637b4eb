"""The two-stage recipe of paper §4.2 with resumable, atomic checkpoints.

Stage 1 pre-trains the backbone with the plain head. Stage 2 builds the MaxQuery network on the
stage-1 backbone and trains it with the backbone frozen for the first epochs, then at a reduced
learning rate. RAdam, polynomial decay per iteration, gradient clipping, AMP on CUDA.

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

from maxquery.network import MaxQueryOutput

from .augment import PatchStream, build_augmentation
from .config import StageConfig, TrainingConfig
from .dataset import PreprocessedCase
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
        backbone: nn.Module | None = None,
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
        self.augmentation = build_augmentation(config.augmentation)
        backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
        groups = [{"params": [p for p in model.parameters() if id(p) not in backbone_ids], "lr_multiplier": 1.0}]
        if backbone is not None:
            groups.append({"params": list(backbone.parameters()), "lr_multiplier": stage.backbone_lr_multiplier})
        self.optimizer = torch.optim.RAdam(groups, lr=stage.learning_rate, weight_decay=stage.weight_decay)
        self.use_amp = dist_info.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.epoch = 0
        self.history: list[dict[str, float]] = []

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    @property
    def finished(self) -> bool:
        return self.epoch >= self.stage.epochs

    def _backbone_frozen(self, epoch: int) -> bool:
        return self.backbone is not None and epoch < self.stage.freeze_backbone_epochs

    def resume(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        state = load_checkpoint(self.checkpoint_path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
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
                bar.set_postfix(loss=f"{terms['loss']:.3f}", frozen=frozen)
            means = {k: mean_across_ranks(v / iters, self.dist) for k, v in sums.items()}
            means.update(epoch=epoch + 1, seconds=time.time() - start, lr=self.optimizer.param_groups[0]["lr"])
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
                log.info("%s epoch %d/%d: %s", self.name, self.epoch, self.stage.epochs,
                         ", ".join(f"{k}={v:.4f}" for k, v in means.items() if k != "epoch"))
            if on_epoch_end is not None:
                on_epoch_end(self.epoch, means)
        if writer is not None:
            writer.close()
        if self.backbone is not None:
            self.backbone.requires_grad_(True)
        return self.history

    def _step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", enabled=self.use_amp):
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
