"""The MaxQuery mask transformer (paper Eq. 2-4).

pixel features P (InstanceNorm on the last decoder level), mask embeddings C from the queries,
query responses R = C·Pᵀ, cluster assignment M = softmax_N(R), class logits per query C_K and
semantic logits Z = C_Kᵀ·M. Each kMaX block adds an auxiliary prediction of the same form from
its own assignment logits, for deep supervision; as in kMaX-DeepLab it is compared with the labels
at full resolution (``AuxPrediction.at``), so that small tumours do not vanish on a coarse grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import full_precision

from .backbone import UNetBackbone
from .config import NetworkConfig
from .kmax import KMaXBlock


@dataclass
class MaskPrediction:
    """Z (B, K, *S) logits, R (B, N, *S) pre-softmax query responses, M = softmax_N(R)."""

    logits: torch.Tensor
    query_responses: torch.Tensor

    @property
    def assignments(self) -> torch.Tensor:
        return self.query_responses.softmax(dim=1)


@dataclass
class AuxPrediction:
    """A kMaX block's prediction: its queries' class logits C_K (B, N, K) and its assignment
    logits R (B, N, *s) on the block's own (coarse) grid."""

    class_logits: torch.Tensor
    query_responses: torch.Tensor

    def at(self, shape: tuple[int, ...]) -> MaskPrediction:
        """The prediction on a finer grid: R upsampled (trilinear), then Z = C_Kᵀ·softmax_N(R)."""
        responses = self.query_responses
        if tuple(responses.shape[2:]) != tuple(shape):
            responses = F.interpolate(responses, size=tuple(shape), mode="trilinear", align_corners=False)
        return MaskPrediction(combine(self.class_logits, responses), responses)


@dataclass
class MaxQueryOutput(MaskPrediction):
    """The final prediction plus one auxiliary prediction per kMaX block (coarse to fine)."""

    class_logits: torch.Tensor | None = None  # C_K, (B, N, K)
    aux: list[AuxPrediction] = field(default_factory=list)


def combine(class_logits: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """Z = C_Kᵀ · softmax_N(R) for (B, N, K) class logits and (B, N, *S) responses, in fp32
    whatever the autocast (the softmax over queries is numerically sensitive)."""
    with full_precision(responses.device):
        assignments = responses.float().softmax(dim=1)
        return torch.einsum("bnk,bn...->bk...", class_logits.float(), assignments)


class MaxQueryNet(nn.Module):
    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.query_dim
        self.backbone = UNetBackbone(config)
        # kMaX-DeepLab initialises the cluster centres with unit variance, so that the queries are
        # distinct centres from the start (the k-means update itself starts at zero).
        self.queries = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, config.num_queries, dim), std=1.0))
        rates = torch.linspace(0, config.drop_path, len(config.kmax_levels)).tolist()
        self.blocks = nn.ModuleList(
            KMaXBlock(config.features[level], dim, config.num_heads, config.ffn_dim, rate)
            for level, rate in zip(config.kmax_levels, rates)
        )
        self.aux_class_heads = nn.ModuleList(nn.Linear(dim, config.num_classes) for _ in config.kmax_levels)
        self.final_norm = nn.LayerNorm(dim)
        pixel_dim = config.features[0]
        self.pixel_norm = nn.InstanceNorm3d(pixel_dim, affine=False)
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, pixel_dim))
        self.class_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, config.num_classes))

    def forward(self, x: torch.Tensor, with_aux: bool | None = None) -> MaxQueryOutput:
        """``with_aux`` defaults to ``self.training``; inference skips the auxiliary logits."""
        with_aux = self.training if with_aux is None else with_aux
        levels = self.backbone(x)
        queries = self.queries.expand(x.shape[0], -1, -1)
        aux = []
        for level, block, aux_head in zip(self.config.kmax_levels, self.blocks, self.aux_class_heads):
            # kMaX deep supervision: the block's assignment logits come from its incoming queries,
            # so its class logits must too (cluster n's class and cluster n's pixels, same centre).
            incoming = queries
            queries, block_logits = block(queries, levels[level])
            if with_aux:
                aux.append(AuxPrediction(aux_head(incoming), block_logits.unflatten(2, levels[level].shape[2:])))
        queries = self.final_norm(queries)
        mask_embeddings = self.mask_embed(queries)  # C
        class_logits = self.class_head(queries)  # C_K
        if torch.is_grad_enabled():
            pixels = self.pixel_norm(levels[0])  # P
            responses = torch.einsum("bnc,bc...->bn...", mask_embeddings, pixels)  # R = C·Pᵀ
            logits = combine(class_logits, responses)  # Z = C_Kᵀ·softmax_N(R)
        else:
            responses, logits = self._inference_heads(mask_embeddings, class_logits, levels[0])
        return MaxQueryOutput(logits, responses, class_logits, aux)

    #: voxels per chunk of the inference path's softmax (N × chunk floats live at a time)
    inference_chunk: int = 2**16

    def _inference_heads(
        self, mask_embeddings: torch.Tensor, class_logits: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """R and Z exactly as in the training path, without its full-size temporaries.

        The training path makes a normalised copy of the features (C × voxels) and the full
        M = softmax_N(R) (N × voxels) before Z. Here the InstanceNorm statistics are taken first,
        then normalisation, R = C·Pᵀ, the softmax over queries and Z = C_Kᵀ·M run chunk by chunk
        along the voxels (all of them are per voxel), so only R and Z are full size. Same
        operations per voxel; checked against the training path in the tests.
        """
        if torch.is_autocast_enabled(features.device.type) or features.dtype != torch.float32:
            # Precision: InstanceNorm statistics, R and the softmax over queries always in fp32
            # (R is the MaxQuery score itself); the heads are a small share of the work.
            with torch.autocast(features.device.type, enabled=False):
                return self._inference_heads(mask_embeddings.float(), class_logits.float(), features.float())
        batch, channels = features.shape[:2]
        flat_features = features.reshape(batch, channels, -1)  # (B, C, L)
        n_voxels = flat_features.shape[2]
        mean = flat_features.mean(dim=2, keepdim=True)
        # Centred two-pass variance in chunks: as robust as var_mean (no E[x²] − μ² cancellation)
        # and several times faster on CPU than var_mean over a full-resolution volume.
        squares = flat_features.new_zeros((batch, channels, 1), dtype=torch.float64)
        for start in range(0, n_voxels, self.inference_chunk):
            centred = flat_features[:, :, start:start + self.inference_chunk] - mean
            squares += centred.square_().sum(dim=2, keepdim=True, dtype=torch.float64)
        scale = torch.rsqrt((squares / n_voxels).to(mean.dtype) + self.pixel_norm.eps)
        classes_t = class_logits.transpose(1, 2)  # (B, K, N)
        responses = flat_features.new_empty(batch, mask_embeddings.shape[1], n_voxels)
        logits = flat_features.new_empty(batch, classes_t.shape[1], n_voxels)
        for start in range(0, n_voxels, self.inference_chunk):
            stop = start + self.inference_chunk
            pixels = (flat_features[:, :, start:stop] - mean).mul_(scale)  # P, this chunk
            chunk = torch.bmm(mask_embeddings, pixels)  # R = C·Pᵀ
            responses[:, :, start:stop] = chunk
            logits[:, :, start:stop] = torch.bmm(classes_t, chunk.softmax(dim=1))  # Z = C_Kᵀ·M
        spatial = features.shape[2:]
        return responses.view(batch, -1, *spatial), logits.view(batch, -1, *spatial)
