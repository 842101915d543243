"""Result schema: validation messages, loading, atomic writes, paths, `totobench validate`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from test_results_fakes import fake_result, write_fake
from totobench.cli import main
from totobench.errors import DataError
from totobench.results import schema
from totobench.results.schema import (created_now, load_result, parse_created, result_path,
                                      safe_name, validate_result, write_result_atomic)


def test_missing_field_and_wrong_types_are_named_by_path():
    r = fake_result()
    del r["per_layer"][2]["metrics"]
    r["model"]["num_layers"] = "8"
    r["per_layer"][0]["metrics"]["top5"] = True  # a bool is not a metric
    r["task"]["main_metric"] = 1
    assert validate_result(r) == [
        "model.num_layers: expected an integer, got a string",
        "task.main_metric: expected a string, got a number",
        "per_layer[0].metrics.top5: expected a number, got a boolean",
        "per_layer[2].metrics: missing (expected an object)",
    ]


def test_top_level_missing_and_not_an_object():
    r = fake_result()
    del r["best_layer"]
    assert validate_result(r) == ["best_layer: missing (expected an object)"]
    assert validate_result([1]) == ["(top level): expected an object, got a list"]


def test_cross_field_facts_are_checked():
    r = fake_result(num_layers=8)
    r["per_layer"][1]["depth"] = 0.3           # should be 2/8
    r["per_layer"][4]["layer"] = 1             # duplicate and depth 5/8 no longer matches
    r["per_layer"][5]["metrics"] = {"top5": 0.5}  # main metric gone
    r["per_layer"][6]["metrics"]["top1"] = math.nan
    r["best_layer"]["metrics"]["top1"] = 0.9   # not the value of layer 3
    r["created"] = "2025-01-01 00:00:00"
    r["timing_s"]["probe"] = -1.0
    assert validate_result(r) == [
        "per_layer[6].metrics.top1: expected a finite number, got nan",
    ]  # type-level problems come alone: the cross-field checks need the types right
    r["per_layer"][6]["metrics"]["top1"] = 0.5
    assert validate_result(r) == [
        "created: expected an ISO 8601 UTC time like 2025-01-31T12:00:00Z, got '2025-01-01 00:00:00'",
        "timing_s.probe: expected >= 0 seconds, got -1.0",
        "per_layer[1].depth: expected (layer + 1) / num_layers = 0.25, got 0.3",
        "per_layer[4].depth: expected (layer + 1) / num_layers = 0.25, got 0.625",
        "per_layer[4].layer: layer 1 appears twice",
        "per_layer[5].metrics: missing the main metric 'top1'",
        "best_layer.metrics.top1: expected the value of layer 3 in per_layer (0.6), got 0.9",
    ]


def test_layer_out_of_range_and_best_layer_not_a_row():
    r = fake_result(num_layers=4)
    r["per_layer"] = r["per_layer"][:2]
    r["per_layer"][1]["layer"], r["per_layer"][1]["depth"] = 4, 1.25
    assert validate_result(r) == [
        "per_layer[1].layer: expected 0 <= layer < num_layers=4, got 4",
        "best_layer.layer: expected one of the per_layer layers, got 1",
    ]


def test_load_result_rejects_unknown_schema_version_in_one_line(tmp_path):
    path = tmp_path / "future.json"
    path.write_text(json.dumps(dict(fake_result(), schema_version="2")))
    with pytest.raises(DataError) as err:
        load_result(path)
    assert str(err.value) == (f"{path}: result schema_version '2' is not supported "
                              "(this totobench reads schema_version '1')")


def test_load_result_errors_name_the_file(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"schema_version": "1",')
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON \(line 1"):
        load_result(bad_json)
    invalid = tmp_path / "invalid.json"
    r = fake_result()
    del r["task"]["dataset_fingerprint"]
    r["model"]["dim"] = 2.5
    invalid.write_text(json.dumps(r))
    with pytest.raises(DataError) as err:
        load_result(invalid)
    assert str(err.value) == (f"{invalid}: invalid result file: model.dim: expected an integer, got a "
                              "number (and 1 more problems)")
    with pytest.raises(DataError, match="result file not found"):
        load_result(tmp_path / "missing.json")


def test_write_then_load_round_trips_and_converts_numpy_scalars(tmp_path):
    r = fake_result()
    r["per_layer"][0]["metrics"]["top1"] = np.float32(0.25)
    r["per_layer"][0]["best_hparams"]["lr"] = np.float64(0.01)
    r["model"]["params"] = np.int64(99)
    path = write_result_atomic(tmp_path / "a" / "b.json", r)
    loaded = load_result(path)
    assert loaded["per_layer"][0]["metrics"]["top1"] == 0.25
    assert type(loaded["model"]["params"]) is int and loaded["model"]["params"] == 99
    assert loaded["per_layer"][3] == fake_result()["per_layer"][3]
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.json"]


def test_atomic_write_leaves_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = write_fake(tmp_path, model="toto-tiny")
    before = path.read_bytes()

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    import totobench.io
    monkeypatch.setattr(totobench.io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        write_result_atomic(path, fake_result(values=[0.1] * 8))
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_atomic_write_leaves_no_partial_file_when_serialisation_fails(tmp_path, monkeypatch):
    old = write_fake(tmp_path, task="imagenet")
    new = old.with_name("k400.json")

    def failing_dumps(*args, **kwargs):
        raise TypeError("cannot serialise")

    monkeypatch.setattr(schema.json, "dumps", failing_dumps)
    with pytest.raises(TypeError):
        write_result_atomic(new, fake_result(task="k400"))
    with pytest.raises(TypeError):
        write_result_atomic(old, fake_result(values=[0.3] * 8))
    assert [p.name for p in old.parent.iterdir()] == ["imagenet.json"]
    assert load_result(old)["best_layer"]["layer"] == 3  # still the first write's content


def test_invalid_result_is_refused_before_anything_is_written(tmp_path):
    r = fake_result()
    r["per_layer"][0]["metrics"]["top1"] = np.zeros(3)  # an array where a number belongs
    with pytest.raises(DataError, match=r"refusing to write an invalid result: "
                                        r"per_layer\[0\]\.metrics\.top1: expected a number, got ndarray"):
        write_result_atomic(tmp_path / "x.json", r)
    assert list(tmp_path.iterdir()) == []


def test_result_path_makes_model_names_file_system_safe(tmp_path):
    assert result_path(tmp_path, "random-init:toto-tiny", "imagenet") == \
        tmp_path / "random-init_toto-tiny" / "imagenet.json"
    assert safe_name("/ckpts/my model//v2") == "ckpts_my_model_v2"
    assert safe_name("..") == "_.." and safe_name("::") == "_"
    assert safe_name("toto-1b.v2+ft") == "toto-1b.v2+ft"


def test_cli_validate_prints_one_line_per_problem_and_exits_1(tmp_path, capsys):
    good = write_fake(tmp_path, model="toto-tiny")
    r = fake_result()
    del r["protocol"]["report_split"]
    r["per_layer"][0]["layer"] = -1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(r))
    future = tmp_path / "future.json"
    future.write_text(json.dumps(dict(fake_result(), schema_version="9")))

    assert main(["validate", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: ok (toto-tiny on imagenet, 8 layers, best layer 3)\n"
    assert main(["validate", str(good), str(bad), str(future)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{good}: ok (toto-tiny on imagenet, 8 layers, best layer 3)",
        f"{bad}: protocol.report_split: missing (expected a string)",
        f"{future}: result schema_version '9' is not supported (this totobench reads schema_version '1')",
        "1 of 3 files valid",
    ]


def test_cli_validate_a_folder_checks_result_files_and_skips_other_json(tmp_path, capsys):
    a = write_fake(tmp_path, model="toto-tiny")
    b = write_fake(tmp_path, model="toto-base", num_layers=12)
    (tmp_path / "leaderboard.json").write_text('{"leaderboard_version": "1"}')
    assert main(["validate", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{b}: ok (toto-base on imagenet, 12 layers, best layer 5)",
        f"{a}: ok (toto-tiny on imagenet, 8 layers, best layer 3)",
        "2 of 2 files valid",
    ]
    assert main(["validate", str(tmp_path / "leaderboard.json")]) == 1  # named: must be a result
    assert "no schema_version field" in capsys.readouterr().out


def test_created_now_is_a_valid_created_field():
    r = fake_result(created=created_now())
    assert validate_result(r) == [] and parse_created(r["created"]).tzinfo is not None


def test_fields_the_runner_adds_are_allowed_and_dataset_root_may_be_null():
    r = fake_result()
    r["model"]["path"] = None
    r["task"].update(dataset_root=None, kind="classification", dataset_format="imagenet")
    r["run"] = {"layers": list(range(8)), "quick": False}
    r["extra"] = {"skipped_videos": 2}
    assert validate_result(r) == []


def test_the_builder_writes_only_declared_keys_and_picks_the_shallower_best_layer():
    import typing

    from totobench.results.schema import BestLayer, LayerRow, ModelInfo, Protocol, ResultFile, TaskInfo, build_result
    model = {"name": "m", "checkpoint_sha256": "0" * 64, "tokenizer_sha256": "1" * 64, "num_layers": 4, "dim": 8,
             "params": 10, "path": None}
    task = {"name": "t", "kind": "classification", "dataset_format": "imagenet", "dataset_root": None,
            "dataset_fingerprint": "f", "main_metric": "top1"}
    protocol = {"probe": "linear", "grid": {"lrs": [0.1]}, "settings": {}, "selection_split": "s",
                "report_split": "val", "seed": 0, "input": {"resolution": 64}, "data": {"num_train": 3}}
    rows = [{"layer": layer, "metrics": {"top1": top1}, "best_hparams": {}, "select_score": None}
            for layer, top1 in ((0, 0.25), (1, 0.5), (3, 0.5))]
    r = build_result(model=model, task=task, protocol=protocol, per_layer=rows, config={}, env={},
                     timing_s={"total": 1.0}, run={"layers": [0, 1, 3], "quick": False}, extra={}, version="0")
    assert validate_result(r) == []
    assert r["best_layer"] == {"layer": 1, "depth": 0.5, "metrics": {"top1": 0.5}}   # tie: the shallower layer
    assert [row["depth"] for row in r["per_layer"]] == [0.25, 0.5, 1.0]
    for doc, typed in ((r, ResultFile), (r["model"], ModelInfo), (r["task"], TaskInfo), (r["protocol"], Protocol),
                       (r["per_layer"][0], LayerRow), (r["best_layer"], BestLayer)):
        assert set(doc) <= set(typing.get_type_hints(typed)), set(doc) - set(typing.get_type_hints(typed))
