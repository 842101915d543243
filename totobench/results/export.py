"""Leaderboards of models x tasks and per-layer tables, exported as Markdown, CSV, JSON or HTML.

Input: result files (see schema.py), found under folders or named one by one. Several runs may
hold the same (model, task): the one with the latest `created` time is kept and the export says
which files it replaced. A result file of an unknown schema_version stops the export with one
line naming the file; other JSON files under a folder (no schema_version field, e.g. a previous
JSON export) are skipped.

Leaderboard cell = the main metric (report split) at the result's `best_layer`, with the layer
index and its relative depth (layer + 1) / num_layers.

JSON export schema, "leaderboard_version": "1" (a reader must refuse other versions):

    {"leaderboard_version": "1",
     "totobench_version": str, "created": str (ISO 8601 UTC, "...Z"),
     "result_schema_version": "1",            # version of the result files merged
     "sources": [{"path", "model", "task", "created"}],       # the result files kept
     "merged": [{"model", "task", "kept": path, "replaced": [path, ...]}],
     "models": [{"name", "checkpoint_sha256", "num_layers", "dim", "params"}],
     "tasks": [{"name", "main_metric", "probe", "selection_split", "report_split"}],
     "leaderboard": [{"model", "task", "main_metric", "value", "layer", "depth", "num_layers"}],
     "per_layer": [{"model", "task", "layer", "depth", "is_best", "metrics": {name: number},
                    "select_score": number | null, "best_hparams": {...}}]}

Lists are sorted by model name, then task name, then layer. CSV export: one row per
(model, task, layer) with `is_best` = 1 on the leaderboard's rows; metric columns are
`metric.<name>` over the union of metrics (empty where a task lacks one).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from pathlib import Path

from totobench import __version__
from totobench.errors import DataError
from totobench.results.schema import (RESULT_SCHEMA_VERSION, check_result, created_now,
                                      load_result, parse_created, read_result_json)
from totobench.results.table import format_hparams, format_metric

LEADERBOARD_VERSION = "1"


# ---------------------------------------------------------------------------------------------
# collecting result files

def _load_from_folder(folder: Path) -> list[dict]:
    results = []
    for path in sorted(folder.rglob("*.json")):
        obj = read_result_json(path)
        if "schema_version" not in obj:
            continue  # not a result file (e.g. a JSON export or a task's prediction file)
        check_result(obj, path)
        obj["_source"] = str(path)
        results.append(obj)
    return results


def collect_results(paths, merge: bool = True) -> list[dict]:
    """Valid result dicts from result files and folders (every *.json below a folder).

    `paths`: one path or a list. Each dict gets `_source` = the file it was read from. With
    `merge`, one result per (model name, task name) is kept, the latest `created` (later path on
    a tie), at the place of the first one; the kept dict lists the files it replaced in
    `_replaced` (see `merge_notes`). Results come in the order of `paths` (files of a folder in
    sorted path order).

    Raises DataError (one line naming the file) for a missing path, a folder without result
    files, a file that is not JSON, of an unknown schema_version, or invalid.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    results: list[dict] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = _load_from_folder(path)
            if not found:
                raise DataError(f"{path}: no result files found (expected <model>/<task>.json below it)")
            results.extend(found)
        elif path.exists():
            obj = load_result(path)
            obj["_source"] = str(path)
            results.append(obj)
        else:
            raise DataError(f"{path}: no such result file or folder")
    if merge:
        latest: dict[tuple[str, str], dict] = {}  # dicts keep the first-seen order of keys
        for result in results:
            key = (result["model"]["name"], result["task"]["name"])
            old = latest.get(key)
            if old is None:
                latest[key] = result
                continue
            new_wins = parse_created(result["created"]) >= parse_created(old["created"])
            kept, dropped = (result, old) if new_wins else (old, result)
            replaced = kept.get("_replaced", []) + dropped.get("_replaced", []) + [dropped["_source"]]
            kept["_replaced"] = replaced
            latest[key] = kept
        results = list(latest.values())
    return results


def merge_notes(results: list[dict]) -> list[str]:
    """One line per (model, task) found in several runs: which file was kept, which it replaced."""
    return [f"{r['model']['name']} on {r['task']['name']}: kept {r['_source']} (created {r['created']}, "
            f"the latest) over {', '.join(r['_replaced'])}"
            for r in results if r.get("_replaced")]


# ---------------------------------------------------------------------------------------------
# the tables, as plain data

