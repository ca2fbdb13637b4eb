"""Whole-CT inference benchmark (a script that prints figures, not a test).

On the real abdominal CT (``example_ct``, 122×101×112 at 3 mm) and on a 512×512×300 volume at
0.78×0.78×1.25 mm made from it (linear resampling, 10 HU noise, so the anatomy is real and the
size is a clinical one) it measures, each in its own process so that peak RSS is its own:

- ``maxquery`` / ``maxquery_fp32``: ``maxquery segment`` end to end with the bundled model, at
  ``--precision auto`` and ``fp32``: process start, reading, every stage of the predictor, every
  default output written (the stage table comes from these runs);
- ``fast``: the same in fast mode (twice the model spacing);
- ``plain``: the same predictor with the plain backbone of the same size (random weights);
- ``monai_fp32`` / ``monai_bf16``: MONAI's ``DynUNet`` (same filters, kernels and strides) with
  ``sliding_window_inference`` (Gaussian σ = 1/8, same patch, overlap 0.5, batch 2) on the same
  preprocessed volume, network only, without and with ``torch.autocast("cpu", bfloat16)``;
- ``nnunet``: nnU-Net v2's own predictor (``nnUNetPredictor.predict_sliding_window_return_logits``:
  its Gaussian sliding window, step 0.5, no mirroring) with its ``PlainConvUNet`` of the same
  size, network only (``pip install -e .[bench]``). nnU-Net never autocasts on the CPU.

Speed does not depend on the weights, so the baselines use random ones. Run:

    .venv/bin/python Testing/benchmarks/bench_inference.py                      # both cases, every mode
    .venv/bin/python Testing/benchmarks/bench_inference.py --cases big --modes maxquery,monai_fp32
"""

from __future__ import annotations

import argparse
import json
import os
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
BUNDLED_MODEL = REPO / "Resources" / "Models" / "maxquery-liver-demo"
BIG_SIZE_XYZ, BIG_SPACING_XYZ = (512, 512, 300), (0.78, 0.78, 1.25)
MODES = ("maxquery", "maxquery_fp32", "fast", "plain", "monai_fp32", "monai_bf16", "nnunet")
OVERLAP, BATCH = 0.5, 2


def big_ct(path: Path) -> Path:
    """The real CT resampled onto a centred 512×512×300 grid at 0.78×0.78×1.25 mm, with CT noise."""
    if path.is_file():
        return path
    ct = sitk.ReadImage(str(REAL_CT), sitk.sitkFloat32)
    centre = ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct.GetSize()])
    reference = sitk.Image(BIG_SIZE_XYZ, sitk.sitkUInt8)
    reference.SetSpacing(BIG_SPACING_XYZ)
    reference.SetOrigin([c - (n - 1) / 2 * s for c, n, s in zip(centre, BIG_SIZE_XYZ, BIG_SPACING_XYZ)])
    array = sitk.GetArrayFromImage(sitk.Resample(ct, reference, sitk.Transform(), sitk.sitkLinear, -1024.0))
    array += np.random.default_rng(0).normal(0, 10, array.shape).astype(np.float32)
    image = sitk.GetImageFromArray(np.clip(np.rint(array), -1024, 3071).astype(np.int16))
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def case_path(case: str, cache: Path) -> Path:
    return REAL_CT if case == "real" else big_ct(cache / "big_ct_512x512x300.nii.gz")


def plain_model(folder: Path) -> Path:
    """The bundled card with the plain backbone (random weights) in place of MaxQuery."""
    from dataclasses import replace

    from maxquery.model_folder import load_model_folder, save_model_folder
    from maxquery.network import build_network

    card = load_model_folder(BUNDLED_MODEL).card
    torch.manual_seed(0)
    plain = replace(card, name="plain-benchmark", architecture="plain", calibration=None)
    return save_model_folder(folder, plain, build_network("plain", card.network), overwrite=True)


def run_segment(path: Path, model: Path, precision: str, fast: bool) -> dict:
    """``maxquery segment`` as the command line runs it, with each stage and each file timed."""
    import psutil

    from maxquery.inference import Predictor
    from maxquery.inference.writer import write_outputs
    from maxquery.io import read_image

    clock = time.perf_counter()
    image = read_image(path)
    read = time.perf_counter() - clock
    predictor = Predictor(model, device="cpu", fast=fast, scores=(), precision=precision)
    result = predictor.predict(image)
    writes: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as out:
        written = write_outputs(result, out, "case", timings=writes)
        sizes = {role: p.stat().st_size / 2**20 for role, p in written.items()}
    wall = time.time() - psutil.Process().create_time()
    return {"wall_s": wall, "network_s": result.timings["network"], "precision": result.precision,
            "stages": {"read": round(read, 3), **result.timings, **writes}, "output_mib": sizes}


