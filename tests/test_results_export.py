"""Export of result files written here: two models of different depth, two runs, a future schema."""

from __future__ import annotations

import base64
import csv
import io
import json
import re

import pytest

from test_results_fakes import fake_result, write_fake
from totobench.cli import main
from totobench.errors import DataError
from totobench.results.export import (LEADERBOARD_VERSION, collect_results, export, merge_notes,
                                      to_csv, to_html, to_json, to_markdown)

TINY_IMAGENET_RUN1 = [0.45, 0.50, 0.55, 0.60, 0.55, 0.50, 0.45, 0.40]        # best L3
TINY_IMAGENET_RUN2 = [0.50, 0.50, 0.62, 0.50, 0.50, 0.50, 0.50, 0.50]        # best L2
TINY_K400 = [0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80]                 # best L7
BASE_IMAGENET = [0.30, 0.35, 0.40, 0.45, 0.50, 0.70, 0.65, 0.60, 0.55, 0.50, 0.45, 0.40]  # best L5


@pytest.fixture
def results_dir(tmp_path):
    """run1: toto-tiny (8 layers) on imagenet and k400, toto-base (12 layers) on imagenet;
    run2 (a month later): toto-tiny on imagenet again."""
    root = tmp_path / "results"
    write_fake(root / "run1", model="toto-tiny", values=TINY_IMAGENET_RUN1)
    write_fake(root / "run1", model="toto-tiny", task="k400", values=TINY_K400)
    write_fake(root / "run1", model="toto-base", num_layers=12, values=BASE_IMAGENET)
    write_fake(root / "run2", model="toto-tiny", values=TINY_IMAGENET_RUN2, created="2025-02-01T00:00:00Z")
    return root


def test_collect_merges_runs_keeping_the_latest(results_dir):
    results = collect_results(results_dir)
    assert [(r["model"]["name"], r["task"]["name"]) for r in results] == [
        ("toto-base", "imagenet"), ("toto-tiny", "imagenet"), ("toto-tiny", "k400")]
    tiny = results[1]
    assert tiny["created"] == "2025-02-01T00:00:00Z" and tiny["best_layer"]["layer"] == 2
    assert merge_notes(results) == [
        f"toto-tiny on imagenet: kept {results_dir}/run2/toto-tiny/imagenet.json (created "
        f"2025-02-01T00:00:00Z, the latest) over {results_dir}/run1/toto-tiny/imagenet.json"]
    # in the other order of the paths the latest still wins
    swapped = collect_results([results_dir / "run2", results_dir / "run1"])
    assert [r["created"] for r in swapped if r["task"]["name"] == "imagenet" and
            r["model"]["name"] == "toto-tiny"] == ["2025-02-01T00:00:00Z"]
    assert len(collect_results(results_dir, merge=False)) == 4


