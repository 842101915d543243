"""Kinetics-400 in the layouts real copies come in, and clips decoded through pytorchvideo.

Annotations: `{split}.csv` with the columns `label,youtube_id,time_start,time_end,split`
(optionally `is_cc`; the test CSV has no `label`; older releases write the split as `validate`),
in `annotations/` or at the root. Videos: `{youtube_id}_{time_start:06d}_{time_end:06d}.mp4` in
`{split}/` or in `{split}/<label>/` class folders (a file named `{youtube_id}.mp4` is accepted
too). Also read: pytorchvideo's `path label` list file (`{split}.csv` or `{split}.txt` without a
header) and a bare `{split}/<class>/<video>` tree.

Class index = position in the sorted train labels, so every split agrees. Videos that are missing,
unreadable or too short are never fatal: they are listed in `.skipped` and left out.
"""

from __future__ import annotations

import csv
import math
import os
import random
import sys
from fractions import Fraction
from pathlib import Path

import av
import torch
from rich.progress import track

from totobench.data.fingerprint import dataset_fingerprint
from totobench.data.video import VideoInfo, read_frames, video_info
from totobench.errors import DataError


def _alias_torchvision_functional_tensor() -> None:
    """pytorchvideo 0.1.5 imports `torchvision.transforms.functional_tensor`, which torchvision
    >= 0.17 renamed `_functional_tensor`: register the old name once, before pytorchvideo loads."""
    name = "torchvision.transforms.functional_tensor"
    if name in sys.modules:
        return
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401  (old torchvision)
    except ImportError:
        from torchvision.transforms import _functional_tensor
        sys.modules[name] = _functional_tensor


_alias_torchvision_functional_tensor()

from pytorchvideo.data.clip_sampling import ConstantClipsPerVideoSampler, RandomClipSampler  # noqa: E402
from pytorchvideo.data.encoded_video import EncodedVideo  # noqa: E402
from pytorchvideo.data.labeled_video_paths import LabeledVideoPaths  # noqa: E402

SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "validate", "validation", "valid"),
                 "test": ("test", "testing")}
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi")
REQUIRED_COLUMNS = ("youtube_id", "time_start", "time_end")
ANNOTATION_FOLDERS = ("annotations", ".", "lists", "labels")


def split_aliases(split: str) -> tuple[str, ...]:
    return SPLIT_ALIASES.get(split, (split,))


def find_annotation_file(root: Path, split: str) -> Path | None:
    """The CSV (or pytorchvideo list) of `split` under `root`, or None when there is none."""
    if root.is_file():
        return root
    for folder in ANNOTATION_FOLDERS:
        for alias in split_aliases(split):
            for name in (f"{alias}.csv", f"kinetics_{alias}.csv", f"kinetics400_{alias}.csv",
                         f"kinetics_400_{alias}.csv", f"{alias}.txt", f"{alias}list.txt", f"{alias}_list.txt"):
                if (root / folder / name).is_file():
                    return root / folder / name
    return None


def video_folders(root: Path, split: str) -> list[Path]:
    """Folders that may hold the videos of `split`: `{split}/`, `{split}_256/`, `videos/{split}/`, ..."""
    found = []
    for base in (root, root / "videos"):
        if not base.is_dir():
            continue
        for child in sorted(base.iterdir()):
            if child.is_dir() and any(child.name == a or child.name.startswith(a + "_") for a in split_aliases(split)):
                found.append(child)
    return found


def parse_video_name(stem: str) -> tuple[str, int, int] | None:
    """`{youtube_id}_{start:06d}_{end:06d}` -> (youtube_id, start, end), split from the right
    because ids may contain `_` or begin with `-`/`_`; None when the name has no times."""
    parts = stem.rsplit("_", 2)
    if len(parts) == 3 and parts[0] and parts[1].isdigit() and parts[2].isdigit():
        return parts[0], int(parts[1]), int(parts[2])
    return None


