"""Gaussian-weighted sliding-window aggregation (nnU-Net v2's scheme).

Patches overlap by a configurable fraction; each patch's per-voxel maps are weighted by a
Gaussian centred on the patch (sigma = 1/8 of the patch size), because a convolutional network is
least reliable near the patch border, and the weighted sum is divided by the summed weights.
Every channel (class probabilities and every anomaly score) goes through the same weights, so a
score is aggregated exactly like the probabilities it is compared with.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import RunCancelled

PatchFn = Callable[[torch.Tensor], torch.Tensor]  # (B, 1, *P) -> (B, C, *P) on the CPU


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """Weights of one patch: a Gaussian of peak 1, with no zero so every voxel counts a little."""
    axes = []
    for size in patch_size:
        coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        axes.append(np.exp(-0.5 * (coords / max(size * sigma_scale, 1e-6)) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights /= weights.max()
    weights = np.maximum(weights, weights[weights > 0].min())
    return torch.from_numpy(weights.astype(np.float32))


def patch_starts(image_size: Sequence[int], patch_size: Sequence[int], overlap: float) -> list[tuple[int, int, int]]:
    """Start corners of the patches: evenly spaced, first and last flush with the image border."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    per_axis = []
    for size, patch in zip(image_size, patch_size):
        if size <= patch:
            per_axis.append([0])
            continue
        steps = math.ceil((size - patch) / (patch * (1.0 - overlap))) + 1
        stride = (size - patch) / (steps - 1)
        per_axis.append([int(round(stride * i)) for i in range(steps)])
    return list(itertools.product(*per_axis))


def mirrored(fn: PatchFn, axes: Sequence[Sequence[int]]) -> PatchFn:
    """Test-time mirroring: average ``fn`` over the input flipped along each axis set (and unflipped)."""
    def predict(x: torch.Tensor) -> torch.Tensor:
        total = fn(x)
        for flip in axes:
            dims = [2 + a for a in flip]
            total += fn(torch.flip(x, dims)).flip(dims)
        return total / (1 + len(axes))
    return predict


def mirror_axis_sets(axes: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Every non-empty combination of ``axes``: 7 flips for all three axes, none for none."""
    axes = sorted(set(axes))
    return tuple(c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r))


def sliding_window(
    volume: torch.Tensor,
    fn: PatchFn,
    num_channels: int,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 2,
    pad_value: float = 0.0,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int, int], None] | None = None,
    cancel=None,
    timings: dict[str, float] | None = None,
) -> torch.Tensor:
    """Aggregate ``fn`` over a (Z, Y, X) volume; returns (C, Z, Y, X) float32 on the CPU.

    The aggregation buffers are float32 whatever precision ``fn`` computes in: a sum of many
    weighted patches in bf16 (8 significant bits) would lose the small differences between
    classes. A volume smaller than the patch is padded with ``pad_value`` and the padding cropped
    away. ``on_batch(done, total)`` is called after every batch; ``cancel.is_set()`` is checked
    before every batch and raises ``RunCancelled``. ``timings["aggregation"]`` receives the
    seconds spent adding patches into the buffers (the rest is the network).
    """
    shape = tuple(volume.shape)
    padded_shape = tuple(max(s, p) for s, p in zip(shape, patch_size))
    before = [(p - s) // 2 for s, p in zip(shape, padded_shape)]
    if padded_shape != shape:
        padded = torch.full(padded_shape, pad_value, dtype=volume.dtype)
        padded[tuple(slice(b, b + s) for b, s in zip(before, shape))] = volume
        volume = padded
    weights = gaussian_importance(patch_size)
    output = torch.zeros((num_channels, *padded_shape), dtype=torch.float32)
    weight_sum = torch.zeros(padded_shape, dtype=torch.float32)
    starts = patch_starts(padded_shape, patch_size, overlap)
    total = math.ceil(len(starts) / batch_size)
    aggregation = 0.0
    for b in range(total):
        if cancel is not None and cancel.is_set():
            raise RunCancelled("the run was cancelled; nothing was written")
        corners = starts[b * batch_size:(b + 1) * batch_size]
        windows = [tuple(slice(c, c + p) for c, p in zip(corner, patch_size)) for corner in corners]
        batch = torch.stack([volume[w] for w in windows])[:, None].to(device)
        maps = fn(batch).float()
        clock = time.perf_counter()
        for window, patch_maps in zip(windows, maps):
            output[(slice(None), *window)].addcmul_(patch_maps, weights)
            weight_sum[window] += weights
        aggregation += time.perf_counter() - clock
        if on_batch is not None:
            on_batch(b + 1, total)
    clock = time.perf_counter()
    output /= weight_sum
    output = output[(slice(None), *(slice(b, b + s) for b, s in zip(before, shape)))]
    if timings is not None:
        timings["aggregation"] = round(aggregation + time.perf_counter() - clock, 3)
    return output
