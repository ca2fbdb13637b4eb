"""The floating-point precision of a run: fp32, or bf16 / fp16 autocast where the hardware has it.

One choice for inference and training. ``auto`` picks bf16 on CPUs that compute it natively
(AVX512-BF16 or AMX with oneDNN kernels) and on CUDA devices that support it, fp16 on older CUDA
devices, and fp32 everywhere else (emulated bf16 is many times slower than fp32). Weights,
optimiser state and the numerically sensitive steps (k-means update, softmax over queries,
normalisation statistics, aggregation buffers) stay fp32 whatever the choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16")
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that compute in bf16 natively


@dataclass(frozen=True)
class Precision:
    """The autocast type of the network (None: plain fp32) and why it was chosen, for the user."""

    name: str  # "fp32", "bf16" or "fp16"
    dtype: torch.dtype | None
    reason: str
    slow: bool = False  # asked for on hardware that only emulates it


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux); None where the system does not expose them."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> tuple[bool, str]:
    """(native, why): bf16 pays off on a CPU only with bf16 instructions and oneDNN kernels for them.

    Without them PyTorch falls back to reference kernels: on this project's AVX2 machine a bf16
    Conv3d ran 12x slower than fp32. Flags come from /proc/cpuinfo; where they cannot be read
    (macOS, Windows) the answer is no, so ``auto`` never picks a slower path by guessing.
    """
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return False, "the CPU's feature flags cannot be read on this system"
    native = sorted(set(_NATIVE_BF16_FLAGS) & flags)
    if not native:
        return False, "this CPU has no bf16 instructions (avx512_bf16 or amx_bf16)"
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False, "this PyTorch build has no oneDNN bf16 kernels"
    return True, f"the CPU computes bf16 natively ({', '.join(native)})"


def select_precision(requested: str, device: torch.device) -> Precision:
    """``auto``: bf16 where the CPU computes it natively, bf16 (or fp16) on CUDA, fp32 elsewhere.

    ``bf16`` asked for explicitly is honoured on any CPU, with a reason that says when it will be
    slow; on a GPU without bf16 it is refused.
    """
    requested = str(requested).lower()
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return Precision("fp32", None, "fp32 was asked for")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", torch.bfloat16, "the GPU supports bf16")
        if requested == "bf16":
            raise ValueError("this GPU has no bf16 support; use --precision auto (fp16) or fp32")
        return Precision("fp16", torch.float16, "the GPU has no bf16; fp16 autocast")
    if device.type == "cpu":
        native, why = cpu_has_native_bf16()
        if native:
            return Precision("bf16", torch.bfloat16, why)
        if requested == "bf16":
            return Precision("bf16", torch.bfloat16, f"bf16 was asked for, but {why}", slow=True)
        return Precision("fp32", None, why)
    if requested == "bf16":
        return Precision("bf16", torch.bfloat16, "bf16 was asked for")
    return Precision("fp32", None, f"no mixed precision on {device.type}")


def full_precision(device: torch.device) -> torch.autocast:
    """A region that runs in fp32 whatever autocast is active around it (k-means update, softmax)."""
    return torch.autocast(device.type if device.type in ("cpu", "cuda") else "cpu", enabled=False)
