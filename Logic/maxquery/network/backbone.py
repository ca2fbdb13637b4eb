"""nnU-Net-style 3D encoder-decoder that yields the multi-scale pixel features of MaxQuery.

Each stage is two conv-InstanceNorm-LeakyReLU layers (the first one strided), as in nnU-Net's
``PlainConvUNet``. The decoder upsamples with transposed convolutions and fuses the skip
connection. ``UNetBackbone.forward`` returns every decoder level, coarse to fine, so the
transformer decoder can read the scales it needs and the final level becomes the pixel features P.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import NetworkConfig


def _padding(kernel: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(k // 2 for k in kernel)


class ConvNormAct(nn.Sequential):
    """Conv3d → InstanceNorm3d (affine) → LeakyReLU(0.01), nnU-Net's basic layer."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple, stride: tuple = (1, 1, 1)) -> None:
        super().__init__(
            nn.Conv3d(in_ch, out_ch, kernel, stride=stride, padding=_padding(kernel), bias=True),
            nn.InstanceNorm3d(out_ch, eps=1e-5, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class StackedConvs(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: tuple, stride: tuple = (1, 1, 1)) -> None:
        super().__init__(ConvNormAct(in_ch, out_ch, kernel, stride), ConvNormAct(out_ch, out_ch, kernel))


class UNetBackbone(nn.Module):
    """Pixel encoder + pixel decoder with skip connections.

    ``forward(x)`` returns a list of decoder features, index ``L`` being level ``L`` (0 = full
    resolution, the last stage = the bottleneck). ``dropout`` > 0 adds channel dropout after each
    decoder stage; it is kept active at test time only for the MC-dropout baseline.
    """

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        feats, kernels, strides = config.features, config.kernel_sizes, config.strides
        self.encoder = nn.ModuleList()
        in_ch = config.in_channels
        for feat, kernel, stride in zip(feats, kernels, strides):
            self.encoder.append(StackedConvs(in_ch, feat, kernel, stride))
            in_ch = feat
        self.upsamplers = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(len(feats) - 2, -1, -1):
            stride = strides[level + 1]
            self.upsamplers.append(nn.ConvTranspose3d(feats[level + 1], feats[level], stride, stride=stride))
            self.decoder.append(StackedConvs(2 * feats[level], feats[level], kernels[level]))
        self.dropout = nn.Dropout3d(config.dropout) if config.dropout > 0 else nn.Identity()

    @property
    def out_channels(self) -> tuple[int, ...]:
        return self.config.features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        levels: list[torch.Tensor] = [None] * len(skips)  # type: ignore[list-item]
        levels[-1] = x
        for i, (up, stage) in enumerate(zip(self.upsamplers, self.decoder)):
            level = len(skips) - 2 - i
            x = up(x)
            x = self.dropout(stage(torch.cat([x, skips[level]], dim=1)))
            levels[level] = x
        return levels


class PlainSegmentationNet(nn.Module):
    """The backbone with a 1×1×1 convolution head: the nnU-Net baseline and the stage-1 model."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = UNetBackbone(config)
        self.head = nn.Conv3d(config.features[0], config.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[0])
