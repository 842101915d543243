"""Linear classifiers on raw pixels of the generated data world: how hard are its tasks?

    .venv/bin/python benchmarks/raw_pixel_baselines.py [--root WORLD] [--size default] [--seed 0]

Prints, side by side with chance: ImageNet-format top-1 from pixels (should be clearly above
chance), Kinetics-format top-1 from one middle frame (should be near chance: the action classes
are defined by motion only) and from frame differences (should be above chance).
The files are read with the suite's own video reader and PIL, as a user's dataset would be.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from totobench.data.video import read_frames
from totobench.data.world import ensure_data_world


def linear_top1(x_train, y_train, x_val, y_val) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=3000))
    model.fit(x_train.reshape(len(x_train), -1), y_train)
    return float(model.score(x_val.reshape(len(x_val), -1), y_val))


def imagenet_pixels(root: Path, split: str, classes: list[str], side: int = 32):
    """Resize the short side to `side`, centre crop `side` x `side` (the evaluation transform)."""
    xs, ys = [], []
    for label, wnid in enumerate(classes):
        for path in sorted((root / split / wnid).glob("*.JPEG")):
            image = Image.open(path).convert("RGB")
            scale = side / min(image.size)
            w, h = round(image.width * scale), round(image.height * scale)
            image = image.resize((w, h), Image.BILINEAR)
            left, top = (w - side) // 2, (h - side) // 2
            xs.append(np.asarray(image.crop((left, top, left + side, top + side)), np.float32) / 255)
            ys.append(label)
    return np.stack(xs), np.array(ys)


def kinetics_clips(root: Path, split: str, classes: list[str], pool: int = 4):
    """All frames of every clip of `split`, average-pooled `pool` x `pool`: [N, T, H/pool, W/pool, 3]."""
    xs, ys = [], []
    with open(root / f"{split}.csv", newline="") as f:
        for row in csv.DictReader(f):
            name = f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}.mp4"
            frames = read_frames(root / split / name, list(range(32))).astype(np.float32) / 255
            t, h, w, c = frames.shape
            xs.append(frames.reshape(t, h // pool, pool, w // pool, pool, c).mean(axis=(2, 4)))
            ys.append(classes.index(row["label"]))
    return np.stack(xs), np.array(ys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="a data world folder (default: ensure_data_world)")
    parser.add_argument("--size", default="default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    world = args.root or ensure_data_world(args.size, args.seed)
    rows = []

    start = time.perf_counter()
    imagenet = world / "imagenet"
    classes = sorted(p.name for p in (imagenet / "train").iterdir() if p.is_dir())
    x_train, y_train = imagenet_pixels(imagenet, "train", classes)
    x_val, y_val = imagenet_pixels(imagenet, "val", classes)
    rows.append(("ImageNet-format, 32x32 pixels", len(x_train), len(x_val),
                 linear_top1(x_train, y_train, x_val, y_val), 1 / len(classes)))

    kinetics = world / "kinetics400"
    with open(kinetics / "train.csv", newline="") as f:
        actions = sorted({row["label"] for row in csv.DictReader(f)})
    c_train, k_train = kinetics_clips(kinetics, "train", actions)
    c_val, k_val = kinetics_clips(kinetics, "val", actions)
    chance = 1 / len(actions)
    middle = c_train.shape[1] // 2
    rows.append(("Kinetics-format, middle frame", len(c_train), len(c_val),
                 linear_top1(c_train[:, middle], k_train, c_val[:, middle], k_val), chance))
    rows.append(("Kinetics-format, first frame", len(c_train), len(c_val),
                 linear_top1(c_train[:, 0], k_train, c_val[:, 0], k_val), chance))
    diff = lambda c: c[:, 2::2] - c[:, :-2:2]  # frame t+2 minus frame t, 15 differences
    rows.append(("Kinetics-format, signed frame differences", len(c_train), len(c_val),
                 linear_top1(diff(c_train), k_train, diff(c_val), k_val), chance))
    rows.append(("Kinetics-format, |frame differences|", len(c_train), len(c_val),
                 linear_top1(np.abs(diff(c_train)), k_train, np.abs(diff(c_val)), k_val), chance))

    print(f"data world: {world}")
    print(f"{'features (linear probe, logistic regression)':46s} {'train':>6s} {'val':>5s} {'top-1':>7s} "
          f"{'chance':>7s} {'top-1/chance':>13s}")
    for name, n_train, n_val, top1, chance in rows:
        print(f"{name:46s} {n_train:6d} {n_val:5d} {top1:7.3f} {chance:7.3f} {top1 / chance:13.2f}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
