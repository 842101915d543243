"""`totobench info SPEC`: a checkpoint's config, parameter count, sha256 and training facts."""

from __future__ import annotations

import json

import torch
from rich.console import Console
from rich.table import Table

from totobench.errors import ConfigError
from totobench.model import Toto, load_backbone
from totobench.model.backbone import resolve_checkpoint, split_spec
from totobench.model.checkpoint import file_sha256, read_config, read_training


def cli_info(args) -> int:
    """Print what `args.checkpoint` (a checkpoint folder, a registered name or random-init:NAME)
    is: config, parameter count, sha256 of the weights, tokenizer and training facts."""
    name = args.checkpoint
    family, rest = split_spec(name)
    if family not in ("checkpoint", "random-init"):
        raise ConfigError(f"totobench info describes totobench checkpoints; {name!r} is a {family} model")
    backbone = load_backbone(name) if family == "random-init" else None
    directory = resolve_checkpoint(rest)
    config = read_config(directory)
    with torch.device("meta"):
        meta = Toto(config)
    sha = backbone.sha256 if backbone else file_sha256(directory / "model.safetensors")

    console = Console()
    console.print(f"[bold]{name}[/bold]  ({directory})")
    if backbone:
        console.print("weights: random (torch.manual_seed(0)); config and tokenizer from the checkpoint; "
                      "sha256 below is of those random weights serialised as model.safetensors")
    console.print(f"parameters: {meta.num_params():,} (+ {meta.tok_embeddings.weight.numel():,} in the "
                  f"input embedding table = {meta.num_params(non_embedding=False):,})")
    console.print(f"sha256: {sha}", soft_wrap=True)

    table = Table(title="config", show_header=False)
    for k, v in config.to_dict().items():
        table.add_row(k, str(v))
    table.add_row("tokens_per_frame", str(config.tokens_per_frame))
    console.print(table)

    tok_cfg = directory / "tokenizer" / "config.json"
    if tok_cfg.is_file():
        tok = json.loads(tok_cfg.read_text())
        console.print("tokenizer: " + ", ".join(f"{k}={v}" for k, v in tok.items()), soft_wrap=True)
    else:
        console.print("tokenizer: [yellow]none[/yellow] (no tokenizer/ folder)")

    training = read_training(directory)
    if training and not backbone:
        table = Table(title="training", show_header=False)
        for k, v in training.items():
            table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
        console.print(table)
    elif not backbone:
        console.print("training: [yellow]no training.json[/yellow]")
    return 0
