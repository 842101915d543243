"""Frames/s of the vectorised label propagation against the plain per-frame, per-context-frame loop.

Same random features for both (default: 30 frames of 32x32 cells, D=256, 3 objects + background,
context 20, radius 12, top-10, temperature 0.05), best of --repeats runs each, side by side.

    nice -n 10 .venv/bin/python benchmarks/label_propagation.py [--frames 30] [--grid 32] [--dim 256]
"""

import argparse
import time

import torch

from totobench.probes.label_propagation import label_propagation, label_propagation_loop


def best_time(function, repeats: int) -> tuple[float, torch.Tensor]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = function()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--grid", type=int, default=32, help="feature cells per side")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--labels", type=int, default=4, help="objects + background")
    parser.add_argument("--context", type=int, default=20)
    parser.add_argument("--radius", type=float, default=12)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    feats = torch.randn(args.frames, args.grid, args.grid, args.dim, generator=generator)
    first = torch.softmax(torch.randn(args.labels, args.grid, args.grid, generator=generator) * 3, dim=0)
    params = dict(context=args.context, radius=args.radius, topk=args.topk, temperature=args.temperature)

    fast_s, fast = best_time(lambda: label_propagation(feats, first, **params), args.repeats)
    loop_s, slow = best_time(lambda: label_propagation_loop(feats, first, **params), args.repeats)
    propagated = args.frames - 1
    print(f"{args.frames} frames, {args.grid}x{args.grid} cells, D={args.dim}, {params}, "
          f"{torch.get_num_threads()} torch threads, best of {args.repeats}")
    print(f"vectorised : {propagated / fast_s:8.2f} frames/s  ({fast_s:.2f} s)")
    print(f"loop       : {propagated / loop_s:8.2f} frames/s  ({loop_s:.2f} s)")
    print(f"ratio      : {loop_s / fast_s:8.2f}x")
    print(f"max |vectorised - loop| = {(fast - slow).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
