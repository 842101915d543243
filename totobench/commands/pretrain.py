"""`totobench pretrain --config FILE [--out DIR] [--resume] [--device cpu|cuda|cuda:N] [--precision fp32|bf16|fp16]`."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from rich.console import Console

from totobench.errors import ConfigError
from totobench.pretrain import load_pretrain_config, pretrain


def cli_pretrain(args) -> int:
    """Pre-train the tokenizer and Toto as the config says, into --out (or the config's `out:`)."""
    cfg = load_pretrain_config(args.config)
    if args.device:  # the flags override the config's device and train.precision
        cfg["device"] = args.device
    if args.precision:
        cfg["train"]["precision"] = args.precision
    out = Path(args.out or cfg.get("out") or "")
    if not str(out) or str(out) == ".":
        raise ConfigError(f"{args.config}: no output folder; give --out or set `out:` in the config")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    command = ("" if world == 1 else f"torchrun --standalone --nproc_per_node={world} -m ") + \
        "totobench pretrain " + " ".join(shlex.quote(a) for a in _own_args(args))
    pretrain(cfg, out, resume=args.resume, console=Console(stderr=True), command=command)
    return 0


def _own_args(args) -> list[str]:
    """The arguments that reproduce this run (for the model card's command line)."""
    a = ["--config", args.config]
    if args.out:
        a += ["--out", args.out]
    if args.resume:
        a.append("--resume")
    if args.device:
        a += ["--device", args.device]
    if args.precision:
        a += ["--precision", args.precision]
    return a
