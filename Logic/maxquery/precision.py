"""The floating-point precision of a run: fp32, or bf16 / fp16 autocast where the hardware has it.

``auto`` picks bf16 on CPUs that compute it natively (AVX512-BF16 or AMX: about 2× faster than fp32
for these networks) and on CUDA devices that support it, fp16 on older CUDA devices, and fp32
everywhere else (emulated bf16 is slower than fp32). Weights, optimiser state and the numerically
sensitive steps (k-means update, softmax over queries, normalisation statistics, aggregation
buffers) stay fp32 whatever the choice.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 arithmetic (Linux /proc/cpuinfo flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(_NATIVE_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("fp16 is only supported on CUDA devices; use bf16 or fp32 on the CPU")
        return torch.float16
    if precision == "bf16":
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"bf16 autocast is not supported on {device.type}; use fp32")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def full_precision(device: torch.device) -> torch.autocast:
    """A region that runs in fp32 whatever autocast is active around it (k-means update, softmax)."""
    return torch.autocast(device.type if device.type in ("cpu", "cuda") else "cpu", enabled=False)
