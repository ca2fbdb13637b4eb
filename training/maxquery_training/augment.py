"""Patch sampling with foreground oversampling and nnU-Net-style augmentation (MONAI transforms).

Beyond nnU-Net's set, two augmentations for what differs between patients and scanners:
contrast phase (the organ and its lesions shifted together in HU, on top of a global HU shift, so
an unenhanced liver of 60 HU and a portal-venous one of 110 HU both occur) and field of view (the
patch cut to a slab of a few slices with air beyond it, as in a short scan range).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai import transforms as mt
from monai.transforms import MapTransform, RandomizableTransform
from scipy import ndimage
from torch.utils.data import IterableDataset, get_worker_info

from maxquery.preprocessing import CTNormalization

from .config import AugmentationConfig
from .dataset import PreprocessedCase


class RandContrastPhased(RandomizableTransform, MapTransform):
    """Shift the organ region (label ≥ 1, edges softened over a voxel) by a random HU offset and the
    whole image by another, in the normalised units of ``normalization``."""

    def __init__(self, normalization: CTNormalization, organ_shift_hu: float, global_shift_hu: float,
                 prob: float) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, ("image", "label"))
        self.units_per_hu = 1.0 / normalization.std
        self.organ_shift_hu = organ_shift_hu
        self.global_shift_hu = global_shift_hu

    def __call__(self, data):
        self.randomize(None)
        if not self._do_transform:
            return data
        organ = self.R.uniform(-self.organ_shift_hu, self.organ_shift_hu) * self.units_per_hu
        overall = self.R.uniform(-self.global_shift_hu, self.global_shift_hu) * self.units_per_hu
        image = np.asarray(data["image"], dtype=np.float32)
        weight = ndimage.gaussian_filter((np.asarray(data["label"]) >= 1).astype(np.float32), sigma=(0, 1, 1, 1))
        return {**data, "image": image + organ * weight + overall}


class RandSlabd(RandomizableTransform, MapTransform):
    """Keep a random slab of ``min_slices``–``max_slices`` slices along z; beyond it the image is
    air (``air_value``) and the label background, as where a short scan range ends."""

    def __init__(self, air_value: float, min_slices: int, max_slices: int, prob: float) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, ("image", "label"))
        self.air_value = air_value
        self.min_slices, self.max_slices = min_slices, max_slices

    def __call__(self, data):
        self.randomize(None)
        depth = np.asarray(data["image"]).shape[1]
        if not self._do_transform or depth <= self.min_slices:
            return data
        size = int(self.R.randint(self.min_slices, min(self.max_slices, depth) + 1))
        start = int(self.R.randint(0, depth - size + 1))
        image, label = np.array(data["image"], dtype=np.float32), np.array(data["label"])
        for array, fill in ((image, self.air_value), (label, 0)):
            array[:, :start] = fill
            array[:, start + size:] = fill
        return {**data, "image": image, "label": label}


def build_augmentation(cfg: AugmentationConfig, normalization: CTNormalization) -> mt.Compose:
    """Spatial (rotation, scaling, elastic, mirroring, slab) then intensity (contrast phase, noise,
    brightness, gamma). ``normalization`` gives the HU scale and the value of air."""
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
    air = float(normalization(np.asarray([normalization.clip_low]))[0])
    if cfg.slab_prob > 0:
        spatial.append(RandSlabd(air, cfg.slab_slices[0], cfg.slab_slices[1], cfg.slab_prob))
    intensity = [RandContrastPhased(normalization, cfg.organ_shift_hu, cfg.global_shift_hu, cfg.contrast_prob)]
    intensity += [
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
