"""`totobench compare`: deltas by relative depth between models of different depth."""

from __future__ import annotations

import argparse
import io

import pytest
from rich.console import Console

from test_results_fakes import fake_result, write_fake
from totobench.errors import DataError
from totobench.commands.compare import cli_compare
from totobench.results.compare import layer_deltas, value_at_depth

# 8 layers at depths 1/8 .. 8/8, value = depth**2; 12 layers at depths 1/12 .. 12/12, value = depth
REF8 = [((layer + 1) / 8) ** 2 for layer in range(8)]
OTHER12 = [(layer + 1) / 12 for layer in range(12)]


def test_value_at_depth_exact_interpolated_and_out_of_range():
    ref = fake_result(num_layers=8, values=REF8)
    assert value_at_depth(ref, 0.5) == (0.25, True)
    # depth 1/3 lies between 0.25 (0.0625) and 0.375 (0.140625), 2/3 of the way
    value, exact = value_at_depth(ref, 1 / 3)
    assert value == pytest.approx(0.0625 + (2 / 3) * (0.140625 - 0.0625)) and not exact
    assert value_at_depth(ref, 1 / 12) == (None, False)  # shallower than the reference's first layer


def test_layer_deltas_align_models_of_different_depth():
    ref = fake_result(num_layers=8, values=REF8)
    other = fake_result(model="toto-base", num_layers=12, values=OTHER12)
    rows = layer_deltas(ref, other)
    assert [row["layer"] for row in rows] == list(range(12))
    assert rows[0]["delta"] is None and rows[0]["ref_value"] is None
    assert rows[5]["depth"] == 0.5 and rows[5]["exact"]
    assert rows[5]["delta"] == pytest.approx(0.5 - 0.25)
    assert rows[3]["delta"] == pytest.approx(1 / 3 - (0.0625 + (2 / 3) * 0.078125)) and not rows[3]["exact"]
    assert rows[11]["delta"] == pytest.approx(0.0) and rows[11]["exact"]


def _run(paths, task=None, plot=None):
    out = io.StringIO()
    code = cli_compare(argparse.Namespace(results=[str(p) for p in paths], task=task, plot=plot),
                       console=Console(file=out, width=200, color_system=None))
    return code, out.getvalue()


def test_cli_compare_prints_deltas_and_best_layers(tmp_path):
    a = write_fake(tmp_path / "a", model="toto-tiny", values=REF8)
    b = write_fake(tmp_path / "b", model="toto-base", num_layers=12, values=OTHER12)
    write_fake(tmp_path / "b", model="toto-base", task="k400", num_layers=12)
    code, text = _run([a, tmp_path / "b"], task="imagenet", plot=str(tmp_path / "cmp.png"))
    assert code == 0
    lines = text.splitlines()
    assert lines[0] == "imagenet: top1 by relative depth (layer + 1) / num_layers; reference: toto-tiny"
    row_05 = next(line for line in lines if line.startswith("│ 0.500"))
    assert [cell.strip() for cell in row_05.split("│")[1:-1]] == ["0.500", "L3 0.2500", "L5 0.5000", "+0.2500"]
    row_13 = next(line for line in lines if line.startswith("│ 0.333"))
    assert [cell.strip() for cell in row_13.split("│")[1:-1]] == ["0.333", "", "L3 0.3333", "~+0.2188"]
    row_112 = next(line for line in lines if line.startswith("│ 0.083"))
    assert row_112.split("│")[-2].strip() == "-"
    assert "best layer of toto-tiny: L7 of 8 (depth 1.00), top1 = 1.0000" in lines
    assert "best layer of toto-base: L11 of 12 (depth 1.00), top1 = 1.0000 (+0.0000 vs toto-tiny)" in lines
    assert "k400" not in text.replace(str(tmp_path), "")
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {tmp_path / 'cmp.png'}" in text


def test_cli_compare_two_runs_of_one_model_are_both_shown(tmp_path):
    write_fake(tmp_path / "r1", values=REF8)
    write_fake(tmp_path / "r2", values=[v + 0.1 for v in REF8], created="2025-03-01T00:00:00Z")
    code, text = _run([tmp_path / "r1", tmp_path / "r2"])
    assert code == 0
    assert "toto-tiny @ 2025-01-01T00:00:00Z" in text and "toto-tiny @ 2025-03-01T00:00:00Z" in text
    row_05 = next(line for line in text.splitlines() if line.startswith("│ 0.500"))
    assert row_05.split("│")[-2].strip() == "+0.1000"


def test_cli_compare_unknown_task(tmp_path):
    write_fake(tmp_path, values=REF8)
    with pytest.raises(DataError, match=r"no result for task 'k400' .* \(tasks found: imagenet\)"):
        _run([tmp_path], task="k400")
