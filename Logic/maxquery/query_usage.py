"""Which queries win voxels: the health check of a mask transformer's clusters.

MaxQuery measures how far a voxel lies from the cluster centre it is assigned to; that only works
when the queries of every group (background, organ, tumour; paper Eq. 5) are cluster centres that
some voxels actually choose. ``QueryUsage`` counts, for every kMaX block and for the final R, how
many voxels each query wins (argmax over queries), accumulated over patches or cases, and
summarises it per query group: how many of the group's queries win any voxel and the share of
voxels the group wins. A group whose queries win nothing is a failed training run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

GROUP_NAMES = ("background", "organ", "tumour")


@dataclass
class QueryUsage:
    groups: tuple[int, int, int]
    stages: list[str]
    wins: np.ndarray = field(default=None)  # (stages, N) voxels won per query

    def __post_init__(self) -> None:
        if self.wins is None:
            self.wins = np.zeros((len(self.stages), sum(self.groups)), np.int64)

    @classmethod
    def for_network(cls, groups: Sequence[int], num_blocks: int) -> "QueryUsage":
        """Stages named ``block1`` … ``blockK`` (coarse to fine) and ``final``."""
        return cls(tuple(int(g) for g in groups), [f"block{i + 1}" for i in range(num_blocks)] + ["final"])

    def update(self, stage_responses: Sequence[torch.Tensor]) -> None:
        """Add one prediction: the responses (B, N, *S) of every stage, in ``stages`` order."""
        if len(stage_responses) != len(self.stages):
            raise ValueError(f"expected responses of {len(self.stages)} stages, got {len(stage_responses)}")
        n = self.wins.shape[1]
        for row, responses in zip(self.wins, stage_responses):
            winners = responses.detach().argmax(dim=1).flatten()
            row += torch.bincount(winners, minlength=n).cpu().numpy()

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """{stage: {group: {"queries_used", "queries", "voxel_share"}}}."""
        bounds = np.cumsum((0,) + self.groups)
        out = {}
        for stage, row in zip(self.stages, self.wins):
            total = max(int(row.sum()), 1)
            out[stage] = {
                name: {"queries_used": int((row[lo:hi] > 0).sum()), "queries": int(hi - lo),
                       "voxel_share": float(row[lo:hi].sum() / total)}
                for name, lo, hi in zip(GROUP_NAMES, bounds[:-1], bounds[1:])
            }
        return out

    def unused_groups(self) -> list[str]:
        """``stage/group`` for every group none of whose queries wins a voxel."""
        return [f"{stage}/{group}" for stage, groups in self.summary().items()
                for group, row in groups.items() if row["queries_used"] == 0]

    def table(self) -> str:
        """A Markdown table: queries used / queries and voxel share (%) per stage and group."""
        lines = ["| stage | " + " | ".join(GROUP_NAMES) + " |", "|---|" + "---|" * len(GROUP_NAMES)]
        for stage, groups in self.summary().items():
            cells = [f"{g['queries_used']}/{g['queries']} ({100 * g['voxel_share']:.1f} %)" for g in groups.values()]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def stage_responses(output) -> list[torch.Tensor]:
    """The responses of every kMaX block (``output.aux``, coarse to fine) and the final R."""
    return [aux.query_responses for aux in output.aux] + [output.query_responses]
