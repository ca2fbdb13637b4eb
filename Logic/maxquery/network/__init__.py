"""Networks: the MaxQuery mask transformer and its plain nnU-Net-style twin."""

from torch import nn

from .backbone import PlainSegmentationNet, UNetBackbone
from .config import NetworkConfig, small_config
from .kmax import KMaXBlock, kmeans_update
from .maxquery_net import AuxPrediction, MaskPrediction, MaxQueryNet, MaxQueryOutput, combine

ARCHITECTURES = {"maxquery": MaxQueryNet, "plain": PlainSegmentationNet}


def build_network(architecture: str, config: NetworkConfig) -> nn.Module:
    """Build ``"maxquery"`` or ``"plain"`` from a configuration."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](config)


__all__ = [
    "ARCHITECTURES", "AuxPrediction", "KMaXBlock", "MaskPrediction", "MaxQueryNet", "MaxQueryOutput", "NetworkConfig",
    "PlainSegmentationNet", "UNetBackbone", "build_network", "combine", "kmeans_update", "small_config",
]
