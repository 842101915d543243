"""`torchrun --nproc_per_node=2 -m totobench run ...` on this machine (gloo, CPU): the two ranks
share the extraction by batch chunks and rank 0 writes the same result file, and the same
feature bytes, as one process."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from launch import torchrun_two

from totobench.cli import main
from totobench.errors import DataError, TotobenchError
from totobench.features import distributed
from totobench.features.cache import FeatureCache
from totobench.features.extract import extract_features, plan_chunks, run_extraction_job, serve_extraction


def _run_args(world, checkpoint):
    # 48 train / 32 val images in batches of 8: 6 and 4 batches (chunks), 3+3 and 2+2 per rank
    return ["run", "--model", str(checkpoint), "--tasks", "imagenet-linear", "--layers", "0,-1", "--quick",
            "--set", "probe.holdout=0.3", "--set", "batch_size=8", "--data-root", str(world)]


def _npy_hashes(folder):
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.npy")}


def test_plan_chunks_are_whole_batches_independent_of_the_world_size(monkeypatch):
    monkeypatch.setenv("TOTOBENCH_CHUNK_BATCHES", "8")
    assert plan_chunks(48, 8) == [(i, i + 8) for i in range(0, 48, 8)]   # 6 batches: one chunk each
    assert plan_chunks(5, 8) == [(0, 5)]                                   # one batch cannot be split
    assert plan_chunks(20 * 64 + 3, 64)[:2] == [(0, 192), (192, 384)]      # 21 batches: 3 per chunk
    assert plan_chunks(100 * 64, 64)[-1] == (96 * 64, 100 * 64)            # 100 batches: capped at 8
    monkeypatch.setenv("TOTOBENCH_CHUNK_BATCHES", "2")
    assert len(plan_chunks(100 * 64, 64)) == 50


def test_a_failed_share_reaches_rank_0_as_one_error_of_its_kind():
    with pytest.raises(TotobenchError, match="^rank 0: bad root$"):    # a user error stays one
        distributed.collect_reports(distributed.failure_report(DataError("bad root")))
    with pytest.raises(RuntimeError, match="^rank 0: boom$"):
        distributed.collect_reports(distributed.failure_report(ValueError("boom")))
    assert distributed.collect_reports({"computed": 2, "reused": 1}) == [{"computed": 2, "reused": 1}]


def test_a_serving_rank_reports_each_job_and_stops_on_stop(monkeypatch):
    """A job that fails is reported (rank 0 raises it), not raised: the rank serves on until STOP."""
    jobs = iter([{"op": "extract", "cache_root": 1}, None])    # a malformed job, then STOP
    sent = []
    monkeypatch.setattr(distributed, "receive_job", lambda: next(jobs))
    monkeypatch.setattr(distributed, "send_report", sent.append)
    assert serve_extraction(backbone=None, device=torch.device("cpu")) == 0
    assert [r["user_error"] for r in sent] == [False] and sent[0]["error"].startswith("rank 0: ")


def test_chunks_another_rank_committed_are_reused_by_one_process(micro_checkpoint, tmp_path, monkeypatch):
    """A torchrun run killed after rank 1 committed its chunks resumes in one process without them."""
    from totobench.features.extract import Indexed
    from totobench.model import load_backbone
    backbone = load_backbone(str(micro_checkpoint))
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(1, 3, 64, 64, generator=g), i % 2) for i in range(16)]
    kwargs = dict(kind="image", pooling="mean", key_parts={"dataset": "d"}, batch_size=2)
    job = {"op": "extract", "items": Indexed(data), "layers": [0, 3], "kind": "image", "pooling": "mean",
           "base": {"dataset": "d", "checkpoint": backbone.features_id, "pooling": "mean"},
           "chunks": plan_chunks(16, 2), "batch_size": 2, "num_workers": 0, "cache_root": str(tmp_path / "a"),
           "desc": "rank 1"}
    assert run_extraction_job(backbone, job, torch.device("cpu"), rank=1, world_size=2) == {"computed": 4, "reused": 0}
    seen = []
    forward = type(backbone).forward_frames
    monkeypatch.setattr(type(backbone), "forward_frames",
                        lambda self, frames, layers, kind: seen.append(len(frames)) or forward(self, frames, layers, kind))
    resumed = extract_features(backbone, data, [0, 3], cache=FeatureCache(tmp_path / "a"), **kwargs)
    assert sum(seen) == 8                                   # rank 0's half only
    reference = extract_features(backbone, data, [0, 3], cache=FeatureCache(tmp_path / "b"), **kwargs)
    for layer in (0, 3):
        assert resumed.feats[layer].tobytes() == reference.feats[layer].tobytes()


@pytest.mark.timeout(300)
def test_torchrun_two_processes_equals_one_process(tiny_world, micro_checkpoint, tmp_path, monkeypatch):
    args = _run_args(tiny_world, micro_checkpoint)
    home2 = tmp_path / "home-2proc"
    proc = torchrun_two(args, home2, tmp_path / "two")
    # the ranks shared the chunks: 6 train batches (3 + 3), 4 val batches (2 + 2)
    assert "imagenet-linear train: chunks computed per rank [3, 3]" in proc.stdout, proc.stdout[-1500:]
    assert "imagenet-linear val: chunks computed per rank [2, 2]" in proc.stdout, proc.stdout[-1500:]

    home1 = tmp_path / "home-1proc"
    monkeypatch.setenv("TOTOBENCH_HOME", str(home1))
    assert main([*args, "--out", str(tmp_path / "one")]) == 0

    one = json.loads((tmp_path / "one" / "micro" / "imagenet-linear.json").read_text())
    two = json.loads((tmp_path / "two" / "micro" / "imagenet-linear.json").read_text())
    assert [r["layer"] for r in two["per_layer"]] == [0, 3]
    assert two["per_layer"] == one["per_layer"]
    assert two["best_layer"] == one["best_layer"]
    assert two["protocol"] == one["protocol"]
    # the assembled shards are byte for byte those of one process, and no chunk is left behind
    assert _npy_hashes(home2 / "features") == _npy_hashes(home1 / "features")
    assert len(list((home2 / "features").glob("*.npy"))) == 2 * 3   # (2 layers + labels) x 2 splits
    assert not list((home2 / "features").glob(".*"))                 # no temporary file


@pytest.mark.timeout(300)
def test_torchrun_davis_equals_one_process(tiny_world, micro_checkpoint, tmp_path, monkeypatch):
    """DAVIS frames (tiles) go through the shared extraction too: same masks' scores, same shards."""
    args = ["run", "--model", str(micro_checkpoint), "--tasks", "davis", "--layers", "0,-1",
            "--set", "batch_size=4", "--data-root", str(tiny_world)]
    home2 = tmp_path / "home-2proc"
    torchrun_two(args, home2, tmp_path / "two")
    home1 = tmp_path / "home-1proc"
    monkeypatch.setenv("TOTOBENCH_HOME", str(home1))
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "micro" / "davis.json").read_text())
    two = json.loads((tmp_path / "two" / "micro" / "davis.json").read_text())
    assert two["per_layer"] == one["per_layer"]
    assert _npy_hashes(home2 / "features") == _npy_hashes(home1 / "features") != set()
