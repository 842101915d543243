"""Layer-sweep plots: a task's main metric against relative depth, one curve per model or run.

x is the relative depth (layer + 1) / num_layers, so an 8-layer and a 12-layer model line up
(the paper's "probing across layers" figure). Drawn with matplotlib's Agg canvas directly (no
pyplot, no global backend switch), so plotting works headless and inside other programs.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from totobench.io import atomic_write
from totobench.results.schema import safe_name


def run_labels(results: list[dict]) -> list[str]:
    """One legend label per result: the model name, plus its `created` time when the same model
    appears more than once for a task (several runs), plus its source file if that still collides."""
    labels = [r["model"]["name"] for r in results]
    for extra in (lambda r: r["created"], lambda r: r.get("_source", "")):
        counts: dict[tuple[str, str], int] = {}
        for r, label in zip(results, labels):
            key = (r["task"]["name"], label)
            counts[key] = counts.get(key, 0) + 1
        labels = [f"{label} @ {extra(r)}" if counts[(r["task"]["name"], label)] > 1 and extra(r)
                  else label for r, label in zip(results, labels)]
    return labels


def task_names(results: list[dict]) -> list[str]:
    """The tasks of `results` in first-seen order."""
    names: list[str] = []
    for r in results:
        if r["task"]["name"] not in names:
            names.append(r["task"]["name"])
    return names


def _draw_task(ax, task: str, results: list[dict], labels: list[str], colors: dict[str, str]) -> None:
    main = None
    for result, label in zip(results, labels):
        if result["task"]["name"] != task:
            continue
        main = result["task"]["main_metric"]
        rows = sorted(result["per_layer"], key=lambda row: row["layer"])
        x = [row["depth"] for row in rows]
        y = [row["metrics"][main] for row in rows]
        color = colors[label]
        ax.plot(x, y, marker="o", markersize=3.5, linewidth=1.6, color=color,
                label=f"{label} ({result['model']['num_layers']} layers)")
        best = result["best_layer"]
        ax.plot([best["depth"]], [best["metrics"][main]], marker="*", markersize=14, color=color,
                markeredgecolor="black", markeredgewidth=0.6, linestyle="none")
    probes = sorted({r["protocol"]["probe"] for r in results if r["task"]["name"] == task})
    ax.set_title(f"{task} ({', '.join(probes)} probe)", fontsize=10)
    ax.set_xlabel("relative depth (layer + 1) / num_layers")
    ax.set_ylabel(main or "")
    ax.set_xlim(0, 1.03)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def sweep_figure(results: list[dict], task: str | None = None):
    """A matplotlib Figure of the layer sweeps: one axes for one task, a grid for several.

    `results` are valid result dicts; `task` keeps only that task. Best layers are starred.
    Raises ValueError when no result matches.
    """
    from matplotlib.figure import Figure

    labels = run_labels(results)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
               "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    colors: dict[str, str] = {}
    for label in labels:  # one colour per model/run, the same in every panel and per-task figure
        colors.setdefault(label, palette[len(colors) % len(palette)])
    if task is not None:
        labels = [label for r, label in zip(results, labels) if r["task"]["name"] == task]
        results = [r for r in results if r["task"]["name"] == task]
    if not results:
        raise ValueError(f"no results to plot{f' for task {task!r}' if task else ''}")
    tasks = task_names(results)
    ncols = min(3, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.8 * nrows), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, name in zip(axes.flat, tasks):
        _draw_task(ax, name, results, labels, colors)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    return fig


def figure_png_bytes(fig) -> bytes:
    """PNG bytes of a Figure (no Software metadata, so identical inputs give identical bytes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def plot_layer_sweep(results: list[dict], path, task: str | None = None):
    """Write the layer-sweep plot of `results` as PNG to `path` (a file path or a binary file).

    One axes when the results hold one task (or `task` is given), a grid of tasks otherwise;
    x = relative depth, y = each task's main metric, one curve per model/run, best layer starred.
    A path is written atomically. Returns `path`. Raises ValueError when nothing matches `task`.
    """
    data = figure_png_bytes(sweep_figure(results, task))
    if hasattr(path, "write"):
        path.write(data)
        return path
    return atomic_write(path, data)


def write_sweep_plots(results: list[dict], out_dir: str | Path) -> list[Path]:
    """The plots `totobench run` writes next to its result files, into `out_dir` (the model's
    folder of results, out/<model>/).

    One out_dir/<task>.png per task (beside <task>.json; every given result of that task is a
    curve), and when there are several tasks, out_dir/layer_sweep.png, a grid of all of them.
    Returns the paths written.
    """
    out_dir = Path(out_dir)
    tasks = task_names(results)
    written = [plot_layer_sweep(results, out_dir / f"{safe_name(task)}.png", task=task) for task in tasks]
    if len(tasks) > 1:
        written.append(plot_layer_sweep(results, out_dir / "layer_sweep.png"))
    return written
