"""The MaxQuery network against the paper's equations (Eq. 2-4, §4.2), on tiny configurations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maxquery.network import (
    KMaXBlock, MaxQueryNet, NetworkConfig, PlainSegmentationNet, build_network, combine, kmeans_update,
    small_config,
)
from maxquery.network.kmax import DropPath

torch.set_num_threads(1)


def tiny(num_classes: int = 3, **overrides) -> NetworkConfig:
    settings = dict(features=(8, 16, 16, 24, 24), query_dim=32, ffn_dim=64, num_heads=8)
    settings.update(overrides)
    return small_config(num_classes, **settings)


ANISO = dict(
    strides=((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
    kernel_sizes=((1, 3, 3), (1, 3, 3), 3, 3, 3),
)


def level_shape(config: NetworkConfig, patch, level: int) -> tuple[int, ...]:
    shape = list(patch)
    for stride in config.strides[: level + 1]:
        shape = [s // st for s, st in zip(shape, stride)]
    return tuple(shape)


def explicit_kmeans(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Loop over batches and clusters: the sum of the pixels whose best cluster is n, 0 if none."""
    batch, n_clusters, n_pixels = logits.shape
    centres = torch.zeros(batch, n_clusters, values.shape[-1], dtype=values.dtype)
    for b in range(batch):
        for n in range(n_clusters):
            members = [i for i in range(n_pixels) if int(torch.argmax(logits[b, :, i])) == n]
            if members:
                centres[b, n] = values[b, members].sum(dim=0)
    return centres


# ---------------------------------------------------------------- argmax cross-attention (Eq. 2)


def test_kmeans_update_equals_explicit_centre_update_with_an_empty_cluster():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 23, generator=gen, dtype=torch.float64)
    logits[:, 3] = -100.0  # cluster 3 wins no pixel: its centre must be 0
    values = torch.randn(2, 23, 7, generator=gen, dtype=torch.float64)
    expected = explicit_kmeans(logits, values)
    got = kmeans_update(logits, values)
    assert got.shape == (2, 5, 7)
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(got[:, 3]) == 0
    # A hard assignment, not a softmax-weighted one: changing a losing logit changes nothing.
    shifted = logits.clone()
    shifted[logits != logits.amax(dim=1, keepdim=True)] -= 0.5
    torch.testing.assert_close(kmeans_update(shifted, values), got, rtol=0, atol=0)


