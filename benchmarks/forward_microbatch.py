"""Clips/s of the bundled model's forward (every layer) on a batch of 64 clips, in one pass
against parts of at most N tokens (`tokens.forward_in_parts`, what extraction does on CPU).

Same random tokens for every setting; each part size is checked bit-identical to the one-pass
output at every layer. Repeats alternate the settings and each figure is the best repeat.

    .venv/bin/python benchmarks/forward_microbatch.py [--model toto-tiny] [--clips 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from totobench.model.tokens import forward_in_parts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="toto-tiny")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from totobench.model.backbone import load_backbone
    backbone = load_backbone(args.model)
    model, inputs = backbone.model, backbone.inputs
    seq_len = 1 + inputs.num_frames * (inputs.resolution // inputs.patch_size) ** 2
    vocab = model.tok_embeddings.num_embeddings
    tokens = torch.randint(0, vocab, (args.clips, seq_len), generator=torch.Generator().manual_seed(0))
    layers = list(range(backbone.num_layers))
    budgets = {"one pass": args.clips * seq_len, **{f"{n} tokens": n for n in (2048, 4096, 8192)}}
    best = {name: float("inf") for name in budgets}
    with torch.no_grad():
        reference = model.forward_intermediates(tokens, layers)
        for name, budget in budgets.items():
            out = forward_in_parts(model, tokens, layers, max_tokens=budget)
            assert all(torch.equal(a, b) for a, b in zip(out, reference)), f"{name}: other values"
        for _ in range(args.repeats):
            for name, budget in budgets.items():
                t0 = time.perf_counter()
                forward_in_parts(model, tokens, layers, max_tokens=budget)
                best[name] = min(best[name], time.perf_counter() - t0)
    print(f"{args.model}: {args.clips} clips of {seq_len} tokens, {len(layers)} layers, {args.threads} thread(s); "
          "every part size gives the one-pass values bit for bit")
    for name, seconds in best.items():
        print(f"  {name:>12}: {args.clips / seconds:6.1f} clips/s  ({best['one pass'] / seconds:.2f}x one pass)")


if __name__ == "__main__":
    main()
