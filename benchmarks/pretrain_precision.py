"""What the scaling switches of `totobench pretrain` cost and change, side by side on one machine.

From the same seed and the same batches (the synthetic copy task of copy_emergence.py), one small
Toto is trained per setting with the pre-training step (`train_step`: AdamW, warmup-free constant lr,
clipping) and the script prints, per setting, the time per step relative to fp32 and the largest
relative difference of its loss curve from the fp32 curve over the first `--steps` steps:
  fp32 | bf16 autocast | fp16 autocast + GradScaler | fp32 + activation checkpointing |
  fp32 accumulated over micro-batches of 1 sequence.

    .venv/bin/python benchmarks/pretrain_precision.py                 # ~1-2 min on 2 CPU cores
    .venv/bin/python benchmarks/pretrain_precision.py --dim 256 --layers 8 --steps 5
"""

from __future__ import annotations

import argparse
import time

import torch

from copy_emergence import copy_batch  # the script folder is on sys.path
from totobench.model.toto import TotoConfig
from totobench.pretrain.train import initial_model, make_optimizer, train_step

SETTINGS = [("fp32", "fp32", False, None), ("bf16", "bf16", False, None), ("fp16", "fp16", False, None),
            ("fp32 + checkpointing", "fp32", True, None), ("fp32, micro-batch 1", "fp32", False, 1)]


def run(mc: TotoConfig, batches: list[torch.Tensor], precision: str, checkpointing: bool, micro: int | None,
        lr: float) -> tuple[list[float], float]:
    """(loss per step, seconds per step after the first) of one setting."""
    model = initial_model(mc, 0)
    model.activation_checkpointing = checkpointing
    opt = make_optimizer(model, {"lr": lr, "weight_decay": 0.1})
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    losses, times = [], []
    for seqs in batches:
        t0 = time.perf_counter()
        loss, _ = train_step(model, opt, seqs, mc.end_id, lr, micro or len(seqs), 1.0, precision, scaler)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    return losses, sum(times[1:]) / max(1, len(times) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--frames", type=int, default=4, help="frames of 64 tokens per sequence")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    mc = TotoConfig.from_dict({**TotoConfig.preset("toto-tiny").to_dict(), "dim": a.dim, "n_layers": a.layers,
                               "n_heads": max(1, a.dim // 32), "mlp_hidden": 2 * a.dim})
    gen = torch.Generator().manual_seed(0)
    batches = [copy_batch(a.batch, a.frames, mc.codebook_size, 0.1, gen) for _ in range(a.steps)]
    print(f"dim {a.dim}, {a.layers} layers, {a.batch} x {batches[0].shape[1]} tokens, {a.steps} steps, "
          f"{torch.get_num_threads()} threads")
    base, base_s = None, None
    for name, precision, ckpt, micro in SETTINGS:
        losses, sec = run(mc, batches, precision, ckpt, micro, a.lr)
        base, base_s = (losses, sec) if base is None else (base, base_s)
        worst = max(abs(x - y) / y for x, y in zip(losses, base))
        print(f"{name:>22}: {sec * 1000:8.1f} ms/step  ({sec / base_s:6.2f}x fp32)  "
              f"loss step 1 {losses[0]:.4f}  step {a.steps} {losses[-1]:.4f}  max rel diff from fp32 {worst:.2e}")


if __name__ == "__main__":
    main()
