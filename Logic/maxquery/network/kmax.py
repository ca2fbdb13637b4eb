"""kMaX transformer decoder blocks (Yu et al., kMaX-DeepLab, 2022) in 3D.

The cross-attention of a block is one k-means step: every pixel is assigned to the query whose
response is largest (cluster-wise argmax instead of a spatial softmax), and each query moves by
the sum of the values of the pixels assigned to it. As in kMaX-DeepLab:

- the update is summed in fp32 whatever the autocast (a cluster of many voxels overflows fp16);
- the summed update is normalised per channel across the queries, so the relative size of the
  clusters survives (a per-query LayerNorm would erase it), then projected and scaled by a
  normalisation whose scale starts at zero, so that every block starts as the identity;
- the argmax has no gradient; the assignment logits are trained through deep supervision.
"""

from __future__ import annotations

import torch
from torch import nn

from ..precision import full_precision


def kmeans_update(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per cluster, the fp32 sum of the values of the pixels whose argmax is that cluster.

    Args:
        logits: (B, N, L) assignment logits of N clusters over L pixels.
        values: (B, L, D) pixel values.

    Returns:
        (B, N, D) float32; zero for a cluster that received no pixel.
    """
    batch, clusters = logits.shape[:2]
    index = logits.argmax(dim=1)  # (B, L)
    values = values.float()
    sums = values.new_zeros(batch, clusters, values.shape[2])
    return sums.scatter_add_(1, index.unsqueeze(-1).expand_as(values), values)


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample while training."""

    def __init__(self, prob: float) -> None:
        super().__init__()
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        keep = 1.0 - self.prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class QueryChannelNorm(nn.Module):
    """Normalises each channel across the queries of a sample: (B, N, D) → (B, N, D).

    kMaX-DeepLab uses BatchNorm over batch × queries here; with the batch of 2 of 3D training, the
    statistics are taken per sample instead. ``zero_init`` starts the scale at zero.
    """

    def __init__(self, dim: int, zero_init: bool = False) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm1d(dim, affine=True)
        if zero_init:
            nn.init.zeros_(self.norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class KMaXBlock(nn.Module):
    """One transformer decoder block: k-means cross-attention, query self-attention, FFN.

    ``forward`` returns the updated queries and the assignment logits (B, N, L) of this scale,
    which the caller turns into this block's auxiliary prediction.
    """

    def __init__(self, pixel_channels: int, dim: int, num_heads: int, ffn_dim: int, drop_path: float) -> None:
        super().__init__()
        self.pixel_key = nn.Sequential(nn.Conv3d(pixel_channels, dim, 1), nn.InstanceNorm3d(dim, affine=True))
        self.pixel_value = nn.Conv3d(pixel_channels, dim, 1)
        self.query_norm = nn.LayerNorm(dim)
        self.query_proj = nn.Linear(dim, dim)
        self.update_norm = QueryChannelNorm(dim)
        self.update_proj = nn.Linear(dim, dim, bias=False)
        self.update_scale = QueryChannelNorm(dim, zero_init=True)
        self.self_attn_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, queries: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.pixel_key(pixels).flatten(2)  # (B, D, L)
        values = self.pixel_value(pixels).flatten(2).transpose(1, 2)  # (B, L, D)
        q = self.query_proj(self.query_norm(queries))  # (B, N, D)
        logits = torch.einsum("bnd,bdl->bnl", q, keys)
        with full_precision(queries.device):
            update = kmeans_update(logits.detach(), values)
            update = self.update_scale(self.update_proj(self.update_norm(update)))
            queries = queries.float() + self.drop_path(update)
        h = self.self_attn_norm(queries)
        queries = queries + self.drop_path(self.self_attn(h, h, h, need_weights=False)[0])
        queries = queries + self.drop_path(self.ffn(self.ffn_norm(queries)))
        return queries, logits
