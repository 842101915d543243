"""What keeping freed memory for reuse (totobench/host.py) does to the suite's CPU work.

Runs the same measurements in two child processes side by side, one with glibc's default
allocator behaviour (TOTOBENCH_MALLOC=system) and one as `totobench` runs (mmap threshold 1 GiB),
alternating them `--repeats` times, and prints per measurement the best time of each and their
ratio, plus each child's peak RSS:
  - probe step: one training step of the Kinetics AIM attentive probe grid (8 layers x 2 learning
    rates, a batch of 64 rows x 512 tokens x 256 channels read from float16 arrays, as k400 reads
    its cache);
  - forward: toto-tiny's forward (random init) of one k400 extraction batch (8 clips of 8 frames);
  - subtract: the broadcast subtraction of one probe batch's channel mean (33.5 MB).

    .venv/bin/python benchmarks/host_malloc.py [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def best_ms(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def child(threads: int) -> dict:
    import torch

    from totobench.features.stream import ArrayRows
    from totobench.host import keep_freed_memory
    from totobench.model import Toto, TotoConfig
    from totobench.probes.attentive import AttentiveProbeGrid

    applied = keep_freed_memory()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    layers, rows, tokens, dim = list(range(8)), 256, 512, 256
    feats = {layer: rng.standard_normal((rows, tokens, dim), dtype=np.float32).astype(np.float16) for layer in layers}
    labels = rng.integers(0, 10, rows)
    source = ArrayRows(feats, labels)
    grid = AttentiveProbeGrid(layers, dim, 10, lrs=(1e-3, 3e-4), wds=(1e-4,), head="aim")
    index = torch.arange(64)

    def probe_step():
        for batch, read in source.read(index, 64):
            grid.train_step(batch, source.labels[read])

    model = Toto(TotoConfig.preset("toto-tiny")).eval()
    clip = torch.randint(0, 256, (8, 8 * 64 + 1))

    @torch.inference_mode()
    def forward():
        model.forward_intermediates(clip, layers)

    flat = torch.randn(64 * tokens, dim)
    mean = flat.mean(0)
    out = {"keeps_freed_memory": applied,
           "probe step": best_ms(probe_step, 3), "forward": best_ms(forward, 3),
           "subtract": best_ms(lambda: flat - mean, 10)}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.threads)))
        return 0
    runs: dict[str, list[dict]] = {"system": [], "totobench": []}
    for _ in range(args.repeats):
        for mode in runs:
            env = dict(os.environ, TOTOBENCH_MALLOC="system" if mode == "system" else "")
            done = subprocess.run([sys.executable, __file__, "--child", "--threads", str(args.threads)], env=env,
                                  capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert not any(r["keeps_freed_memory"] for r in runs["system"]) and all(r["keeps_freed_memory"]
                                                                          for r in runs["totobench"])
    print(f"{args.threads} thread(s), best of {args.repeats} alternating runs per allocator")
    print(f"{'measurement':<14} {'glibc default':>14} {'kept (totobench)':>17} {'speed-up':>9}")
    for key in ("probe step", "forward", "subtract"):
        base, kept = min(r[key] for r in runs["system"]), min(r[key] for r in runs["totobench"])
        print(f"{key:<14} {base:>11.1f} ms {kept:>14.1f} ms {base / kept:>8.2f}x")
    base, kept = max(r["peak_rss_mb"] for r in runs["system"]), max(r["peak_rss_mb"] for r in runs["totobench"])
    print(f"{'peak RSS':<14} {base:>11.0f} MB {kept:>14.0f} MB {kept / base:>8.2f}x (ratio of memory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
