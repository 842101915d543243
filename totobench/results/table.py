"""The per-layer table of one result, printed with rich at the end of a run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def format_metric(value) -> str:
    """A metric as text: 4 decimals below 10 (fractions), 2 above (percentages), "-" for none."""
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    value = float(value)
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def format_hparams(hparams: dict) -> str:
    """{"lr": 0.001, "wd": 0.0} -> "lr=0.001 wd=0"."""
    def one(v):
        return f"{v:g}" if isinstance(v, float) else str(v)
    return " ".join(f"{k}={one(v)}" for k, v in hparams.items()) or "-"


def metric_names(result: dict) -> list[str]:
    """The metrics of a result's rows: the main metric first, then the others in first-seen order."""
    main = result["task"]["main_metric"]
    names = [main]
    for row in result["per_layer"]:
        names.extend(k for k in row["metrics"] if k not in names)
    return names


def layer_table(result: dict) -> Table:
    """A rich Table: one row per layer (depth, metrics, select score, best hyper-parameters),
    the best layer marked with a star and in bold."""
    task, model, protocol = result["task"], result["model"], result["protocol"]
    best = result["best_layer"]["layer"]
    best_value = result["best_layer"]["metrics"][task["main_metric"]]
    names = metric_names(result)
    table = Table(
        title=f"{model['name']} on {task['name']} - {protocol['probe']} probe",
        caption=(f"hyper-parameters chosen on {protocol['selection_split']}, metrics on "
                 f"{protocol['report_split']}; * = best layer {best} (depth "
                 f"{result['best_layer']['depth']:.2f}), "
                 f"{task['main_metric']} = {format_metric(best_value)}"),
    )
    table.add_column("", width=1)
    table.add_column("layer", justify="right")
    table.add_column("depth", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("select", justify="right")
    table.add_column("best hparams")
    for row in sorted(result["per_layer"], key=lambda r: r["layer"]):
        is_best = row["layer"] == best
        table.add_row(
            "*" if is_best else "",
            str(row["layer"]),
            f"{row['depth']:.3f}",
            *(format_metric(row["metrics"].get(name)) for name in names),
            format_metric(row["select_score"]),
            format_hparams(row["best_hparams"]),
            style="bold green" if is_best else None,
        )
    return table


def print_layer_table(result: dict, console: Console | None = None) -> None:
    """Print the per-layer table of a (valid) result dict to `console` (default: a new Console)."""
    (console or Console()).print(layer_table(result))
