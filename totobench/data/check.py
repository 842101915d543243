"""`totobench data check`: validate a dataset root (real or generated) with the same readers the
tasks use, summarise it, and list every problem one per line with its path.

A problem is an "error" when the tasks cannot use the root as it is (missing folder or annotation
file, unreadable image, unknown label, annotation field of the wrong type), a "warning" when the
reader skips the item and carries on (a missing or broken Kinetics video: real copies always
have some). The root is usable when there is no error.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from totobench.data.davis import DavisDataset, load_indexed_png, resolution_folders
from totobench.data.ego4d import find_sta_annotations, load_sta, sta_video_path
from totobench.data.imagenet import ImageNetFolder
from totobench.data.video import read_frames, video_info
from totobench.errors import ConfigError, DataError
from totobench.progress import progress_bar

FORMATS = ("imagenet", "k400", "ego4d-sta", "davis")


@dataclass
class Problem:
    path: str
    message: str
    severity: str = "error"  # "error": the root is not usable as it is; "warning": skipped by the reader


@dataclass
class CheckReport:
    """`summary`: {"splits": {split: {counts, classes, frames, resolution, ...}}, ...};
    `problems`: every problem found, in the order found."""
    format: str
    root: Path
    summary: dict = field(default_factory=lambda: {"splits": {}})
    problems: list[Problem] = field(default_factory=list)

    def error(self, path, message: str) -> None:
        self.problems.append(Problem(str(path), message, "error"))

    def warn(self, path, message: str) -> None:
        self.problems.append(Problem(str(path), message, "warning"))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def usable(self) -> bool:
        return not self.errors


def check_root(fmt: str, root: str | os.PathLike, progress: bool = False) -> CheckReport:
    """Validate the dataset root `root` of format `fmt` (one of FORMATS); never raises on a data
    problem (it goes in the report). Raises ConfigError on an unknown format."""
    checks = {"imagenet": check_imagenet, "k400": check_kinetics, "ego4d-sta": check_ego4d_sta, "davis": check_davis}
    if fmt not in checks:
        raise ConfigError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")
    report = CheckReport(fmt, Path(root))
    if not report.root.is_dir():
        report.error(report.root, "dataset root not found (not a folder)")
        return report
    checks[fmt](report, progress)
    return report


def _items(items, description: str, progress: bool):
    if not progress:
        yield from items
        return
    with progress_bar(fields="", transient=True) as bar:
        yield from bar.track(items, description=description)


def _size_range(sizes: list[tuple[int, int]]) -> str:
    """'WxH' when every item has one size, else 'WxH..WxH' (smallest..largest area)."""
    if not sizes:
        return "-"
    unique = sorted(set(sizes), key=lambda s: (s[0] * s[1], s))
    return f"{unique[0][0]}x{unique[0][1]}" + (f"..{unique[-1][0]}x{unique[-1][1]}" if len(unique) > 1 else "")


def _range(values: list) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    fmt = (lambda v: f"{v:g}") if isinstance(low, float) else str
    return fmt(low) if low == high else f"{fmt(low)}..{fmt(high)}"


# ImageNet ---------------------------------------------------------------------------------------

def check_imagenet(report: CheckReport, progress: bool) -> None:
    for split in ("train", "val"):
        dataset = ImageNetFolder(report.root, split, strict=False)
        for path, message in dataset.problems:
            report.error(path, message)
        sizes = []
        for path, _ in _items(dataset.samples, f"imagenet {split}", progress):
            try:
                with Image.open(path) as image:
                    image.load()  # a full decode: catches truncated files that open() alone accepts
                    sizes.append(image.size)
            except (OSError, SyntaxError, ValueError) as err:
                report.error(path, f"unreadable image ({err})")
        per_class = Counter(label for _, label in dataset.samples)
        if split == "train":
            for i, wnid in enumerate(dataset.classes):
                if per_class[i] == 0 and dataset.split_dir.is_dir():
                    report.error(dataset.split_dir / wnid, "class folder has no images")
        report.summary["splits"][split] = {
            "images": len(dataset.samples), "classes": len(per_class),
            "images per class": _range(list(per_class.values())), "resolution": _size_range(sizes)}
        report.summary["classes"] = len(dataset.classes)
        report.summary["class names"] = "LOC_synset_mapping.txt" if dataset.class_names else "none"


# Kinetics-400 -----------------------------------------------------------------------------------

def check_kinetics(report: CheckReport, progress: bool) -> None:
    from totobench.data.kinetics import KineticsIndex, find_annotation_file  # pytorchvideo import is slow

    splits = ["train", "val"] + (["test"] if find_annotation_file(report.root, "test") else [])
    for split in splits:
        try:
            index = KineticsIndex(report.root, split, probe=False)
        except DataError as err:
            report.error(report.root, str(err).removeprefix(f"{report.root}: "))
            continue
        for path in index.skipped.get("missing", []):
            report.warn(path, "missing video (the reader skips it)")
        for where in index.skipped.get("unknown_label", []):
            path, _, detail = where.partition(": ")
            report.error(path, f"{detail or 'video'}: unknown label, not one of the {len(index.classes)} train classes")
        for where in index.skipped.get("bad_row", []):
            report.error(where, "malformed row: time_start/time_end must be numbers")
        frames, fps, sizes, usable = [], [], [], 0
        for path, _ in _items(index.videos, f"k400 {split}", progress):
            try:
                info = video_info(path)
                if info.num_frames < 1:
                    report.warn(path, "video has no frames (the reader skips it)")
                    continue
                read_frames(path, [info.num_frames - 1])  # decoding the last frame catches truncation
            except DataError as err:
                report.warn(path, f"unreadable or truncated video (the reader skips it): "
                                  f"{str(err).removeprefix(f'{path}: ')}")
                continue
            usable += 1
            frames.append(info.num_frames)
            fps.append(round(info.fps, 3))
            sizes.append((info.width, info.height))
        if usable == 0:
            report.error(index.annotation_file or report.root / split, f"no usable video in split {split}")
        listed = len(index.videos) + sum(len(index.skipped.get(r, [])) for r in ("missing", "unknown_label", "bad_row"))
        report.summary["splits"][split] = {
            "layout": index.layout,
            "annotations": str(index.annotation_file.relative_to(report.root)) if index.annotation_file else "-",
            "videos listed": listed, "usable": usable, "classes": len({label for _, label in index.videos}),
            "frames": _range(frames), "fps": _range(fps), "resolution": _size_range(sizes)}
        if split == "train" or "classes" not in report.summary:
            report.summary["classes"] = len(index.classes)


# Ego4D STA --------------------------------------------------------------------------------------

def check_ego4d_sta(report: CheckReport, progress: bool) -> None:
    splits = ["train", "val"]
    try:
        find_sta_annotations(report.root, "test")
        splits.append("test")
    except DataError:
        pass
    for split in splits:
        try:
            path = find_sta_annotations(report.root, split)
        except DataError:
            report.error(report.root / "annotations" / f"fho_sta_{split}.json",
                         "missing annotation file (also looked in v2/annotations/, v1/annotations/ and the root)")
            continue
        try:
            sta = load_sta(path, strict=False)
        except DataError as err:
            report.error(path, str(err).removeprefix(f"{path}: "))
            continue
        for where, message in sta.problems:
            report.error(path, f"{where}: {message}")
        if split != "test" and not sta.has_objects and sta.annotations:
            report.error(path, "no annotation has 'objects' (expected in train and val files)")
        last_frame = {}
        for a in sta.annotations:
            last_frame[a["video_uid"]] = max(last_frame.get(a["video_uid"], 0), a["frame"])
        frames, sizes = [], []
        for uid in _items(sorted(last_frame), f"ego4d {split}", progress):
            try:
                video = sta_video_path(report.root, uid)
            except DataError as err:
                report.error(report.root / "v2" / "full_scale" / f"{uid}.mp4", str(err).removeprefix(f"{report.root}: "))
                continue
            try:
                info = video_info(video)
                if last_frame[uid] >= info.num_frames:
                    report.error(video, f"annotated frame {last_frame[uid]} is past the video's {info.num_frames} frames")
                    continue
                read_frames(video, [last_frame[uid]])
            except DataError as err:
                report.error(video, f"unreadable or truncated video: {str(err).removeprefix(f'{video}: ')}")
                continue
            frames.append(info.num_frames)
            sizes.append((info.width, info.height))
            meta = sta.video_metadata.get(uid)
            if isinstance(meta, dict) and (meta.get("frame_width"), meta.get("frame_height")) not in ((None, None), (info.width, info.height)):
                report.warn(video, f"video is {info.width}x{info.height} but video_metadata says "
                                   f"{meta.get('frame_width')}x{meta.get('frame_height')} (boxes are in those pixels)")
        objects = [o for a in sta.annotations for o in (a["objects"] or [])]
        report.summary["splits"][split] = {
            "annotations": len(sta.annotations), "videos": len(last_frame), "objects": len(objects),
            "nouns": len(sta.nouns), "verbs": len(sta.verbs),
            "nouns used": len({o["noun_category_id"] for o in objects}),
            "frames": _range(frames), "resolution": _size_range(sizes)}


# DAVIS 2017 -------------------------------------------------------------------------------------

def check_davis(report: CheckReport, progress: bool) -> None:
    resolutions = resolution_folders(report.root)
    if not resolutions:
        report.error(report.root / "JPEGImages", "missing JPEGImages/<resolution>/ folder")
        return
    image_sets = report.root / "ImageSets" / "2017"
    splits = ["train", "val"] if (image_sets / "train.txt").is_file() else ["val"]
    for resolution in resolutions:
        for split in splits:
            dataset = DavisDataset(report.root, split, resolution=resolution, strict=False)
            for path, message in dataset.problems:
                report.error(path, message)
            name = split if len(resolutions) == 1 else f"{split} ({resolution})"
            report.summary["splits"][name] = _check_davis_split(report, dataset, progress)


def _check_davis_split(report: CheckReport, dataset: DavisDataset, progress: bool) -> dict:
    sizes, objects, frames, first_only = [], [], 0, 0
    for seq in _items(dataset.sequences, f"davis {dataset.split}", progress):
        names = dataset.frame_names(seq)
        frames += len(names)
        has_mask = [dataset.has_mask(seq, i) for i in range(len(names))]
        if not any(has_mask[1:]) and len(names) > 1:
            first_only += 1
        for i in range(len(names)):
            try:
                frame = dataset.load_frame(seq, i)
            except DataError as err:
                report.error(dataset.frame_path(seq, i), str(err).removeprefix(f"{dataset.frame_path(seq, i)}: "))
                continue
            sizes.append((frame.shape[1], frame.shape[0]))
            if not has_mask[i]:
                if any(has_mask[1:]):  # partly annotated: a hole in the ground truth
                    report.error(dataset.mask_path(seq, i), "missing annotation")
                continue
            try:
                mask = load_indexed_png(dataset.mask_path(seq, i))
            except DataError as err:
                report.error(dataset.mask_path(seq, i), str(err).removeprefix(f"{dataset.mask_path(seq, i)}: "))
                continue
            if mask.shape != frame.shape[:2]:
                report.error(dataset.mask_path(seq, i), f"mask is {mask.shape[1]}x{mask.shape[0]}, "
                                                         f"frame is {frame.shape[1]}x{frame.shape[0]}")
            if i == 0:
                ids = np.unique(mask)
                ids = ids[ids != 255]
                if not ids.size or ids.max() == 0:
                    report.error(dataset.mask_path(seq, 0), "first-frame annotation has no object")
                else:
                    objects.append(int(ids.max()))
    summary = {"resolution folder": dataset.resolution, "sequences": len(dataset.sequences), "frames": frames,
               "objects": sum(objects), "objects per sequence": _range(objects), "resolution": _size_range(sizes)}
    if first_only:
        summary["first-frame annotations only"] = first_only
    return summary


# What `totobench data check` prints ----------------------------------------------------------------

def print_report(report: CheckReport, console: Console) -> None:
    """The summary table(s), then every problem on one line: SEVERITY path: message."""
    console.print(f"[bold]{report.format}[/bold] dataset at {report.root}")
    splits = report.summary.get("splits", {})
    if splits:
        table = Table("", *splits)  # one column per split: a few splits, many facts
        for key in dict.fromkeys(k for facts in splits.values() for k in facts):
            table.add_row(key, *(str(facts.get(key, "")) for facts in splits.values()))
        console.print(table)
    for key, value in report.summary.items():
        if key != "splits":
            console.print(f"{key}: {value}")
    for problem in report.problems:
        # Plain print: one problem per line, never wrapped, so grep and scripts can read it.
        print(f"{problem.severity.upper()} {problem.path}: {problem.message}")
    verdict = "[green]usable[/green]" if report.usable else "[red]NOT usable[/red]"
    console.print(f"{verdict}: {len(report.errors)} errors, {len(report.warnings)} warnings")
