"""Whole-CT inference benchmark (a script that prints figures, not a test).

For the real abdominal CT and a synthetic 512×512×300 CT-like volume at 0.8×0.8×2.5 mm it measures
wall time and peak resident memory of:

- ``maxquery``: the Predictor with a MaxQuery network and its anomaly map (the shipped path);
- ``plain``: the same Predictor with the plain backbone of the same size (no queries);
- ``monai``: MONAI's ``sliding_window_inference`` (Gaussian, same patch and overlap) with a
  ``DynUNet`` of the same filters and strides, on the same preprocessed tensor (network only);
- ``fast``: the MaxQuery Predictor in fast mode (twice the model spacing).

Each measurement runs in its own process so that peak RSS is its own. The model is the demo-sized
``small_config`` at 2.5 × 2 × 2 mm (z, y, x) with a 48 × 96 × 96 patch, random weights (speed
does not depend on them). Run: ``.venv/bin/python Testing/benchmarks/bench_inference.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[2]
REAL_CT = REPO.parent / "shared" / "data" / "real" / "totalsegmentator" / "example_ct.nii.gz"
SPACING_ZYX = (2.5, 2.0, 2.0)
PATCH_ZYX = (48, 96, 96)


def synthetic_ct(size_xyz=(512, 512, 300), spacing=(0.8, 0.8, 2.5), seed=0) -> sitk.Image:
    """Air, an elliptic body of soft tissue with fat, a liver-like organ, a spine and noise (HU)."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = size_xyz
    z, y, x = np.ogrid[:nz, :ny, :nx]
    y_mm, x_mm = (y - ny / 2) * spacing[1], (x - nx / 2) * spacing[0]
    volume = np.full((nz, ny, nx), -1000, np.int16)
    body = (x_mm / 170) ** 2 + (y_mm / 120) ** 2 <= 1
    volume[np.broadcast_to(body, volume.shape)] = -90
    inner = (x_mm / 155) ** 2 + (y_mm / 105) ** 2 <= 1
    volume[np.broadcast_to(inner, volume.shape)] = 40
    liver = ((x_mm + 60) / 80) ** 2 + ((y_mm + 10) / 70) ** 2 + (((z - nz / 2) * spacing[2]) / 150) ** 2 <= 1
    volume[liver] = 60
    spine = (x_mm / 18) ** 2 + ((y_mm - 70) / 18) ** 2 <= 1
    volume[np.broadcast_to(spine, volume.shape)] = 700
    volume += rng.normal(0, 12, volume.shape).astype(np.int16)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(spacing)
    return image


def build_model(folder: Path, architecture: str) -> Path:
    from maxquery.demo import build_untrained_model

    return build_untrained_model(folder, seed=0, spacing_zyx=SPACING_ZYX, patch_size_zyx=PATCH_ZYX,
                                 architecture=architecture)


def load_case(case: str) -> sitk.Image:
    return sitk.ReadImage(str(REAL_CT)) if case == "real" else synthetic_ct()


def run_predictor(case: str, architecture: str, fast: bool) -> dict:
    from maxquery.inference import Predictor

    image = load_case(case)
    with tempfile.TemporaryDirectory() as tmp:
        predictor = Predictor(build_model(Path(tmp) / "m", architecture), device="cpu", fast=fast,
                              scores=("maxquery",) if architecture == "maxquery" else ("maxlogit",))
        start = time.perf_counter()
        result = predictor.predict(image)
        wall = time.perf_counter() - start
    return {"wall_s": wall, "network_s": result.timings["network"], "timings": result.timings}


def run_monai(case: str) -> dict:
    """DynUNet with the same filters/strides, MONAI's Gaussian sliding window, same preprocessing."""
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import DynUNet

    from maxquery.network import small_config
    from maxquery.preprocessing import CTNormalization, resample_to_spacing, to_canonical

    config = small_config(4)
    torch.manual_seed(0)
    net = DynUNet(3, 1, 4, kernel_size=list(config.kernel_sizes), strides=list(config.strides),
                  upsample_kernel_size=list(config.strides[1:]), filters=list(config.features),
                  norm_name=("INSTANCE", {"affine": True}), act_name=("leakyrelu", {"negative_slope": 0.01}),
                  res_block=False).eval()
    image = load_case(case)
    start = time.perf_counter()
    grid = resample_to_spacing(to_canonical(image), SPACING_ZYX)
    volume = CTNormalization(-160.0, 240.0, 60.0, 70.0)(sitk.GetArrayViewFromImage(grid))
    prep = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(volume)[None, None], PATCH_ZYX, 2, net, overlap=0.5,
                                          mode="gaussian", sigma_scale=0.125)
        logits.softmax(1).argmax(1)
    end = time.perf_counter()
    return {"wall_s": end - start, "network_s": end - prep}


def measure(case: str, mode: str) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if mode == "monai":
        figures = run_monai(case)
    else:
        figures = run_predictor(case, "plain" if mode == "plain" else "maxquery", fast=mode == "fast")
    figures["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("real", "big"))
    parser.add_argument("--mode", choices=("maxquery", "plain", "monai", "fast"))
    parser.add_argument("--cases", default="real,big")
    args = parser.parse_args()
    if args.case:  # one measurement, in this process
        print(json.dumps(measure(args.case, args.mode)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model small_config, spacing "
          f"{SPACING_ZYX} mm, patch {PATCH_ZYX}, overlap 0.5, batch 2")
    for case in args.cases.split(","):
        rows = {}
        for mode in ("maxquery", "plain", "monai", "fast"):
            done = subprocess.run([sys.executable, __file__, "--case", case, "--mode", mode],
                                  capture_output=True, text=True, check=True)
            rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            r = rows[mode]
            print(f"{case:5s} {mode:9s} wall {r['wall_s']:7.1f} s  network {r['network_s']:7.1f} s  "
                  f"peak RSS {r['peak_rss_gib']:5.2f} GiB", flush=True)
        mq, plain, monai = rows["maxquery"], rows["plain"], rows["monai"]
        print(f"{case:5s} ratios: maxquery/plain wall {mq['wall_s'] / plain['wall_s']:.2f} "
              f"(network {mq['network_s'] / plain['network_s']:.2f}); maxquery/monai network "
              f"{mq['network_s'] / monai['network_s']:.2f}; plain/monai network "
              f"{plain['network_s'] / monai['network_s']:.2f}", flush=True)


if __name__ == "__main__":
    main()