def test_kmeans_update_toy_example_by_hand():
    # 4 pixels with 1-D values 1, 2, 3, 10; clusters: {0, 1} -> 0, {3} -> 1, cluster 2 empty.
    logits = torch.tensor([[[5.0, 5.0, 4.0, 0.0], [0.0, 1.0, 5.0, 9.0], [-1.0, -1.0, -1.0, -1.0]]])
    values = torch.tensor([[[1.0], [2.0], [3.0], [10.0]]])
    got = kmeans_update(logits, values)
    torch.testing.assert_close(got, torch.tensor([[[3.0], [13.0], [0.0]]]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kmeans_update_is_fp32_for_half_precision_values(dtype):
    """30 000 voxels of value 3 sum to 90 000: above fp16's 65 504 and beyond bf16's exact range."""
    values = torch.full((1, 30_000, 2), 3.0, dtype=dtype)
    logits = torch.zeros(1, 4, 30_000, dtype=dtype)
    logits[:, 1] = 1.0
    got = kmeans_update(logits, values)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[0, 1], torch.tensor([90_000.0, 90_000.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kmax_block_stays_finite_under_autocast(dtype):
    """A big cluster at a fine level under autocast: no inf in the update, no NaN after the norms."""
    torch.manual_seed(2)
    block = KMaXBlock(pixel_channels=4, dim=16, num_heads=8, ffn_dim=32, drop_path=0.0)
    torch.nn.init.ones_(block.update_scale.norm.weight)  # as after training: the update matters
    pixels = torch.full((1, 4, 20, 40, 40), 3.0) + 0.01 * torch.randn(1, 4, 20, 40, 40)
    with torch.autocast("cpu", dtype=dtype), torch.no_grad():
        queries, logits = block(torch.randn(1, 5, 16), pixels)
    assert torch.isfinite(queries).all()


def test_kmax_block_starts_as_identity_for_the_kmeans_update():
    """kMaX: the update's last normalisation has a zero scale at initialisation."""
    block = KMaXBlock(pixel_channels=6, dim=16, num_heads=8, ffn_dim=32, drop_path=0.0)
    update = block.update_scale(block.update_proj(block.update_norm(torch.randn(2, 5, 16))))
    assert torch.count_nonzero(update) == 0


def test_kmax_block_update_is_the_explicit_kmeans_step():
    torch.manual_seed(1)
    block = KMaXBlock(pixel_channels=6, dim=16, num_heads=8, ffn_dim=32, drop_path=0.0).eval()
    torch.nn.init.normal_(block.update_scale.norm.weight)  # a trained block: the update is not zero
    queries = torch.randn(2, 5, 16)
    pixels = torch.randn(2, 6, 3, 4, 5)
    with torch.no_grad():
        out, logits = block(queries, pixels)
        keys = block.pixel_key(pixels).flatten(2)
        values = block.pixel_value(pixels).flatten(2).transpose(1, 2)
        q = block.query_proj(block.query_norm(queries))
        expected_logits = torch.stack([q[b] @ keys[b] for b in range(2)])
        sums = explicit_kmeans(expected_logits, values)
        # Eq. 2: C <- C + argmax_N(Q Kᵀ) V, normalised per channel across the queries as kMaX does
        def across_queries(x, norm):
            mean = x.mean(dim=1, keepdim=True)
            var = x.var(dim=1, unbiased=False, keepdim=True)
            return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
        update = across_queries(sums, block.update_norm.norm)
        update = across_queries(update @ block.update_proj.weight.T, block.update_scale.norm)
        assert update.abs().sum() > 0
        expected = queries + update
        h = block.self_attn_norm(expected)
        expected = expected + block.self_attn(h, h, h, need_weights=False)[0]
        expected = expected + block.ffn(block.ffn_norm(expected))
    assert logits.shape == (2, 5, 60)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- heads (Eq. 3-4) and §4.2


def _captured_forward(net: MaxQueryNet, x: torch.Tensor):
    seen = {}
    hooks = [
        net.final_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("queries", o)),
        net.pixel_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("pixels", o)),
    ]
    try:
        out = net(x)  # with autograd on: the reference path (explicit InstanceNorm, full M)
    finally:
        for hook in hooks:
            hook.remove()
    out.logits, out.query_responses = out.logits.detach(), out.query_responses.detach()
    out.class_logits = out.class_logits.detach()
    return out, {key: value.detach() for key, value in seen.items()}


def test_responses_assignments_and_logits_follow_eq_3_and_4():
    torch.manual_seed(2)
    config = tiny(num_classes=3)
    net = MaxQueryNet(config).eval()
    x = torch.randn(2, 1, 16, 32, 32)
    out, seen = _captured_forward(net, x)
    n_queries = config.num_queries

    # LayerNorm at the end of the transformer decoder, InstanceNorm on the pixel features P (§4.2).
    queries, pixels = seen["queries"], seen["pixels"]
    torch.testing.assert_close(queries.mean(-1), torch.zeros(2, n_queries), atol=1e-5, rtol=0)
    flat = pixels.flatten(2)
    torch.testing.assert_close(flat.mean(-1), torch.zeros(flat.shape[:2]), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat.var(-1, unbiased=False), torch.ones(flat.shape[:2]), atol=1e-2, rtol=0)

    # R = C·Pᵀ with C the mask embeddings of the final queries.
    with torch.no_grad():
        c = net.mask_embed(queries)
    r_hand = torch.zeros_like(out.query_responses)
    for n in range(n_queries):
        r_hand[:, n] = (c[:, n, :, None, None, None] * pixels).sum(dim=1)
    torch.testing.assert_close(out.query_responses, r_hand, rtol=1e-4, atol=1e-4)

    # M = softmax over queries sums to 1 everywhere; Z = C_Kᵀ·M by an explicit sum over queries.
    m = out.assignments
    torch.testing.assert_close(m.sum(dim=1), torch.ones(2, 16, 32, 32), rtol=0, atol=1e-5)
    exp_r = torch.exp(out.query_responses - out.query_responses.amax(dim=1, keepdim=True))
    m_hand = exp_r / exp_r.sum(dim=1, keepdim=True)
    torch.testing.assert_close(m, m_hand, rtol=1e-5, atol=1e-6)
    z_hand = torch.zeros_like(out.logits)
    for k in range(config.num_classes):
        for n in range(n_queries):
            z_hand[:, k] += out.class_logits[:, n, k, None, None, None] * m_hand[:, n]
    assert out.class_logits.shape == (2, n_queries, config.num_classes)
    torch.testing.assert_close(out.logits, z_hand, rtol=1e-5, atol=1e-5)
    # For each voxel, Z is a convex combination of the query class rows: within their range.
    lo = out.class_logits.amin(dim=1)[:, :, None, None, None]
    hi = out.class_logits.amax(dim=1)[:, :, None, None, None]
    assert bool(((out.logits >= lo - 1e-5) & (out.logits <= hi + 1e-5)).all())


def test_combine_equals_hand_computation():
    gen = torch.Generator().manual_seed(3)
    class_logits = torch.randn(1, 4, 2, generator=gen)
    responses = torch.randn(1, 4, 3, 5, generator=gen)
    m = torch.exp(responses) / torch.exp(responses).sum(dim=1, keepdim=True)
    expected = torch.stack([(class_logits[0, :, k, None, None] * m[0]).sum(0) for k in range(2)])[None]
    torch.testing.assert_close(combine(class_logits, responses), expected, rtol=1e-6, atol=1e-6)


def test_aux_prediction_pairs_assignment_and_classes_of_the_same_queries():
    """kMaX deep supervision: a block's class logits come from the queries that made its assignment."""
    torch.manual_seed(4)
    net = MaxQueryNet(tiny(drop_path=0.0)).eval()
    incoming = []
    hooks = [b.register_forward_pre_hook(lambda m, args: incoming.append(args[0])) for b in net.blocks]
    with torch.no_grad():
        out = net(torch.randn(1, 1, 16, 32, 32), with_aux=True)
    for hook in hooks:
        hook.remove()
    assert len(out.aux) == len(net.blocks)
    for queries, head, aux in zip(incoming, net.aux_class_heads, out.aux):
        torch.testing.assert_close(aux.class_logits, head(queries), rtol=1e-5, atol=1e-5)


def test_aux_prediction_is_upsampled_to_the_label_grid():
    """kMaX's auxiliary loss: R of a block is upsampled (trilinear) before Z = C_Kᵀ·softmax_N(R)."""
    torch.manual_seed(3)
    net = MaxQueryNet(tiny(drop_path=0.0)).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 16, 32, 32), with_aux=True)
        coarse = out.aux[0]
        fine = coarse.at((16, 32, 32))
        expected_r = F.interpolate(coarse.query_responses, size=(16, 32, 32), mode="trilinear", align_corners=False)
    assert fine.logits.shape == (1, 3, 16, 32, 32)
    torch.testing.assert_close(fine.query_responses, expected_r)
    torch.testing.assert_close(fine.logits, combine(coarse.class_logits, expected_r))


