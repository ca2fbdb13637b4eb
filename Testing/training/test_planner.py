"""The training plan: strides, kernel sizes and patch from the spacing (nnU-Net v2's rules), every
bundled config checked before any preprocessing, and the plan recorded and kept."""

import json
from pathlib import Path

import pytest
import torch

from maxquery.model_folder import read_model_card
from maxquery.network import MaxQueryNet, NetworkConfig, PlainSegmentationNet
from maxquery_training import cli
from maxquery_training.config import CONFIG_DIR, load_config
from maxquery_training.distributed import DistInfo
from maxquery_training.export import build_card
from maxquery_training.pipeline import make_plan, read_plan
from maxquery_training.planner import plan_network, plan_topology

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "Resources" / "Models" / "maxquery-liver-demo"
PAPER_SPACING = (3.0, 0.76, 0.76)  # §4.2: patch 40×192×224 at 3 × 0.76 × 0.76 mm
# The spacing each bundled config is meant for: the paper's data, LiverBench (the bundled model's
# card) and the tests' 3 mm TotalSegmentator crop. A config without an entry fails the first test.
INTENDED_SPACING = {
    "paper": PAPER_SPACING,
    "cpu_demo": tuple(read_model_card(DEMO_MODEL).spacing_zyx),
    "tiny": (3.0, 3.0, 3.0),
}
ONE_PROCESS = DistInfo(0, 1, torch.device("cpu"))


def test_every_bundled_config_has_an_intended_spacing():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(INTENDED_SPACING)


@pytest.mark.parametrize("name", sorted(INTENDED_SPACING))
def test_bundled_config_builds_and_runs_at_its_spacing(name):
    """Plan, build both networks and run them: real numbers on a small input, full-size shapes on meta."""
    config = load_config(name)
    network, topology = plan_network(config, INTENDED_SPACING[name])
    patch = topology.patch_size_zyx
    network.check_patch_size(patch)
    level_shapes = [tuple(p // s for p, s in zip(patch, stride)) for stride in network.level_strides]
    assert min(level_shapes[-1]) >= config.min_feature_map_size
    # real numbers on the smallest input with 2×2×2 bottleneck voxels (the paper's patch is too big for CPU tests)
    small = tuple(2 * s for s in network.total_stride)
    torch.manual_seed(0)
    for model in (MaxQueryNet(network), PlainSegmentationNet(network)):
        with torch.no_grad():
            out = model.eval()(torch.randn(1, 1, *small))
        logits = out.logits if isinstance(model, MaxQueryNet) else out
        assert logits.shape == (1, network.num_classes, *small) and torch.isfinite(logits).all()
    meta = MaxQueryNet(network).to("meta").train()
    levels = meta.backbone(torch.empty(2, 1, *patch, device="meta"))
    assert [tuple(level.shape[2:]) for level in levels] == level_shapes
    out = meta(torch.empty(2, 1, *patch, device="meta"))
    assert out.logits.shape == (2, network.num_classes, *patch)
    assert out.query_responses.shape == (2, network.num_queries, *patch)
    assert len(out.aux) == len(network.kmax_levels)


def test_paper_config_is_the_papers_setting():
    """paper.yaml (§4.2): four kMaX blocks at output strides 32, 16, 8, 4; 8 heads; N = 32 in groups
    (16, 4, 12); drop path 0.2; patch 40×192×224; and at 3 × 0.76 × 0.76 mm nnU-Net's topology."""
    config = load_config("paper")
    network, topology = plan_network(config, PAPER_SPACING)
    assert topology.patch_size_zyx == (40, 192, 224)  # already a multiple of the planned stride
    assert topology.strides == ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))
    assert topology.kernel_sizes == ((1, 3, 3),) + ((3, 3, 3),) * 5
    assert network.total_stride == (8, 32, 32)
    assert network.kmax_output_strides == (32, 16, 8, 4)
    assert network.level_strides[5] == (8, 32, 32) and network.level_strides[2] == (2, 4, 4)
    assert (network.num_queries, network.query_groups, network.num_heads) == (32, (16, 4, 12), 8)
    assert network.drop_path == pytest.approx(0.2)
    net = MaxQueryNet(network)
    assert len(net.blocks) == 4 and all(block.self_attn.num_heads == 8 for block in net.blocks)
    assert net.backbone.encoder[0][0][0].kernel_size == (1, 3, 3)  # in-plane only at 3 mm z
    assert net.backbone.encoder[5][0][0].stride == (1, 2, 2)  # z no longer pooled at the bottleneck
    rates = [block.drop_path.prob for block in net.blocks]
    assert rates[-1] == pytest.approx(0.2) and rates == sorted(rates)


