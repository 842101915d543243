"""GPU check: the default suite of a paper architecture in bf16 with streaming forced, on CUDA.

1. Forward throughput: batches of the model's own clip (16 frames at 128 px for the presets) through
   every layer under bf16 autocast (the tokenizer's code lookup in fp32, as in `run`); tokens/s, the
   achieved FLOP rate (FLOPs counted by torch's FlopCounter, features.estimate.item_flops) as a
   fraction of the device's dense bf16 peak, and the peak memory allocated.
2. The default suite (`totobench run --tasks all --precision bf16 --cache-budget 0 --overwrite`, on
   the data world or --data-root) with its wall time per task, the estimated single-pass forward
   TFLOPs of each task, and the peak memory of the whole run.

The peak is looked up by device name (KNOWN_PEAKS, dense bf16 tensor-core TFLOP/s from the vendors'
data sheets); for another device pass --peak-tflops. Without CUDA it says so in one line and exits 0.

    .venv/bin/python benchmarks/gpu_check.py [--model preset:toto-base] [--batch 8] [--quick]
        [--data-root DIR] [--peak-tflops 312]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

# dense bf16 tensor-core TFLOP/s (no sparsity); the first name found in the device name wins
KNOWN_PEAKS = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0, "H200": 989.0,
               "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
               "RTX 4090": 165.0, "RTX 3090": 71.0, "RTX A6000": 155.0}


def device_peak(name: str, given: float | None) -> float | None:
    """Peak dense bf16 TFLOP/s of the device called `name` (--peak-tflops wins), None when unknown."""
    if given is not None:
        return given
    return next((peak for key, peak in KNOWN_PEAKS.items() if key.lower() in name.lower()), None)


def forward_rate(model: str, batch: int, steps: int, device: torch.device) -> dict:
    """Tokens/s and FLOP/s of the bf16 forward of `batch` default clips through every layer."""
    from totobench.features.estimate import item_flops
    from totobench.model import load_backbone
    backbone = load_backbone(model, device=str(device))
    backbone.precision = "bf16"
    i = backbone.inputs
    kind = "video" if i.num_frames > 1 else "image"
    layers = list(range(backbone.num_layers))
    frames = torch.rand(batch, i.num_frames, 3, i.resolution, i.resolution, device=device)
    t, h, w = backbone.token_grid(i.num_frames, i.resolution, i.resolution, kind)
    flops = batch * item_flops(backbone, i.num_frames, i.resolution, i.resolution, kind, layers[-1])
    backbone.forward_frames(frames, layers, kind)     # warm-up: kernels chosen, memory pooled
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        backbone.forward_frames(frames, layers, kind)
    torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    return {"tokens_per_s": batch * t * h * w / seconds, "tflops_per_s": flops / seconds / 1e12,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9, "batch": batch,
            "tokens_per_clip": t * h * w}


def run_suite(args, device: torch.device) -> list[dict]:
    """The default suite in bf16 with --cache-budget 0; per task: wall seconds, estimated TFLOPs."""
    from totobench.cli import main
    out = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    command = ["run", "--model", args.model, "--tasks", "all", "--device", str(device), "--precision", "bf16",
               "--cache-budget", "0", "--overwrite", "--out", str(out)]
    command += ["--quick"] if args.quick else []
    command += ["--data-root", args.data_root] if args.data_root else []
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    code = main(command)
    print(f"suite: exit {code}, {time.perf_counter() - start:.0f} s, peak memory "
          f"{torch.cuda.max_memory_allocated(device) / 1e9:.1f} GB, results in {out}")
    rows = []
    for path in sorted(out.rglob("*.json")):
        result = json.loads(path.read_text())
        estimate = result["protocol"].get("estimate") or {}
        rows.append({"task": result["task"]["name"], "seconds": result["timing_s"].get("total", 0.0),
                     "tflops": estimate.get("forward_flops", 0) / 1e12, "streamed": estimate.get("streamed")})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preset:toto-base")
    parser.add_argument("--batch", type=int, default=8, help="clips per forward in the throughput test")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, when not in KNOWN_PEAKS")
    parser.add_argument("--quick", action="store_true", help="the suite with --quick")
    parser.add_argument("--data-root", help="dataset roots (default: the data world)")
    parser.add_argument("--skip-suite", action="store_true", help="only the forward throughput")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to measure")
        return 0
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = device_peak(name, args.peak_tflops)
    rate = forward_rate(args.model, args.batch, args.steps, device)
    share = f"{rate['tflops_per_s'] / peak:.1%} of {peak:.0f}" if peak else "unknown peak (pass --peak-tflops)"
    print(f"{name}: {args.model} bf16 forward, {rate['batch']} clips of {rate['tokens_per_clip']} tokens: "
          f"{rate['tokens_per_s']:,.0f} tokens/s, {rate['tflops_per_s']:.1f} TFLOP/s = {share}, "
          f"peak memory {rate['peak_memory_gb']:.1f} GB")
    if args.skip_suite:
        return 0
    print(f"{'task':<20} {'seconds':>9} {'TFLOPs (1 pass)':>16} {'TFLOP/s':>9} streamed")
    for row in run_suite(args, device):
        per_s = row["tflops"] / row["seconds"] if row["seconds"] else 0.0
        print(f"{row['task']:<20} {row['seconds']:>9.0f} {row['tflops']:>16.1f} {per_s:>9.2f} {row['streamed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
