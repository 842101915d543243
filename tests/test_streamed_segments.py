"""Streamed probes on joined segments (features/stream.py StreamedRows with segments > 1): a Kinetics
probe input joins the tokens of `segments` consecutive clips, streamed as the cache's JoinedRows reads it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from launch import torchrun_two
from torch.utils.data import Dataset

from totobench.cli import main
from totobench.features.cache import FeatureCache
from totobench.features.extract import extract_features
from totobench.features.stream import StreamedRows, pooled_row_shape
from totobench.features.views import JoinedRows


class _Clips(Dataset):
    """Extractor items (dicts) of random images; the items in `broken` cannot be decoded."""
    yields_dicts = True

    def __init__(self, n: int, broken=()):
        g = torch.Generator().manual_seed(3)
        self.frames = [(torch.rand(1, 3, 64, 64, generator=g) * 255).to(torch.uint8) for _ in range(n)]
        self.broken = set(broken)

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        bad = i in self.broken
        return {"frames": None if bad else self.frames[i], "label": i // 2 % 3, "index": i, "group": i // 2,
                "path": f"clip{i}.mp4", "skip_reason": "unreadable" if bad else None}


@pytest.fixture(scope="module")
def micro(micro_checkpoint):
    from totobench.model import load_backbone
    return load_backbone(str(micro_checkpoint))


@pytest.mark.parametrize("pooling", ["tokens", "mean"])
def test_streamed_runs_of_segments_equal_the_cached_joined_rows(micro, tmp_path, pooling):
    items = _Clips(12, broken={5})      # input 2 (items 4, 5) has an unreadable segment
    cached = extract_features(micro, items, [0, 3], kind="image", pooling=pooling, key_parts={"dataset": "c"},
                              cache=FeatureCache(tmp_path / "cache"), batch_size=4)
    starts = np.flatnonzero(cached.valid.reshape(-1, 2).all(axis=1)) * 2
    assert list(starts) == [0, 2, 6, 8, 10]
    shape = tuple(cached.feats[0].shape[1:])
    streamed = StreamedRows(items, np.arange(6) % 3, [0, 3], shape, kind="image", pooling=pooling,
                            forward_batch=3, segments=2).bind(micro, "cpu")
    assert streamed.row_shape == JoinedRows(cached.feats[0], starts, 2).shape[1:]
    index = torch.tensor([4, 2, 0, 5, 1, 3])
    batches = list(streamed.read(index, 4))
    rows = torch.cat([r for _, r in batches])
    assert rows.tolist() == [4, 0, 5, 1, 3]            # input 2 left out, the others in the asked order
    assert streamed.dropped == [2] and streamed.skipped == [("clip5.mp4", "unreadable")]
    assert streamed.forwarded == 12                     # every item of the asked inputs, once
    for layer in (0, 3):
        got = torch.cat([f[layer] for f, _ in batches])
        want = JoinedRows(cached.feats[layer], rows.numpy() * 2, 2)[np.arange(5)]
        assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(np.asarray(want)).float())


SMALL = ("--set", "input.frames=4", "--set", "input.resolution=32")   # clips of 4 x 4 x 4 tokens: quick forwards


def test_two_ranks_each_keep_their_share_of_whole_inputs(micro, monkeypatch):
    """Two ranks simulated in turn: each forwards and yields every other input of each batch (whole
    inputs, its own rows only: nothing is gathered), an empty share included; together they make up
    the one-process batches, also when an input of one rank was dropped."""
    from totobench import parallel
    items, index = _Clips(12, broken={5}), torch.tensor([4, 2, 0, 5, 1])
    shape = pooled_row_shape(micro, "tokens", "image", 1, 64)
    make = lambda: StreamedRows(items, np.arange(6) % 3, [0, 3], shape, kind="image", pooling="tokens",
                                forward_batch=2, segments=2).bind(micro, "cpu")
    one = list(make().read(index, 4))
    ranks, got = {}, {}
    for rank in (0, 1):
        monkeypatch.setattr(parallel, "info", lambda rank=rank: parallel.DistInfo(rank=rank, world_size=2))
        ranks[rank] = make().bind(micro, "cpu", shared=True)
        got[rank] = list(ranks[rank].read(index, 4))
    assert ranks[0].shared and ranks[0].share == (0, 2) and ranks[1].share == (1, 2)
    # batch [4, 2, 0, 5]: rank 0 forwards inputs 4, 0; rank 1 inputs 2 (unreadable), 5; batch [1]: rank 0 alone
    assert [[r.tolist() for _, r in got[rank]] for rank in (0, 1)] == [[[4, 0], [1]], [[5], []]]
    assert ranks[1].dropped == [2] and ranks[0].dropped == [] and ranks[0].forwarded == 6 and ranks[1].forwarded == 4
    assert [r.tolist() for _, r in one] == [[4, 0, 5], [1]]
    for layer in (0, 3):
        assert got[1][1][0][layer].shape == (0, *one[0][0][layer].shape[1:])   # rank 1's empty share of batch 2
        mine = {row: f for rank in (0, 1) for feats, rows in got[rank] for row, f in zip(rows.tolist(), feats[layer])}
        for feats, rows in one:
            assert all(torch.equal(mine[row], f) for row, f in zip(rows.tolist(), feats[layer]))


def _k400(world, checkpoint, out, task, *extra):
    args = ["run", "--model", str(checkpoint), "--tasks", task, "--layers", "0,-1", "--quick", "--out", str(out),
            "--set", f"k400.root={world / 'kinetics400'}", "--set", "probe.epochs=2", "--set", "input.segments=2",
            *SMALL, *extra]
    assert main(args) == 0
    return json.loads((out / "micro" / f"{task}.json").read_text())


@pytest.mark.parametrize("task", ["k400", "k400-linear"])
def test_streamed_joined_segments_give_the_cached_numbers(tiny_world, micro_checkpoint, tmp_path, monkeypatch, task):
    from totobench.tasks.kinetics import VideoClassification
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "home"))
    seen = []   # what each run scores: the val class scores of every view, their labels and videos
    score = VideoClassification.score
    monkeypatch.setattr(VideoClassification, "score", lambda self, ctx, results, val, val_data: seen.append(
        ({layer: r.outputs for layer, r in results.items()}, val_data.labels, val_data.targets)) or
        score(self, ctx, results, val, val_data))
    grid = ("--set", "probe.lrs=[0.1,0.001]", "--set", "probe.wds=[0.0001]")
    streamed = _k400(tiny_world, micro_checkpoint, tmp_path / "s", task, *grid, "--cache-budget", "0")
    assert streamed["protocol"]["streamed"] is True and streamed["protocol"]["val_streamed"] is True
    cached = _k400(tiny_world, micro_checkpoint, tmp_path / "c", task, *grid)
    assert cached["protocol"]["streamed"] is False
    assert streamed["protocol"]["data"] == cached["protocol"]["data"]     # token grid of the joined input, counts
    assert streamed["per_layer"] == cached["per_layer"]
    (scores_s, labels_s, videos_s), (scores_c, labels_c, videos_c) = seen
    assert len(labels_c) == 10 * 3 and np.array_equal(labels_s, labels_c) and np.array_equal(videos_s, videos_c)
    for layer in scores_c:
        assert scores_c[layer].shape == (30, 10)
        torch.testing.assert_close(scores_s[layer], scores_c[layer], atol=1e-4, rtol=1e-4)


def test_augmented_joined_segments_run_end_to_end(tiny_world, micro_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "home"))
    out = _k400(tiny_world, micro_checkpoint, tmp_path / "a", "k400", "--set", "probe.augment=true")
    protocol = out["protocol"]
    assert protocol["streamed"] is True and protocol["augment"] is True and protocol["val_streamed"] is False
    frames, side = protocol["input"]["frames"], protocol["input"]["resolution"] // 8
    assert protocol["data"]["token_grid"] == [2 * frames, side, side]
    assert all(0.0 <= row["metrics"]["top1"] <= 1.0 for row in out["per_layer"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("task, forwarded", [
    # each rank forwards half of the inputs of every read, both clips of each: 18 fitted inputs (20 videos, 2 held
    # out) x (2 statistics passes + 2 epochs), the 2 held out once, all 20 x (2 + 2) for the refit, the 30 val
    # inputs (10 videos x 3 views) once: 184 inputs = 368 clips
    ("k400-linear", 184),
    # the attentive grid: 18 fitted inputs x 3 epochs (k400's quick: epochs 3), the 2 held out, the 30 val inputs:
    # 86 inputs = 172 clips; its val scores (every view's) are gathered from both ranks in the one-process order,
    # then averaged per video
    ("k400", 86)])
def test_torchrun_two_processes_stream_joined_segments_as_one(tiny_world, micro_checkpoint, tmp_path, monkeypatch,
                                                              task, forwarded):
    args = ["run", "--model", str(micro_checkpoint), "--tasks", task, "--layers", "0,-1", "--quick",
            "--set", f"k400.root={tiny_world / 'kinetics400'}", "--set", "probe.epochs=2",
            "--set", "input.segments=2", *SMALL, "--cache-budget", "0"]
    proc = torchrun_two(args, tmp_path / "home-2", tmp_path / "two", timeout=110)
    assert f"{task} streamed probe: items forwarded per rank [{forwarded}, {forwarded}]" in proc.stdout, \
        proc.stdout[-1500:]
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "home-1"))
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "micro" / f"{task}.json").read_text())
    two = json.loads((tmp_path / "two" / "micro" / f"{task}.json").read_text())
    assert two["protocol"]["streamed"] is True
    # data-parallel: logits equal one process's to float32 summation order (tests/test_probe_data_parallel.py);
    # the metrics are counted from them, so they are equal unless a margin is that thin
    assert two["per_layer"] == one["per_layer"]