def test_gradients_reach_backbone_queries_and_key_projections_through_deep_supervision():
    torch.manual_seed(5)
    config = tiny(num_classes=3, drop_path=0.0)
    net = MaxQueryNet(config).train()
    for block in net.blocks:  # past the first step: the update's zero-initialised scale has moved
        torch.nn.init.constant_(block.update_scale.norm.weight, 0.5)
    x = torch.randn(2, 1, 16, 32, 32)
    out = net(x)
    assert len(out.aux) == len(config.kmax_levels)
    target = torch.randint(0, 3, (2, 16, 32, 32))
    loss = F.cross_entropy(out.logits, target)
    for aux in out.aux:
        loss = loss + F.cross_entropy(aux.at(target.shape[1:]).logits, target)
    loss.backward()

    def nonzero(param):
        return param.grad is not None and float(param.grad.abs().sum()) > 0

    assert nonzero(net.backbone.encoder[0][0][0].weight), "no gradient at the backbone's first conv"
    assert nonzero(net.queries), "no gradient at the learnable queries"
    for i, block in enumerate(net.blocks):
        assert nonzero(block.pixel_key[0].weight), f"kMaX block {i}: no gradient at the key projection"
        assert nonzero(block.query_proj.weight), f"kMaX block {i}: no gradient at the query projection"
        assert nonzero(block.pixel_value.weight), f"kMaX block {i}: no gradient at the value projection"


