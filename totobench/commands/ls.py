"""`totobench ls [tasks|models|probes]`: what is registered."""

from __future__ import annotations

from rich.console import Console

from totobench.errors import TotobenchError
from totobench.registry import PROBES
from totobench.tasks.config import available_tasks, load_task_config


def cli_ls(args) -> int:
    console = Console()
    if args.what == "tasks":
        from rich.table import Table
        table = Table()
        for column in ("task", "class", "format", "probe", "main metric"):
            table.add_column(column, no_wrap=True)
        table.add_column("description", ratio=1, overflow="fold")
        for name in available_tasks():
            try:
                cfg = load_task_config(name)
            except TotobenchError as err:
                table.add_row(name, "[red]invalid[/]", "", "", "", str(err))
                continue
            table.add_row(name, cfg.kind, cfg.dataset.format, cfg.probe.name, cfg.main_metric, cfg.description)
        console.print(table)
    elif args.what == "models":
        from totobench.model import list_models
        from totobench.registry import MODELS, TOKENIZERS
        console.print("[bold]model families[/] (--model FAMILY:...):")
        for family in MODELS.names():
            console.print(f"  [bold]{family}[/]: {MODELS.description(family)}")
        console.print("[bold]tokenizers[/] (--tokenizer FAMILY:PATH):")
        for family in TOKENIZERS.names():
            console.print(f"  [bold]{family}[/]: {TOKENIZERS.description(family)}")
        console.print("[bold]names[/]:")
        for name in list_models():
            console.print(f"  {name}")
    else:
        for name in PROBES.names():
            console.print(f"[bold]{name}[/]: {PROBES.description(name)}")
    return 0
