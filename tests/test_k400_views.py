"""Kinetics test views as V-JEPA 2's frozen evaluation: segments evenly spaced over a video, their rows
joined lazily into one probe input, class scores averaged over spatial views, and a --quick run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from totobench.cli import main
from totobench.features.views import JoinedRows, join_segments
from totobench.probes.grid import gather_rows
from totobench.results.schema import load_result
from totobench.tasks.kinetics import ClipViews, segment_start, video_level_metrics


def test_segments_are_evenly_spaced_on_a_hand_worked_video():
    # 100 frames, clips of 8 frames every 4th = a span of 32 frames
    starts = lambda segments: [segment_start(100, 32, segments, s) for s in range(segments)]
    assert starts(1) == [34]                  # one partition of 100 > 32: the clip centred, (100 - 32) // 2
    assert starts(2) == [9, 59]               # partitions of 50 > 32: centred in each, 50 * s + 9
    assert starts(4) == [0, 22, 44, 66]       # partitions of 25 <= 32: spread, (100 - 32) // 3 = 22 apart
    assert starts(8) == [0, 9, 18, 27, 36, 45, 54, 63]   # the last clip ends at frame 63 + 32 = 95 <= 100
    assert [segment_start(20, 32, 3, s) for s in range(3)] == [0, 0, 0]   # shorter than one clip
    g = lambda: torch.Generator().manual_seed(5)
    drawn = [segment_start(100, 32, 2, s, g()) for s in range(2)]
    assert drawn == [segment_start(100, 32, 2, s, g()) for s in range(2)]  # the generator decides
    assert 0 <= drawn[0] <= 18 and 50 <= drawn[1] <= 68                     # inside its partition


def test_joined_rows_equal_the_concatenation_and_read_lazily(tmp_path):
    rng = np.random.default_rng(0)
    tokens = np.memmap(tmp_path / "t.f16", dtype=np.float16, mode="w+", shape=(10, 3, 4))
    tokens[:] = rng.standard_normal((10, 3, 4))
    joined = JoinedRows(tokens, starts=[0, 4, 6], segments=2)
    assert joined.shape == (3, 6, 4) and joined.ndim == 3 and len(joined) == 3
    np.testing.assert_array_equal(joined[np.array([2, 0])],
                                  np.stack([np.concatenate([tokens[6], tokens[7]]),
                                            np.concatenate([tokens[0], tokens[1]])]))
    np.testing.assert_array_equal(joined[1], np.concatenate([tokens[4], tokens[5]]))
    np.testing.assert_array_equal(np.asarray(joined)[1:], joined[1:])
    # what the probes read: gather_rows on an index tensor
    got = gather_rows(joined, torch.tensor([1, 2]))
    assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(joined[np.array([1, 2])]).float())
    pooled = rng.standard_normal((10, 4)).astype(np.float16)
    mean = JoinedRows(pooled, [0, 4, 6], 2)
    assert mean.shape == (3, 4)
    np.testing.assert_allclose(mean[np.array([1])], pooled[4:6].astype(np.float32).mean(0, keepdims=True), rtol=1e-6)
    assert torch.equal(join_segments(torch.from_numpy(tokens[4:8]), 2), torch.from_numpy(joined[1:3]))
    with pytest.raises(ValueError, match="do not fit in 10 rows"):
        JoinedRows(tokens, [9], 2)


def test_class_scores_are_averaged_over_the_views_of_a_video():
    # video 0: views say class 1, 0, 1 -> 1 (its label); video 1: one confident view for class 2 wins
    scores = torch.tensor([[0., 3., 0.], [2., 0., 0.], [0., 3., 0.],
                           [1., 0., 0.], [1., 0., 0.], [0., 0., 9.]])
    groups = np.array([0, 0, 0, 1, 1, 1])
    assert video_level_metrics(scores, np.array([1, 1, 1, 2, 2, 2]), groups)["top1"] == 1.0
    assert video_level_metrics(scores, np.array([1, 1, 1, 0, 0, 0]), groups)["top1"] == 0.5


def test_clip_views_lay_out_segments_then_views_of_each_video(tiny_world):
    from totobench.data.kinetics import KineticsIndex
    index = KineticsIndex(tiny_world / "kinetics400", "val", min_frames=4)
    val = ClipViews(index, frames=4, stride=2, resolution=32, training=False, segments=2, views=3)
    assert val.views[0] == 3                 # the data world's 96 x 80 frames are not square
    assert len(val) == len(index.videos) * 2 * 3
    labels, groups = val.labels_and_groups()
    assert list(groups[:7]) == [0] * 6 + [1] and labels[0] == index.videos[0][1]
    items = [val[i] for i in range(6)]       # video 0: view 0 (segments 0, 1), view 1, view 2
    assert all(item["frames"].shape == (4, 3, 32, 32) and item["frames"].dtype == torch.uint8 for item in items)
    assert not torch.equal(items[0]["frames"], items[4]["frames"])   # left and right crops differ
    train = ClipViews(index, 4, 2, 32, True, segments=2, seed=0, samples=2)
    assert len(train) == len(index.videos) * 2 * 2


def test_quick_k400_with_two_segments_joins_them_for_the_probe(tiny_world, micro_checkpoint, tmp_path):
    out = tmp_path / "out"
    common = ["run", "--model", str(micro_checkpoint), "--layers", "-1", "--quick", "--out", str(out),
              "--set", f"k400.root={tiny_world / 'kinetics400'}", "--set", "probe.epochs=1",
              "--set", "input.segments=2"]
    assert main(common + ["--tasks", "k400,k400-spacetime"]) == 0
    result = load_result(out / "micro" / "k400.json")
    protocol = result["protocol"]
    frames, side = protocol["input"]["frames"], protocol["input"]["resolution"] // 8
    assert protocol["data"]["token_grid"] == [2 * frames, side, side]    # two clips' tokens, one input
    assert protocol["data"]["eval_views"].startswith("2 segment(s) joined x 3 spatial view(s)")
    assert protocol["data"]["augmentation"] == "none"
    assert any(d.startswith("2 segment(s) per probe input") for d in protocol["deviations"])
    assert 0.0 <= result["best_layer"]["metrics"]["top1"] <= 1.0
    # the space-time position embedding spans the joined segments' frames
    spacetime = load_result(out / "micro" / "k400-spacetime.json")["protocol"]["data"]["token_grid"]
    assert spacetime == [2 * frames, side // 2, side // 2]