def _models(results):
    return sorted({r["model"]["name"] for r in results})


def _tasks(results):
    return sorted({r["task"]["name"] for r in results})


def leaderboard_rows(results: list[dict]) -> list[dict]:
    """One row per result: model, task, main_metric, value (best layer's main metric), layer,
    depth, num_layers; sorted by model then task."""
    rows = []
    for r in results:
        main = r["task"]["main_metric"]
        best = r["best_layer"]
        rows.append({"model": r["model"]["name"], "task": r["task"]["name"], "main_metric": main,
                     "value": best["metrics"][main], "layer": best["layer"], "depth": best["depth"],
                     "num_layers": r["model"]["num_layers"], "deviations": list(r["protocol"].get("deviations", []))})
    return sorted(rows, key=lambda row: (row["model"], row["task"]))


def per_layer_rows(results: list[dict]) -> list[dict]:
    """One row per (model, task, layer): depth, is_best, metrics, select_score, best_hparams."""
    rows = []
    for r in results:
        for row in r["per_layer"]:
            rows.append({"model": r["model"]["name"], "task": r["task"]["name"], "layer": row["layer"],
                         "depth": row["depth"], "is_best": row["layer"] == r["best_layer"]["layer"],
                         "metrics": dict(row["metrics"]), "select_score": row["select_score"],
                         "best_hparams": dict(row["best_hparams"])})
    return sorted(rows, key=lambda row: (row["model"], row["task"], row["layer"]))


def _task_info(results, task):
    first = next(r for r in results if r["task"]["name"] == task)
    p = first["protocol"]
    return {"name": task, "main_metric": first["task"]["main_metric"], "probe": p["probe"],
            "selection_split": p["selection_split"], "report_split": p["report_split"]}


def _task_metric_names(results, task):
    main = _task_info(results, task)["main_metric"]
    names = [main]
    for r in results:
        if r["task"]["name"] == task:
            for row in r["per_layer"]:
                names.extend(k for k in row["metrics"] if k not in names)
    return names


def _cell(row) -> str:
    mark = " †" if row.get("deviations") else ""
    return f"{format_metric(row['value'])} (L{row['layer']}, {row['depth']:.2f}){mark}"


DEVIATION_NOTE = "† = the run departs from the paper's protocol; how, below (docs/protocols.md)."


def deviation_lines(results: list[dict]) -> list[tuple[str, list[str]]]:
    """(task, its deviations) for every task whose results record any, each deviation once (models
    may differ: e.g. the frames of a model's own clip)."""
    out = []
    for task in _tasks(results):
        seen: list[str] = []
        for r in results:
            if r["task"]["name"] == task:
                seen += [d for d in r["protocol"].get("deviations", []) if d not in seen]
        if seen:
            out.append((task, seen))
    return out


# ---------------------------------------------------------------------------------------------
# formats

def to_json(results: list[dict]) -> str:
    """The leaderboard_version 1 JSON document described in this module's docstring."""
    ordered = sorted(results, key=lambda r: (r["model"]["name"], r["task"]["name"]))
    models = {}
    for r in ordered:
        m = r["model"]
        models.setdefault(m["name"], {k: m[k] for k in ("name", "checkpoint_sha256", "num_layers",
                                                        "dim", "params")})
    doc = {
        "leaderboard_version": LEADERBOARD_VERSION,
        "totobench_version": __version__,
        "created": created_now(),
        "result_schema_version": RESULT_SCHEMA_VERSION,
        "sources": [{"path": r["_source"], "model": r["model"]["name"], "task": r["task"]["name"],
                     "created": r["created"]} for r in ordered],
        "merged": [{"model": r["model"]["name"], "task": r["task"]["name"], "kept": r["_source"],
                    "replaced": list(r["_replaced"])} for r in ordered if r.get("_replaced")],
        "models": [models[name] for name in sorted(models)],
        "tasks": [_task_info(results, t) for t in _tasks(results)],
        "leaderboard": leaderboard_rows(results),
        "per_layer": per_layer_rows(results),
    }
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def to_csv(results: list[dict]) -> str:
    """One row per (model, task, layer); `is_best` marks the leaderboard rows."""
    metric_names = sorted({k for r in results for row in r["per_layer"] for k in row["metrics"]})
    mains = {r["task"]["name"]: r["task"]["main_metric"] for r in results}
    nlayers = {(r["model"]["name"], r["task"]["name"]): r["model"]["num_layers"] for r in results}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    def number(value) -> str:  # repr keeps every digit of the stored value
        return "" if value is None else repr(float(value))

    writer.writerow(["model", "task", "main_metric", "num_layers", "layer", "depth", "is_best",
                     "main_value", *(f"metric.{m}" for m in metric_names), "select_score",
                     "best_hparams"])
    for row in per_layer_rows(results):
        main = mains[row["task"]]
        writer.writerow([row["model"], row["task"], main, nlayers[(row["model"], row["task"])],
                         row["layer"], f"{row['depth']:.6g}", int(row["is_best"]),
                         number(row["metrics"][main]),
                         *(number(row["metrics"].get(m)) for m in metric_names),
                         number(row["select_score"]), json.dumps(row["best_hparams"], sort_keys=True)])
    return buffer.getvalue()


