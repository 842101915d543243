"""`totobench compare RESULTS... [--task T] [--plot FILE.png] [--against PUBLISHED]`: per-layer
deltas by relative depth; with --against, each (model, task) of RESULTS beside the same one in
PUBLISHED (what `make run` prints against the committed results/)."""

from __future__ import annotations

from rich.console import Console

from totobench.errors import DataError
from totobench.results.compare import against_published, best_layer_lines, compare_table
from totobench.results.export import collect_results
from totobench.results.plots import plot_layer_sweep, run_labels, task_names


def cli_compare(args, console: Console | None = None) -> int:
    """Print each task's comparison table and best layers; write the plot when --plot is given.

    Raises DataError when no result matches --task (the tasks found are listed).
    """
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped: rich would squeeze the table into 80 columns
            console = Console(width=160)
    results = collect_results(args.results, merge=False)
    tasks = task_names(results)
    if args.task:
        if args.task not in tasks:
            raise DataError(f"no result for task {args.task!r} in {', '.join(args.results)} "
                            f"(tasks found: {', '.join(tasks)})")
        tasks = [args.task]
    for task in tasks:
        task_results = [r for r in results if r["task"]["name"] == task]
        labels = run_labels(task_results)
        console.print(f"[bold]{task}[/bold]: {task_results[0]['task']['main_metric']} by relative depth "
                      f"(layer + 1) / num_layers; reference: {labels[0]}", highlight=False)
        console.print(compare_table(task_results, labels))
        console.print("* = best layer of that model/run; delta = value - reference at the same depth "
                      "(~: reference interpolated between its two nearest layers; -: out of its range)",
                      highlight=False)
        for line in best_layer_lines(task_results, labels):
            console.print(line, highlight=False)
        console.print()
    if args.plot:
        path = plot_layer_sweep(results, args.plot, task=args.task)
        console.print(f"wrote {path}", highlight=False)
    if getattr(args, "against", None):
        console.print(against_published(results, collect_results([args.against], merge=False)))
    return 0
