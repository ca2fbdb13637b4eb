#!/usr/bin/env python
"""Forward time and peak memory of MaxQueryNet against PlainSegmentationNet on the same CPU patch.

Not a test: a script that prints figures (``make bench``). Memory: each model runs in a
fresh subprocess so that its peak resident memory (``getrusage`` max RSS) is its own; "forward
memory" is that peak minus the RSS just before the first forward pass (interpreter, torch, weights),
i.e. what the forward pass itself needs. Time: both models in one subprocess, their runs
interleaved (so that load from other jobs on the machine hits both alike), the median of ``--runs``
forward passes after ``--warmup`` passes each, in eval mode under ``torch.no_grad``; the ratio of
the fastest runs is printed too (the least disturbed estimate when other jobs share the CPU).

    python Testing/benchmarks/bench_network.py                       # small config 64×128×128, then paper config 32×64×128
    python Testing/benchmarks/bench_network.py --config small --patch 32 64 64 --runs 3
    python Testing/benchmarks/bench_network.py --config paper --patch 32 96 96 --profile

``--reference-heads`` runs MaxQueryNet with the training path's heads (full-size normalised P and
M), i.e. as it was before the chunked inference path, for comparison. ``--profile`` adds, for MaxQueryNet, where its extra time goes (backbone, kMaX blocks, R = C·Pᵀ,
softmax over queries, Z = C_Kᵀ·M).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

GOAL = 1.15
DEFAULT_PATCHES = {"small": (64, 128, 128), "paper": (32, 64, 128)}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _config(name: str):
    from maxquery.network import NetworkConfig, small_config

    if name == "paper":
        return NetworkConfig(num_classes=4)
    return small_config(4)


def _build(model: str, config_name: str):
    import torch

    from maxquery.network import build_network

    torch.manual_seed(0)
    config = _config(config_name)
    net = build_network(model, config).eval()
    if model == "maxquery" and os.environ.get("BENCH_REFERENCE_HEADS"):
        net._inference_heads = _reference_heads.__get__(net)
    return net, config


def _reference_heads(net, mask_embeddings, class_logits, features):
    """The heads as the training path computes them (full-size normalised P and M), for comparison."""
    import torch

    from maxquery.network.maxquery_net import combine

    responses = torch.einsum("bnc,bc...->bn...", mask_embeddings, net.pixel_norm(features))
    return responses, combine(class_logits, responses)


def memory_worker(args: argparse.Namespace) -> None:
    """Peak RSS of one model in a fresh process: one warm-up and one measured forward pass."""
    import torch

    torch.set_num_threads(args.threads)
    net, config = _build(args.model, args.config)
    x = torch.randn(1, config.in_channels, *args.patch)
    base = _rss_mib()
    with torch.no_grad():
        for _ in range(2):
            out = net(x)
            del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print("RESULT " + json.dumps({"base_mib": base, "peak_mib": peak,
                                  "params": sum(p.numel() for p in net.parameters())}))


def time_worker(args: argparse.Namespace) -> None:
    """Both models in one process, runs interleaved, so that load from other jobs hits both alike."""
    import torch

    torch.set_num_threads(args.threads)
    nets = {model: _build(model, args.config)[0] for model in ("plain", "maxquery")}
    config = _config(args.config)
    x = torch.randn(1, config.in_channels, *args.patch)
    times: dict[str, list[float]] = {model: [] for model in nets}
    with torch.no_grad():
        for i in range(args.warmup + args.runs):
            for model, net in (nets.items() if i % 2 == 0 else reversed(nets.items())):
                start = time.perf_counter()
                out = net(x)
                elapsed = time.perf_counter() - start
                del out
                if i >= args.warmup:
                    times[model].append(elapsed)
    result = {model: {"median_s": statistics.median(t), "times": t} for model, t in times.items()}
    if args.profile:
        result["profile"] = profile_maxquery(nets["maxquery"], x, args.runs)
    print("RESULT " + json.dumps(result))


def profile_maxquery(net, x, runs: int) -> dict[str, float]:
    """Median seconds per stage of MaxQueryNet's forward, re-running its steps one by one."""
    import torch

    from maxquery.network.maxquery_net import combine

    stages: dict[str, list[float]] = {}

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        stages.setdefault(name, []).append(time.perf_counter() - start)
        return value

    with torch.no_grad():
        for _ in range(runs):
            levels = timed("backbone", lambda: net.backbone(x))
            queries = net.queries.expand(x.shape[0], -1, -1)

            def blocks():
                q = queries
                for level, block in zip(net.config.kmax_levels, net.blocks):
                    q, _ = block(q, levels[level])
                return q

            queries = timed("kmax blocks", blocks)
            queries = net.final_norm(queries)
            c = net.mask_embed(queries)
            k = net.class_head(queries)
            timed("heads, inference path", lambda: net._inference_heads(c, k, levels[0]))
            # the reference (training) path, step by step, for comparison
            pixels = timed("  ref: InstanceNorm on P", lambda: net.pixel_norm(levels[0]))
            r = timed("  ref: R = C·Pᵀ (einsum)", lambda: torch.einsum("bnc,bc...->bn...", c, pixels))
            m = timed("  ref: softmax over N", lambda: r.softmax(dim=1))
            timed("  ref: Z = C_Kᵀ·M", lambda: torch.einsum("bnk,bn...->bk...", k, m))
            timed("  ref: combine() total", lambda: combine(k, r))
    return {name: statistics.median(values) for name, values in stages.items()}


