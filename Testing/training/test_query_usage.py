"""The query-usage diagnostic: counts per stage and group, and whole-case tiling."""

import numpy as np
import torch

from maxquery.network import MaxQueryNet, small_config
from maxquery.query_usage import QueryUsage
from maxquery_training.dataset import PreprocessedCase
from maxquery_training.diagnostics import measure_query_usage, tiles


def test_usage_counts_winners_per_group():
    usage = QueryUsage.for_network((2, 1, 1), num_blocks=1)
    block = torch.zeros(1, 4, 2, 2, 2)
    block[:, 0] = 1.0  # query 0 (background group) wins all 8 voxels
    final = torch.zeros(1, 4, 2, 2, 2)
    final[:, 3, 0] = 1.0  # query 3 (tumour) wins 4 voxels
    final[:, 2, 1] = 1.0  # query 2 (organ) wins the other 4
    usage.update([block, final])
    summary = usage.summary()
    assert summary["block1"]["background"] == {"queries_used": 1, "queries": 2, "voxel_share": 1.0}
    assert summary["block1"]["tumour"]["queries_used"] == 0
    assert summary["final"]["organ"]["voxel_share"] == 0.5 and summary["final"]["tumour"]["queries_used"] == 1
    assert usage.unused_groups() == ["block1/organ", "block1/tumour", "final/background"]
    assert "| block1 | 1/2 (100.0 %) | 0/1 (0.0 %) | 0/1 (0.0 %) |" in usage.table()


def test_tiles_cover_the_case_and_pad_small_cases_with_air():
    image = np.arange(10 * 7 * 5, dtype=np.float32).reshape(10, 7, 5)
    patches = list(tiles(image, (4, 8, 5), air=-9.0))
    assert len(patches) == 3 and all(p.shape == (4, 8, 5) for p in patches)  # z starts 0, 4, 6
    assert (patches[0][:, 7] == -9.0).all()  # y padded with air
    covered = np.concatenate([p[:, :7] for p in patches]).ravel()
    assert set(image.ravel()) <= set(covered)


def test_measure_query_usage_counts_every_voxel_of_every_stage():
    torch.manual_seed(0)
    net = MaxQueryNet(small_config(3, features=(8, 16, 16), kernel_sizes=(3, 3, 3), strides=(1, 2, 2),
                                   kmax_levels=(2, 1), query_dim=16, ffn_dim=16, num_queries=8,
                                   query_groups=(4, 2, 2)))
    case = PreprocessedCase("c", np.random.default_rng(0).normal(size=(8, 20, 16)).astype(np.float32), None, {})
    usage = measure_query_usage(net, [case], (8, 16, 16), air=-2.0, device=torch.device("cpu"))
    # two tiles of 8×16×16: block grids at stride 4 and 2, final at full resolution
    assert usage.wins.sum(axis=1).tolist() == [2 * 2 * 4 * 4, 2 * 4 * 8 * 8, 2 * 8 * 16 * 16]