# A grid is what the Markdown and HTML tables share: a header, and rows of (text, sort key)
# cells, the sort key being the raw number (None for an empty cell), plus which rows are best.

def _leaderboard_grid(results: list[dict]) -> tuple[list[str], list[list[tuple[str, object]]]]:
    board = {(row["model"], row["task"]): row for row in leaderboard_rows(results)}
    nlayers = {r["model"]["name"]: r["model"]["num_layers"] for r in results}
    tasks = _tasks(results)
    header = ["model", "layers"] + [f"{t} ({_task_info(results, t)['main_metric']})" for t in tasks]
    rows = []
    for model in _models(results):
        cells = [(model, model), (str(nlayers[model]), nlayers[model])]
        for t in tasks:
            row = board.get((model, t))
            cells.append(("-", None) if row is None else (_cell(row), row["value"]))
        rows.append(cells)
    return header, rows


def _task_grid(results: list[dict], task: str):
    names = _task_metric_names(results, task)
    header = ["model", "layer", "depth", *names, "select", "best hparams"]
    rows, best = [], []
    for row in per_layer_rows(results):
        if row["task"] != task:
            continue
        values = [row["metrics"].get(n) for n in names] + [row["select_score"]]
        hparams = format_hparams(row["best_hparams"])
        rows.append([(row["model"], row["model"]), (str(row["layer"]), row["layer"]),
                     (f"{row['depth']:.3f}", row["depth"]),
                     *((format_metric(v), v) for v in values), (hparams, hparams)])
        best.append(row["is_best"])
    return header, rows, best


def _md(text) -> str:
    return str(text).replace("|", "\\|")


def _md_table(header, rows, best=None) -> list[str]:
    text_columns = [isinstance(key, str) for _, key in rows[0]] if rows else [True] * len(header)
    lines = ["| " + " | ".join(_md(h) for h in header) + " |",
             "|" + "".join("---|" if text else "---:|" for text in text_columns)]
    for i, cells in enumerate(rows):
        texts = [_md(text) for text, _ in cells]
        if best and best[i]:
            texts = [f"**{t}**" for t in texts]
        lines.append("| " + " | ".join(texts) + " |")
    return lines


def to_markdown(results: list[dict]) -> str:
    """A leaderboard table (models x tasks) and one per-layer table per task, in Markdown."""
    lines = ["# totobench leaderboard", "",
             "Each cell: the main metric (on the report split) at the model's best layer, then "
             "(layer, relative depth (layer + 1) / num_layers).", ""]
    lines += _md_table(*_leaderboard_grid(results))
    deviations = deviation_lines(results)
    if deviations:
        lines += ["", DEVIATION_NOTE, ""]
        lines += [f"- **{_md(task)}**: " + "; ".join(_md(d) for d in found) for task, found in deviations]
    for task in _tasks(results):
        info = _task_info(results, task)
        lines += ["", f"## {_md(task)}", "",
                  f"{info['probe']} probe; hyper-parameters chosen on {info['selection_split']}, "
                  f"metrics on {info['report_split']}; **bold** = best layer.", ""]
        lines += _md_table(*_task_grid(results, task))
    notes = merge_notes(results)
    if notes:
        lines += ["", "## Merged runs", ""] + [f"- {_md(n)}" for n in notes]
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px 32px;
     color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 6px}
