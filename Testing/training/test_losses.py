import torch

from maxquery.network import MaxQueryNet, small_config
from maxquery_training.dataset import IGNORE_INDEX
from monai.losses import DiceCELoss

from maxquery_training.losses import MaxQueryLoss, SegmentationLoss, query_distribution_loss, query_group_log_probs

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


def test_segmentation_loss_equals_monai_dice_ce():
    """An independent reference: MONAI's DiceCELoss with nnU-Net's settings (batch Dice, no background)."""
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 6, 7, 8) * 3
    target = torch.randint(0, 4, (2, 6, 7, 8))
    reference = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                           smooth_nr=1e-5, smooth_dr=1e-5)(logits, target[:, None])
    torch.testing.assert_close(SegmentationLoss()(logits, target), reference, rtol=1e-5, atol=1e-5)


def test_segmentation_loss_ignores_ood_voxels():
    """An ignored voxel neither counts as background nor changes the loss, whatever is predicted there."""
    torch.manual_seed(2)
    logits = torch.randn(1, 4, 4, 4, 4)
    target = torch.randint(1, 4, (1, 4, 4, 4))
    target[0, 0, 0, 0] = IGNORE_INDEX
    loss = SegmentationLoss()(logits, target)
    changed = logits.clone()
    changed[0, :, 0, 0, 0] = torch.tensor([9.0, -9.0, -9.0, -9.0])  # confident background there
    torch.testing.assert_close(SegmentationLoss()(changed, target), loss)
    as_background = torch.where(target == IGNORE_INDEX, torch.zeros_like(target), target)
    assert not torch.isclose(SegmentationLoss()(changed, as_background), loss)


def test_deep_supervision_sees_a_tumour_smaller_than_the_block_grid():
    """kMaX's auxiliary loss at full resolution: a 1-voxel tumour changes every block's term
    (on the block's own stride-4 grid it would vanish)."""
    net, x, y = _net_and_batch()
    roles = ["background", "organ", "tumor", "tumor"]
    loss = MaxQueryLoss(roles, GROUPS, qd_weight=0.1)
    y = torch.ones_like(y)
    with_tumour = y.clone()
    with_tumour[0, 3, 5, 6] = 2
    with torch.no_grad():
        out = net(x)
        for aux in out.aux:
            seg_a, qd_a = loss._term(aux.at(y.shape[1:]), y)
            seg_b, qd_b = loss._term(aux.at(y.shape[1:]), with_tumour)
            assert not torch.isclose(seg_a, seg_b) and not torch.isclose(qd_a, qd_b)


def _net_and_batch():
    torch.manual_seed(0)
    cfg = small_config(4, features=(8, 16, 32), kernel_sizes=(3, 3, 3), strides=(1, 2, 2), kmax_levels=(2, 1),
                       query_dim=16, ffn_dim=16, num_queries=8, query_groups=GROUPS)
    net = MaxQueryNet(cfg).train()
    x = torch.randn(2, 1, 8, 16, 16)
    y = torch.randint(0, 4, (2, 8, 16, 16))
    return net, x, y


def test_qd_term_pulls_tumour_voxels_to_the_tumour_queries():
    """Eq. 7 at work: a few steps with the QD loss give the tumour group a larger share of the
    tumour voxels than the same steps without it."""
    roles = ["background", "organ", "tumor", "tumor"]

    def tumour_share_after_training(use_qd: bool) -> float:
        net, _, y = _net_and_batch()
        x = y[:, None].float() + 0.1 * torch.randn(y[:, None].shape)  # labels learnable from the image
        loss_fn = MaxQueryLoss(roles, GROUPS, qd_weight=1.0, use_qd=use_qd)
        optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(10):
            optimiser.zero_grad()
            loss_fn(net(x), y)["loss"].backward()
            optimiser.step()
        with torch.no_grad():
            m = net.eval()(x).assignments
        return float(m[:, 5:].sum(1)[y >= 2].mean())

    assert tumour_share_after_training(True) > tumour_share_after_training(False) + 0.1


def test_deep_supervision_and_qd_switches():
    net, x, y = _net_and_batch()
    out = net(x)
    roles = ["background", "organ", "tumor", "tumor"]
    full = MaxQueryLoss(roles, GROUPS, qd_weight=0.1)(out, y)
    no_qd = MaxQueryLoss(roles, GROUPS, use_qd=False)(out, y)
    assert no_qd["qd"] == 0 and torch.isclose(no_qd["loss"], no_qd["seg"])
    assert not torch.isclose(full["loss"], no_qd["loss"])
    final_only = MaxQueryLoss(roles, GROUPS, deep_supervision=False)(out, y)
    assert not torch.isclose(final_only["seg"], full["seg"])  # the auxiliary terms contribute
    full["loss"].backward()
    assert net.blocks[0].pixel_key[0].weight.grad.abs().sum() > 0  # assignment logits are supervised
