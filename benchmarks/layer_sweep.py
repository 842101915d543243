"""Cost of features at every layer: one backbone pass for all layers against one pass per layer.

For each model config, the same frames go through `Backbone.forward_frames` (what feature
extraction calls: tokenizer + transformer) two ways:
  - one pass:  forward_frames(frames, all layers)            - one tokenization, one forward;
  - per layer: forward_frames(frames, [i]) for every layer i  - L tokenizations, L forwards, each
               stopping after block i (so (L+1)/2 full forwards' worth of blocks).
Repeats alternate the two ways back to back (shared-machine load hits both alike); the ratio of
the medians and the median of the per-repeat ratios are printed. A check that both ways give the
same features is printed too.

toto-tiny uses checkpoints/toto-tiny when it exists, else its config with random weights and an
untrained tokenizer (the cost is the same); toto-base always uses its config with random weights.

    nice -n 10 .venv/bin/python benchmarks/layer_sweep.py [--models toto-tiny,toto-base] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from totobench.model import Backbone, Toto, TotoConfig, load_backbone
from totobench.model.tokenizer import VisualTokenizer
from totobench.paths import checkpoints_dir

# model -> (kind, clips or images per batch, frames per item): a small batch of each model's input
SHAPES = {"toto-tiny": ("video", 4, 8), "toto-base": ("image", 2, 1)}


def make_backbone(name: str) -> tuple[Backbone, str]:
    """The named model (bundled checkpoint if there is one), else its preset with seed-0 weights."""
    if (checkpoints_dir() / name / "config.json").is_file():
        return load_backbone(name), f"checkpoint {checkpoints_dir() / name}"
    config = TotoConfig.preset(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Toto(config).eval().requires_grad_(False)
        tokenizer = VisualTokenizer(codebook_size=config.codebook_size).eval().requires_grad_(False)
    return Backbone(name, model, tokenizer, sha256="random", path=None), "preset config, random weights"


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench(name: str, repeats: int, log) -> dict:
    backbone, source = make_backbone(name)
    kind, batch, frames_per_item = SHAPES[name]
    r = backbone.config.resolution
    frames = torch.rand(batch, frames_per_item, 3, r, r, generator=torch.Generator().manual_seed(0))
    layers = list(range(backbone.num_layers))

    def one_pass():
        return backbone.forward_frames(frames, layers, kind=kind)

    def per_layer():
        return [backbone.forward_frames(frames, [i], kind=kind)[0] for i in layers]

    with torch.inference_mode():
        a, b = one_pass(), per_layer()  # warm-up, and the check that both ways agree
        max_diff = max((x - y).abs().max().item() for x, y in zip(a, b))
        del a, b
        t_one, t_per = [], []
        for rep in range(repeats):
            t_one.append(timed(one_pass)[0])
            t_per.append(timed(per_layer)[0])
            log(f"{name} repeat {rep + 1}/{repeats}: one pass {t_one[-1]:.3f} s, per layer {t_per[-1]:.3f} s")
    one, per = statistics.median(t_one), statistics.median(t_per)
    seq = (r // backbone.config.patch_size) ** 2 * (frames_per_item if kind == "video" else 1) + 1
    sequences = batch if kind == "video" else batch * frames_per_item
    return {"name": name, "source": source, "layers": len(layers), "input": f"{sequences} x {seq} tokens ({kind})",
            "one_pass_s": one, "per_layer_s": per, "ratio": per / one,
            "paired_ratio": statistics.median(p / o for o, p in zip(t_one, t_per)),
            "expected": (len(layers) + 1) / 2, "max_diff": max_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="toto-tiny,toto-base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} "
          f"interleaved repeats", flush=True)
    rows = [bench(name, args.repeats, lambda m: print("  " + m, flush=True)) for name in args.models.split(",")]
    for row in rows:
        print(f"{row['name']} ({row['source']}; {row['layers']} layers; {row['input']}):")
        print(f"  one pass, all layers : {row['one_pass_s']:8.3f} s")
        print(f"  one pass per layer   : {row['per_layer_s']:8.3f} s")
        print(f"  ratio per-layer / one-pass: {row['ratio']:.2f}x (paired {row['paired_ratio']:.2f}x; "
              f"transformer blocks alone would give {row['expected']:.1f}x)")
        print(f"  max |one pass - per layer| = {row['max_diff']:.1e}")


if __name__ == "__main__":
    main()
