"""H.264 mp4 writing and frame-accurate reading with PyAV.

`write_mp4` is deterministic: one encoder thread, fixed x264 options, no B-frames, bit-exact
muxing and x264's fresh memory zeroed, so the same frames give the same bytes in any process.
`read_frames` seeks to the keyframe before each requested frame instead of decoding the whole file,
so reading a few frames of a long video is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.codec.context
import numpy as np

from totobench.errors import DataError
from totobench.host import zeroed_allocations

# Frames between keyframes in the files we write: bounds the decoding work of one seek.
KEYFRAME_INTERVAL = 16
# When the next requested frame is at most this many frames ahead, decode on instead of seeking.
_DECODE_AHEAD = 32


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int


def write_mp4(path: str | Path, frames: np.ndarray, fps: float | Fraction, crf: int = 20) -> None:
    """Encode uint8 frames [T, H, W, 3] (RGB, H and W even) as H.264 yuv420p in an mp4 at `fps`.

    Same frames, fps and crf give the same bytes (single-threaded x264, bit-exact muxer, blocks x264
    allocates zeroed: its lookahead reads some it never writes, totobench/host.py), whatever the
    process did before: tests/test_world_deterministic.py compares tiny worlds generated in two
    fresh processes and inside pytest's.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"frames must be uint8 [T,H,W,3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if t == 0 or h % 2 or w % 2:
        raise ValueError(f"need at least one frame and even H, W for yuv420p, got {frames.shape}")
    rate = Fraction(fps).limit_denominator(1001)
    # x264 reads some memory it never wrote (macroblock-tree lookahead): zeroed, it reads the same
    with zeroed_allocations(), av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = 1 / rate
        stream.codec_context.thread_count = 1
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        stream.options = {
            "preset": "medium", "crf": str(crf), "threads": "1",
            "x264-params": f"keyint={KEYFRAME_INTERVAL}:min-keyint={KEYFRAME_INTERVAL}:scenecut=0:bframes=0:sliced-threads=0",
        }
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            frame.time_base = stream.codec_context.time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _open(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: video file not found")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot open video ({e})") from None
    if not container.streams.video:
        container.close()
        raise DataError(f"{path}: no video stream")
    return container


def _fps(stream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise DataError(f"{stream.container.name}: video stream has no frame rate")
    return Fraction(rate)


def video_info(path: str | Path) -> VideoInfo:
    """Frame count, frame rate and size of the first video stream.

    Counts packets (no decoding) when the container does not store the frame count.
    Raises DataError on a missing or unreadable file.
    """
    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = _fps(stream)
        n = stream.frames
        if not n:
            try:
                n = sum(1 for p in container.demux(stream) if p.size)
            except av.FFmpegError as e:
                raise DataError(f"{path}: unreadable video ({e})") from None
        return VideoInfo(num_frames=int(n), fps=float(fps), width=stream.codec_context.width,
                         height=stream.codec_context.height)


def read_frames(path: str | Path, indices: list[int]) -> np.ndarray:
    """Decode frames `indices` (0-based, any order, repeats allowed) -> uint8 [len(indices), H, W, 3] RGB.

    Seeks to the keyframe before a requested frame unless it is only a few frames ahead of the
    decoder. Raises DataError when the file is missing or unreadable, or shorter than an index.
    """
    path = Path(path)
    indices = [int(i) for i in indices]
    if any(i < 0 for i in indices):
        raise DataError(f"{path}: negative frame index requested: {min(indices)}")
    wanted = sorted(set(indices))
    got: dict[int, np.ndarray] = {}
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = _fps(stream)
        tb = stream.time_base
        start = stream.start_time or 0
        decoder, last = None, -1  # `last`: index of the frame the decoder returned last

        def index_of(frame) -> int:
            pts = frame.pts if frame.pts is not None else frame.dts
            return round((pts - start) * tb * fps)

        try:
            for target in wanted:
                if decoder is None or target <= last or target - last > _DECODE_AHEAD:
                    pts = start + int(Fraction(target) / fps / tb)
                    container.seek(pts, stream=stream, backward=True, any_frame=False)
                    decoder, last = container.decode(stream), -1
                for frame in decoder:
                    last = index_of(frame)
                    if last > target and target not in got:
                        break  # seek landed past the target (odd index); retry from the start
                    if last == target:
                        got[target] = frame.to_ndarray(format="rgb24")
                        break
                if target not in got and last > target:
                    container.seek(start, stream=stream, backward=True, any_frame=False)
                    decoder, last = container.decode(stream), -1
                    for frame in decoder:
                        last = index_of(frame)
                        if last >= target:
                            if last == target:
                                got[target] = frame.to_ndarray(format="rgb24")
                            break
                if target not in got:
                    raise DataError(f"{path}: video too short or truncated: frame {target} requested, "
                                    f"decoding stopped at frame {last}")
        except av.FFmpegError as e:
            raise DataError(f"{path}: unreadable video ({e})") from None
    return np.stack([got[i] for i in indices]) if indices else np.zeros((0, 0, 0, 3), np.uint8)