def test_cpu_demo_plans_the_bundled_models_architecture():
    config = load_config("cpu_demo")
    card = read_model_card(DEMO_MODEL)
    network, topology = plan_network(config, card.spacing_zyx)
    assert network.strides == ((1, 1, 1),) + ((2, 2, 2),) * 4 and network.kernel_sizes == ((3, 3, 3),) * 5
    architecture = ("features", "strides", "kernel_sizes", "kmax_levels", "num_queries", "query_dim", "ffn_dim")
    assert {k: getattr(network, k) for k in architecture} == {k: getattr(card.network, k) for k in architecture}
    assert topology.patch_size_zyx == card.patch_size_zyx


def test_coarse_axis_waits_until_the_others_catch_up():
    """5 mm slices at 0.7 mm in-plane: two in-plane-only stages (kernel 1 along z), then z joins."""
    topology = plan_topology((5.0, 0.7, 0.7), (32, 256, 256), 6)
    assert topology.strides == ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert topology.kernel_sizes == ((1, 3, 3), (1, 3, 3)) + ((3, 3, 3),) * 4


def test_small_feature_maps_stop_pooling_and_the_patch_is_padded():
    # z reaches the minimum first and stops; y and x go on
    assert plan_topology((1.0, 1.0, 1.0), (16, 64, 64), 5).strides == \
        ((1, 1, 1), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2))
    # an odd size is pooled with ceil (nnU-Net) and the patch padded up to the total stride
    assert plan_topology((3.0, 3.0, 3.0), (36, 80, 80), 5, min_feature_map_size=2).patch_size_zyx == (48, 80, 80)
    # a single axis is pooled alone only while it stays 3x the minimum (nnU-Net's rule)
    assert plan_topology((1.0, 1.0, 1.0), (4, 4, 12), 2).strides == ((1, 1, 1), (1, 1, 2))
    with pytest.raises(ValueError, match=r"allows only 0 downsampling"):
        plan_topology((1.0, 1.0, 1.0), (4, 4, 8), 2)


def test_too_small_a_patch_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match=r"\[8, 8, 8\].*only 1 downsampling.*3 stages.*enlarge the patch"):
        plan_network(load_config("tiny", {"patch_size_zyx": [8, 8, 8]}), (3.0, 3.0, 3.0))


def test_strides_in_the_config_are_refused():
    config = load_config("tiny", {"network.strides": [1, 2, 2]})
    with pytest.raises(ValueError, match="network.strides is planned from the data's spacing"):
        plan_network(config, (3.0, 3.0, 3.0))


def test_a_bad_patch_stops_training_before_any_preprocessing(tiny_msd, tmp_path, capsys):
    work = tmp_path / "work"
    assert cli.main(["train", "--config", "tiny", "--data", str(tiny_msd), "--work", str(work),
                     "--set", "patch_size_zyx=[4, 8, 8]"]) == 2
    assert "patch_size_zyx [4, 8, 8]" in capsys.readouterr().err
    assert not work.exists()  # no plan, no cache


def test_plan_is_recorded_kept_and_checked(tiny_msd, tmp_path):
    config = load_config("tiny")
    plan = make_plan(config, tiny_msd, tmp_path, ONE_PROCESS)
    recorded = json.loads((tmp_path / "plan.json").read_text())
    assert recorded["spacing_zyx"] == [3.0, 3.0, 3.0]  # the median from the headers
    assert recorded["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2]] and recorded["patch_size_zyx"] == [16, 32, 32]
    assert recorded["kmax_output_strides"] == [4, 2]
    card = build_card(config, plan, "stage2", {})
    assert card.network == plan.network and card.patch_size_zyx == (16, 32, 32)
    assert card.foreground_values == config.data.foreground_values == [1, 2, 3, 4]
    # a plan.json from before planning (no topology) is completed, its spacing and normalisation kept
    old = {"spacing_zyx": recorded["spacing_zyx"], "normalization": recorded["normalization"]}
    (tmp_path / "plan.json").write_text(json.dumps(old))
    assert read_plan(tmp_path, config) == plan
    assert make_plan(config, tiny_msd, tmp_path, ONE_PROCESS) == plan
    assert json.loads((tmp_path / "plan.json").read_text()) == recorded
    # a config that now plans otherwise is refused, not silently mixed with the recorded run
    with pytest.raises(ValueError, match="was planned as"):
        make_plan(load_config("tiny", {"patch_size_zyx": [8, 32, 32]}), tiny_msd, tmp_path, ONE_PROCESS)


def test_network_config_refuses_kernels_that_change_the_size():
    network, _ = plan_network(load_config("tiny"), (3.0, 3.0, 3.0))
    with pytest.raises(ValueError, match="must be odd"):
        NetworkConfig.from_dict({**network.to_dict(), "kernel_sizes": [[1, 2, 2], 3, 3]})
