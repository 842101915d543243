"""Killed runs resume: committed feature chunks and shards are reused (never a truncated one),
a changed checkpoint or transform never reuses features, and a run SIGKILLed during extraction
then started again writes the result an uninterrupted run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from totobench.cli import main
from totobench.features.cache import FeatureCache
from totobench.features.extract import extract_features
from totobench.model import load_backbone


class Frames(Dataset):
    """n random images [1, 3, 64, 64] with label i % 3; item `fail_at` raises (a crash mid-run)."""

    def __init__(self, n, fail_at=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.frames = torch.rand(n, 1, 3, 64, 64, generator=g)
        self.fail_at = fail_at

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError("killed")
        return self.frames[i], i % 3


@pytest.fixture(scope="module")
def backbone(micro_checkpoint):
    return load_backbone(str(micro_checkpoint))


def _counting(backbone, monkeypatch):
    """Count the images that go through the backbone."""
    seen = []
    forward = type(backbone).forward_frames
    monkeypatch.setattr(type(backbone), "forward_frames",
                        lambda self, frames, layers, kind: seen.append(len(frames)) or forward(self, frames, layers, kind))
    return seen


def _extract(backbone, cache, data, transform="t", layers=(0, 3)):
    return extract_features(backbone, data, list(layers), kind="image", pooling="mean", cache=cache,
                            key_parts={"dataset": "frames", "transform": transform}, batch_size=4)


def test_crash_mid_split_resumes_at_the_first_missing_chunk(backbone, tmp_path, monkeypatch):
    # 40 items, batches of 4: 10 batches, 2 per chunk: [0,8) [8,16) [16,24) [24,32) [32,40)
    monkeypatch.setenv("TOTOBENCH_CHUNK_BATCHES", "2")
    reference = _extract(backbone, FeatureCache(tmp_path / "ref"), Frames(40))
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(RuntimeError, match="killed"):
        _extract(backbone, cache, Frames(40, fail_at=21))
    assert not list(cache.root.glob(".*")), "a temporary file was left behind"
    seen = _counting(backbone, monkeypatch)
    resumed = _extract(backbone, cache, Frames(40))
    assert sum(seen) == 24                                 # only chunks [16,24) [24,32) [32,40) again
    for layer in (0, 3):
        np.testing.assert_array_equal(resumed.feats[layer], reference.feats[layer])
    np.testing.assert_array_equal(resumed.labels, reference.labels)
    assert sorted(p.suffix for p in cache.root.iterdir()).count(".npy") == 3   # chunk entries merged away


def test_truncated_shard_is_detected_and_recomputed(backbone, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    first = _extract(backbone, cache, Frames(12))
    values = np.array(first.feats[3])
    shard = next(p for p in tmp_path.glob("*.npy") if np.load(p, mmap_mode="r").shape == values.shape
                 and np.array_equal(np.load(p), values))
    shard.write_bytes(shard.read_bytes()[:-64])         # a shard cut short, e.g. by a kill mid-copy
    seen = _counting(backbone, monkeypatch)
    again = _extract(backbone, cache, Frames(12))
    assert not again.from_cache and sum(seen) == 12
    np.testing.assert_array_equal(again.feats[3], values)
    np.testing.assert_array_equal(again.feats[0], first.feats[0])
    seen.clear()
    assert _extract(backbone, cache, Frames(12)).from_cache and seen == []   # repaired: a hit


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    from totobench.io import temp_path, writer_tag
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = FeatureCache(tmp_path)
    host = writer_tag().rpartition("-")[0]
    mine = temp_path(tmp_path / "a.npy")                      # this (live) process's
    stale = tmp_path / f".a.npy.{host}-{dead.pid}.0f0f0f0f.tmp"
    other_host = tmp_path / f".a.npy.elsewhere-{dead.pid}.0f0f0f0f.tmp"
    unknown = tmp_path / f".a.npy.{host}-{dead.pid}.tmp"     # not a temp_path name: left alone
    for p in (mine, stale, other_host, unknown):
        p.write_bytes(b"x")
    assert cache.remove_stale_temp() == [stale]
    assert mine.exists() and other_host.exists() and unknown.exists() and not stale.exists()


def test_changed_checkpoint_or_transform_never_reuses_features(backbone, micro_checkpoint, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    first = _extract(backbone, cache, Frames(8))
    from totobench.model import load_checkpoint
    from totobench.model.checkpoint import save_checkpoint
    model, tokenizer, _, _ = load_checkpoint(micro_checkpoint)
    with torch.no_grad():
        model.layers[0].attention.wq.weight.add_(0.01)   # retrained: same folder name, new weights
    save_checkpoint(tmp_path / "v2" / "micro", model, tokenizer)
    other = load_backbone(str(tmp_path / "v2" / "micro"))
    assert other.name == backbone.name and other.sha256 != backbone.sha256
    seen = _counting(backbone, monkeypatch)
    changed_model = _extract(other, cache, Frames(8))
    assert not changed_model.from_cache and sum(seen) == 8
    assert not np.array_equal(changed_model.feats[3], first.feats[3])
    seen.clear()
    changed_transform = _extract(backbone, cache, Frames(8), transform="t2")
    assert not changed_transform.from_cache and sum(seen) == 8
    seen.clear()
    assert _extract(backbone, cache, Frames(8)).from_cache and seen == []


def _comparable(result: dict) -> dict:
    """A result file without what legitimately differs between two runs of one command."""
    out = {k: v for k, v in result.items() if k not in ("created", "env", "timing_s")}
    out["extra"] = {k: v for k, v in result["extra"].items() if k != "feature_cache"}
    return out


@pytest.mark.timeout(240)
def test_sigkill_during_extraction_then_rerun_gives_the_uninterrupted_result(tiny_world, micro_checkpoint,
                                                                             tmp_path, monkeypatch, capsys):
    args = ["run", "--model", str(micro_checkpoint), "--tasks", "imagenet-linear", "--layers", "0,-1",
            "--quick", "--set", "probe.holdout=0.3", "--set", "probe.epochs=10", "--set", "batch_size=4",
            "--data-root", str(tiny_world), "--out", str(tmp_path / "out")]
    monkeypatch.setenv("TOTOBENCH_CHUNK_BATCHES", "1")
    home = tmp_path / "home"
    features = home / "features"
    env = {**os.environ, "TOTOBENCH_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "totobench", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not list(features.glob("*.record.json")):      # the first committed chunk of train
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "out" / "micro" / "imagenet-linear.json").exists()
    capsys.readouterr()

    monkeypatch.setenv("TOTOBENCH_HOME", str(home))
    assert main(args) == 0                                    # the same command again
    out = capsys.readouterr().out
    assert "resumed" in out and "chunks were already in the cache" in out
    assert not list(features.glob(".*")), "a stale temporary file was left behind"
    resumed = json.loads((tmp_path / "out" / "micro" / "imagenet-linear.json").read_text())

    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "home-ref"))
    assert main([*args[:-1], str(tmp_path / "ref")]) == 0     # uninterrupted, own cache
    reference = json.loads((tmp_path / "ref" / "micro" / "imagenet-linear.json").read_text())
    assert _comparable(resumed) == _comparable(reference)


def test_crash_during_probe_training_reruns_from_cached_features(tiny_world, micro_checkpoint, tmp_path,
                                                                  monkeypatch):
    from totobench.probes.linear import LinearProbe
    args = ["run", "--model", str(micro_checkpoint), "--tasks", "imagenet-linear", "--layers", "-1", "--quick",
            "--set", "probe.holdout=0.3", "--set", "probe.epochs=5", "--data-root", str(tiny_world),
            "--out", str(tmp_path / "out")]
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "home"))

    def crash(*a, **k):
        raise KeyboardInterrupt  # what a kill during training leaves: features cached, no result
    with monkeypatch.context() as patch:
        patch.setattr(LinearProbe, "fit", crash)
        assert main(args) == 130
    assert not (tmp_path / "out" / "micro" / "imagenet-linear.json").exists()
    assert main(args) == 0
    rerun = json.loads((tmp_path / "out" / "micro" / "imagenet-linear.json").read_text())
    assert rerun["extra"]["feature_cache"] == "hit"
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "home-ref"))
    assert main([*args[:-1], str(tmp_path / "ref")]) == 0
    reference = json.loads((tmp_path / "ref" / "micro" / "imagenet-linear.json").read_text())
    assert reference["extra"]["feature_cache"] == "miss"
    assert _comparable(rerun) == _comparable(reference)
