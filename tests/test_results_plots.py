"""Layer-sweep plots and the per-layer rich table."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from test_results_fakes import fake_result
from totobench.results.plots import plot_layer_sweep, run_labels, sweep_figure, write_sweep_plots
from totobench.results.table import print_layer_table


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_curves_use_relative_depth_so_8_and_12_layers_line_up():
    tiny = fake_result(num_layers=8)
    base = fake_result(model="toto-base", num_layers=12)
    fig = sweep_figure([tiny, base])
    (ax,) = [a for a in fig.axes if a.get_visible()]
    lines = ax.get_lines()  # per result: its curve, then its best-layer star
    assert [line.get_label() for line in lines[::2]] == ["toto-tiny (8 layers)", "toto-base (12 layers)"]
    assert list(lines[0].get_xdata()) == [(i + 1) / 8 for i in range(8)]
    assert list(lines[2].get_xdata()) == [(i + 1) / 12 for i in range(12)]
    assert list(lines[2].get_ydata()) == [row["metrics"]["top1"] for row in base["per_layer"]]
    # both peak at depth 0.5: the stars sit on the same x
    assert list(lines[1].get_xdata()) == list(lines[3].get_xdata()) == [0.5]
    assert lines[1].get_marker() == "*"
    assert ax.get_xlabel() == "relative depth (layer + 1) / num_layers" and ax.get_ylabel() == "top1"


def test_one_panel_per_task_in_a_grid_and_task_filter(tmp_path):
    results = [fake_result(task=t) for t in ("imagenet", "k400", "davis", "ego4d-sta")]
    fig = sweep_figure(results)
    visible = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in visible] == [f"{t} (linear probe)" for t in ("imagenet", "k400", "davis",
                                                                               "ego4d-sta")]
    assert len(fig.axes) == 6  # 2 rows x 3 columns, the last two hidden
    grid = plot_layer_sweep(results, tmp_path / "grid.png")
    one = plot_layer_sweep(results, tmp_path / "one.png", task="k400")
    assert _png_size(grid) == (1560, 760) and _png_size(one) == (520, 380)
    with pytest.raises(ValueError, match="no results to plot for task 'robot'"):
        plot_layer_sweep(results, tmp_path / "x.png", task="robot")


def test_plot_bytes_are_deterministic_and_show_the_curve_colours(tmp_path):
    results = [fake_result(), fake_result(model="random-init:toto-tiny", values=[0.1] * 8)]
    first, second = io.BytesIO(), io.BytesIO()
    plot_layer_sweep(results, first)
    plot_layer_sweep(results, second)
    assert first.getvalue() == second.getvalue()
    pixels = np.asarray(Image.open(io.BytesIO(first.getvalue())).convert("RGB")).reshape(-1, 3).astype(int)
    for colour in ((0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28)):  # first and second palette entries
        assert (np.abs(pixels - colour).sum(axis=1) < 12).sum() > 200


def test_write_sweep_plots_next_to_the_result_files(tmp_path):
    results = [fake_result(model="random-init:toto-tiny", task=t) for t in ("imagenet", "ego4d/sta")]
    folder = tmp_path / "random-init_toto-tiny"  # the runner passes the model's results folder
    written = write_sweep_plots(results, folder)
    assert written == [folder / "imagenet.png", folder / "ego4d_sta.png", folder / "layer_sweep.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)
    assert _png_size(written[0]) == (520, 380) and _png_size(written[2]) == (1040, 380)
    assert write_sweep_plots(results[:1], tmp_path / "one") == [tmp_path / "one" / "imagenet.png"]


def test_run_labels_tell_runs_of_one_model_apart():
    a = fake_result()
    b = fake_result(created="2025-02-01T00:00:00Z")
    c = fake_result(task="k400")
    assert run_labels([a, b, c]) == ["toto-tiny @ 2025-01-01T00:00:00Z", "toto-tiny @ 2025-02-01T00:00:00Z",
                                     "toto-tiny"]


def test_print_layer_table_marks_the_best_layer():
    out = io.StringIO()
    print_layer_table(fake_result(num_layers=4, values=[0.2, 0.7, 0.5, 0.1]),
                      Console(file=out, width=150, color_system=None))
    rows = [line for line in out.getvalue().splitlines() if line.startswith("│")]
    cells = [[c.strip() for c in row.split("│")[1:-1]] for row in rows]
    assert cells[1] == ["*", "1", "0.500", "0.7000", "0.9000", "0.6900", "lr=0.002 wd=0"]
    assert cells[0] == ["", "0", "0.250", "0.2000", "0.4000", "0.1900", "lr=0.001 wd=0"]
    assert [c[0] for c in cells] == ["", "*", "", ""]
    assert "* = best layer 1 (depth 0.50), top1 = 0.7000" in " ".join(out.getvalue().split())