def _subprocess(mode: str, config: str, patch, args, model: str = "plain") -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--model", model, "--config", config,
           "--patch", *map(str, patch), "--runs", str(args.runs), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    if args.profile:
        cmd.append("--profile")
    env = dict(os.environ)
    if args.reference_heads:
        env["BENCH_REFERENCE_HEADS"] = "1"
    logic = str(Path(__file__).resolve().parents[2] / "Logic")
    env["PYTHONPATH"] = logic + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} {model}/{config} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def compare(config: str, patch, args) -> dict:
    print(f"\n== {config} configuration, patch {'x'.join(map(str, patch))}, {args.threads} thread(s), "
          f"median of {args.runs} interleaved runs after {args.warmup} warm-up ==", flush=True)
    memory = {model: _subprocess("memory", config, patch, args, model) for model in ("plain", "maxquery")}
    timing = _subprocess("time", config, patch, args)
    p, q = ({**memory[m], **timing[m]} for m in ("plain", "maxquery"))
    for name, r in (("PlainSegmentationNet", p), ("MaxQueryNet", q)):
        print(f"  {name:22s} {r['median_s']*1000:9.1f} ms (min {min(r['times'])*1000:7.1f})   peak RSS {r['peak_mib']:8.1f} MiB   "
              f"forward memory {r['peak_mib'] - r['base_mib']:8.1f} MiB   params {r['params']/1e6:6.2f} M")
    time_ratio = q["median_s"] / p["median_s"]
    min_ratio = min(q["times"]) / min(p["times"])  # the least disturbed run of each, on a busy machine
    rss_ratio = q["peak_mib"] / p["peak_mib"]
    fwd_ratio = (q["peak_mib"] - q["base_mib"]) / max(p["peak_mib"] - p["base_mib"], 1e-9)
    verdict = lambda v: "ok" if v <= GOAL else "OVER"  # noqa: E731
    print(f"  ratio MaxQuery / plain: time {time_ratio:.3f}x median, {min_ratio:.3f}x min [{verdict(min(time_ratio, min_ratio))}]   peak RSS {rss_ratio:.3f}x "
          f"[{verdict(rss_ratio)}]   forward memory {fwd_ratio:.3f}x [{verdict(fwd_ratio)}]   (goal <= {GOAL}x)")
    if "profile" in timing:
        print("  MaxQueryNet forward, median per stage:")
        for name, seconds in timing["profile"].items():
            print(f"    {name:24s} {seconds*1000:9.1f} ms  ({seconds / q['median_s'] * 100:5.1f} % of forward)")
    return {"time_ratio": time_ratio, "min_time_ratio": min_ratio, "rss_ratio": rss_ratio, "forward_memory_ratio": fwd_ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("small", "paper", "both"), default="both")
    parser.add_argument("--patch", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        help="patch size (default: 64 128 128 small, 32 64 128 paper)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine more threads make small ops stall on busy cores)")
    parser.add_argument("--profile", action="store_true", help="break MaxQueryNet's forward time down by stage")
    parser.add_argument("--reference-heads", action="store_true",
                        help="run MaxQueryNet with the training-path heads (no chunked inference path), to compare")
    parser.add_argument("--worker", choices=("memory", "time"), help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=("plain", "maxquery"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        (memory_worker if args.worker == "memory" else time_worker)(args)
        return
    import torch

    print(f"torch {torch.__version__}, CPU, {os.cpu_count()} cores visible")
    configs = ("small", "paper") if args.config == "both" else (args.config,)
    for config in configs:
        compare(config, tuple(args.patch) if args.patch else DEFAULT_PATCHES[config], args)


if __name__ == "__main__":
    main()
