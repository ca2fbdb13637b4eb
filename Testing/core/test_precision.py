"""Inference precision: what ``auto`` picks on which hardware, and that bf16 keeps the sensitive
steps (InstanceNorm statistics, R, the softmax over queries, the aggregation) in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from maxquery.demo import build_untrained_model
from maxquery.inference import Predictor
from maxquery import precision
from maxquery.precision import cpu_has_native_bf16, select_precision
from maxquery.model_folder import load_model_folder

CPU = torch.device("cpu")
LIGHT = dict(features=(8, 16, 32, 64, 96), query_dim=32, ffn_dim=64)


def test_cpu_bf16_needs_the_instructions_and_the_kernels(monkeypatch):
    assert cpu_has_native_bf16(frozenset({"avx2", "fma"})) == (
        False, "this CPU has no bf16 instructions (avx512_bf16 or amx_bf16)")
    monkeypatch.setattr(precision, "cpu_flags", lambda: None)
    assert cpu_has_native_bf16()[0] is False  # flags unknown (macOS, Windows): never guess
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert cpu_has_native_bf16(frozenset({"avx512f", "avx512_bf16"})) == (
        True, "the CPU computes bf16 natively (avx512_bf16)")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert cpu_has_native_bf16(frozenset({"amx_bf16"}))[0] is False


def test_auto_picks_bf16_only_where_it_is_native(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: (False, "no bf16 here"))
    auto = select_precision("auto", CPU)
    assert (auto.name, auto.dtype, auto.reason, auto.slow) == ("fp32", None, "no bf16 here", False)
    forced = select_precision("bf16", CPU)
    assert forced.dtype == torch.bfloat16 and forced.slow and "no bf16 here" in forced.reason
    assert select_precision("fp32", CPU).dtype is None
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: (True, "native"))
    assert select_precision("auto", CPU).dtype == torch.bfloat16 and not select_precision("auto", CPU).slow
    assert select_precision("fp32", CPU).dtype is None
    assert select_precision("auto", torch.device("mps")).dtype is None
    with pytest.raises(ValueError, match="choose auto, fp32, bf16"):
        select_precision("fp16", CPU)


def test_this_machine_is_detected_from_its_flags():
    flags = precision.cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    native, _ = cpu_has_native_bf16()
    assert native == (bool({"avx512_bf16", "amx_bf16"} & flags) and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_untrained_model(tmp_path_factory.mktemp("precision") / "m", seed=1, patch_size_zyx=(16, 32, 32),
                                 spacing_zyx=(5.0, 5.0, 5.0), **LIGHT)


def test_inference_heads_stay_fp32_under_bf16_autocast(model_dir):
    """Under autocast the backbone hands bf16 tensors to the heads; R, the InstanceNorm statistics
    and the softmax over queries must still be computed in fp32 (R is the MaxQuery score)."""
    net = load_model_folder(model_dir).network.eval()
    torch.manual_seed(0)
    embeddings, classes, features = torch.randn(1, 32, 8), torch.randn(1, 32, 4), 3 + torch.randn(1, 8, 8, 16, 16)
    as_bf16 = [t.bfloat16() for t in (embeddings, classes, features)]
    with torch.inference_mode():
        reference = net._inference_heads(*[t.float() for t in as_bf16])  # fp32 on the same inputs
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = net._inference_heads(*as_bf16)
    assert all(t.dtype == torch.float32 for t in mixed)
    for got, want in zip(mixed, reference):
        torch.testing.assert_close(got, want)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(1, 1, 16, 32, 32))
    assert out.query_responses.dtype == torch.float32 and out.logits.dtype == torch.float32


def test_bf16_run_agrees_with_fp32_and_says_what_it_used(real_data, model_dir):
    """A whole (small) CT through the predictor in bf16 and fp32: same labels almost everywhere."""
    image = sitk.ReadImage(str(real_data / "totalsegmentator/example_ct_sm.nii.gz"))
    crop = image[20:84, 20:84, 0:16]  # one 16 x 32 x 32 patch at 5 mm: bf16 is slow without native support
    fp32 = Predictor(model_dir, device="cpu", precision="fp32").predict(crop)
    bf16 = Predictor(model_dir, device="cpu", precision="bf16").predict(crop)
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16") and bf16.summary()["precision"] == "bf16"
    labels32, labels16 = (sitk.GetArrayFromImage(r.labels) for r in (fp32, bf16))
    assert np.mean(labels32 == labels16) > 0.98
    raw32, raw16 = (sitk.GetArrayFromImage(r.raw_scores["maxquery"]) for r in (fp32, bf16))
    assert np.corrcoef(raw32.ravel(), raw16.ravel())[0, 1] > 0.99
