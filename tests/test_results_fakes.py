"""Fabricated result dicts for the results tests (imported by the other test_results_* files)."""

from __future__ import annotations

from pathlib import Path

from totobench.results.schema import result_path, validate_result, write_result_atomic


def hump(depth: float, peak: float = 0.5, top: float = 0.6) -> float:
    """A layer curve that peaks at relative depth `peak`: top at the peak, top - 0.4 at distance 1."""
    return round(top - 0.4 * abs(depth - peak), 6)


def fake_result(model: str = "toto-tiny", task: str = "imagenet", num_layers: int = 8,
                values: list[float] | None = None, created: str = "2025-01-01T00:00:00Z",
                main: str = "top1", probe: str = "linear", best: int | None = None) -> dict:
    """A valid result dict. values[i] is the main metric of layer i (default: `hump` of its depth);
    top5 = min(1, value + 0.2); best = the layer of the largest value unless given."""
    depths = [(layer + 1) / num_layers for layer in range(num_layers)]
    if values is None:
        values = [hump(d) for d in depths]
    rows = [{"layer": layer, "depth": depths[layer],
             "metrics": {main: values[layer], "top5": round(min(1.0, values[layer] + 0.2), 6)},
             "best_hparams": {"lr": round(0.001 * (layer % 3 + 1), 6), "wd": 0.0},
             "select_score": round(values[layer] - 0.01, 6)} for layer in range(num_layers)]
    if best is None:
        best = max(range(num_layers), key=lambda layer: values[layer])
    return {
        "schema_version": "1", "totobench_version": "0.1.0", "created": created,
        "model": {"name": model, "checkpoint_sha256": "ab" * 32, "num_layers": num_layers,
                  "dim": 256, "params": 1234567},
        "task": {"name": task, "dataset_root": "/data/world", "dataset_fingerprint": "f00d",
                 "main_metric": main},
        "protocol": {"probe": probe, "grid": {"lr": [0.001, 0.002, 0.003], "wd": [0.0]},
                     "selection_split": "train-holdout-10pct", "report_split": "val", "seed": 0},
        "per_layer": rows,
        "best_layer": {"layer": best, "depth": depths[best], "metrics": dict(rows[best]["metrics"])},
        "config": {"probe": {"epochs": 3}}, "env": {"torch": "2.14.1", "device": "cpu"},
        "timing_s": {"extract": 1.5, "probe": 0.25},
    }


def write_fake(out_dir: Path, **kwargs) -> Path:
    """Write fake_result(**kwargs) at its standard place under out_dir; returns the path."""
    result = fake_result(**kwargs)
    return write_result_atomic(result_path(out_dir, result["model"]["name"], result["task"]["name"]), result)


def test_fake_results_are_valid_and_peak_where_asked():
    r8, r12 = fake_result(num_layers=8), fake_result(num_layers=12)
    assert validate_result(r8) == [] and validate_result(r12) == []
    # 8 layers: depth 0.5 is layer 3 (value 0.6); 12 layers: depth 0.5 is layer 5
    assert (r8["best_layer"]["layer"], r8["best_layer"]["metrics"]["top1"]) == (3, 0.6)
    assert (r12["best_layer"]["layer"], r12["best_layer"]["depth"]) == (5, 0.5)
