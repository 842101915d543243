"""`totobench data synth`: write the embedded data world in the real on-disk dataset formats.

One folder per format, each a valid root for its reader and for the ecosystem's own tools:

    pretrain/     images/*.JPEG and videos/*.mp4, unlabelled (for pre-training the bundled model)
    imagenet/     train/<wnid>/*.JPEG, val/<wnid>/*.JPEG, LOC_synset_mapping.txt
    kinetics400/  train.csv, val.csv (label,youtube_id,time_start,time_end,split), train/*.mp4, val/*.mp4
    ego4d/        annotations/fho_sta_{train,val}.json, v2/full_scale/<video_uid>.mp4
    davis/        JPEGImages/480p/<seq>/*.jpg, Annotations/480p/<seq>/*.png, ImageSets/2017/{train,val}.txt

Every item (image, clip, sequence) is drawn from its own random stream, keyed by (seed, split name,
item index), so the output does not depend on the number of worker processes and no evaluation item
shares a stream with a pre-training item. Each root is written to a temporary folder and renamed
into place when complete; `world.json` records which roots are complete, for which seed and size.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from totobench.data import world_scenes as scenes
from totobench.data.davis import voc_palette
from totobench.data.video import write_mp4
from totobench.data.world_content import stream_rng
from totobench.errors import ConfigError
from totobench.io import atomic_write_json, host_tag, writer_gone
from totobench.progress import progress_bar


@dataclass(frozen=True)
class WorldSize:
    imagenet_train: int  # images per class
    imagenet_val: int
    kinetics_train: int  # clips per class
    kinetics_val: int
    ego_train: int  # videos
    ego_val: int
    ego_interactions: int  # per video; each gives two annotated frames
    davis_train: int  # sequences
    davis_val: int
    davis_frames: int
    pretrain_images: int
    pretrain_videos: int


SIZES = {
    "tiny": WorldSize(imagenet_train=3, imagenet_val=2, kinetics_train=2, kinetics_val=1, ego_train=2, ego_val=2,
                      ego_interactions=2, davis_train=2, davis_val=2, davis_frames=10,
                      pretrain_images=16, pretrain_videos=6),
    "default": WorldSize(imagenet_train=180, imagenet_val=50, kinetics_train=300, kinetics_val=40, ego_train=48,
                         ego_val=24, ego_interactions=3, davis_train=24, davis_val=12, davis_frames=24,
                         pretrain_images=4000, pretrain_videos=800),
}

# Frame sizes (height, width), frame counts and rates of each format.
IMAGE_SIZE = 80  # ImageNet-like images: 80x80, a quarter of them 96x80 or 80x96
KINETICS_SHAPE, KINETICS_FRAMES, KINETICS_FPS = (80, 96), 32, 8  # 4-second clips
EGO_SHAPE, EGO_FPS = (96, 128), 10
DAVIS_SHAPE = (96, 128)
PRETRAIN_IMAGE_SIZE, PRETRAIN_VIDEO_SHAPE, PRETRAIN_FRAMES, PRETRAIN_FPS = 80, (96, 96), 32, 8

# Bump a root's version when its content changes: existing worlds regenerate that root only.
ROOT_VERSIONS = {"pretrain": 1, "imagenet": 2, "kinetics400": 2, "ego4d": 1, "davis": 3}
MANIFEST = "world.json"
JPEG_QUALITY = 90


def part_of(split: str) -> str:
    """Digit-scan pool of a split: evaluation splits never share handwriting with training."""
    return "eval" if split == "val" else "train"


# ----------------------------------------------------------------------------- pretrain

def _pretrain_images(root: Path, seed: int, indices: range) -> list:
    for i in indices:
        image = scenes.scene_image(stream_rng(seed, "pretrain/images", i), PRETRAIN_IMAGE_SIZE,
                                   PRETRAIN_IMAGE_SIZE, "train")
        Image.fromarray(image).save(root / "images" / f"{i:06d}.JPEG", quality=JPEG_QUALITY)
    return []


def _pretrain_videos(root: Path, seed: int, indices: range) -> list:
    for i in indices:
        frames = scenes.scene_clip(stream_rng(seed, "pretrain/videos", i), *PRETRAIN_VIDEO_SHAPE,
                                   PRETRAIN_FRAMES, "train")
        write_mp4(root / "videos" / f"{i:06d}.mp4", frames, PRETRAIN_FPS)
    return []


def _plan_pretrain(root: Path, seed: int, size: WorldSize):
    (root / "images").mkdir(parents=True)
    (root / "videos").mkdir(parents=True)
    jobs = [(_pretrain_images, (root, seed, r)) for r in _batches(size.pretrain_images, 50)]
    jobs += [(_pretrain_videos, (root, seed, r)) for r in _batches(size.pretrain_videos, 8)]
    return jobs, lambda results: None


# ----------------------------------------------------------------------------- imagenet

def _imagenet_images(root: Path, seed: int, split: str, indices: range) -> list:
    n_classes = len(scenes.OBJECT_CLASSES)
    for i in indices:
        c, j = i % n_classes, i // n_classes  # classes interleaved so batches mix classes
        rng = stream_rng(seed, f"imagenet/{split}", i)
        h, w = _image_shape(rng)
        image = scenes.object_image(rng, scenes.OBJECT_CLASSES[c], h, w, part_of(split),
                                    class_hue=scenes.OBJECT_CLASS_HUES[c])
        wnid = scenes.OBJECT_WNIDS[c]
        name = f"{wnid}_{j}.JPEG" if split == "train" else f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        Image.fromarray(image).save(root / split / wnid / name, quality=JPEG_QUALITY)
    return []


def _image_shape(rng: np.random.Generator) -> tuple[int, int]:
    """(h, w): mostly square; one in four is landscape or portrait, to exercise resize-and-crop."""
    r = rng.random()
    if r < 0.125:
        return IMAGE_SIZE, IMAGE_SIZE + 16  # landscape
    if r < 0.25:
        return IMAGE_SIZE + 16, IMAGE_SIZE  # portrait
    return IMAGE_SIZE, IMAGE_SIZE


def _plan_imagenet(root: Path, seed: int, size: WorldSize):
    jobs = []
    for split, per_class in (("train", size.imagenet_train), ("val", size.imagenet_val)):
        for wnid in scenes.OBJECT_WNIDS:
            (root / split / wnid).mkdir(parents=True)
        jobs += [(_imagenet_images, (root, seed, split, r))
                 for r in _batches(per_class * len(scenes.OBJECT_CLASSES), 64)]

    def finish(results):
        lines = [f"{wnid} {name}\n" for wnid, name in zip(scenes.OBJECT_WNIDS, scenes.OBJECT_CLASS_NAMES)]
        (root / "LOC_synset_mapping.txt").write_text("".join(lines))

    return jobs, finish


# ----------------------------------------------------------------------------- kinetics400

_YOUTUBE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def youtube_id(rng: np.random.Generator, i: int) -> str:
    """11 characters of [A-Za-z0-9_-]; some begin with '-' and some contain '_', as real ids do."""
    chars = [_YOUTUBE_CHARS[k] for k in rng.integers(0, 64, 11)]
    if i % 7 == 3:
        chars[0] = "-"
    if i % 5 == 1:
        chars[int(rng.integers(1, 10))] = "_"
    return "".join(chars)


def _kinetics_clips(root: Path, seed: int, split: str, indices: range) -> list:
    rows = []
    n_classes = len(scenes.ACTIONS)
    duration = KINETICS_FRAMES // KINETICS_FPS
    for i in indices:
        rng = stream_rng(seed, f"kinetics400/{split}", i)
        label = scenes.ACTIONS[i % n_classes]
        yid, start = youtube_id(rng, i), int(rng.integers(0, 290))
        frames = scenes.action_clip(rng, label, *KINETICS_SHAPE, KINETICS_FRAMES, part_of(split))
        write_mp4(root / split / f"{yid}_{start:06d}_{start + duration:06d}.mp4", frames, KINETICS_FPS)
        rows.append((label, yid, start, start + duration, split))
    return rows


def _plan_kinetics(root: Path, seed: int, size: WorldSize):
    jobs = []
    for split, per_class in (("train", size.kinetics_train), ("val", size.kinetics_val)):
        (root / split).mkdir(parents=True)
        jobs += [(_kinetics_clips, (root, seed, split, r)) for r in _batches(per_class * len(scenes.ACTIONS), 8)]

    def finish(results):
        rows = [row for batch in results for row in batch]
        if len({row[1] for row in rows}) != len(rows):
            raise RuntimeError("youtube id collision in the generated Kinetics world")
        for split in ("train", "val"):
            lines = ["label,youtube_id,time_start,time_end,split\n"]
            for label, yid, start, end, s in sorted(r for r in rows if r[4] == split):
                quoted = f'"{label}"' if " " in label else label  # real K400 CSVs quote such labels
                lines.append(f"{quoted},{yid},{start},{end},{s}\n")
            (root / f"{split}.csv").write_text("".join(lines))

    return jobs, finish


# ----------------------------------------------------------------------------- ego4d

def _ego_videos(root: Path, seed: int, split: str, indices: range, interactions: int) -> list:
    out = []
    h, w = EGO_SHAPE
    for i in indices:
        rng = stream_rng(seed, f"ego4d/{split}", i)
        video_uid = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        clip_uid = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        video = scenes.table_video(rng, h, w, interactions, part_of(split))
        write_mp4(root / "v2" / "full_scale" / f"{video_uid}.mp4", video.frames, EGO_FPS)
        clip_start = int(rng.integers(0, 3))  # the clip starts a little after the video
        annotations = []
        for act in video.interactions:
            # two annotated frames per interaction, 0.3 to 1.5 s before contact, hand in view
            ahead = rng.choice(np.arange(3, min(act.contact_frame - act.start_frame, 16)), 2, replace=False)
            for k in sorted(ahead.tolist(), reverse=True):
                frame = act.contact_frame - k
                annotations.append({
                    "uid": f"{video_uid}_{frame:07d}", "video_uid": video_uid, "frame": frame,
                    "clip_uid": clip_uid, "clip_frame": frame - clip_start,
                    "objects": [{"box": video.boxes[act.object_index],
                                 "noun_category_id": video.noun_ids[act.object_index],
                                 "verb_category_id": act.verb_id,
                                 "time_to_contact": round(k / EGO_FPS, 4)}]})
        metadata = {"fps": EGO_FPS, "frame_width": w, "frame_height": h, "num_frames": len(video.frames)}
        out.append((video_uid, metadata, annotations))
    return out


def _plan_ego4d(root: Path, seed: int, size: WorldSize):
    (root / "v2" / "full_scale").mkdir(parents=True)
    (root / "annotations").mkdir()
    splits = (("train", size.ego_train), ("val", size.ego_val))
    jobs = [(_ego_videos, (root, seed, split, r, size.ego_interactions)) for split, n in splits
            for r in _batches(n, 4)]
    n_train_jobs = len(_batches(size.ego_train, 4))

    def finish(results):
        for split, batches in (("train", results[:n_train_jobs]), ("val", results[n_train_jobs:])):
            videos = [v for batch in batches for v in batch]
            document = {
                "version": "v2", "split": split,
                "info": {
                    "description": "totobench data world: a hand reaches for objects on a table",
                    "video_metadata": {uid: meta for uid, meta, _ in videos},
                    "noun_categories": [{"id": i, "name": n} for i, n in enumerate(scenes.NOUNS)],
                    "verb_categories": [{"id": i, "name": n} for i, n in enumerate(scenes.VERBS)],
                },
                "annotations": [a for _, _, annotations in videos for a in annotations],
            }
            (root / "annotations" / f"fho_sta_{split}.json").write_text(json.dumps(document))

    return jobs, finish


# ----------------------------------------------------------------------------- davis

_DAVIS_WORDS = (("red", "blue", "swift", "lazy", "tiny", "bold", "calm", "wild", "odd", "shy", "brave", "quiet"),
                ("digits", "shapes", "dance", "parade", "chase", "crossing", "drift", "juggle", "swap", "race"))


def _davis_names(seed: int, count: int) -> list[str]:
    """`count` distinct sequence names shaped like DAVIS ones ("calm-chase")."""
    combos = [f"{a}-{b}" for a in _DAVIS_WORDS[0] for b in _DAVIS_WORDS[1]]
    order = stream_rng(seed, "davis/names").permutation(len(combos))
    return [combos[order[i % len(combos)]] + (f"-{i // len(combos)}" if i >= len(combos) else "")
            for i in range(count)]


def _davis_sequences(root: Path, seed: int, split: str, items: list[tuple[int, str]], num_frames: int) -> list:
    h, w = DAVIS_SHAPE
    palette = voc_palette()
    for i, name in items:
        frames, masks = scenes.object_sequence(stream_rng(seed, f"davis/{split}", i), h, w, num_frames,
                                               part_of(split), quick_return=True)
        images, annotations = root / "JPEGImages" / "480p" / name, root / "Annotations" / "480p" / name
        images.mkdir(parents=True)
        annotations.mkdir(parents=True)
        for t in range(num_frames):
            Image.fromarray(frames[t]).save(images / f"{t:05d}.jpg", quality=JPEG_QUALITY)
            mask = Image.fromarray(masks[t], "L").convert("P")
            mask.putpalette(palette)
            mask.save(annotations / f"{t:05d}.png")
    return []


def _plan_davis(root: Path, seed: int, size: WorldSize):
    names = _davis_names(seed, size.davis_train + size.davis_val)
    split_names = {"train": names[:size.davis_train], "val": names[size.davis_train:]}
    jobs = [(_davis_sequences, (root, seed, split, [(i, seq_names[i]) for i in r], size.davis_frames))
            for split, seq_names in split_names.items() for r in _batches(len(seq_names), 3)]

    def finish(results):
        (root / "ImageSets" / "2017").mkdir(parents=True)
        for split, seq_names in split_names.items():
            (root / "ImageSets" / "2017" / f"{split}.txt").write_text("".join(f"{n}\n" for n in sorted(seq_names)))

    return jobs, finish


# ----------------------------------------------------------------------------- driver

PLANS: dict[str, Callable] = {"pretrain": _plan_pretrain, "imagenet": _plan_imagenet,
                              "kinetics400": _plan_kinetics, "ego4d": _plan_ego4d, "davis": _plan_davis}


def _batches(n: int, batch: int) -> list[range]:
    return [range(s, min(s + batch, n)) for s in range(0, n, batch)]


def _run_job(job):
    function, args = job
    return function(*args)


def read_manifest(out: Path) -> dict:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def missing_roots(out: Path, seed: int, size: str) -> list[str]:
    """Roots of the world at `out` that are absent, from another seed/size, or out of date."""
    manifest = read_manifest(out)
    same = manifest.get("seed") == seed and manifest.get("size") == size
    done = manifest.get("roots", {}) if same else {}
    return [r for r in PLANS if done.get(r) != ROOT_VERSIONS[r] or not (out / r).is_dir()]


def synth(out: Path, seed: int = 0, size: str = "default", roots: list[str] | None = None,
          workers: int | None = None) -> None:
    """Write the data world for (seed, size) into `out`, generating only the roots that are missing.

    `roots` limits which roots to write (default: all). `workers` processes share the items
    (default: 1 for "tiny", else up to 2); the bytes written do not depend on it.
    Raises ConfigError for an unknown size or a negative seed.
    """
    if size not in SIZES:
        raise ConfigError(f"--size: unknown world size {size!r}; expected one of {sorted(SIZES)}")
    if seed < 0:
        raise ConfigError(f"--seed: expected a non-negative integer, got {seed}")
    unknown = set(roots or []) - set(PLANS)
    if unknown:
        raise ConfigError(f"unknown data world roots {sorted(unknown)}; known: {list(PLANS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [r for r in missing_roots(out, seed, size) if roots is None or r in roots]
    if not todo:
        return
    manifest = read_manifest(out)
    if manifest.get("seed") != seed or manifest.get("size") != size:
        manifest = {"generator": "totobench data synth", "seed": seed, "size": size, "roots": {}}
    workers = workers or (1 if size == "tiny" else min(2, os.cpu_count() or 1))
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        for root in todo:
            _write_root(out, root, seed, SIZES[size], pool)
            manifest["roots"][root] = ROOT_VERSIONS[root]
            atomic_write_json(out / MANIFEST, manifest, sort_keys=True)
        if pool is not None:
            pool.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _write_root(out: Path, root: str, seed: int, size: WorldSize, pool) -> None:
    _remove_abandoned(out, root)
    tmp = out / f".{root}.tmp-{os.getpid()}"
    tmp.mkdir()
    jobs, finish = PLANS[root](tmp, seed, size)
    results = []
    with progress_bar(fields="", transient=True) as progress:
        task = progress.add_task(f"data world: {root}", total=len(jobs))
        for result in (pool.imap(_run_job, jobs) if pool else map(_run_job, jobs)):
            results.append(result)
            progress.advance(task)
    finish(results)
    final = out / root
    if final.exists():  # an out-of-date or foreign copy: move it aside, then delete it
        stale = out / f".{root}.stale-{os.getpid()}"
        os.replace(final, stale)
        shutil.rmtree(stale)
    os.replace(tmp, final)


def _remove_abandoned(out: Path, root: str) -> None:
    """Delete temporary folders of `root` left by generator processes that no longer run."""
    for tmp in out.glob(f".{root}.*-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and (int(pid) == os.getpid() or writer_gone(host_tag(), int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)


def tree_size(path: Path) -> tuple[int, int]:
    """(number of files, total bytes) under `path`."""
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)
