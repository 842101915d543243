"""`totobench run` end to end on the tiny data world with a micro checkpoint: every task kind
writes a valid result file with one row per layer; a second run reuses the feature cache."""

from __future__ import annotations

import json

import pytest

from totobench.cli import main
from totobench.results.schema import load_result, validate_result

TASKS = "imagenet-linear,k400-linear,davis,ego4d-sta"


@pytest.fixture(scope="module")
def first_run(tiny_world, micro_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    code = main(["run", "--model", str(micro_checkpoint), "--tasks", TASKS, "--layers", "all",
                 "--quick", "--data-root", str(tiny_world), "--out", str(out)])
    assert code == 0
    return out


@pytest.mark.parametrize("task", TASKS.split(","))
def test_every_task_writes_a_valid_result_with_all_layers(first_run, task):
    result = load_result(first_run / "micro" / f"{task}.json")
    assert validate_result(result) == []
    assert [row["layer"] for row in result["per_layer"]] == [0, 1, 2, 3]
    assert [row["depth"] for row in result["per_layer"]] == [0.25, 0.5, 0.75, 1.0]
    main_metric = result["task"]["main_metric"]
    best = max(result["per_layer"], key=lambda r: r["metrics"][main_metric])
    assert result["best_layer"]["metrics"][main_metric] == best["metrics"][main_metric]


def test_davis_writes_masks_per_layer(first_run):
    masks = sorted((first_run / "micro" / "davis" / "layer_00").rglob("*.png"))
    assert masks, "label propagation wrote no PNG"


def test_sta_writes_challenge_predictions(first_run):
    pred = json.loads((first_run / "micro" / "ego4d-sta" / "layer_03" / "predictions.json").read_text())
    assert pred["challenge"] == "ego4d_short_term_object_interaction_anticipation"
    assert pred["results"], "no uid in the predictions"


def test_second_run_skips_existing_results_and_overwrite_hits_the_cache(first_run, tiny_world, micro_checkpoint, capsys):
    before = {p.name: p.read_bytes() for p in (first_run / "micro").glob("*.json")}
    assert main(["run", "--model", str(micro_checkpoint), "--tasks", "imagenet-linear", "--quick",
                 "--data-root", str(tiny_world), "--out", str(first_run)]) == 0
    assert "skipped" in capsys.readouterr().out
    assert (first_run / "micro" / "imagenet-linear.json").read_bytes() == before["imagenet-linear.json"]
    assert main(["run", "--model", str(micro_checkpoint), "--tasks", "imagenet-linear", "--quick",
                 "--overwrite", "--data-root", str(tiny_world), "--out", str(first_run)]) == 0
    redo = load_result(first_run / "micro" / "imagenet-linear.json")
    old = json.loads(before["imagenet-linear.json"])
    assert redo["extra"]["feature_cache"] == "hit"
    assert [r["metrics"] for r in redo["per_layer"]] == [r["metrics"] for r in old["per_layer"]]
