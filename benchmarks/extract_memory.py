"""Peak memory of feature extraction at 1x and 4x the dataset size (target: flat).

Each size runs in a fresh subprocess: a synthetic image dataset of N (then 4N) random 64 px
images goes through `totobench.features.extract.extract_features` (all layers, one pass per
batch) into a temporary feature cache. The child reports its peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which counts the memory-mapped cache pages it
touched) and the peak of its anonymous memory (RssAnon of /proc/self/status, sampled every
20 ms: the memory that cannot be dropped to disk), plus the size of what it wrote. Both pooling
modes are measured: "mean" (the linear/kNN probes' features) and "tokens" (every token of every
layer, what an attentive probe reads; 4N of them may exceed RAM if they were held in memory).

toto-tiny uses checkpoints/toto-tiny when it exists, else its config with random weights.

    nice -n 10 .venv/bin/python benchmarks/extract_memory.py [--n 128] [--pooling mean,tokens]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def child(n: int, pooling: str, batch_size: int) -> dict:
    """Extract features of n synthetic images in this process; its peak memory figures."""
    import resource

    import torch
    from torch.utils.data import Dataset

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from layer_sweep import make_backbone
    from totobench.features.cache import FeatureCache
    from totobench.features.extract import extract_features

    peak_anon = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], _rss_anon_kib())
            time.sleep(0.02)

    backbone, source = make_backbone("toto-tiny")
    r = backbone.config.resolution

    class SyntheticImages(Dataset):
        """n random uint8 images [1, 3, r, r], label i % 10; item i is the same on every call."""

        def __len__(self):
            return n

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return torch.randint(0, 256, (1, 3, r, r), generator=g, dtype=torch.uint8), i % 10

    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="extract-memory-") as tmp:
        feats = extract_features(backbone, SyntheticImages(), list(range(backbone.num_layers)),
                                 kind="image", pooling=pooling, cache=FeatureCache(Path(tmp)),
                                 key_parts={"dataset": f"synthetic-{n}"}, batch_size=batch_size)
        seconds = time.perf_counter() - start
        written = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        shape = list(feats.feats[0].shape)
        del feats
    stop.set()
    thread.join()
    return {"n": n, "pooling": pooling, "source": source, "seconds": seconds, "written_mb": written / 2**20,
            "shape_layer0": shape, "baseline_rss_mb": before_kib / 1024,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_anon_mb": peak_anon[0] / 1024}


def run_child(n: int, pooling: str, batch_size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(n), "--pooling", pooling,
                          "--batch-size", str(batch_size)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child with n={n} pooling={pooling} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="items at 1x (4x runs 4n)")
    parser.add_argument("--pooling", default="mean,tokens")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.pooling, args.batch_size)), flush=True)
        return
    print(f"synthetic 64 px images, batch {args.batch_size}, all layers of toto-tiny; a fresh process per run")
    print(f"{'pooling':8s} {'items':>6s} {'written MB':>10s} {'seconds':>8s} {'peak RSS MB':>11s} "
          f"{'peak anon MB':>12s} {'(model loaded) MB':>17s}")
    for pooling in args.pooling.split(","):
        runs = [run_child(n, pooling, args.batch_size) for n in (args.n, 4 * args.n)]
        for r in runs:
            print(f"{pooling:8s} {r['n']:6d} {r['written_mb']:10.1f} {r['seconds']:8.1f} {r['peak_rss_mb']:11.1f} "
                  f"{r['peak_anon_mb']:12.1f} {r['baseline_rss_mb']:17.1f}", flush=True)
        small, big = runs
        print(f"{pooling}: 4x / 1x items: peak RSS ratio {big['peak_rss_mb'] / small['peak_rss_mb']:.2f}x, "
              f"peak anon ratio {big['peak_anon_mb'] / small['peak_anon_mb']:.2f}x "
              f"(features written grew {big['written_mb'] / max(small['written_mb'], 1e-9):.1f}x; "
              f"model: {small['source']})", flush=True)


if __name__ == "__main__":
    main()
