"""Sequence building: start/end tokens per kind, raster order, clip indices."""

from __future__ import annotations

import pytest
import torch

from totobench.model.sequence import (build_batch, build_sequence, clip_frame_indices, clip_span,
                                      num_clip_starts, split_sequence, start_id)
from totobench.model.toto import TotoConfig

CFG = TotoConfig.preset("toto-tiny")  # codebook 256: image start 256, video start 257, end 258


def test_video_sequence_layout():
    frames = torch.arange(2 * 8 * 8).view(2, 8, 8)          # 2 frames of 8x8 ids (< 256)
    seq = build_sequence(frames, "video", CFG)
    assert seq.shape == (1 + 128 + 1,)
    assert int(seq[0]) == 257 and int(seq[-1]) == 258
    # raster order, frame after frame: row 0 of frame 0, row 1, ..., then frame 1
    assert seq[1:9].tolist() == list(range(8))
    assert int(seq[1 + 64]) == 64 and int(seq[128]) == 127


def test_image_sequence_and_inverse():
    ids = torch.randint(0, 256, (8, 64))
    seq = build_sequence(ids, "image", CFG)
    assert int(seq[0]) == 256 == CFG.image_start_id
    kind, back = split_sequence(seq, CFG)
    assert kind == "image" and torch.equal(back, ids)
    kind, back = split_sequence(build_sequence(ids, "video", CFG, add_end=False), CFG)
    assert kind == "video" and torch.equal(back, ids)


def test_build_batch_prepends_the_start_token():
    ids = torch.randint(0, 256, (3, 2, 64))
    batch = build_batch(ids, "video", CFG)
    assert batch.shape == (3, 129)
    assert (batch[:, 0] == 257).all() and torch.equal(batch[:, 1:], ids.view(3, 128))


def test_bad_inputs():
    with pytest.raises(ValueError):
        start_id(CFG, "audio")
    with pytest.raises(ValueError):
        build_sequence(torch.full((1, 64), 256), "image", CFG)   # a special id is not a frame token
    with pytest.raises(ValueError):
        split_sequence(torch.tensor([5, 6, 7]), CFG)


def test_clip_indices():
    assert clip_frame_indices(3, 4, 2) == [3, 5, 7, 9]
    assert clip_span(8, 2) == 15
    assert num_clip_starts(32, 8, 2) == 18     # starts 0..17: the last clip ends on frame 31
    assert num_clip_starts(14, 8, 2) == 0
