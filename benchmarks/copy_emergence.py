"""How many steps does a Toto need before it copies the previous frame? A synthetic copy task.

Sequences are a video start token then `--frames` frames of 64 random codes; each frame repeats the
previous one except for a `--change` fraction of its positions, which get new random codes. The only
thing to learn is "the token at this place in the previous frame comes next", the mechanism that a
model must have before it can learn motion (benchmarks/video_nll.py measures the same thing on the
Kinetics clips). For each codebook size and output-head init, side by side from the same seed, the
script trains from scratch with the pre-training recipe (AdamW 0.9/0.95, warmup, clipping) and
prints the next-token loss of frames 1.. every `--eval-every` steps, the loss a perfect copier gets,
and the first step at which the model has closed half the gap from uniform to that floor.

    .venv/bin/python benchmarks/copy_emergence.py                      # toto-tiny's shape, ~25 min
    .venv/bin/python benchmarks/copy_emergence.py --layers 2 --dim 128 --steps 400   # ~6 min
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from totobench.model.toto import TotoConfig
from totobench.pretrain import initial_model, make_optimizer, next_token_loss


def copy_batch(n: int, frames: int, codebook: int, change: float, gen: torch.Generator) -> torch.Tensor:
    """LongTensor [n, 1 + frames * 64]: video start token, then frames that mostly repeat the last."""
    out = [torch.randint(0, codebook, (n, 64), generator=gen)]
    for _ in range(1, frames):
        fresh = torch.randint(0, codebook, (n, 64), generator=gen)
        out.append(torch.where(torch.rand(n, 64, generator=gen) < change, fresh, out[-1]))
    return torch.cat([torch.full((n, 1), codebook + 1)] + out, 1)


def copy_floor(codebook: int, change: float) -> float:
    """Expected loss (nats) of the best predictor of frames 1..: the previous token with probability
    1 - change + change / codebook, any other code with probability change / codebook."""
    p_same, p_other = 1 - change + change / codebook, change / codebook
    return -(p_same * math.log(p_same) + (codebook - 1) * p_other * math.log(p_other))


def later_frames_loss(model, seqs: torch.Tensor) -> float:
    """Mean next-token loss of the tokens of frames 1.. (targets 64.. of the shifted sequence)."""
    with torch.no_grad():
        nll = next_token_loss(model, seqs, model.config.end_id, reduction="none")
    return float(nll.reshape(len(seqs), -1)[:, 64:].mean())


def run(codebook: int, output_init: str, a) -> list[tuple[int, float]]:
    base = TotoConfig.preset("toto-tiny").to_dict()
    mc = TotoConfig.from_dict({**base, "codebook_size": codebook, "vocab_size": codebook + 3,
                               "n_layers": a.layers, "dim": a.dim, "n_heads": a.dim // 32,
                               "mlp_hidden": a.dim * 11 // 4, "num_frames": a.frames})
    model = initial_model(mc, 0, output_init)
    opt = make_optimizer(model, {"lr": a.lr, "weight_decay": 0.1})
    gen = torch.Generator().manual_seed(1)
    held = copy_batch(32, a.frames, codebook, a.change, gen)
    curve = []
    for step in range(a.steps + 1):
        if step % a.eval_every == 0:
            curve.append((step, later_frames_loss(model, held)))
        if step == a.steps:
            break
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / 20)
        loss = next_token_loss(model, copy_batch(a.batch_size, a.frames, codebook, a.change, gen), mc.end_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return curve


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codebooks", default="1024,256")
    p.add_argument("--output-inits", default="random,embedding")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--change", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"copy task: {a.frames} frames x 64 codes, {a.change:.0%} of positions change per frame; "
          f"model {a.layers} layers x dim {a.dim}; lr {a.lr}, batch {a.batch_size}")
    print(f"{'codebook':>8} {'output init':>11} {'uniform':>8} {'floor':>6}  loss of frames 1.. at steps "
          f"0..{a.steps} every {a.eval_every}   first step halfway   s")
    for codebook in (int(c) for c in a.codebooks.split(",")):
        for init in a.output_inits.split(","):
            t0 = time.perf_counter()
            curve = run(codebook, init, a)
            uniform, floor = math.log(codebook + 3), copy_floor(codebook, a.change)
            half = next((s for s, v in curve if v < (uniform + floor) / 2), None)
            losses = " ".join(f"{v:.2f}" for _, v in curve)
            print(f"{codebook:>8} {init:>11} {uniform:8.2f} {floor:6.2f}  {losses}   "
                  f"{half if half is not None else f'> {a.steps}':>6}   {time.perf_counter() - t0:.0f}", flush=True)


if __name__ == "__main__":
    main()
