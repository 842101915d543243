"""Per-layer curves of several models or runs, aligned by relative depth (`totobench compare`).

The first result of each task is the reference. Every other result's layers get a delta against
the reference at the same relative depth (layer + 1) / num_layers: exact when the reference has a
layer at that depth, linearly interpolated between its two nearest layers otherwise (marked "~"),
none outside the reference's depth range. Runs are not merged here: comparing two runs of the
same model is one of the uses.
"""

from __future__ import annotations

import bisect
import math

from rich.table import Table

from totobench.results.table import format_metric


def _main_curve(result: dict) -> tuple[list[float], list[float]]:
    main = result["task"]["main_metric"]
    rows = sorted(result["per_layer"], key=lambda row: row["depth"])
    return [row["depth"] for row in rows], [float(row["metrics"][main]) for row in rows]


def value_at_depth(result: dict, depth: float) -> tuple[float | None, bool]:
    """The main metric of `result` at relative `depth`: (value, exact).

    exact=True when a layer sits at that depth (within 1e-6); otherwise the linear interpolation
    between the two layers around it, or (None, False) outside the result's depth range.
    """
    xs, ys = _main_curve(result)
    i = bisect.bisect_left(xs, depth - 1e-6)
    if i < len(xs) and math.isclose(xs[i], depth, abs_tol=1e-6):
        return ys[i], True
    if i == 0 or i == len(xs):
        return None, False
    t = (depth - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[i - 1] + t * (ys[i] - ys[i - 1]), False


def layer_deltas(reference: dict, other: dict) -> list[dict]:
    """Per layer of `other`: layer, depth, value, ref_value, delta = value - ref_value, exact.

    ref_value is the reference's main metric at the same relative depth (see `value_at_depth`);
    delta is None where the reference does not reach that depth.
    """
    main = other["task"]["main_metric"]
    rows = []
    for row in sorted(other["per_layer"], key=lambda r: r["layer"]):
        ref_value, exact = value_at_depth(reference, row["depth"])
        value = float(row["metrics"][main])
        delta = None if ref_value is None else value - ref_value
        rows.append({"layer": row["layer"], "depth": row["depth"], "value": value,
                     "ref_value": ref_value, "delta": delta, "exact": exact})
    return rows


def _signed(value: float) -> str:
    return ("+" if value >= 0 else "") + format_metric(value)


def compare_table(results: list[dict], labels: list[str]) -> Table:
    """A rich table of one task: one row per relative depth present in any result; per result its
    layer and main metric (best layer starred), and for all but the first, the delta against it."""
    main = results[0]["task"]["main_metric"]
    reference = results[0]
    table = Table()
    table.add_column("depth", justify="right")
    for i, label in enumerate(labels):
        table.add_column(label, justify="right")
        if i:
            table.add_column("delta", justify="right")
    by_depth: dict[float, list[str]] = {}
    for i, result in enumerate(results):
        best = result["best_layer"]["layer"]
        deltas = {row["layer"]: row for row in layer_deltas(reference, result)} if i else {}
        for row in result["per_layer"]:
            key = round(row["depth"], 6)
            cells = by_depth.setdefault(key, [""] * (2 * len(results) - 1))
            star = "*" if row["layer"] == best else " "
            cells[max(0, 2 * i - 1)] = f"L{row['layer']} {format_metric(row['metrics'][main])}{star}"
            if i:
                d = deltas[row["layer"]]
                if d["delta"] is None:
                    cells[2 * i] = "-"
                else:
                    cells[2 * i] = ("" if d["exact"] else "~") + _signed(d["delta"])
    for depth in sorted(by_depth):
        table.add_row(f"{depth:.3f}", *by_depth[depth])
    return table


def best_layer_lines(results: list[dict], labels: list[str]) -> list[str]:
    """One line per result: its best layer, depth and main metric, and the difference against the
    first result's best."""
    main = results[0]["task"]["main_metric"]
    ref_best = results[0]["best_layer"]["metrics"][main]
    lines = []
    for i, (result, label) in enumerate(zip(results, labels)):
        best = result["best_layer"]
        line = (f"best layer of {label}: L{best['layer']} of {result['model']['num_layers']} "
                f"(depth {best['depth']:.2f}), {main} = {format_metric(best['metrics'][main])}")
        if i:
            line += f" ({_signed(best['metrics'][main] - ref_best)} vs {labels[0]})"
        lines.append(line)
    return lines


def against_published(new: list[dict], published: list[dict]) -> Table:
    """One row per (model, task) of `new`: its best-layer main metric beside the same model and task
    in `published`, the difference, and whether every per-layer number is the same."""
    index = {(r["model"]["name"], r["task"]["name"]): r for r in published}
    table = Table(title="this run against the published results")
    for column in ("model", "task", "metric", "published (layer)", "this run (layer)", "difference", "per-layer"):
        table.add_column(column, justify="right" if column in ("difference",) else "left")
    for r in sorted(new, key=lambda r: (r["model"]["name"], r["task"]["name"])):
        main = r["task"]["main_metric"]
        mine = _best(r)
        ref = index.get((r["model"]["name"], r["task"]["name"]))
        if ref is None:
            table.add_row(r["model"]["name"], r["task"]["name"], main, "-", mine, "-", "not published")
            continue
        same = [(a["layer"], a["metrics"]) for a in ref["per_layer"]] == [(b["layer"], b["metrics"])
                                                                          for b in r["per_layer"]]
        quick = r.get("run", {}).get("quick", False) != ref.get("run", {}).get("quick", False)
        table.add_row(r["model"]["name"], r["task"]["name"], main,
                      _best(ref), mine, _signed(_best_value(r) - _best_value(ref)),
                      "other --quick" if quick else "identical" if same else "differ")
    return table


def _best_value(result: dict) -> float:
    return float(result["best_layer"]["metrics"][result["task"]["main_metric"]])


def _best(result: dict) -> str:
    return f"{format_metric(_best_value(result))} (L{result['best_layer']['layer']})"
