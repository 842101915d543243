"""Kinetics runs: a truncated and a deleted mp4 in the val split never stop the run (the result file
lists both as skipped); the attentive probe gets the clip's token grid for its position embedding."""

from __future__ import annotations

import csv
import shutil

from totobench.cli import main
from totobench.results.schema import load_result


def _video_path(root, row):
    return root / row["split"] / f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}.mp4"


def test_truncated_and_deleted_videos_are_skipped_and_reported(tiny_world, micro_checkpoint, tmp_path):
    root = tmp_path / "kinetics400"
    shutil.copytree(tiny_world / "kinetics400", root)
    with open(root / "val.csv") as f:
        rows = list(csv.DictReader(f))
    first, second = rows[0], next(r for r in rows[1:] if r["label"] != rows[0]["label"])
    deleted, truncated = _video_path(root, first), _video_path(root, second)
    deleted.unlink()
    truncated.write_bytes(truncated.read_bytes()[:600])  # header only: not decodable

    out = tmp_path / "out"
    code = main(["run", "--model", str(micro_checkpoint), "--tasks", "k400-linear", "--layers", "-1",
                 "--quick", "--set", f"k400.root={root}", "--set", "probe.epochs=2", "--out", str(out)])
    assert code == 0
    result = load_result(out / "micro" / "k400-linear.json")
    skipped_val = result["extra"]["skipped"]["val"]
    listed = {path for paths in skipped_val.values() for path in paths}
    assert str(deleted) in listed and str(truncated) in listed
    assert result["extra"]["num_skipped"]["val"] == len(listed) == 2
    assert result["extra"]["num_skipped"]["train"] == 0


def test_k400_probe_gets_the_clip_token_grid_and_rejects_unknown_positions(tiny_world, micro_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["run", "--model", str(micro_checkpoint), "--tasks", "k400-spacetime", "--layers", "-1", "--quick",
              "--set", f"k400.root={tiny_world / 'kinetics400'}", "--set", "probe.epochs=1", "--out", str(out)]
    assert main(common + ["--set", "probe.positions=everywhere"]) == 2
    assert "probe.positions: expected one of 'none', 'spacetime', got 'everywhere'" in capsys.readouterr().err
    assert main(common + ["--set", "probe.pooling=mean"]) == 2
    assert "needs every token" in capsys.readouterr().err
    assert not (out / "micro" / "k400-spacetime.json").exists()
    assert main(common) == 0
    result = load_result(out / "micro" / "k400-spacetime.json")
    protocol = result["protocol"]
    side = protocol["input"]["resolution"] // 8 // 2  # patch 8, then tokens_pool2
    assert protocol["settings"]["positions"] == "spacetime"
    assert protocol["data"]["token_grid"] == [protocol["input"]["frames"], side, side]


def test_the_attentive_probe_reads_pooled_features_as_one_token(tiny_world, micro_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert main(["run", "--model", str(micro_checkpoint), "--tasks", "k400", "--layers", "-1", "--quick",
                 "--set", f"k400.root={tiny_world / 'kinetics400'}", "--set", "probe.epochs=1",
                 "--set", "probe.pooling=mean", "--out", str(out)]) == 0
    result = load_result(out / "micro" / "k400.json")
    assert "tokens mean-pooled before the probe; the paper's probe reads every token" in result["protocol"]["deviations"]


def test_probe_training_prints_progress_lines_in_a_log(tiny_world, micro_checkpoint, tmp_path, capsys):
    assert main(["run", "--model", str(micro_checkpoint), "--tasks", "imagenet", "--layers", "-1", "--quick",
                 "--data-root", str(tiny_world), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out     # not a terminal: plain lines
    assert "imagenet probe epochs: 3/3 (100%) loss " in out   # --quick: quick.epochs