def test_argmax_assignment_has_no_gradient_without_deep_supervision():
    """The keys only enter through the argmax: without the aux loss they must receive no gradient."""
    torch.manual_seed(6)
    net = MaxQueryNet(tiny(drop_path=0.0)).train()
    out = net(torch.randn(1, 1, 16, 32, 32), with_aux=False)
    assert out.aux == []
    out.logits.square().mean().backward()
    for block in net.blocks:
        grad = block.pixel_key[0].weight.grad
        assert grad is None or float(grad.abs().sum()) == 0.0
    assert float(net.queries.grad.abs().sum()) > 0


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "overrides, patch",
    [({}, (16, 32, 32)), (ANISO, (8, 32, 48))],
    ids=["isotropic", "anisotropic"],
)
def test_output_shapes_and_aux_resolutions(overrides, patch):
    torch.manual_seed(7)
    config = tiny(num_classes=4, **overrides)
    net = MaxQueryNet(config).train()
    with torch.no_grad():
        out = net(torch.randn(2, 1, *patch))
    assert out.logits.shape == (2, 4, *patch)
    assert out.query_responses.shape == (2, config.num_queries, *patch)
    assert out.assignments.shape == (2, config.num_queries, *patch)
    assert out.class_logits.shape == (2, config.num_queries, 4)
    assert [a.query_responses.shape[2:] for a in out.aux] == [level_shape(config, patch, lv)
                                                              for lv in config.kmax_levels]
    for aux in out.aux:
        assert aux.class_logits.shape == (2, config.num_queries, 4)
        assert aux.query_responses.shape[:2] == (2, config.num_queries)
        assert aux.at(patch).logits.shape == (2, 4, *patch)


def test_anisotropic_levels_are_really_anisotropic():
    config = tiny(**ANISO)
    assert config.total_stride == (4, 16, 16)
    assert level_shape(config, (8, 32, 48), 2) == (8, 8, 12)
    net = MaxQueryNet(config)
    assert net.backbone.encoder[0][0][0].kernel_size == (1, 3, 3)
    assert net.backbone.encoder[1][0][0].stride == (1, 2, 2)


def test_eval_mode_skips_aux_unless_asked():
    net = MaxQueryNet(tiny())
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        assert len(net.train()(x).aux) == len(net.blocks)
        assert net.eval()(x).aux == []
        assert len(net(x, with_aux=True).aux) == len(net.blocks)
        assert net.train()(x, with_aux=False).aux == []


def test_plain_segmentation_net_output_shape():
    for overrides, patch in (({}, (16, 32, 32)), (ANISO, (8, 32, 48))):
        net = build_network("plain", tiny(num_classes=5, **overrides)).eval()
        assert isinstance(net, PlainSegmentationNet)
        with torch.no_grad():
            assert net(torch.randn(2, 1, *patch)).shape == (2, 5, *patch)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_network("unet3000", tiny())


# ---------------------------------------------------------------- drop path


def test_drop_path_only_in_training():
    torch.manual_seed(8)
    layer = DropPath(0.5)
    x = torch.ones(400, 3, 2)
    assert torch.equal(layer.eval()(x), x)
    y = layer.train()(x)
    per_sample = y[:, 0, 0]
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and rescaled by 1/keep
    assert torch.all(y == per_sample[:, None, None])  # whole sample dropped at once
    assert 0.35 < float((per_sample == 0).float().mean()) < 0.65


