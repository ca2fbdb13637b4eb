"""kMaX transformer decoder blocks (Yu et al., kMaX-DeepLab, 2022) in 3D.

The cross-attention of a block is one k-means step: every pixel is assigned to the query whose
response is largest (cluster-wise argmax instead of a spatial softmax), and each query moves to
the mean of the values of the pixels assigned to it. The argmax has no gradient; the assignment
logits are trained through deep supervision, as in kMaX-DeepLab and the MaxQuery paper (§4.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kmeans_update(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Cluster centres from a hard assignment.

    Args:
        logits: (B, N, L) assignment logits of N clusters over L pixels.
        values: (B, L, D) pixel values.

    Returns:
        (B, N, D): for each cluster the mean value of the pixels whose argmax is that cluster,
        zero for a cluster that received no pixel.
    """
    assignment = F.one_hot(logits.argmax(dim=1), num_classes=logits.shape[1])  # (B, L, N)
    assignment = assignment.to(values.dtype)
    sums = torch.einsum("bln,bld->bnd", assignment, values)
    counts = assignment.sum(dim=1).unsqueeze(-1)  # (B, N, 1)
    return sums / counts.clamp(min=1.0)


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


class KMaXBlock(nn.Module):
    """One transformer decoder block: k-means cross-attention, query self-attention, FFN.

    ``forward`` returns the updated queries and the assignment logits (B, N, L) of this scale,
    which the caller turns into this block's auxiliary prediction.
    """

    def __init__(
        self, pixel_channels: int, dim: int, num_heads: int, ffn_dim: int, drop_path: float, dropout: float
    ) -> None:
        super().__init__()
        self.pixel_key = nn.Sequential(nn.Conv3d(pixel_channels, dim, 1), nn.InstanceNorm3d(dim, affine=True))
        self.pixel_value = nn.Conv3d(pixel_channels, dim, 1)
        self.query_norm = nn.LayerNorm(dim)
        self.query_proj = nn.Linear(dim, dim)
        self.update_norm = nn.LayerNorm(dim)
        self.self_attn_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, queries: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.pixel_key(pixels).flatten(2)  # (B, D, L)
        values = self.pixel_value(pixels).flatten(2).transpose(1, 2)  # (B, L, D)
        q = self.query_proj(self.query_norm(queries))  # (B, N, D)
        logits = torch.einsum("bnd,bdl->bnl", q, keys)
        update = kmeans_update(logits.detach(), values)
        queries = queries + self.drop_path(self.update_norm(update))
        h = self.self_attn_norm(queries)
        queries = queries + self.drop_path(self.self_attn(h, h, h, need_weights=False)[0])
        queries = queries + self.drop_path(self.ffn(self.ffn_norm(queries)))
        return queries, logits