def test_unknown_schema_version_is_rejected_with_one_line(results_dir, capsys):
    future = results_dir / "run3" / "toto-tiny" / "imagenet.json"
    future.parent.mkdir(parents=True)
    future.write_text(json.dumps(dict(fake_result(), schema_version="2")))
    with pytest.raises(DataError) as err:
        collect_results(results_dir)
    assert str(err.value) == (f"{future}: result schema_version '2' is not supported "
                              "(this totobench reads schema_version '1')")
    assert main(["export", str(results_dir), "--format", "json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"totobench: error: {err.value}\n"


def test_other_json_files_are_skipped_and_an_empty_folder_is_an_error(results_dir, tmp_path):
    (results_dir / "leaderboard.json").write_text(to_json(collect_results(results_dir)))
    (results_dir / "run1" / "toto-tiny" / "predictions.json").write_text('{"version": "1.0", "results": {}}')
    assert len(collect_results(results_dir)) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no result files found"):
        collect_results(tmp_path / "empty")
    with pytest.raises(DataError, match="no such result file or folder"):
        collect_results(tmp_path / "nope")


def test_markdown_leaderboard_and_per_layer_tables(results_dir):
    md = to_markdown(collect_results(results_dir))
    lines = md.splitlines()
    start = lines.index("| model | layers | imagenet (top1) | k400 (top1) |")
    assert lines[start + 2:start + 4] == [
        "| toto-base | 12 | 0.7000 (L5, 0.50) | - |",
        "| toto-tiny | 8 | 0.6200 (L2, 0.38) | 0.8000 (L7, 1.00) |",
    ]
    imagenet = lines[lines.index("## imagenet"):lines.index("## k400")]
    layer_rows = [line for line in imagenet if line.startswith("| toto-") or line.startswith("| **")]
    assert len(layer_rows) == 12 + 8
    assert "| **toto-base** | **5** | **0.500** | **0.7000** | **0.9000** | **0.6900** | **lr=0.003 wd=0** |" \
        in imagenet
    assert "| toto-tiny | 3 | 0.500 | 0.5000 | 0.7000 | 0.4900 | lr=0.001 wd=0 |" in imagenet
    assert lines[-1].startswith("- toto-tiny on imagenet: kept ")


def test_csv_has_one_row_per_layer_and_marks_the_best(results_dir):
    rows = list(csv.DictReader(io.StringIO(to_csv(collect_results(results_dir)))))
    assert len(rows) == 12 + 8 + 8
    best = [(r["model"], r["task"], int(r["layer"]), float(r["main_value"]), float(r["depth"]))
            for r in rows if r["is_best"] == "1"]
    assert best == [("toto-base", "imagenet", 5, 0.70, 0.5), ("toto-tiny", "imagenet", 2, 0.62, 0.375),
                    ("toto-tiny", "k400", 7, 0.80, 1.0)]
    first = rows[0]
    assert (first["num_layers"], first["metric.top5"], json.loads(first["best_hparams"])) == \
        ("12", "0.5", {"lr": 0.001, "wd": 0.0})


def test_json_export_schema(results_dir):
    doc = json.loads(to_json(collect_results(results_dir)))
    assert doc["leaderboard_version"] == LEADERBOARD_VERSION == "1"
    assert doc["result_schema_version"] == "1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["created"])
    assert all(row.pop("deviations") == [] for row in doc["leaderboard"])   # none recorded in these results
    assert doc["leaderboard"] == [
        {"model": "toto-base", "task": "imagenet", "main_metric": "top1", "value": 0.70, "layer": 5,
         "depth": 0.5, "num_layers": 12},
        {"model": "toto-tiny", "task": "imagenet", "main_metric": "top1", "value": 0.62, "layer": 2,
         "depth": 0.375, "num_layers": 8},
        {"model": "toto-tiny", "task": "k400", "main_metric": "top1", "value": 0.80, "layer": 7,
         "depth": 1.0, "num_layers": 8},
    ]
    assert [m["name"] for m in doc["models"]] == ["toto-base", "toto-tiny"]
    assert doc["tasks"][0] == {"name": "imagenet", "main_metric": "top1", "probe": "linear",
                               "selection_split": "train-holdout-10pct", "report_split": "val"}
    assert doc["merged"] == [{"model": "toto-tiny", "task": "imagenet",
                              "kept": str(results_dir / "run2/toto-tiny/imagenet.json"),
                              "replaced": [str(results_dir / "run1/toto-tiny/imagenet.json")]}]
    assert len(doc["per_layer"]) == 28 and sum(row["is_best"] for row in doc["per_layer"]) == 3
    assert doc["per_layer"][5] == {"model": "toto-base", "task": "imagenet", "layer": 5, "depth": 0.5,
                                   "is_best": True, "metrics": {"top1": 0.7, "top5": 0.9},
                                   "select_score": 0.69, "best_hparams": {"lr": 0.003, "wd": 0.0}}


def test_html_is_self_contained_with_sortable_tables_and_plots(results_dir):
    page = to_html(collect_results(results_dir))
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)", page)  # no network fetch
    assert "<link" not in page and "@import" not in page
    assert page.count('<table class="sortable"') == 3  # leaderboard + one per task
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert '<td data-sort="0.62">0.6200 (L2, 0.38)</td>' in page
    assert '<tr class=best><td class="text">toto-base</td><td data-sort="5.0">5</td>' in page


def test_cli_export_writes_the_file(results_dir, tmp_path, capsys):
    out = tmp_path / "board" / "LEADERBOARD.md"
    assert main(["export", str(results_dir), "--format", "md", "--out", str(out)]) == 0
    assert out.read_text() == export(collect_results(results_dir), "md")
    err = capsys.readouterr().err
    assert "totobench: merged runs: toto-tiny on imagenet: kept" in err
    assert f"wrote {out} (3 results, format md)" in err


def test_deviations_are_marked_and_listed(results_dir, tmp_path):
    import shutil
    folder = tmp_path / "r"
    shutil.copytree(results_dir, folder)
    path = next(folder.rglob("k400.json"))
    doc = json.loads(path.read_text())
    doc["protocol"]["deviations"] = ["test views: 2 clips x 1 crop", "a | pipe"]
    path.write_text(json.dumps(doc))
    md = to_markdown(collect_results(folder))
    board = md.split("## ")[0]
    k400_cells = [line for line in board.splitlines() if line.startswith("| toto-tiny")]
    assert k400_cells and k400_cells[0].rstrip(" |").endswith("†")
    assert "- **k400**: test views: 2 clips x 1 crop; a \\| pipe" in board
    assert "imagenet**" not in board     # tasks without deviations are not listed
