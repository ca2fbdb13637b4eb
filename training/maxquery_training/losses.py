"""Losses of paper §3.2: CE + Dice on Z, the query-distribution (QD) loss, deep supervision.

Voxels labelled ``IGNORE_INDEX`` (unseen-type lesions, which may only occur in test labels) take
part in no term: not in CE, not in Dice, not in QD.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from maxquery.network import MaskPrediction, MaxQueryOutput

from .dataset import IGNORE_INDEX


def query_group_log_probs(responses: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
    """log M̃ (Eq. 5): log of the summed assignments of each query group, from R, stably.

    ``responses`` is (B, N, *S); the result is (B, len(groups), *S) and its exp sums to 1.
    """
    log_m = responses.float().log_softmax(dim=1)
    return torch.stack([chunk.logsumexp(dim=1) for chunk in log_m.split(list(groups), dim=1)], dim=1)


def query_distribution_loss(
    responses: torch.Tensor, target: torch.Tensor, groups: Sequence[int], class_to_group: torch.Tensor
) -> torch.Tensor:
    """Eq. 7: NLL between merged assignments M̃ and merged labels G̃ (background/organ/tumour).

    The paper sums over voxels; here it is averaged, which only rescales λ by the patch size and
    keeps λ = 0.1 meaningful for any patch. ``class_to_group`` maps class index → group index.
    """
    valid = target != IGNORE_INDEX
    group_target = class_to_group[torch.where(valid, target, torch.zeros_like(target))]
    log_probs = query_group_log_probs(responses, groups)
    loss = F.nll_loss(log_probs, group_target, reduction="none")
    return (loss * valid).sum() / valid.sum().clamp(min=1)


class SegmentationLoss(nn.Module):
    """CE + soft Dice as nnU-Net: batch Dice over the foreground classes, computed in fp32."""

    def __init__(self, smooth: float = 1e-5) -> None:
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        valid = target != IGNORE_INDEX
        ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
        probs = logits.softmax(dim=1) * valid.unsqueeze(1)
        onehot = F.one_hot(torch.where(valid, target, torch.zeros_like(target)), logits.shape[1])
        onehot = onehot.movedim(-1, 1).to(probs.dtype) * valid.unsqueeze(1)
        axes = [0] + list(range(2, logits.ndim))  # batch Dice: sums over the batch and space
        intersection = (probs * onehot).sum(axes)[1:]
        denominator = (probs.sum(axes) + onehot.sum(axes))[1:]
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth)
        return ce + (1 - dice).mean()


class MaxQueryLoss(nn.Module):
    """L = L_seg + λ·L_qd (Eq. 8) on the final prediction and, with deep supervision, on every
    kMaX block's auxiliary prediction upsampled to the label grid (kMaX-DeepLab's auxiliary loss),
    with nnU-Net's halving weights (finest first), normalised."""

    def __init__(
        self, class_roles: Sequence[str], groups: Sequence[int], qd_weight: float = 0.1,
        use_qd: bool = True, deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        self.seg = SegmentationLoss()
        self.groups = tuple(groups)
        self.qd_weight = qd_weight if use_qd else 0.0
        self.deep_supervision = deep_supervision
        group_of_role = {"background": 0, "organ": 1, "tumor": 2}
        self.register_buffer("class_to_group", torch.tensor([group_of_role[r] for r in class_roles]))

    def _term(self, prediction: MaskPrediction, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seg = self.seg(prediction.logits, target)
        if self.qd_weight == 0.0:
            return seg, seg.new_zeros(())
        return seg, query_distribution_loss(prediction.query_responses, target, self.groups, self.class_to_group)

    def forward(self, output: MaxQueryOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        shape = tuple(target.shape[1:])
        aux = [a.at(shape) for a in reversed(output.aux)] if self.deep_supervision else []
        predictions = [output] + aux
        weights = torch.tensor([0.5**i for i in range(len(predictions))])
        weights = weights / weights.sum()
        seg_total, qd_total = 0.0, 0.0
        for weight, prediction in zip(weights.tolist(), predictions):
            seg, qd = self._term(prediction, target)
            seg_total = seg_total + weight * seg
            qd_total = qd_total + weight * qd
        total = seg_total + self.qd_weight * qd_total
        return {"loss": total, "seg": seg_total.detach(), "qd": torch.as_tensor(qd_total).detach()}
