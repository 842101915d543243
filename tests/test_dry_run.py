"""Estimates before extraction (features/estimate.py) and `totobench run --dry-run`: sizes parse,
the stored-bytes estimate matches what a cached run writes, a dry run of a billion-parameter preset
builds no weights, and a real run with a planning size set stops."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from totobench.cli import main
from totobench.errors import ConfigError
from totobench.features.estimate import SplitEstimate, TaskEstimate, decide_streaming, parse_size, stored_tokens
from totobench.results.schema import load_result


@pytest.mark.parametrize("text, expected", [
    ("0", 0), ("123", 123), ("500G", 500 * 10**9), ("1T", 10**12), ("1.5GB", 1_500_000_000),
    ("2TiB", 2 * 2**40), ("64k", 64_000), (" 3 mb ", 3_000_000), (7, 7)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "-1G", "1X", "G", "1.2.3T", "ten"])
def test_parse_size_rejects_with_the_flag_named(text):
    with pytest.raises(ConfigError, match="--cache-budget"):
        parse_size(text)


def test_stored_tokens_follow_the_pooling():
    grid = (16, 16, 16)
    assert [stored_tokens(grid, p) for p in ("mean", "tokens", "last_frame", "tokens_pool2")] == [1, 4096, 256, 1024]


def _estimate(train_bytes: int) -> TaskEstimate:
    split = SplitEstimate("train", 10, 1, 8, 1, train_bytes, 10, 0)
    return TaskEstimate.of("t", [split, SplitEstimate("val", 5, 1, 8, 1, 7, 5, 0)], budget=None)


def test_streaming_decision_compares_train_bytes_with_the_budget():
    est = _estimate(1000)
    assert est.train_bytes == 1000 and est.stored_bytes == 1007
    assert decide_streaming(est, None) is False            # no limit
    assert decide_streaming(est, 1000) is False            # fits exactly
    assert decide_streaming(est, 999) is True
    assert decide_streaming(est, 10**12, augment=True) is True   # augmentation always streams


def test_a_streamed_probe_reads_the_training_split_once_per_epoch():
    splits = [SplitEstimate("train", 10, 1, 8, 1, 1000, 10, 100), SplitEstimate("val", 5, 1, 8, 1, 7, 5, 50)]
    cached = TaskEstimate.of("t", splits, budget=None, epochs=10)
    streamed = TaskEstimate.of("t", splits, budget=0, epochs=10)
    assert (cached.streamed, cached.forward_flops, cached.train_passes) == (False, 150, 1)
    assert (streamed.streamed, streamed.forward_flops, streamed.train_passes) == (True, 10 * 100 + 50, 10)
    assert TaskEstimate.of("t", splits, budget=0, streamable=False).streamed is None


def _folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("task", ["imagenet-linear", "imagenet", "ego4d-sta", "davis"])
def test_estimated_bytes_match_what_a_cached_run_writes(task, tiny_world, micro_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "home"))
    out = tmp_path / "out"
    assert main(["run", "--model", str(micro_checkpoint), "--tasks", task, "--quick", "--data-root",
                 str(tiny_world), "--out", str(out), "--set", f"{task}.probe.epochs=1" if task != "davis" else "seed=0"]) == 0
    written = _folder_bytes(tmp_path / "home" / "features")
    estimate = load_result(out / "micro" / f"{task}.json")["protocol"]["estimate"]
    assert written > 0
    assert abs(estimate["stored_bytes"] - written) <= 0.10 * written, (estimate["stored_bytes"], written)


def test_dry_run_of_a_billion_parameter_preset_builds_no_weights(tiny_world, tmp_path, monkeypatch, capsys):
    import totobench.model as model
    built = []
    load = model.load_backbone

    def recording_load(spec, tokenizer=None, device="cpu"):
        backbone = load(spec, tokenizer=tokenizer, device=device)
        built.append({p.device.type for p in backbone.model.parameters()})
        return backbone
    monkeypatch.setattr(model, "load_backbone", recording_load)
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "home"))
    t0 = time.perf_counter()
    assert main(["run", "--model", "preset:toto-1b", "--tasks", "imagenet,k400,davis", "--dry-run",
                 "--data-root", str(tiny_world), "--out", str(tmp_path / "out"), "--cache-budget", "1T",
                 "--set", "imagenet.dataset.size=[1281167,50000]"]) == 0
    seconds = time.perf_counter() - t0
    text = capsys.readouterr().out
    assert built == [{"meta"}]
    assert not (tmp_path / "out").exists() and not (tmp_path / "home" / "features").exists()
    assert seconds < 60
    # (1,281,167 + 50,000 images) x 256 tokens x 2048 wide x 2 bytes = 1.4 TB a layer; streamed under 1 TB
    assert "imagenet: features 30.7 TB (22 layer(s) x 1.4 TB)" in text and "train streamed (budget 1 TB)" in text
    assert "(train read 10x)" in text                                   # streamed: one pass per epoch
    assert "k400:" in text and "davis:" in text and text.strip().splitlines()[-1].startswith("total: features")


def test_forward_flops_are_the_models_flops_per_token_plus_the_tokenizer():
    """A clip of the model's own shape costs its tokens x the transformer's `flops_per_token()` plus
    the tokenizer (under 2% here); stopping at block 5 of 12 costs about half."""
    from totobench.features.estimate import split_estimate
    from totobench.model import load_backbone
    backbone = load_backbone("preset:toto-base", device="meta")
    est = split_estimate(backbone, list(range(12)), "train", 3, 16, 128, 128, "video", "tokens")
    assert est.forward_tokens == 3 * 16 * 16 * 16 and est.stored_tokens_per_item == 4096
    assert est.bytes_per_layer == 3 * 4096 * 768 * 2
    per_token = est.flops / est.forward_tokens
    assert backbone.flops_per_token() < per_token < 1.02 * backbone.flops_per_token()
    half = split_estimate(backbone, [5], "train", 3, 16, 128, 128, "video", "tokens")
    assert 0.45 < half.flops / est.flops < 0.55 and half.layers == 1


def test_a_real_run_with_a_planning_size_stops(tiny_world, micro_checkpoint, tmp_path, capsys):
    assert main(["run", "--model", str(micro_checkpoint), "--tasks", "imagenet-linear", "--quick", "--data-root",
                 str(tiny_world), "--out", str(tmp_path), "--set", "imagenet-linear.dataset.size=1000"]) == 2
    assert "dataset.size is for planning with --dry-run only" in capsys.readouterr().err


def test_no_cache_and_a_nonzero_budget_contradict(micro_checkpoint, tmp_path, capsys):
    assert main(["run", "--model", str(micro_checkpoint), "--tasks", "imagenet-linear", "--no-cache",
                 "--cache-budget", "1G", "--out", str(tmp_path)]) == 2
    assert "--no-cache means a cache budget of 0" in capsys.readouterr().err
