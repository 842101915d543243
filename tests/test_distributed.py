"""`torchrun --nproc_per_node=2 -m totobench run ...` on this machine (gloo, CPU): the two ranks
share the extraction by batch chunks and rank 0 writes the same result file, and the same
feature bytes, as one process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from totobench.cli import main
from totobench.features.extract import plan_chunks


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on this shared 2-core machine, 2 threads are ~10x slower (spinning)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _run_args(world, checkpoint):
    # 48 train / 32 val images in batches of 8: 6 and 4 batches, split 3+3 and 2+2 between 2 ranks
    return ["run", "--model", str(checkpoint), "--tasks", "imagenet-linear", "--layers", "0,-1", "--quick",
            "--set", "probe.holdout=0.3", "--set", "batch_size=8", "--data-root", str(world)]


def _npy_hashes(folder):
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.npy")}


def test_plan_chunks_are_whole_batches_shared_by_ranks(monkeypatch):
    monkeypatch.setenv("TOTOBENCH_CHUNK_BATCHES", "8")
    assert plan_chunks(48, 8, 1) == [(0, 48)]
    assert plan_chunks(48, 8, 2) == [(0, 24), (24, 48)]
    assert plan_chunks(50, 8, 2) == [(0, 32), (32, 50)]          # 7 batches: 4 + 3
    assert plan_chunks(5, 8, 4) == [(0, 5)]                      # one batch cannot be split
    monkeypatch.setenv("TOTOBENCH_CHUNK_BATCHES", "2")
    assert plan_chunks(40, 8, 1) == [(0, 16), (16, 32), (32, 40)]


@pytest.mark.timeout(300)
def test_torchrun_two_processes_equals_one_process(tiny_world, micro_checkpoint, tmp_path, monkeypatch):
    args = _run_args(tiny_world, micro_checkpoint)
    home2 = tmp_path / "home-2proc"
    env = {**os.environ, "TOTOBENCH_HOME": str(home2), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "totobench", *args, "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    # each rank extracted one chunk of each split
    assert proc.stdout.count("chunks computed per rank [1, 1]") == 2, proc.stdout[-1500:]

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
