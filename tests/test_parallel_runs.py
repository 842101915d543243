"""Parallel runs: concurrent `totobench run` processes over one feature cache and one results
folder all exit 0 with the sequential run's numbers (one round of benchmarks/parallel_runs.py),
and two probes with the same key never share a resume-state file."""

from __future__ import annotations

import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from totobench.io import lock_beside
from totobench.probes.attentive import AttentiveProbe, AttentiveSpec
from totobench.probes.base import ProbeContext, ProbeData

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "parallel_runs.py"


@pytest.fixture(scope="module")
def parallel_runs():
    return SimpleNamespace(**runpy.run_path(str(BENCH)))  # the script's functions (its main does not run)


@pytest.mark.timeout(300)
def test_concurrent_runs_over_one_cache_and_one_folder_equal_the_sequential_runs(parallel_runs, tiny_world,
                                                                                 micro_checkpoint, tmp_path):
    model = str(micro_checkpoint)
    reference, _ = parallel_runs.sequential(model, tiny_world, tmp_path / "sequential", procs=3)
    assert {out: sorted(r) for out, r in reference.items()} == {
        "out": ["micro/davis.json", "micro/imagenet.json"], "out-layers": ["micro/davis.json", "micro/imagenet.json"]}
    assert parallel_runs.run_round(model, tiny_world, tmp_path / "round", reference, procs=3) == ([], None)
    # A and B ran one command into one folder: each task was run by one of them, the other skipped it
    logs = [(tmp_path / "round" / f"{name}.log").read_text() for name in "AB"]
    for task in ("imagenet", "davis"):
        wrote = [line for log in logs for line in log.splitlines() if line.startswith("wrote") and
                 line.endswith(f"/micro/{task}.json")]
        assert len(wrote) == 1, f"{task} was trained {len(wrote)} times"


def _probe_data(n: int, seed: int) -> ProbeData:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    tokens = torch.randn(n, 4, 8, generator=g) + labels[:, None, None].float()
    return ProbeData(feats={1: tokens.numpy()}, labels=labels.numpy(), num_classes=3)


def test_a_probe_whose_state_file_another_process_holds_trains_without_touching_it(tmp_path):
    spec = AttentiveSpec(lrs=(3e-3,), wds=(0.0,), epochs=2, batch_size=16, num_heads=2)
    train, val = _probe_data(48, 0), _probe_data(24, 1)
    alone = AttentiveProbe().fit(train, val, spec, ProbeContext(device=torch.device("cpu")))
    ctx = ProbeContext(device=torch.device("cpu"), state_dir=tmp_path, run_key="k")
    resumable = AttentiveProbe().fit(train, val, spec, ctx)
    assert list(tmp_path.iterdir()) == []                         # its state file and lock: removed at the end

    state = AttentiveProbe.state_file(train, spec, ctx)
    state.write_bytes(b"the other process's half-trained state")  # torch.load would fail on it
    other = lock_beside(state)
    assert other.try_acquire()                                    # the other process trains this probe now
    try:
        second = AttentiveProbe().fit(train, val, spec, ctx)
    finally:
        other.release()
    assert state.read_bytes() == b"the other process's half-trained state"
    assert [p.name for p in tmp_path.iterdir()] == [state.name]
    for got in (resumable, second):
        assert {layer: r.metrics for layer, r in got.items()} == {layer: r.metrics for layer, r in alone.items()}