def preprocessed(path: Path) -> tuple[torch.Tensor, object]:
    """The volume exactly as the predictor feeds it to the network (model spacing, normalised)."""
    from maxquery.io import read_image
    from maxquery.model_folder import load_model_folder
    from maxquery.preprocessing import resample_to_spacing, to_canonical

    card = load_model_folder(BUNDLED_MODEL).card
    grid = resample_to_spacing(to_canonical(read_image(path)), card.spacing_zyx)
    return torch.from_numpy(card.normalization(sitk.GetArrayViewFromImage(grid))), card


def run_monai(path: Path, bf16: bool) -> dict:
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import DynUNet

    volume, card = preprocessed(path)
    config = card.network
    torch.manual_seed(0)
    net = DynUNet(3, 1, config.num_classes, kernel_size=[list(k) for k in config.kernel_sizes],
                  strides=[list(s) for s in config.strides], upsample_kernel_size=[list(s) for s in config.strides[1:]],
                  filters=list(config.features), norm_name=("INSTANCE", {"affine": True}),
                  act_name=("leakyrelu", {"negative_slope": 0.01}), res_block=False).eval()
    clock = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = sliding_window_inference(volume[None, None], card.patch_size_zyx, BATCH, net, overlap=OVERLAP,
                                          mode="gaussian", sigma_scale=0.125)
    logits.float().argmax(1)
    return {"network_s": time.perf_counter() - clock}


def run_nnunet(path: Path) -> dict:
    from types import SimpleNamespace

    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    volume, card = preprocessed(path)
    config = card.network
    torch.manual_seed(0)
    net = PlainConvUNet(
        1, len(config.features), list(config.features), torch.nn.Conv3d, [list(k) for k in config.kernel_sizes],
        [list(s) for s in config.strides], [2] * len(config.features), config.num_classes,
        [2] * (len(config.features) - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
    ).eval()
    predictor = nnUNetPredictor(tile_step_size=OVERLAP, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    # What nnU-Net's plans files would provide: the patch size and the number of outputs.
    predictor.manual_initialization(net, SimpleNamespace(get_label_manager=lambda _: SimpleNamespace(
        num_segmentation_heads=config.num_classes)), SimpleNamespace(patch_size=list(card.patch_size_zyx)),
        None, {}, "benchmark", None)
    clock = time.perf_counter()
    logits = predictor.predict_sliding_window_return_logits(volume[None])
    logits.float().argmax(0)
    return {"network_s": time.perf_counter() - clock}


def measure(case: str, mode: str, cache: Path) -> dict:
    path = case_path(case, cache)
    if mode.startswith("monai"):
        figures = run_monai(path, bf16=mode == "monai_bf16")
    elif mode == "nnunet":
        figures = run_nnunet(path)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model = plain_model(Path(tmp) / "plain") if mode == "plain" else BUNDLED_MODEL
            figures = run_segment(path, model, "fp32" if mode == "maxquery_fp32" else "auto", fast=mode == "fast")
    figures["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    figures["cpu_s"] = sum(os.times()[:2])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="real,big")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "maxquery-bench")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:  # one measurement, in this process
        print(json.dumps(measure(*args.one, args.cache)))
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} "
          f"threads; bundled model {BUNDLED_MODEL.name}, overlap {OVERLAP}, batch {BATCH}; load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| case | mode | precision | network s | end to end s | CPU s | peak RSS GiB | default outputs MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        for mode in args.modes.split(","):
            done = subprocess.run([sys.executable, __file__, "--one", case, mode, "--threads", str(args.threads),
                                   "--cache", str(args.cache)], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"| {case} | {mode} | failed: {done.stderr.strip().splitlines()[-1]} |||||", flush=True)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            wall = f"{r['wall_s']:.1f}" if "wall_s" in r else "–"
            sizes = f"{sum(r['output_mib'].values()):.1f}" if "output_mib" in r else "–"
            print(f"| {case} | {mode} | {r.get('precision', 'bf16' if mode.endswith('bf16') else 'fp32')} | "
                  f"{r['network_s']:.1f} | {wall} | {r['cpu_s']:.0f} | {r['peak_rss_gib']:.2f} | {sizes} |", flush=True)
            if "stages" in r:
                stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items())
                print(f"|  | stages (s): {stages}; files (MiB): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in r["output_mib"].items()) + " |||||||", flush=True)


if __name__ == "__main__":
    main()