h2{font-size:18px;margin:28px 0 6px;border-bottom:2px solid #d5dcea;padding-bottom:3px}
p.note{color:#4a5568;font-size:13px;margin:4px 0 10px}
table{border-collapse:collapse;font-size:13px;margin:8px 0 12px}
th,td{border:1px solid #c9d1e0;padding:4px 9px;text-align:right;white-space:nowrap}
th{background:#dbe6f7;cursor:pointer;user-select:none}th:hover{background:#c5d6f2}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td:first-child,th:first-child,td.text{text-align:left}tr.best td{background:#e3f6e3;font-weight:600}
img.plot{display:block;max-width:100%;border:1px solid #e2e6ee;margin:6px 0}
ul.merged{font-size:13px;color:#4a5568}
"""

# Click a header to sort its table by that column (again: reverse); cells sort by their
# data-sort number when they have one, else by text; empty cells stay last.
_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var asc = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    function key(tr) {
      var td = tr.children[col];
      if (!td.hasAttribute("data-sort")) return td.textContent;
      var v = td.getAttribute("data-sort");
      return v === "" ? null : parseFloat(v);
    }
    Array.from(body.rows).map(function (tr, i) { return [key(tr), i, tr]; }).sort(function (a, b) {
      if (a[0] === null || b[0] === null) return (a[0] === null) - (b[0] === null) || a[1] - b[1];
      var c = a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0;
      return (asc ? c : -c) || a[1] - b[1];
    }).forEach(function (t) { body.appendChild(t[2]); });
  });
});
"""


def _h(text) -> str:
    return html.escape(str(text))


def _html_table(header, rows, best=None, table_id=None) -> list[str]:
    id_attr = f' id="{table_id}"' if table_id else ""
    out = [f'<table class="sortable"{id_attr}><thead><tr>' + "".join(f"<th>{_h(h)}</th>" for h in header)
           + "</tr></thead><tbody>"]
    for i, cells in enumerate(rows):
        tds = []
        for text, key in cells:
            if isinstance(key, str):
                tds.append(f'<td class="text">{_h(text)}</td>')
            else:  # numbers sort by their raw value, not by the rounded text
                tds.append(f'<td data-sort="{"" if key is None else repr(float(key))}">{_h(text)}</td>')
        out.append(f'<tr{" class=best" if best and best[i] else ""}>' + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    return out


def _plot_data_uri(results, task) -> str:
    from totobench.results.plots import figure_png_bytes, sweep_figure

    png = figure_png_bytes(sweep_figure(results, task))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def to_html(results: list[dict]) -> str:
    """One self-contained HTML page (inline CSS and JS, plots as base64 PNG, no network):
    a sortable leaderboard, then per task its layer-sweep plot and sortable per-layer table."""
    tasks = _tasks(results)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<title>totobench leaderboard</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>totobench leaderboard</h1>",
           f'<p class="note">{len(results)} results, {len(_models(results))} models, '
           f"{len(tasks)} tasks. "
           "Each cell: the main metric (on the report split) at the model's best layer, then "
           "(layer, relative depth (layer + 1) / num_layers). Click a column header to sort.</p>"]
    out += _html_table(*_leaderboard_grid(results), table_id="leaderboard")
    deviations = deviation_lines(results)
    if deviations:
        out += [f'<p class="note">{_h(DEVIATION_NOTE)}</p>', '<ul class="deviations">',
                *(f"<li><b>{_h(task)}</b>: {_h('; '.join(found))}</li>" for task, found in deviations), "</ul>"]
    for task in tasks:
        info = _task_info(results, task)
        out += [f"<h2>{_h(task)}</h2>",
                f'<p class="note">{_h(info["probe"])} probe; hyper-parameters chosen on '
                f'{_h(info["selection_split"])}, metrics on {_h(info["report_split"])}; '
                "stars and green rows mark the best layer.</p>",
                f'<img class="plot" alt="layer sweep of {_h(task)}" '
                f'src="{_plot_data_uri(results, task)}">']
        out += _html_table(*_task_grid(results, task))
    notes = merge_notes(results)
    if notes:
        out += ["<h2>Merged runs</h2>", '<ul class="merged">',
                *(f"<li>{_h(n)}</li>" for n in notes), "</ul>"]
    out += [f"<script>{_JS}</script>", "</body></html>"]
    return "\n".join(out) + "\n"


FORMATS = {"md": to_markdown, "csv": to_csv, "json": to_json, "html": to_html}


def export(results: list[dict], fmt: str) -> str:
    """The export of `results` (from `collect_results`) in format md, csv, json or html."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[fmt](results)
