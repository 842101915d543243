"""DAVIS input geometry: sizes with the aspect kept, tile offsets, stitched tile features."""

import torch

from totobench.tasks.davis import input_size, sequence_features, window_starts


def test_input_size_square_or_aspect_kept_on_the_patch_grid():
    assert input_size(96, 128, 64, keep_aspect=False, patch=8) == (64, 64)
    assert input_size(96, 128, 64, keep_aspect=True, patch=8) == (64, 88)      # 85.3 -> 88
    assert input_size(480, 854, 128, keep_aspect=True, patch=8) == (128, 224)  # 227.7 -> 224


def test_window_starts_cover_the_frame_with_the_fewest_windows():
    assert window_starts(64, 64, 8) == [0]
    assert window_starts(128, 64, 8) == [0, 64]
    assert window_starts(96, 64, 8) == [0, 32]           # overlapping, the last flush with the end
    assert window_starts(200, 64, 8) == [0, 48, 88, 136]  # 4 windows, multiples of 8, last ends at 200
    for length in (72, 96, 130 // 8 * 8, 200):
        starts = window_starts(length, 64, 8)
        assert starts[-1] + 64 == length and all(s % 8 == 0 for s in starts)
        assert all(b - a <= 64 for a, b in zip(starts, starts[1:]))


class CellBackbone:
    """Feature of a cell = (tile-local row, tile-local col, global pixel mean of the cell): lets the
    test see which tile each stitched cell came from."""

    class inputs:  # noqa: N801
        patch_size = 8
        resolution = 16

    def forward_frames(self, frames, layers, kind):
        B, T, _, H, W = frames.shape
        rows = torch.arange(H // 8).float().view(-1, 1).expand(H // 8, W // 8)
        cols = torch.arange(W // 8).float().view(1, -1).expand(H // 8, W // 8)
        means = frames.mean(2).unfold(2, 8, 8).unfold(3, 8, 8).mean((-1, -2))  # [B, T, h, w]
        f = torch.stack([rows.expand(B, T, -1, -1), cols.expand(B, T, -1, -1), means], -1)
        return [f for _ in layers]   # [B, T, h, w, 3]


def test_tiles_are_stitched_in_place_and_overlaps_averaged():
    frames = torch.rand(3, 1, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    whole = sequence_features(CellBackbone(), frames, [0], batch_size=2, device="cpu")[0]
    tiled = sequence_features(CellBackbone(), frames, [0], batch_size=2, device="cpu", window=16)[0]
    assert whole.shape == tiled.shape == (3, 3, 4, 3)
    # content lands where it belongs: the pixel means agree with the whole-frame pass
    torch.testing.assert_close(tiled[..., 2], whole[..., 2])
    # rows: tiles start at y = 0 and 8 (cells 0-1 and 1-2): cell row 1 is the mean of 1 and 0
    torch.testing.assert_close(tiled[0, :, 0, 0], torch.tensor([0.0, 0.5, 1.0]))
    # cols: tiles at x = 0 and 16, no overlap: local cols 0 1 0 1
    torch.testing.assert_close(tiled[0, 0, :, 1], torch.tensor([0.0, 1.0, 0.0, 1.0]))


def test_stitch_tiles_equals_sequence_features_layout():
    """The task's cached path (tiles as extractor items, then stitch_tiles) gives what
    sequence_features computes in memory."""
    from totobench.tasks.davis import stitch_tiles, tile_boxes
    frames = torch.rand(2, 1, 3, 24, 40, generator=torch.Generator().manual_seed(1))
    backbone = CellBackbone()
    boxes = tile_boxes(24, 40, 16, 8)
    assert boxes == [(0, 0, 16, 16), (0, 16, 16, 16), (0, 24, 16, 16), (8, 0, 16, 16), (8, 16, 16, 16), (8, 24, 16, 16)]
    items = torch.stack([torch.stack([backbone.forward_frames(frames[t:t + 1, :, :, y:y + h, x:x + w], [0], "image")[0][0, 0]
                                      for y, x, h, w in boxes]) for t in range(2)])
    torch.testing.assert_close(stitch_tiles(items, boxes, 24, 40, 8),
                               sequence_features(backbone, frames, [0], 4, "cpu", window=16)[0])
