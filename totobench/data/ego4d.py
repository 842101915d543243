"""Ego4D short-term object-interaction anticipation (STA) annotations and videos.

Annotation files `fho_sta_{train,val,test_unannotated}.json` (v1 and v2 schema):
`info.video_metadata[video_uid]` (fps, frame_width, frame_height), `info.noun_categories`,
`info.verb_categories` ([{"id", "name"}]) and `annotations`: uid, video_uid (or video_id), frame,
clip_uid, clip_frame and, except in test files, `objects` [{box [x1,y1,x2,y2] in pixels,
noun_category_id, verb_category_id, time_to_contact in seconds}].
Videos: `v2/full_scale/<video_uid>.mp4` (also `v1/full_scale/`, `full_scale/`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from totobench.data.fingerprint import dataset_fingerprint
from totobench.data.video import read_frames
from totobench.errors import DataError

VIDEO_FOLDERS = ("v2/full_scale", "v1/full_scale", "full_scale", "v2/video_540ss", "videos", ".")
ANNOTATION_FOLDERS = ("annotations", "v2/annotations", "v1/annotations", ".")


@dataclass
class StaAnnotations:
    """One STA annotation file, validated and normalised.

    `annotations`: list of dicts with uid (str), video_uid (str), frame (int), clip_uid,
    clip_frame, and objects: list of {box [4 floats], noun_category_id (int), verb_category_id
    (int), time_to_contact (float)}, or None in files without objects (test).
    `nouns` / `verbs`: category names indexed by id, as listed in the file.
    `problems`: [(uid or field, message)] found when loaded with strict=False.
    """
    path: Path
    video_metadata: dict[str, dict]
    nouns: list[str]
    verbs: list[str]
    annotations: list[dict]
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def has_objects(self) -> bool:
        return any(a["objects"] is not None for a in self.annotations)

    @property
    def video_uids(self) -> list[str]:
        return sorted({a["video_uid"] for a in self.annotations})


def find_sta_annotations(root: str | os.PathLike, split: str) -> Path:
    """`fho_sta_<split>.json` (test: also `fho_sta_test_unannotated.json`) under `root`; DataError."""
    root = Path(root)
    names = [f"fho_sta_{split}.json"] + (["fho_sta_test_unannotated.json"] if split == "test" else [])
    for folder in ANNOTATION_FOLDERS:
        for name in names:
            if (root / folder / name).is_file():
                return root / folder / name
    raise DataError(f"{root}: no {names[0]} in {', '.join(f + '/' for f in ANNOTATION_FOLDERS[:-1])} or the root")


def sta_video_path(root: str | os.PathLike, video_uid: str) -> Path:
    """The full-scale video of `video_uid` under `root` (v2/full_scale/<uid>.mp4, v1 layouts, ...).

    Raises DataError naming the folders searched when none holds the file.
    """
    root = Path(root)
    for folder in VIDEO_FOLDERS:
        path = root / folder / f"{video_uid}.mp4"
        if path.is_file():
            return path
    raise DataError(f"{root}: video {video_uid}.mp4 not found in "
                    f"{', '.join(f + '/' for f in VIDEO_FOLDERS[:-1])} or the root")


def sta_clip(video_path: str | os.PathLike, frame: int, num_frames: int, stride: int) -> np.ndarray:
    """uint8 [num_frames, H, W, 3]: frames frame-(num_frames-1)*stride, ..., frame (every
    `stride`-th frame, ending at the annotated frame); indices before 0 are clamped to frame 0.

    Raises DataError when the video is missing, unreadable or shorter than `frame`.
    """
    indices = [max(0, frame - stride * (num_frames - 1 - k)) for k in range(num_frames)]
    return read_frames(video_path, indices)


def load_sta(path: str | os.PathLike, strict: bool = True) -> StaAnnotations:
    """Read and validate an STA annotation file.

    Raises DataError with one line (file, annotation uid, field, what was expected) on the first
    problem, or, with strict=False, keeps the valid annotations and lists every problem in
    `.problems`.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable JSON file ({err})") from None
    problems: list[tuple[str, str]] = []
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: expected an object with an 'annotations' list")
    info = data.get("info", {})
    if not isinstance(info, dict):
        raise DataError(f"{path}: 'info' must be an object")
    nouns = _categories(info.get("noun_categories"), "info.noun_categories", problems)
    verbs = _categories(info.get("verb_categories"), "info.verb_categories", problems)
    metadata = info.get("video_metadata", {})
    if not isinstance(metadata, dict):
        problems.append(("info.video_metadata", f"expected an object keyed by video uid, got {type(metadata).__name__}"))
        metadata = {}

    annotations = []
    for i, raw in enumerate(data["annotations"]):
        annotation = _normalise_annotation(raw, i, nouns, verbs, problems)
        if annotation is not None:
            annotations.append(annotation)
    if strict and problems:
        where, message = problems[0]
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DataError(f"{path}: {where}: {message}{more}")
    return StaAnnotations(path, metadata, nouns, verbs, annotations, problems)


