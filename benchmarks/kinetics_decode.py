"""Clips per second of the Kinetics clip readers, side by side on the same videos.

Writes a few 10 s, 30 fps, 340x256 H.264 videos (the size of a real Kinetics-400 copy) to a temp
folder and times, for clips of 16 frames every 4th frame:
  - KineticsClips(decoder="pytorchvideo"): pytorchvideo's EncodedVideoPyAV.get_clip (seeks);
  - KineticsClips(decoder="frames"): totobench.data.video.read_frames of the 16 frames (seeks);
  - whole-video decoding then picking the frames (what seeking avoids).
Run: nice -n 10 .venv/bin/python benchmarks/kinetics_decode.py [--videos 6] [--frames 300]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from totobench.data.kinetics import KineticsClips, KineticsIndex
from totobench.data.video import write_mp4


def make_videos(root: Path, count: int, frames: int) -> None:
    (root / "train").mkdir(parents=True)
    y, x = np.mgrid[0:256, 0:340]
    rows = []
    for i in range(count):
        clip = np.empty((frames, 256, 340, 3), np.uint8)
        for t in range(frames):  # moving stripes: enough texture for H.264 to work on
            clip[t, ..., 0] = (x + 3 * t + 17 * i) % 256
            clip[t, ..., 1] = (y * 2 + t) % 256
            clip[t, ..., 2] = ((x + y) // 8 * 32 + i * 40) % 256
        name = f"vid{i:03d}_{0:06d}_{10:06d}"
        write_mp4(root / "train" / f"{name}.mp4", clip, 30)
        rows.append(["class" + str(i % 2), f"vid{i:03d}", 0, 10, "train"])
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([["label", "youtube_id", "time_start", "time_end", "split"], *rows])


def clips_per_second(dataset, repeats: int) -> float:
    start = time.perf_counter()
    n = 0
    for epoch in range(repeats):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            assert dataset[i]["frames"] is not None
            n += 1
    return n / (time.perf_counter() - start)


def whole_video_clips_per_second(videos, repeats: int) -> float:
    start = time.perf_counter()
    n = 0
    for _ in range(repeats):
        for path, _ in videos:
            with av.open(path) as container:
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            np.stack(frames[100:164:4])
            n += 1
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "k400"
        make_videos(root, args.videos, args.frames)
        index = KineticsIndex(root, "train")
        rates = {}
        for decoder in ("pytorchvideo", "frames"):
            rates[f"{decoder} (train, random clip)"] = clips_per_second(
                KineticsClips(index, 16, 4, decoder=decoder), args.repeats)
            rates[f"{decoder} (eval, 4 clips/video)"] = clips_per_second(
                KineticsClips(index, 16, 4, clips_per_video=4, decoder=decoder), 1)
        rates["whole-video decode"] = whole_video_clips_per_second(index.videos, 1)
    base = rates["whole-video decode"]
    print(f"{args.videos} videos of {args.frames} frames, 340x256, 30 fps; clips of 16 frames, stride 4")
    for name, rate in rates.items():
        print(f"  {name:36s} {rate:7.2f} clips/s   x{rate / base:5.2f} vs whole-video decode")


if __name__ == "__main__":
    main()
