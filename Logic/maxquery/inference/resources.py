"""Where to run and whether it fits: device, numeric precision, CPU threads and a memory estimate.

The estimate is made before any work so that a volume that cannot fit is refused with a message
that says what to do, instead of the process being killed halfway (which would take Slicer down
with it).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import psutil
import torch

from ..errors import ResourceError
from ..network import NetworkConfig

_FLOAT = 4  # bytes per float32 value


def select_device(requested: str = "auto") -> tuple[torch.device, bool]:
    """Return (device, fell_back_to_cpu).

    ``auto`` tries CUDA, then Apple MPS, then the CPU. ``fell_back_to_cpu`` is True when an
    accelerator was asked for (``auto``, ``cuda`` or ``mps``) and none could be used.
    """
    requested = str(requested).lower()
    if requested not in ("auto", "cpu", "cuda", "mps") and not requested.startswith("cuda:"):
        raise ValueError(f"unknown device {requested!r}; choose auto, cpu, cuda or mps")
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "cpu":
        return torch.device("cpu"), False
    if requested.startswith("cuda") or requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda" if requested == "auto" else requested), False
        if requested == "auto" and mps_ok:
            return torch.device("mps"), False
        return torch.device("cpu"), True
    return (torch.device("mps"), False) if mps_ok else (torch.device("cpu"), True)


def cpu_threads() -> int:
    """All cores this process may use (respects affinity masks and container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Use ``count`` intra-op threads for the duration, then restore the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class MemoryEstimate:
    host_bytes: int  # RAM for arrays on the model grid and the outputs on the input grid
    network_bytes: int  # activations of one batch of patches (on the compute device)

    def total_on(self, device: torch.device) -> tuple[int, int]:
        """(RAM, device memory) needed when the network runs on ``device``."""
        if device.type == "cpu":
            return self.host_bytes + self.network_bytes, 0
        return self.host_bytes, self.network_bytes


def estimate_memory(
    input_voxels: int, model_shape: Sequence[int], patch_size: Sequence[int], batch_size: int,
    config: NetworkConfig, num_scores: int, with_queries: bool, mirror: bool = False,
) -> MemoryEstimate:
    """Bytes the run will need, by a deliberately generous count of the large arrays.

    Model grid: the resampled and normalised volume, the aggregate (K classes + scores + weights)
    and a few label/score temporaries. Input grid: the labels, the calibrated and min-max anomaly
    and one raw map per score, plus the float copy made while reorienting. Network: per patch
    voxel about six full-resolution feature maps, the query responses R and assignments M, the
    logits and the score maps (measured peak of the small configuration is about 70 % of this).
    """
    model_voxels = int(np.prod(model_shape))
    padded_voxels = int(np.prod([max(s, p) for s, p in zip(model_shape, patch_size)]))
    k = config.num_classes
    host = _FLOAT * (2 * model_voxels + (k + num_scores + 1) * padded_voxels + 4 * model_voxels)
    host += _FLOAT * input_voxels * (3 + num_scores) + input_voxels
    per_voxel = 6 * config.features[0] + (2 * config.num_queries if with_queries else 0) + 3 * k + 2 * num_scores
    network = _FLOAT * per_voxel * int(np.prod(patch_size)) * batch_size * (2 if mirror else 1)
    return MemoryEstimate(int(host), int(network))


def available_memory(device: torch.device) -> tuple[int, int | None]:
    """(free RAM, free device memory or None when the device has no separate memory)."""
    ram = int(psutil.virtual_memory().available)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return ram, int(free)
    return ram, None


def check_fits(estimate: MemoryEstimate, device: torch.device, fast: bool) -> None:
    """Raise ``ResourceError`` with what to do when the estimate exceeds what is free."""
    ram_needed, device_needed = estimate.total_on(device)
    ram_free, device_free = available_memory(device)
    gib = 2.0 ** 30
    if ram_needed > ram_free:
        hint = "" if fast else "use fast mode (coarser spacing, about 8x less memory), "
        raise ResourceError(
            f"this CT needs about {ram_needed / gib:.1f} GiB of memory but only {ram_free / gib:.1f} GiB is free; "
            f"{hint}crop the CT to the region of interest, or close other programs"
        )
    if device_free is not None and device_needed > device_free:
        raise ResourceError(
            f"the network needs about {device_needed / gib:.1f} GiB of GPU memory but only "
            f"{device_free / gib:.1f} GiB is free; run on the CPU (device 'cpu') or free GPU memory"
        )
