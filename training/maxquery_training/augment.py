"""Patch sampling with foreground oversampling and nnU-Net-style augmentation (MONAI transforms)."""

from __future__ import annotations

import math

import numpy as np
import torch
from monai import transforms as mt
from torch.utils.data import IterableDataset, get_worker_info

from .config import AugmentationConfig
from .dataset import PreprocessedCase


def build_augmentation(cfg: AugmentationConfig) -> mt.Compose:
    """Spatial (rotation, scaling, elastic, mirroring) then intensity (noise, brightness, gamma)."""
    angle = math.radians(cfg.rotation_deg)
    spatial = [
        mt.RandAffined(
            keys=("image", "label"), prob=max(cfg.rotation_prob, cfg.scale_prob), rotate_range=(angle,) * 3,
            scale_range=tuple(s - 1.0 for s in cfg.scale_range), mode=("bilinear", "nearest"),
            padding_mode="border",
        ),
    ]
    if cfg.elastic_prob > 0:
        spatial.append(mt.Rand3DElasticd(
            keys=("image", "label"), sigma_range=(5, 8), magnitude_range=(50, 150), prob=cfg.elastic_prob,
            mode=("bilinear", "nearest"), padding_mode="border",
        ))
    spatial += [mt.RandFlipd(keys=("image", "label"), prob=cfg.mirror_prob, spatial_axis=axis)
                for axis in cfg.mirror_axes]
    intensity = [
        mt.RandGaussianNoised(keys="image", prob=cfg.noise_prob, std=cfg.noise_std),
        mt.RandScaleIntensityd(keys="image", factors=0.25, prob=cfg.brightness_prob),
        mt.RandAdjustContrastd(keys="image", prob=cfg.gamma_prob, gamma=cfg.gamma_range, retain_stats=True),
    ]
    return mt.Compose(spatial + intensity)


def sample_patch(
    case: PreprocessedCase, patch: tuple[int, int, int], rng: np.random.Generator, force_foreground: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Crop ``patch`` (padding with the minimum where the case is smaller).

    With ``force_foreground`` the patch is centred near a voxel of a randomly chosen non-background
    class present in the case (nnU-Net's class-balanced oversampling).
    """
    shape = np.array(case.image.shape)
    size = np.array(patch)
    if force_foreground and case.class_locations:
        cls = rng.choice(sorted(case.class_locations))
        locations = case.class_locations[cls]
        centre = locations[rng.integers(len(locations))].astype(int)
        start = centre - size // 2 + rng.integers(-(size // 4), size // 4 + 1)
    else:
        start = np.array([rng.integers(min(0, s - p), max(0, s - p) + 1) for s, p in zip(shape, size)])
    start = np.clip(start, np.minimum(0, shape - size), np.maximum(0, shape - size))
    image = np.full(patch, case.image.min(), np.float32)
    label = np.zeros(patch, np.uint8)
    src = tuple(slice(max(0, a), min(s, a + p)) for a, s, p in zip(start, shape, size))
    dst = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(src, start))
    image[dst] = case.image[src]
    label[dst] = case.label[src]
    return image, label


class PatchStream(IterableDataset):
    """An endless stream of augmented (image, label) patches, seeded per rank and worker."""

    def __init__(
        self, cases: list[PreprocessedCase], patch: tuple[int, int, int], augmentation: mt.Compose,
        foreground_oversample: float, seed: int,
    ) -> None:
        self.cases = cases
        self.patch = tuple(patch)
        self.augmentation = augmentation
        self.foreground_oversample = foreground_oversample
        self.seed = seed

    def __iter__(self):
        worker = get_worker_info()
        seed = self.seed * 1000 + (worker.id if worker else 0)
        rng = np.random.default_rng(seed)
        self.augmentation.set_random_state(seed=seed % (2**32))
        while True:
            case = self.cases[rng.integers(len(self.cases))]
            image, label = sample_patch(case, self.patch, rng, rng.random() < self.foreground_oversample)
            item = self.augmentation({"image": image[None], "label": label[None]})
            yield torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32), \
                torch.as_tensor(np.asarray(item["label"])[0], dtype=torch.long)
