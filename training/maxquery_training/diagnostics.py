"""Query usage of a trained MaxQuery network over whole cases (``maxquery-evaluate``'s table).

Each preprocessed case is covered by patches of the training size (the last patch of an axis
aligned to the case's end; a case smaller than a patch padded with air, as inference does), and
every kMaX block's and the final R's argmax over queries is counted with ``QueryUsage``.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from maxquery.network import MaxQueryNet
from maxquery.query_usage import QueryUsage, stage_responses

from .dataset import PreprocessedCase


def _starts(size: int, patch: int) -> list[int]:
    if size <= patch:
        return [0]
    return sorted(set(list(range(0, size - patch, patch)) + [size - patch]))


def tiles(image: np.ndarray, patch: tuple[int, int, int], air: float):
    """Non-overlapping patches covering ``image`` (z, y, x); the last one per axis aligned to the end."""
    padded_shape = tuple(max(s, p) for s, p in zip(image.shape, patch))
    if padded_shape != image.shape:
        padded = np.full(padded_shape, air, np.float32)
        padded[tuple(slice(0, s) for s in image.shape)] = image
        image = padded
    for start in itertools.product(*(_starts(s, p) for s, p in zip(image.shape, patch))):
        yield image[tuple(slice(a, a + p) for a, p in zip(start, patch))]


@torch.no_grad()
def measure_query_usage(network: MaxQueryNet, cases: list[PreprocessedCase], patch: tuple[int, int, int],
                        air: float, device: torch.device) -> QueryUsage:
    network.eval().to(device)
    usage = QueryUsage.for_network(network.config.query_groups, len(network.blocks))
    for case in cases:
        for tile in tiles(case.image, patch, air):
            x = torch.from_numpy(np.ascontiguousarray(tile))[None, None].to(device)
            usage.update(stage_responses(network(x, with_aux=True)))
    return usage
