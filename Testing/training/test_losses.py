import torch

from maxquery.network import MaxQueryNet, small_config
from maxquery_training.dataset import IGNORE_INDEX
from maxquery_training.losses import MaxQueryLoss, downsample_labels, query_distribution_loss, query_group_log_probs

GROUPS = (3, 2, 3)
CLASS_TO_GROUP = torch.tensor([0, 1, 2, 2])  # background, organ, two tumour types


def explicit_qd(responses, target):
    """Eq. 5-7 written out: sum M over each group, pick the group of the label, mean −log."""
    m = responses.softmax(dim=1)
    merged = torch.stack([m[:, :3].sum(1), m[:, 3:5].sum(1), m[:, 5:].sum(1)], dim=1)
    group = CLASS_TO_GROUP[target]
    picked = merged.gather(1, group[:, None])[:, 0]
    return -picked.log().mean()


def test_group_log_probs_are_a_distribution():
    r = torch.randn(2, 8, 3, 4, 5) * 5
    merged = query_group_log_probs(r, GROUPS).exp()
    assert merged.shape == (2, 3, 3, 4, 5)
    torch.testing.assert_close(merged.sum(1), torch.ones(2, 3, 4, 5))


def test_qd_loss_matches_equations_5_to_7():
    torch.manual_seed(0)
    r = torch.randn(2, 8, 4, 5, 6) * 3
    target = torch.randint(0, 4, (2, 4, 5, 6))
    torch.testing.assert_close(query_distribution_loss(r, target, GROUPS, CLASS_TO_GROUP), explicit_qd(r, target))


def test_qd_loss_is_low_when_groups_own_their_regions():
    target = torch.randint(0, 4, (1, 4, 4, 4))
    r = torch.full((1, 8, 4, 4, 4), -10.0)
    for cls, queries in ((0, slice(0, 3)), (1, slice(3, 5)), (2, slice(5, 8)), (3, slice(5, 8))):
        r[:, queries] = torch.where(target[:, None] == cls, 10.0, r[:, queries])
    wrong = r.roll(3, dims=1)
    assert query_distribution_loss(r, target, GROUPS, CLASS_TO_GROUP) < 1e-6
    assert query_distribution_loss(wrong, target, GROUPS, CLASS_TO_GROUP) > 5


def test_qd_loss_ignores_ood_voxels():
    r = torch.randn(1, 8, 2, 2, 2)
    target = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    with_ood = target.clone()
    with_ood[0, 0, 0, 0] = IGNORE_INDEX
    keep = torch.ones_like(target, dtype=torch.bool)
    keep[0, 0, 0, 0] = False
    expected = -query_group_log_probs(r, GROUPS)[:, 0][keep].mean()
    torch.testing.assert_close(query_distribution_loss(r, with_ood, GROUPS, CLASS_TO_GROUP), expected)


def test_downsample_labels_nearest():
    target = torch.arange(64).reshape(1, 4, 4, 4) % 4
    small = downsample_labels(target, (2, 2, 2))
    assert small.shape == (1, 2, 2, 2)
    assert set(small.unique().tolist()) <= set(target.unique().tolist())


def _net_and_batch():
    torch.manual_seed(0)
    cfg = small_config(4, features=(8, 16, 32), kernel_sizes=(3, 3, 3), strides=(1, 2, 2), kmax_levels=(2, 1),
                       query_dim=16, ffn_dim=16, num_queries=8, query_groups=GROUPS)
    net = MaxQueryNet(cfg).train()
    x = torch.randn(2, 1, 8, 16, 16)
    y = torch.randint(0, 4, (2, 8, 16, 16))
    return net, x, y


def test_total_loss_combines_seg_qd_and_deep_supervision():
    net, x, y = _net_and_batch()
    out = net(x)
    roles = ["background", "organ", "tumor", "tumor"]
    full = MaxQueryLoss(roles, GROUPS, qd_weight=0.1)(out, y)
    torch.testing.assert_close(full["loss"], full["seg"] + 0.1 * full["qd"])
    no_qd = MaxQueryLoss(roles, GROUPS, use_qd=False)(out, y)
    assert no_qd["qd"] == 0 and torch.isclose(no_qd["loss"], no_qd["seg"])
    final_only = MaxQueryLoss(roles, GROUPS, deep_supervision=False)(out, y)
    assert not torch.isclose(final_only["seg"], full["seg"])  # the auxiliary terms contribute
    full["loss"].backward()
    assert net.blocks[0].pixel_key[0].weight.grad.abs().sum() > 0  # assignment logits are supervised
