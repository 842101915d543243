"""`totobench run`: evaluate a model on tasks at every requested layer (see totobench.runner);
`totobench run --dry-run`: only print what each task would store and compute."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from totobench import parallel
from totobench.features.estimate import format_bytes, format_flops
from totobench.registry import TASKS
from totobench.model.backbone import resolve_precision
from totobench.runner import (estimate_task, parse_layers, print_run_settings, resolve_budget, resolve_data_root,
                              run_command, task_context)
from totobench.tasks.config import load_task_config, resolve_task_names


def cli_run(args) -> int:
    if getattr(args, "dry_run", False):
        return dry_run(args, Console())
    return run_command(args)


def dry_run(args, console: Console) -> int:
    """Print every task's estimate (features.estimate) and return 0. Nothing is extracted or written:
    a preset is built on the meta device (no weights); other models are loaded, but nothing runs
    through them (FLOPs are counted on fake tensors). Dataset roots are read for their annotations
    only (file lists, CSVs, first masks), and not at all by a task whose `dataset.size` gives both
    splits; the data world is generated on first use, as for `run`."""
    from totobench.model import load_backbone
    from totobench.model.backbone import RANDOM_INIT, split_spec

    device = parallel.parse_device(args.device)
    configs = [load_task_config(name, args.overrides) for name in resolve_task_names(args.tasks)]
    precision, budget = resolve_precision(getattr(args, "precision", None), device), resolve_budget(args)
    family, _ = split_spec(args.model.removeprefix(RANDOM_INIT))
    backbone = load_backbone(args.model, tokenizer=getattr(args, "tokenizer", None),
                             device="meta" if family == "preset" else "cpu")
    backbone.precision = precision
    layers = parse_layers(args.layers, backbone.num_layers)
    console.print(f"[bold]{backbone.name}[/] ({backbone.num_layers} layers, dim {backbone.dim}) - layers {layers} "
                  f"- dry run, nothing extracted", soft_wrap=True)
    print_run_settings(console, device, precision, budget)
    stored = flops = 0
    for cfg in configs:
        task = TASKS.get(cfg.kind)(cfg)
        ctx = task_context(cfg, backbone, layers, device, args.quick, resolve_data_root(cfg, args.data_root),
                           Path(args.out), None, console, budget)
        est = estimate_task(task, ctx)
        if est is None:
            console.print(f"{cfg.name}: no estimate (task class {cfg.kind} has no splits to count)")
            continue
        console.print(est.summary(), soft_wrap=True)
        for s in est.splits:
            console.print(f"  {s.split}: {s.items:,} items x {s.stored_tokens_per_item} tokens x {s.width} x "
                          f"{s.layers} layer(s) = {format_bytes(s.bytes)}; reads {s.forward_tokens:,} tokens, "
                          f"{format_flops(s.flops)}", soft_wrap=True, style="dim")
        stored, flops = stored + est.stored_bytes, flops + est.forward_flops
    console.print(f"total: features {format_bytes(stored)}, forward {format_flops(flops)}", soft_wrap=True)
    return 0
