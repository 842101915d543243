"""`totobench tokenize --tokenizer SPEC --source DIR_OR_LIST ... --out DIR`: token shards for pre-training."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from totobench.errors import ConfigError
from totobench.pretrain.tokenizer_stage import tokenize_to_shards


def cli_tokenize(args) -> int:
    """Tokenize the sources into shards in --out (a rerun of the same command continues a killed one)."""
    for name in ("resolution", "frames", "stride", "shard_tokens", "batch"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; expected a folder for the token shards")
    tokenize_to_shards(args.tokenizer, args.source, out, resolution=args.resolution, frames=args.frames,
                       stride=args.stride, shard_tokens=args.shard_tokens, batch_files=args.batch,
                       device=args.device, console=Console(stderr=True))
    return 0
