"""`totobench info SPEC`: what a model is - family, layers, width, parameters, FLOPs, token grid,
tokenizer - and, for a totobench checkpoint, its config and training facts."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from totobench.model import load_backbone
from totobench.model.backbone import RANDOM_INIT, split_spec
from totobench.model.checkpoint import read_training


def cli_info(args) -> int:
    """Print what `args.checkpoint` (any model spec) is; preset:NAME is built on the meta device."""
    spec = args.checkpoint
    family, _ = split_spec(spec.removeprefix(RANDOM_INIT))
    device = "meta" if family == "preset" else "cpu"
    backbone = load_backbone(spec, tokenizer=getattr(args, "tokenizer", None), device=device)
    d = backbone.describe()
    console = Console()
    console.print(f"[bold]{backbone.name}[/bold]  ({backbone.family}{', ' + str(backbone.path) if backbone.path else ''})")
    table = Table(show_header=False)
    rows = [("layers", d["num_layers"]), ("width", d["dim"]), ("heads", d["num_heads"]),
            ("parameters", f"{d['params']:,}"), ("forward FLOPs per token", f"{backbone.flops_per_token():,}"),
            ("token grid (T', h, w) of a default input", d["token_grid"]),
            ("input", ", ".join(f"{k}={v}" for k, v in d["inputs"].items()))]
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
    console.print(f"tokenizer: {d['tokenizer'] or 'none (reads pixels)'}", soft_wrap=True)
    console.print(f"sha256: {backbone.sha256}", soft_wrap=True)
    if backbone.tokenizer_sha256:
        console.print(f"tokenizer sha256: {backbone.tokenizer_sha256}", soft_wrap=True)
    for note in d["notes"]:
        console.print(f"note: {note}", soft_wrap=True)
    config = getattr(backbone, "config", None)
    if config is not None:
        table = Table(title="config", show_header=False)
        for k, v in config.to_dict().items():
            table.add_row(k, str(v))
        console.print(table)
    if backbone.family == "checkpoint" and backbone.path is not None:
        training = read_training(backbone.path)
        if training:
            table = Table(title="training", show_header=False)
            for k, v in training.items():
                table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
            console.print(table)
        else:
            console.print("training: [yellow]no training.json[/yellow]")
    elif spec.startswith(RANDOM_INIT):
        console.print("weights: random (torch.manual_seed(0)); sha256 is of those random weights")
    return 0