def test_network_is_deterministic_in_eval_and_stochastic_in_training_with_drop_path():
    torch.manual_seed(9)
    x = torch.randn(2, 1, 16, 32, 32)
    net = MaxQueryNet(tiny(drop_path=0.9))
    with torch.no_grad():
        net.eval()
        torch.testing.assert_close(net(x).logits, net(x).logits, rtol=0, atol=0)
        net.train()
        outputs = [net(x).logits for _ in range(4)]
    assert any(not torch.allclose(outputs[0], o) for o in outputs[1:])
    no_drop = MaxQueryNet(tiny(drop_path=0.0)).train()
    with torch.no_grad():
        torch.testing.assert_close(no_drop(x).logits, no_drop(x).logits, rtol=0, atol=0)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(query_groups=(16, 4, 11)), "query_groups"),
        (dict(num_queries=30), "query_groups"),
        (dict(query_groups=(16, 16)), "query_groups"),
        (dict(kernel_sizes=(3, 3, 3)), "one entry per stage"),
        (dict(strides=(1, 2, 2, 2)), "one entry per stage"),
        (dict(kmax_levels=(5, 3)), "kmax_levels"),
        (dict(query_dim=36), "divisible"),
        (dict(kernel_sizes=(3, (1, 3), 3, 3, 3)), "triple"),
        (dict(strides=((1, 2, 2), 2, 2, 2, 2)), "first stage"),
    ],
)
def test_config_validation_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_config_round_trip_through_dict():
    config = tiny(**ANISO)
    again = NetworkConfig.from_dict(config.to_dict())
    assert again == config
    with pytest.raises(ValueError, match="unknown network settings"):
        NetworkConfig.from_dict({**config.to_dict(), "heads": 4})


# ---------------------------------------------------------------- the inference path


@pytest.mark.parametrize("chunk", [2**16, 777])
def test_inference_path_equals_the_reference_path(chunk):
    """Without autograd, R and Z come from the folded-InstanceNorm, chunked path: same values."""
    torch.manual_seed(10)
    net = MaxQueryNet(tiny(num_classes=4, **ANISO)).eval()
    net.inference_chunk = chunk  # 777 does not divide the 2·8·32·48 voxels: a ragged last chunk
    x = torch.randn(2, 1, 8, 32, 48) * 3 + 1
    reference = net(x)  # grad enabled: the training path with an explicit InstanceNorm and full M
    with torch.no_grad():
        fast = net(x)
    torch.testing.assert_close(fast.query_responses, reference.query_responses.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.logits, reference.logits.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.class_logits, reference.class_logits.detach())
    assert fast.logits.shape == (2, 4, 8, 32, 48) and fast.logits.is_contiguous()
    # and the fast path agrees with Eq. 4 applied to its own R
    torch.testing.assert_close(fast.logits, combine(fast.class_logits, fast.query_responses), rtol=1e-5, atol=1e-5)


def test_inference_heads_are_robust_to_features_with_a_large_offset():
    """A channel with mean 100 and spread 0.01: R must still match InstanceNorm + einsum."""
    torch.manual_seed(11)
    net = MaxQueryNet(tiny(num_classes=3)).eval()
    net.inference_chunk = 1000
    c_dim = net.config.features[0]
    features = torch.randn(1, c_dim, 6, 20, 30)
    features[:, 0] = features[:, 0] * 0.01 + 100.0
    c = torch.randn(1, net.config.num_queries, c_dim)
    k = torch.randn(1, net.config.num_queries, 3)
    with torch.no_grad():
        responses, logits = net._inference_heads(c, k, features)
        ref_r = torch.einsum("bnc,bc...->bn...", c, net.pixel_norm(features))
        ref_z = combine(k, ref_r)
        exact_r = torch.einsum("bnc,bc...->bn...", c.double(), net.pixel_norm(features.double()))
        exact_z = combine(k.double(), exact_r)
    # float32 resolution of x ≈ 100 is 7.6e-6, i.e. ~1e-3 after dividing by σ = 0.01: both paths sit
    # at that floor, and the chunked path must be no worse than the reference (a folded
    # (C/σ)·F − (C/σ)·μ would lose ~4 orders of magnitude here).
    for got, ref, exact in ((responses, ref_r, exact_r), (logits, ref_z, exact_z)):
        err, ref_err = (got.double() - exact).abs().max(), (ref.double() - exact).abs().max()
        assert err < 5e-3 and err <= 2 * ref_err + 1e-5, (float(err), float(ref_err))
