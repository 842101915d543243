"""write_mp4 / read_frames / video_info: deterministic bytes, frame-exact seeking, clear errors."""

from __future__ import annotations

import hashlib

import av
import numpy as np
import pytest

from totobench.data.video import KEYFRAME_INTERVAL, VideoInfo, read_frames, video_info, write_mp4
from totobench.errors import DataError


def moving_gradient(t: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Smooth frames (H.264 keeps them close) with a bright square moving one pixel per frame."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i, ..., 0] = (xx * 4) % 256
        frames[i, ..., 1] = (yy * 5) % 256
        frames[i, ..., 2] = 60
        frames[i, 10:20, i % (w - 10):i % (w - 10) + 10] = 250
    return frames


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    frames = moving_gradient(50)
    path = tmp_path_factory.mktemp("v") / "clip.mp4"
    write_mp4(path, frames, fps=10)
    return path, frames


def test_same_frames_same_bytes(video, tmp_path):
    path, frames = video
    write_mp4(tmp_path / "again.mp4", frames, fps=10)
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256((tmp_path / "again.mp4").read_bytes()).digest()


def test_video_info(video):
    path, _ = video
    assert video_info(path) == VideoInfo(num_frames=50, fps=10.0, width=64, height=48)


def test_read_frames_equals_a_full_decode_in_any_order(video):
    path, frames = video
    with av.open(str(path)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 4  # lossy, but close
    indices = [49, 3, 3, 0, KEYFRAME_INTERVAL, KEYFRAME_INTERVAL - 1, 20, 48]
    got = read_frames(path, indices)
    assert got.dtype == np.uint8 and got.shape == (len(indices), 48, 64, 3)
    assert np.array_equal(got, decoded[indices])


def test_read_frames_errors_name_the_file(video, tmp_path):
    path, _ = video
    with pytest.raises(DataError, match="too short"):
        read_frames(path, [10, 50])
    with pytest.raises(DataError, match="not found"):
        read_frames(tmp_path / "missing.mp4", [0])
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated.mp4"):
        read_frames(truncated, [0])
    with pytest.raises(DataError, match="truncated.mp4"):
        video_info(truncated)


def test_write_rejects_odd_sizes(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((2, 5, 8, 3), np.uint8), fps=8)
