"""bf16 against fp32 with the same model on LiverBench's test cases (a script, not a test).

Issue 12's acceptance check: labels agree on ≥ 99.5 % of voxels, Dice per class within 0.5
points, MaxQuery AUROC / FPR95 (inside the organ region: ground-truth liver and lesions grown by
5 mm, the OOD lesions as positives, pooled over the cases) within 0.5 points.

On a CPU without native bf16 PyTorch runs bf16 autocast through reference kernels (12-100x
slower than fp32 here), so ``--emulate`` reproduces what native bf16 autocast computes instead:
the operands of the operations autocast lowers (convolutions, linear layers, attention) are
rounded to bf16 and their products summed in fp32, as oneDNN's bf16 kernels do, and every
layer's output is rounded to bf16, the type the next operation reads. The model's fp32 steps
(InstanceNorm statistics inside the kernels, the heads, the aggregation) stay fp32 as in the real
path. ``--check-emulation`` compares the emulation with real bf16 autocast on one patch first.

    .venv/bin/python Testing/benchmarks/compare_precision.py --data LIVERBENCH --emulate
"""

from __future__ import annotations

import argparse
import contextlib
import re
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from maxquery.inference import Predictor
from maxquery.metrics import StreamingOODMetrics, dice
from maxquery_training.dataset import list_cases
from maxquery_training.regions import organ_region

REPO = Path(__file__).resolve().parents[2]
BUNDLED_MODEL = REPO / "Resources" / "Models" / "maxquery-liver-demo"
_LOWERED = (nn.Conv3d, nn.ConvTranspose3d, nn.Linear, nn.MultiheadAttention)  # autocast's bf16 ops
_EXCLUDED = ("pixel_norm", "mask_embed", "class_head")  # the inference heads run in fp32 under autocast


def _bf16(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(torch.bfloat16).to(value.dtype)
    if isinstance(value, tuple):
        return tuple(_bf16(v) for v in value)
    return value


@contextlib.contextmanager
def emulated_bf16(network: nn.Module):
    """Round what bf16 autocast would round (see the module docstring); restores the weights."""
    handles, saved = [], {}
    for name, module in network.named_modules():
        if name.split(".")[0] in _EXCLUDED:
            continue
        if isinstance(module, _LOWERED):
            for pname, param in module.named_parameters(recurse=False):
                saved[(module, pname)] = param.data
                param.data = _bf16(param.data)
            handles.append(module.register_forward_pre_hook(lambda m, args: _bf16(args)))
        if isinstance(module, _LOWERED) or not list(module.children()):
            handles.append(module.register_forward_hook(lambda m, args, out: _bf16(out)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for (module, pname), data in saved.items():
            getattr(module, pname).data = data


def check_emulation(predictor: Predictor) -> None:
    """A small patch (real bf16 is slow here) through fp32, real bf16 autocast and the emulation."""
    network = predictor.network
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.inference_mode():
        fp32 = network(x).logits
        clock = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            real = network(x).logits.float()
        real_s = time.perf_counter() - clock
        with emulated_bf16(network):
            emulated = network(x).logits

    def diff(a, b):
        return f"max |Δlogit| {float((a - b).abs().max()):.4f}, argmax agree {float((a.argmax(1) == b.argmax(1)).float().mean()):.4%}"
    print(f"one patch: real bf16 vs fp32: {diff(real, fp32)}; emulated vs fp32: {diff(emulated, fp32)}; "
          f"emulated vs real bf16: {diff(emulated, real)} (real bf16 took {real_s:.1f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="LiverBench folder (dataset.json)")
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--emulate", action="store_true", help="emulate bf16 (for CPUs without native bf16)")
    parser.add_argument("--check-emulation", action="store_true")
    parser.add_argument("--cases", default=".", help="regular expression on the case ids to run")
    parser.add_argument("--margin-mm", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fp32 = Predictor(args.model, device="cpu", precision="fp32")
    bf16 = fp32 if args.emulate else Predictor(args.model, device="cpu", precision="bf16")
    if args.check_emulation:
        check_emulation(fp32)
    card = fp32.card
    classes = [c for c in card.classes if c.role != "background"]
    foreground = [c.value for c in classes]
    cases = [c for split in ("test_inlier", "test_ood") for c in list_cases(args.data, split)
             if re.search(args.cases, c.case_id)]
    metrics = {"fp32": StreamingOODMetrics(), "bf16": StreamingOODMetrics()}
    dices = {"fp32": {c.name: [] for c in classes}, "bf16": {c.name: [] for c in classes}}
    agree = total = 0
    print(f"{len(cases)} cases; bf16 {'emulated' if args.emulate else 'autocast: ' + bf16.precision.reason}")
    ood_value = 9
    for case in cases:
        image = sitk.ReadImage(str(case.image))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
        region = organ_region(reference, [*foreground, ood_value], tuple(reversed(image.GetSpacing())), args.margin_mm)
        labels = {}
        for name, predictor in (("fp32", fp32), ("bf16", bf16)):
            clock = time.perf_counter()
            with emulated_bf16(predictor.network) if (args.emulate and name == "bf16") else contextlib.nullcontext():
                result = predictor.predict(image)
            labels[name] = sitk.GetArrayFromImage(result.labels)
            raw = sitk.GetArrayViewFromImage(result.raw_scores[predictor.anomaly_score])
            if (reference == ood_value).any():
                metrics[name].update(raw, reference == ood_value, region)
            for c in classes:
                dices[name][c.name].append(dice(labels[name], reference, c.value))
            print(f"{case.case_id} {name}: {time.perf_counter() - clock:.0f} s", flush=True)
        agree += int((labels["fp32"] == labels["bf16"]).sum())
        total += labels["fp32"].size
        print(f"{case.case_id}: labels agree on {np.mean(labels['fp32'] == labels['bf16']):.4%} of voxels", flush=True)
    print(f"\nlabels agree on {agree / total:.4%} of {total} voxels (goal ≥ 99.5 %)")
    print("| measure | fp32 | bf16 | difference (points) |\n|---|---|---|---|")
    for c in classes:
        a, b = np.nanmean(dices["fp32"][c.name]) * 100, np.nanmean(dices["bf16"][c.name]) * 100
        print(f"| Dice {c.name} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    if metrics["fp32"].low is not None:
        s32, s16 = metrics["fp32"].summary(), metrics["bf16"].summary()
        for key in ("auroc", "fpr95"):
            print(f"| MaxQuery {key.upper()} | {100 * s32[key]:.2f} | {100 * s16[key]:.2f} | {100 * (s16[key] - s32[key]):+.2f} |")


if __name__ == "__main__":
    main()
