"""Forward throughput of Toto returning every layer, against transformers' LlamaModel, on this CPU.

For each config (random weights, seed 0): tokens/s of `Toto.forward_intermediates(tokens, all layers)`
and of `LlamaModel(tokens, output_hidden_states=True, use_cache=False)` loaded from our
`save_hf_llama` export (same weights, same tokens), their ratio, and the fraction of this machine's
fp32 matmul rate (a large `torch.mm`, measured in the same run) that our forward reaches.

FLOPs of a forward: 2 x (block parameters) x tokens + attention, where attention is
4 x n_layers x L^2 x dim per sequence (QK^T and AV over the full L x L square; a causal kernel may
skip up to half of it, so this is the dense-equivalent rate). The output head is not run by either.

Every repeat times the matmul rate, our forward and transformers' forward back to back, so that load
from other processes on a shared machine hits all three alike; each figure uses the best (fastest)
repeat, the usual estimate of the uncontended speed (load only ever adds time).

    nice -n 10 .venv/bin/python benchmarks/forward.py [--models toto-tiny,toto-base] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from totobench.model import Toto, TotoConfig

# (batch, sequence length): a clip's worth of tokens + the start token
SHAPES = {"toto-tiny": (4, 8 * 64 + 1), "toto-base": (1, 4 * 256 + 1)}


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of an n x n @ n x n torch.mm."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)   # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def forward_flops(config: TotoConfig, batch: int, seq_len: int) -> float:
    block_params = config.n_layers * (4 * config.dim ** 2 + 3 * config.dim * config.mlp_hidden)
    attention = 4 * config.n_layers * seq_len ** 2 * config.dim
    return batch * (2 * block_params * seq_len + attention)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(name: str, repeats: int, console: Console) -> dict:
    from transformers import LlamaForCausalLM

    config = TotoConfig.preset(name)
    batch, seq_len = SHAPES[name]
    torch.manual_seed(0)
    ours = Toto(config).eval()
    with tempfile.TemporaryDirectory() as d:
        ours.save_hf_llama(d)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).model.eval()  # the LlamaModel
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    layers = list(range(config.n_layers))

    def run_ours():
        return ours.forward_intermediates(tokens, layers)

    def run_hf():
        return hf(tokens, output_hidden_states=True, use_cache=False).hidden_states

    with torch.inference_mode():
        a, b = run_ours(), run_hf()   # warm-up, and a check that both compute the same features
        max_diff = max((a[i] - b[i + 1]).abs().max().item() for i in range(config.n_layers - 1))
        peaks, t_ours, t_hf = [], [], []
        for r in range(repeats):
            peaks.append(matmul_gflops(repeats=3))
            t_ours.append(timed(run_ours))
            t_hf.append(timed(run_hf))
            console.log(f"{name} repeat {r + 1}/{repeats}: mm {peaks[-1]:.1f} GFLOP/s, "
                        f"ours {t_ours[-1]:.3f}s, transformers {t_hf[-1]:.3f}s")
    tokens_n, flops = batch * seq_len, forward_flops(config, batch, seq_len)
    ours_gflops = flops / min(t_ours) / 1e9
    return {"name": name, "shape": f"{batch}x{seq_len}", "ours_tok_s": tokens_n / min(t_ours),
            "hf_tok_s": tokens_n / min(t_hf), "ratio": min(t_hf) / min(t_ours),
            "paired_ratio": statistics.median(h / o for o, h in zip(t_ours, t_hf)),
            "peak": max(peaks), "ours_gflops": ours_gflops, "fraction": ours_gflops / max(peaks),
            "max_diff": max_diff}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="toto-tiny,toto-base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=140)
    console.log(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [bench(name, args.repeats, console) for name in args.models.split(",")]
    table = Table(title="forward returning all layers, fp32 CPU (best of repeats; "
                        "paired = median of per-repeat ratios)")
    for col in ("model", "B x L", "ours tok/s", "transformers tok/s", "ours/transformers", "paired",
                "mm GFLOP/s", "ours GFLOP/s", "ours/mm", "max |diff|"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["name"], r["shape"], f"{r['ours_tok_s']:,.0f}", f"{r['hf_tok_s']:,.0f}",
                      f"{r['ratio']:.2f}", f"{r['paired_ratio']:.2f}", f"{r['peak']:.1f}", f"{r['ours_gflops']:.1f}",
                      f"{r['fraction']:.2f}", f"{r['max_diff']:.1e}")
    console.print(table)


if __name__ == "__main__":
    main()
