"""The network topology for a training run, planned from the voxel spacing as nnU-Net v2 plans it.

Each downsampling step pools (stride 2) the axes whose current spacing is within 2× of the finest
spacing among the axes that can still be pooled, and whose feature map stays at least
``min_feature_map_size`` voxels (three times that when a single axis would be pooled alone). An
axis much coarser than the others, z of thick-slice CT, therefore waits until the others have
caught up. A stage convolves with kernel 3 along the axes within 2× of its finest spacing and 1
along the others (in-plane-only stages), and keeps 3 once an axis has it; the bottleneck uses 3
along every axis. The patch is then padded up to a multiple of the total stride.

Unlike nnU-Net, the depth is not free: the network preset fixes the number of stages (its
``features``), so planning stops after ``stages - 1`` steps and refuses a patch too small for them.
The kMaX blocks stay at the paper's output strides: a level's output stride is its largest
per-axis stride, which is the in-plane stride ``2**level`` because the finest axes pool at every
step (``NetworkConfig.kmax_output_strides``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from maxquery.network import NetworkConfig, small_config

from .config import TrainingConfig

Triple = tuple[int, int, int]
PLANNED_SETTINGS = ("strides", "kernel_sizes")  # network settings the plan decides, never the config


@dataclass(frozen=True)
class Topology:
    """Per stage its stride and kernel size (z, y, x); the patch padded to the total stride."""

    strides: tuple[Triple, ...]
    kernel_sizes: tuple[Triple, ...]
    patch_size_zyx: Triple


def plan_topology(
    spacing_zyx: Sequence[float], patch_size_zyx: Sequence[int], num_stages: int, min_feature_map_size: int = 4,
) -> Topology:
    """Strides and kernel sizes of ``num_stages`` stages for a patch at a spacing (module docstring)."""
    if len(spacing_zyx) != 3 or min(spacing_zyx) <= 0:
        raise ValueError(f"spacing {list(spacing_zyx)} must be three positive millimetre values (z, y, x)")
    if len(patch_size_zyx) != 3 or min(patch_size_zyx) < 1:
        raise ValueError(f"patch_size_zyx {list(patch_size_zyx)} must be three positive voxel counts (z, y, x)")
    spacing = [float(s) for s in spacing_zyx]
    size = [int(p) for p in patch_size_zyx]
    strides: list[Triple] = [(1, 1, 1)]
    kernels: list[Triple] = []
    kernel = [1, 1, 1]
    for stage in range(num_stages - 1):
        finest = min(spacing)
        kernel = [3 if k == 3 or s / finest < 2 else 1 for k, s in zip(kernel, spacing)]
        kernels.append(tuple(kernel))
        axes = _poolable_axes(spacing, size, min_feature_map_size)
        if not axes:
            raise ValueError(
                f"patch_size_zyx {list(patch_size_zyx)} at spacing {list(spacing_zyx)} mm allows only {stage} "
                f"downsampling step(s) with feature maps of at least {min_feature_map_size} voxels, but the network "
                f"has {num_stages} stages ({num_stages - 1} steps); enlarge the patch, lower min_feature_map_size "
                "or give the network fewer stages (network.features)"
            )
        strides.append(tuple(2 if axis in axes else 1 for axis in range(3)))
        for axis in axes:
            spacing[axis] *= 2
            size[axis] = math.ceil(size[axis] / 2)
    kernels.append((3, 3, 3))  # the bottleneck, as in nnU-Net
    total = [math.prod(stride[axis] for stride in strides) for axis in range(3)]
    patch = tuple(math.ceil(p / t) * t for p, t in zip(patch_size_zyx, total))
    return Topology(tuple(strides), tuple(kernels), patch)


def _poolable_axes(spacing: list[float], size: list[int], min_feature_map_size: int) -> list[int]:
    """nnU-Net's rule for one step: big enough to halve, and within 2× of the finest such spacing."""
    axes = [axis for axis in range(3) if size[axis] >= 2 * min_feature_map_size]
    if not axes:
        return []
    finest = min(spacing[axis] for axis in axes)
    axes = [axis for axis in axes if spacing[axis] / finest < 2]
    if len(axes) == 1 and size[axes[0]] < 3 * min_feature_map_size:
        return []
    return axes


def plan_network(config: TrainingConfig, spacing_zyx: Sequence[float]) -> tuple[NetworkConfig, Topology]:
    """The config's network with the strides and kernel sizes planned for ``spacing_zyx``.

    Cheap (no image is read), so a run is checked before any preprocessing.
    """
    planned = sorted(set(config.network) & set(PLANNED_SETTINGS))
    if planned:
        raise ValueError(f"network.{planned[0]} is planned from the data's spacing and the patch; remove "
                         f"{planned} from the config's network section")
    stages = len(config.network["features"]) if "features" in config.network else len(_build(config).features)
    topology = plan_topology(spacing_zyx, config.patch_size_zyx, stages, config.min_feature_map_size)
    network = _build(config, strides=topology.strides, kernel_sizes=topology.kernel_sizes)
    network.check_patch_size(topology.patch_size_zyx)
    return network, topology


def _build(config: TrainingConfig, **planned) -> NetworkConfig:
    """The config's network preset with its overrides (and, once planned, the topology)."""
    num_classes = len(config.data.label_values)
    if config.network_preset == "small":
        return small_config(num_classes, **config.network, **planned)
    if config.network_preset == "paper":
        return NetworkConfig(num_classes=num_classes, **config.network, **planned)
    raise ValueError(f"network_preset must be 'paper' or 'small', got {config.network_preset!r}")