def index_video_files(folders: list[Path]) -> dict:
    """{(youtube_id, start, end): path} and {youtube_id or stem: path} over every video file
    below `folders` (class sub-folders included). The first path in sorted order wins."""
    files = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for name in sorted(filenames):
                stem, ext = os.path.splitext(name)
                if ext.lower() not in VIDEO_EXTENSIONS or name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                parsed = parse_video_name(stem)
                files.setdefault(parsed or stem, path)
                if parsed:
                    files.setdefault(parsed[0], path)
    return files


def read_kinetics_csv(path: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """Rows {label (None in test files), youtube_id, time_start, time_end} of a Kinetics CSV,
    and [(file:line, message)] for malformed rows. Raises DataError when a column is missing."""
    rows, bad = [], []
    try:
        return _read_kinetics_rows(path, rows, bad)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None


def _read_kinetics_rows(path: Path, rows: list, bad: list) -> tuple[list[dict], list[tuple[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected "
                            "label,youtube_id,time_start,time_end,split (label optional in test files)")
        for row in reader:
            try:
                rows.append({"label": row["label"].strip() if "label" in columns and row["label"] else None,
                             "youtube_id": row["youtube_id"].strip(),
                             "time_start": int(float(row["time_start"])),
                             "time_end": int(float(row["time_end"]))})
            except (TypeError, ValueError, AttributeError, OverflowError):
                bad.append((f"{path}:{reader.line_num}", "time_start/time_end must be numbers, "
                            f"got {row.get('time_start')!r}, {row.get('time_end')!r}"))
    return rows, bad


def read_path_label_list(path: Path) -> list[tuple[str, str | None]]:
    """pytorchvideo's list file: one `path label` per line (label optional) -> [(path, label)]."""
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        parts = line.strip().rsplit(None, 1)
        entries.append((parts[0], parts[1]) if len(parts) == 2 else (parts[0], None))
    return entries


def is_kinetics_csv(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline()
    return "youtube_id" in header


class KineticsIndex:
    """The labelled videos of one Kinetics split, found in any of the supported layouts.

    `classes`: sorted labels (of the train split when it is there); `videos`: [(path, label
    index)] of the usable videos (label -1 in test files); `skipped`: {reason: [path]} for
    missing, unreadable, too_short, and unknown_label ("<csv>: <video file> label '<label>'"),
    bad_row ("<csv>:<line>");
    `info`: {path: VideoInfo} when `probe` (each header opened: catches unreadable files).
    Raises DataError only when the split itself cannot be found or its CSV lacks a column.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", probe: bool = True, min_frames: int = 1):
        self.root = Path(root)
        # `root` may also be the annotation file itself: videos are then looked for beside it,
        # or beside its annotations/ folder.
        self.base = self.root if self.root.is_dir() else self.root.parent
        if not self.root.is_dir() and self.base.name == "annotations":
            self.base = self.base.parent
        self.split = split
        self.skipped: dict[str, list[str]] = {}
        self.info: dict[str, VideoInfo] = {}
        self.annotation_file = find_annotation_file(self.root, split)
        folders = video_folders(self.base, split)
        if self.annotation_file is not None and is_kinetics_csv(self.annotation_file):
            self.layout = "csv"
            entries = self._from_csv(folders)
        elif self.annotation_file is not None:
            self.layout = "list"
            entries = self._from_list()
        elif folders:
            self.layout = "tree"
            entries = self._from_tree(folders)
        else:
            raise DataError(f"{self.root}: no {split}.csv (in annotations/ or the root), {split}.txt "
                            f"list or {split}/ video folder for split {split!r}")
        self.videos = self._usable(entries, probe, min_frames)

    def _skip(self, reason: str, path: str) -> None:
        self.skipped.setdefault(reason, []).append(str(path))

    def _train_labels(self) -> list[str] | None:
        """Labels of the train annotation file (CSV or list), or None when this is the train
        split or there is no train file: the train labels define the class index."""
        train = find_annotation_file(self.base, "train")
        if self.split in split_aliases("train") or train is None or train == self.annotation_file:
            return None
        if is_kinetics_csv(train):
            labels = [r["label"] for r in read_kinetics_csv(train)[0]]
        else:
            labels = [label for _, label in read_path_label_list(train)]
        return sorted({label for label in labels if label is not None}) or None

    def _from_csv(self, folders: list[Path]) -> list[tuple[str, int]]:
        rows, bad = read_kinetics_csv(self.annotation_file)
        for where, _ in bad:
            self._skip("bad_row", where)
        self.classes = self._train_labels() or sorted({r["label"] for r in rows if r["label"] is not None})
        class_to_idx = {label: i for i, label in enumerate(self.classes)}
        files = index_video_files(folders or [self.base])
        # Where a missing video would be: the split folder, or its class folder if it has them.
        folder = folders[0] if folders else self.base / self.split
        class_folders = folder.is_dir() and any(p.is_dir() for p in folder.iterdir())
        entries = []
        for row in rows:
            key = (row["youtube_id"], row["time_start"], row["time_end"])
            name = f"{row['youtube_id']}_{row['time_start']:06d}_{row['time_end']:06d}.mp4"
            if row["label"] is not None and row["label"] not in class_to_idx:
                self._skip("unknown_label", f"{self.annotation_file}: {name} label {row['label']!r}")
                continue
            path = files.get(key) or files.get(row["youtube_id"])
            if path is None:
                in_class_folder = class_folders and row["label"]
                self._skip("missing", folder / row["label"] / name if in_class_folder else folder / name)
                continue
            entries.append((path, class_to_idx[row["label"]] if row["label"] is not None else -1))
        return entries

    def _from_list(self) -> list[tuple[str, int]]:
        raw = read_path_label_list(self.annotation_file)
        labels = {label for _, label in raw if label is not None and label != "-1"}
        known = self._train_labels() or sorted(labels)
        if all(label.isdigit() for label in labels | set(known)):
            # pytorchvideo lists hold class indices already: the names are the indices.
            top = max(int(label) for label in labels | set(known)) if labels or known else -1
            self.classes = [str(i) for i in range(top + 1)]
            raw = [(video, None if label is None else str(int(label))) for video, label in raw]
        else:
            self.classes = known
        class_to_idx = {label: i for i, label in enumerate(self.classes)}
        entries = []
        for video, label in raw:
            path = self._resolve_listed(video)
            if label is not None and label != "-1" and label not in class_to_idx:
                self._skip("unknown_label", f"{self.annotation_file}: {video} label {label!r}")
            elif path is None:
                self._skip("missing", video)
            else:
                entries.append((path, -1 if label in (None, "-1") else class_to_idx[label]))
        return entries

    def _resolve_listed(self, video: str) -> str | None:
        if os.path.isabs(video):
            return video if os.path.isfile(video) else None
        bases = [self.annotation_file.parent, self.base, self.base / self.split]
        for base in bases:
            if (base / video).is_file():
                return str(base / video)
        return None

    def _from_tree(self, folders: list[Path]) -> list[tuple[str, int]]:
        train_folders = video_folders(self.base, "train")
        source = train_folders[0] if train_folders else folders[0]
        self.classes = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
        class_to_idx = {label: i for i, label in enumerate(self.classes)}
        entries = []
        for class_dir in sorted(p for p in folders[0].iterdir() if p.is_dir()):
            for path in sorted(class_dir.iterdir()):
                if path.suffix.lower() not in VIDEO_EXTENSIONS:
                    continue
                if class_dir.name not in class_to_idx:
                    self._skip("unknown_label", path)
                else:
                    entries.append((str(path), class_to_idx[class_dir.name]))
        return entries

    def _usable(self, entries: list[tuple[str, int]], probe: bool, min_frames: int) -> list[tuple[str, int]]:
        if not probe:
            return entries
        usable = []
        for path, label in track(entries, description=f"kinetics {self.split}: opening videos",
                                 transient=True, disable=len(entries) < 1000):
            try:
                info = video_info(path)
            except DataError:
                self._skip("unreadable", path)
                continue
            if info.num_frames < min_frames:
                self._skip("too_short", path)
                continue
            self.info[path] = info
            usable.append((path, label))
        return usable

    @property
    def num_skipped(self) -> int:
        return sum(len(paths) for paths in self.skipped.values())

    def fingerprint(self) -> str:
        """Hash of relative paths and sizes of the usable videos and the annotation file."""
        extra = [self.annotation_file] if self.annotation_file is not None else []
        return dataset_fingerprint(self.base, [p for p, _ in self.videos] + extra)

    def pytorchvideo_paths(self) -> LabeledVideoPaths:
        """The usable videos as pytorchvideo's LabeledVideoPaths (for its LabeledVideoDataset)."""
        return LabeledVideoPaths(list(self.videos))


class KineticsClips(torch.utils.data.Dataset):
    """Clips of `num_frames` frames, every `stride`-th frame, from the videos of a KineticsIndex.

    Training (`clips_per_video=None`): one item per video, a clip at a random position from
    pytorchvideo's RandomClipSampler, seeded by (seed, epoch, video) so runs repeat.
    Evaluation (`clips_per_video=N`): N items per video at the positions of pytorchvideo's
    ConstantClipsPerVideoSampler (multi-view testing).
    An item is {"frames": uint8 tensor [T, H, W, 3] (or `transform(frames)`), "label",
    "video_index", "clip_index", "path", "skip_reason": None}. A video that fails to decode gives
    frames None and skip_reason "missing" or "unreadable"; `collate_clips` drops such items and
    lists them under "skipped", and `note_skipped` records them (DataLoader workers cannot
    write to this object). Videos shorter than `num_frames` frames are skipped up front
    (too_short); shorter than a whole clip span, the last frame is repeated.
    `decoder`: "frames" (totobench.data.video.read_frames of exactly the needed frames) or
    "pytorchvideo" (EncodedVideoPyAV.get_clip: same frames, but every frame of the window goes
    through RGB and float32; ~20x fewer clips/s, see benchmarks/kinetics_decode.py).
    """

    def __init__(self, index: KineticsIndex, num_frames: int, stride: int, clips_per_video: int | None = None,
                 transform=None, seed: int = 0, decoder: str = "frames"):
        if decoder not in ("frames", "pytorchvideo"):
            raise ValueError(f"decoder must be 'frames' or 'pytorchvideo', got {decoder!r}")
        self.num_frames, self.stride = num_frames, stride
        self.clips_per_video = clips_per_video
        self.transform, self.seed, self.epoch, self.decoder = transform, seed, 0, decoder
        self.skipped = {reason: list(paths) for reason, paths in index.skipped.items()}
        self.videos, self.info = [], {}
        for path, label in index.videos:
            info = index.info.get(path)
            if info is not None and info.num_frames < num_frames:
                self.skipped.setdefault("too_short", []).append(path)
                continue
            self.videos.append((path, label))
            if info is not None:
                self.info[path] = info

    def set_epoch(self, epoch: int) -> None:
        """New random clip positions for training epoch `epoch`."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.videos) * (self.clips_per_video or 1)

    def __getitem__(self, item: int) -> dict:
        video_index, clip_index = divmod(item, self.clips_per_video or 1)
        path, label = self.videos[video_index]
        sample = {"frames": None, "label": label, "video_index": video_index, "clip_index": clip_index,
                  "path": path, "skip_reason": None}
        try:
            if self.decoder == "frames":
                frames = self._read_clip_frames(path, video_index, clip_index)
            else:
                frames = self._decode_clip(path, video_index, clip_index)
        except (DataError, RuntimeError, OSError, ValueError, av.FFmpegError) as err:
            sample["skip_reason"] = "missing" if isinstance(err, FileNotFoundError) or not os.path.exists(path) else "unreadable"
            self.note_skipped([(path, sample["skip_reason"])])
            return sample
        sample["frames"] = self.transform(frames) if self.transform else frames
        return sample

    def _clip_sampler(self, clip_duration: Fraction):
        if self.clips_per_video is None:
            return RandomClipSampler(clip_duration)
        return ConstantClipsPerVideoSampler(clip_duration, self.clips_per_video)

    def _clip_start(self, duration: Fraction, clip_duration: Fraction, video_index: int, clip_index: int) -> Fraction:
        """Start time (s) of the clip from pytorchvideo's sampler for this video and view."""
        sampler = self._clip_sampler(clip_duration)
        if self.clips_per_video is None:
            # RandomClipSampler draws from the global `random`: seed it per item, then restore it.
            state = random.getstate()
            random.seed(f"{self.seed}-{self.epoch}-{video_index}")
            try:
                return Fraction(sampler(0.0, duration, {}).clip_start_sec)
            finally:
                random.setstate(state)
        for _ in range(clip_index + 1):
            start = sampler(0.0, duration, {}).clip_start_sec
        return Fraction(start)

    def _decode_clip(self, path: str, video_index: int, clip_index: int) -> torch.Tensor:
        video = EncodedVideo.from_path(path, decode_audio=False, decoder="pyav")
        try:
            stream = video._container.streams.video[0]
            fps = Fraction(stream.average_rate or stream.guessed_rate)
            clip_duration = Fraction(self.num_frames * self.stride) / fps
            duration = Fraction(video.duration)
            start = self._clip_start(duration, clip_duration, video_index, clip_index)
            clip = video.get_clip(start, start + clip_duration)
        finally:
            video.close()
        if clip is None or clip["video"] is None:
            raise DataError(f"{path}: no frames decoded in the clip window")
        frames = clip["video"].permute(1, 2, 3, 0).round().clamp(0, 255).to(torch.uint8)  # [T,H,W,3]
        frames = frames[:: self.stride][: self.num_frames]
        if len(frames) < self.num_frames:
            frames = torch.cat([frames, frames[-1:].expand(self.num_frames - len(frames), -1, -1, -1)])
        return frames

    def _read_clip_frames(self, path: str, video_index: int, clip_index: int) -> torch.Tensor:
        info = self.info.get(path) or video_info(path)
        fps = Fraction(info.fps).limit_denominator(1001)
        span = self.num_frames * self.stride
        start = self._clip_start(Fraction(info.num_frames) / fps, Fraction(span) / fps, video_index, clip_index)
        first = math.ceil(start * fps)
        indices = [min(first + k * self.stride, info.num_frames - 1) for k in range(self.num_frames)]
        return torch.from_numpy(read_frames(path, indices))

    def note_skipped(self, items) -> None:
        """Record [(path, reason)] (e.g. a batch's "skipped") in `.skipped`, once per path."""
        for path, reason in items:
            paths = self.skipped.setdefault(reason, [])
            if path not in paths:
                paths.append(path)

    @property
    def num_skipped(self) -> int:
        return sum(len(paths) for paths in self.skipped.values())


def collate_clips(samples: list[dict]) -> dict:
    """Batch the decodable items: frames [B, ...], label, video_index, clip_index (LongTensor [B]),
    path (list); and "skipped": [(path, reason)] of the items that failed to decode."""
    good = [s for s in samples if s["frames"] is not None]
    batch = {"skipped": [(s["path"], s["skip_reason"]) for s in samples if s["frames"] is None],
             "path": [s["path"] for s in good]}
    for key in ("label", "video_index", "clip_index"):
        batch[key] = torch.tensor([s[key] for s in good], dtype=torch.long)
    batch["frames"] = torch.stack([torch.as_tensor(s["frames"]) for s in good]) if good else None
    return batch
