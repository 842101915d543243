"""Killed runs resume: committed feature chunks and shards are reused (never a truncated one),
a changed checkpoint or transform never reuses features, and a run SIGKILLed during extraction
then started again writes the result an uninterrupted run writes. Chunks another process is
extracting are waited for (taken over when it died), and chunks it merged and dropped are taken
from its merge, never reported missing or corrupt."""

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
from totobench.features.cache import FeatureCache, cache_key
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
    held = cache.lock("held")
    assert held.try_acquire()
    cache.root.joinpath(".dead.lock").write_text(json.dumps({"host": host, "pid": dead.pid, "token": "t"}))
    assert cache.remove_stale_temp() == [stale]
    assert mine.exists() and other_host.exists() and unknown.exists() and not stale.exists()
    assert held.path.exists() and not cache.root.joinpath(".dead.lock").exists()   # a dead holder's lock goes
    held.release()


def _base(backbone) -> dict:
    """The key parts `_extract` gives extract_features, completed as it completes them."""
    return {"dataset": "frames", "transform": "t", "checkpoint": getattr(backbone, "features_id", backbone.sha256),
            "pooling": "mean"}


@pytest.mark.parametrize("other_layers", [[0, 3], [0]])
def test_chunks_merged_and_dropped_by_another_process_are_taken_from_its_merge(backbone, tmp_path, monkeypatch,
                                                                               other_layers):
    """The race behind "feature chunk ... is corrupt" and FileNotFoundError: this process has extracted
    its chunks when another one, extracting the same split (same or fewer layers), merges them and
    drops the chunk entries; this process's merge then takes the other's merged entries."""
    from totobench.features import extract
    monkeypatch.setenv("TOTOBENCH_CHUNK_BATCHES", "1")
    reference = _extract(backbone, FeatureCache(tmp_path / "ref"), Frames(16))
    cache = FeatureCache(tmp_path / "cache")
    merge = extract._assemble

    def other_process_merges_first(*args, **kwargs):
        monkeypatch.setattr(extract, "_assemble", merge)
        _extract(backbone, cache, Frames(16), layers=other_layers)
        return merge(*args, **kwargs)
    monkeypatch.setattr(extract, "_assemble", other_process_merges_first)
    got = _extract(backbone, cache, Frames(16))
    for layer in (0, 3):
        np.testing.assert_array_equal(got.feats[layer], reference.feats[layer])
    np.testing.assert_array_equal(got.labels, reference.labels)
    assert sorted(p.name[-4:] for p in cache.root.iterdir()) == [".npy"] * 3 + ["json"] * 4   # nothing left over


def test_a_split_another_process_is_still_merging_is_waited_for(backbone, tmp_path, monkeypatch):
    """Every layer's merged entry is there, not yet the skipped record: another process is merging."""
    import threading
    cache = FeatureCache(tmp_path)
    first = _extract(backbone, cache, Frames(8))
    meta_key = cache_key(**_base(backbone), what="labels-groups")
    record = tmp_path / f"{meta_key}.record.json"
    written = record.read_text()
    record.unlink()
    merger = cache.lock(meta_key)
    assert merger.try_acquire()

    def merged():
        record.write_text(written)
        merger.release()
    threading.Timer(0.5, merged).start()
    seen = _counting(backbone, monkeypatch)
    again = _extract(backbone, cache, Frames(8))
    assert seen == [] and record.read_text() == written                # waited for it, extracted nothing
    np.testing.assert_array_equal(again.feats[3], first.feats[3])
    np.testing.assert_array_equal(again.labels, first.labels)


def test_a_chunk_another_process_extracts_is_waited_for_and_a_dead_ones_taken_over(backbone, tmp_path, monkeypatch):
    import threading

    from totobench.features.extract import _chunk_keys
    from totobench.io import host_tag
    monkeypatch.setenv("TOTOBENCH_CHUNK_BATCHES", "1")
    reference = _extract(backbone, FeatureCache(tmp_path / "ref"), Frames(16))
    cache = FeatureCache(tmp_path / "cache")
    live = cache.lock(_chunk_keys(_base(backbone), [0, 3], (4, 8))[1])
    assert live.try_acquire()                          # another process is extracting chunk [4, 8)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache.lock(_chunk_keys(_base(backbone), [0, 3], (8, 12))[1]).path.write_text(
        json.dumps({"host": host_tag(), "pid": dead.pid, "token": "t"}))    # one killed while extracting [8, 12)
    threading.Timer(1.0, live.release).start()         # it gives up (or is killed) one second later
    seen = _counting(backbone, monkeypatch)
    t0 = time.monotonic()
    got = _extract(backbone, cache, Frames(16))
    assert time.monotonic() - t0 >= 1.0 and sum(seen) == 16           # waited, then extracted [4, 8) itself
    for layer in (0, 3):
        np.testing.assert_array_equal(got.feats[layer], reference.feats[layer])
    assert not list(cache.root.glob(".*")), "a lock or temporary file was left behind"


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
