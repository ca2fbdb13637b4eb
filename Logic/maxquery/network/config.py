"""Network configuration: one dataclass that the model card stores and the builders read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence


def _as_triples(values: Sequence, name: str) -> tuple[tuple[int, int, int], ...]:
    """Accept ``3`` or ``(1, 3, 3)`` per stage and return a tuple of (z, y, x) triples."""
    triples = []
    for value in values:
        if isinstance(value, int):
            triples.append((value, value, value))
        elif len(value) == 3:
            triples.append(tuple(int(v) for v in value))
        else:
            raise ValueError(f"{name}: each entry must be an int or a (z, y, x) triple, got {value!r}")
    return tuple(triples)


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture of the MaxQuery network (paper §3.1, §4.2) and of its plain-backbone twin.

    ``kmax_levels`` are the pixel-decoder levels (0 = full resolution) that feed one kMaX block
    each, coarse to fine. A level's output stride is the largest of its per-axis strides: on
    anisotropic CT, where the training planner pools z less often (``maxquery_training.planner``),
    that is the in-plane stride, ``2**L`` at level ``L``; so the paper's output strides 32, 16, 8, 4
    are levels (5, 4, 3, 2) whether or not z is pooled at every stage.
    """

    in_channels: int = 1
    num_classes: int = 4
    features: tuple[int, ...] = (32, 64, 128, 256, 320, 320)
    kernel_sizes: tuple = (3, 3, 3, 3, 3, 3)
    strides: tuple = (1, 2, 2, 2, 2, 2)
    num_queries: int = 32
    query_dim: int = 128
    num_heads: int = 8
    ffn_dim: int = 512
    kmax_levels: tuple[int, ...] = (5, 4, 3, 2)
    drop_path: float = 0.2
    dropout: float = 0.0
    query_groups: tuple[int, int, int] = (16, 4, 12)

    def __post_init__(self) -> None:
        n_stages = len(self.features)
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        object.__setattr__(self, "kernel_sizes", _as_triples(self.kernel_sizes, "kernel_sizes"))
        object.__setattr__(self, "strides", _as_triples(self.strides, "strides"))
        object.__setattr__(self, "kmax_levels", tuple(int(v) for v in self.kmax_levels))
        object.__setattr__(self, "query_groups", tuple(int(v) for v in self.query_groups))
        if len(self.kernel_sizes) != n_stages or len(self.strides) != n_stages:
            raise ValueError(
                f"features, kernel_sizes and strides need one entry per stage; got "
                f"{n_stages}, {len(self.kernel_sizes)} and {len(self.strides)}"
            )
        if any(k < 1 or k % 2 == 0 for kernel in self.kernel_sizes for k in kernel):
            raise ValueError(f"kernel_sizes {self.kernel_sizes} must be odd and positive, so that a stage "
                             "keeps its size")
        if any(s < 1 for stride in self.strides for s in stride):
            raise ValueError(f"strides {self.strides} must be positive")
        if self.strides and self.strides[0] != (1, 1, 1):
            raise ValueError(
                f"the first stage must have stride (1, 1, 1) so that Z and R come out at the input "
                f"resolution; got strides[0]={self.strides[0]} (downsample in the later stages)"
            )
        if any(level < 0 or level >= n_stages for level in self.kmax_levels):
            raise ValueError(f"kmax_levels {self.kmax_levels} must lie in 0..{n_stages - 1}")
        if len(self.query_groups) != 3 or min(self.query_groups) < 1:
            raise ValueError(
                f"query_groups {self.query_groups} must be three positive query counts "
                f"(background, organ, tumour) for the QD loss"
            )
        if sum(self.query_groups) != self.num_queries:
            raise ValueError(
                f"query_groups {self.query_groups} must add up to num_queries={self.num_queries}"
            )
        if self.query_dim % self.num_heads:
            raise ValueError(f"query_dim={self.query_dim} must be divisible by num_heads={self.num_heads}")

    @property
    def level_strides(self) -> tuple[tuple[int, int, int], ...]:
        """Per level (0 = full resolution), its stride per axis (z, y, x) relative to the input."""
        levels, total = [], (1, 1, 1)
        for stride in self.strides:
            total = tuple(t * s for t, s in zip(total, stride))
            levels.append(total)
        return tuple(levels)

    @property
    def total_stride(self) -> tuple[int, int, int]:
        """The bottleneck's stride per axis: patch sizes must be multiples of it."""
        return self.level_strides[-1]

    @property
    def kmax_output_strides(self) -> tuple[int, ...]:
        """Output stride of each kMaX block's level (its largest per-axis stride), coarse to fine."""
        return tuple(max(self.level_strides[level]) for level in self.kmax_levels)

    def check_patch_size(self, patch_size_zyx: Sequence[int]) -> None:
        """The one patch/stride check (training plan and model card): every level must tile the patch."""
        stride = self.total_stride
        if any(p % s for p, s in zip(patch_size_zyx, stride)):
            raise ValueError(f"patch size {list(patch_size_zyx)} is not a multiple of the network stride "
                             f"{list(stride)} (z, y, x); choose a patch whose every axis is a multiple of it")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: (list(map(list, v)) if k in ("kernel_sizes", "strides") else list(v) if isinstance(v, tuple) else v)
                for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NetworkConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown network settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def small_config(num_classes: int, **overrides: Any) -> NetworkConfig:
    """A CPU-sized configuration (used by the demo model and the tests)."""
    settings: dict[str, Any] = dict(
        num_classes=num_classes,
        features=(16, 32, 64, 128, 160),
        kernel_sizes=(3, 3, 3, 3, 3),
        strides=(1, 2, 2, 2, 2),
        query_dim=64,
        ffn_dim=128,
        num_heads=8,
        kmax_levels=(4, 3, 2),
    )
    settings.update(overrides)
    return NetworkConfig(**settings)


__all__ = ["NetworkConfig", "small_config"]