def _categories(raw, where: str, problems: list) -> list[str]:
    """Names indexed by id from [{"id", "name"}], a list of names, or {id: name}."""
    if raw is None:
        problems.append((where, "missing"))
        return []
    if isinstance(raw, dict):
        raw = [{"id": k, "name": v} for k, v in raw.items()]
    if not isinstance(raw, list):
        problems.append((where, f"expected a list of {{id, name}}, got {type(raw).__name__}"))
        return []
    names = {}
    for i, entry in enumerate(raw):
        if isinstance(entry, str):
            names[i] = entry
        elif isinstance(entry, dict) and _as_int(entry.get("id")) is not None and "name" in entry:
            names[_as_int(entry["id"])] = str(entry["name"])
        else:
            problems.append((f"{where}[{i}]", f"expected {{id, name}}, got {entry!r}"[:200]))
    if names and sorted(names) != list(range(len(names))):
        problems.append((where, f"ids must be 0..{len(names) - 1}, got {min(names)}..{max(names)}"))
    return [names[k] for k in sorted(names)]


def _as_int(value) -> int | None:
    """An int, or an integral float (some writers emit 12.0); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _normalise_annotation(raw, i: int, nouns: list, verbs: list, problems: list) -> dict | None:
    where = f"annotations[{i}]"
    if not isinstance(raw, dict):
        problems.append((where, f"expected an object, got {type(raw).__name__}"))
        return None
    uid = raw.get("uid")
    if isinstance(uid, str) and uid:
        where = uid
    else:
        problems.append((where, "uid: missing or not a string"))
        return None
    video_uid = raw.get("video_uid", raw.get("video_id"))
    if not isinstance(video_uid, str) or not video_uid:
        problems.append((where, "video_uid (or video_id): missing or not a string"))
        return None
    frame = _as_int(raw.get("frame"))
    if frame is None or frame < 0:
        problems.append((where, f"frame: expected a non-negative int, got {raw.get('frame')!r}"))
        return None
    annotation = {"uid": uid, "video_uid": video_uid, "frame": frame,
                  "clip_uid": raw.get("clip_uid", raw.get("clip_id")), "clip_frame": raw.get("clip_frame"),
                  "objects": None}
    if "objects" not in raw:
        return annotation
    if not isinstance(raw["objects"], list):
        problems.append((where, f"objects: expected a list, got {type(raw['objects']).__name__}"))
        return None
    objects = []
    for j, obj in enumerate(raw["objects"]):
        obj = _normalise_object(obj, f"{where}: objects[{j}]", nouns, verbs, problems)
        if obj is None:
            return None
        objects.append(obj)
    annotation["objects"] = objects
    return annotation


def _normalise_object(obj, where: str, nouns: list, verbs: list, problems: list) -> dict | None:
    if not isinstance(obj, dict):
        problems.append((where, f"expected an object, got {type(obj).__name__}"))
        return None
    box = obj.get("box")
    if box is None:
        problems.append((where, "box: missing (expected [x1, y1, x2, y2] in pixels)"))
        return None
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
        problems.append((where, f"box: expected [x1, y1, x2, y2] as 4 numbers, got {box!r}"[:200]))
        return None
    if box[2] < box[0] or box[3] < box[1]:
        problems.append((where, f"box: expected x2 >= x1 and y2 >= y1, got {box}"))
        return None
    normalised = {"box": [float(v) for v in box]}
    for key, names in (("noun_category_id", nouns), ("verb_category_id", verbs)):
        value = _as_int(obj.get(key))
        if key not in obj:
            problems.append((where, f"{key}: missing"))
            return None
        if value is None or value < 0 or (names and value >= len(names)):
            problems.append((where, f"{key}: expected an int in 0..{len(names) - 1}, got {obj[key]!r}"))
            return None
        normalised[key] = value
    ttc = obj.get("time_to_contact")
    if not _is_number(ttc) or ttc < 0:
        problems.append((where, f"time_to_contact: expected a non-negative number of seconds, got {ttc!r}"))
        return None
    normalised["time_to_contact"] = float(ttc)
    return normalised


def sta_fingerprint(root: str | os.PathLike, annotations: StaAnnotations) -> str:
    """Hash of relative paths and sizes of the annotation file and the videos it names."""
    paths = [annotations.path]
    for uid in annotations.video_uids:
        try:
            paths.append(sta_video_path(root, uid))
        except DataError:
            paths.append(Path(root) / "v2" / "full_scale" / f"{uid}.mp4")
    return dataset_fingerprint(root, paths)
