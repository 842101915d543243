"""Kinetics-400 reader: the real CSV and its quirks, every supported layout, skipped videos, and
clips taken through pytorchvideo's clip samplers."""

from __future__ import annotations

import os
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from test_data_readers import frame_indices, grey_video

from totobench.data.kinetics import (
    KineticsClips, KineticsIndex, collate_clips, parse_video_name, read_kinetics_csv,
)
from totobench.errors import DataError

HEADER = "label,youtube_id,time_start,time_end,split"
# (label, youtube_id, start, end, frames): ids start with '-' or '_' and contain '_'.
TRAIN = [("air drumming", "-a_b-c", 10, 20, 40), ("zumba", "_x_Y9", 0, 10, 40),
         ("air drumming", "plainid0001", 31, 41, 24), ("abseiling", "Ab_cd_ef_gh", 5, 15, 40)]
VAL = [("zumba", "v-al_1", 2, 12, 40), ("abseiling", "_val2", 0, 10, 40)]


def video_name(youtube_id: str, start: int, end: int) -> str:
    return f"{youtube_id}_{start:06d}_{end:06d}.mp4"


def csv_text(rows, split: str, is_cc: bool = False, label: bool = True) -> str:
    header = HEADER + (",is_cc" if is_cc else "")
    if not label:
        header = header.removeprefix("label,")
    lines = [header]
    for lab, yt, start, end, _ in rows:
        quoted = f'"{lab}"' if " " in lab else lab  # real files quote labels with spaces
        fields = ([quoted] if label else []) + [yt, str(start), str(end), split] + (["0"] if is_cc else [])
        lines.append(",".join(fields))
    return "\n".join(lines) + "\n"


def make_kinetics(root: Path, layout: str = "download", is_cc: bool = False) -> Path:
    """layout "download": annotations/{train,validate}.csv beside train/, val/ (val CSV uses the
    old `validate` split name); "class-folders": CSVs at the root, videos in <split>/<label>/."""
    for split, rows in (("train", TRAIN), ("val", VAL)):
        csv_dir = root / "annotations" if layout == "download" else root
        csv_dir.mkdir(parents=True, exist_ok=True)
        name = "validate" if split == "val" and layout == "download" else split
        (csv_dir / f"{name}.csv").write_text(csv_text(rows, name, is_cc=is_cc))
        for lab, yt, start, end, frames in rows:
            folder = root / split / lab if layout == "class-folders" else root / split
            grey_video(folder / video_name(yt, start, end), frames)
    return root


@pytest.mark.parametrize("is_cc", [False, True])
def test_csv_with_and_without_is_cc_and_quoted_labels(tmp_path, is_cc):
    path = tmp_path / "train.csv"
    path.write_text(csv_text(TRAIN, "train", is_cc=is_cc))
    rows, bad = read_kinetics_csv(path)
    assert bad == []
    assert rows[0] == {"label": "air drumming", "youtube_id": "-a_b-c", "time_start": 10, "time_end": 20}
    assert [r["youtube_id"] for r in rows] == ["-a_b-c", "_x_Y9", "plainid0001", "Ab_cd_ef_gh"]


def test_file_names_split_from_the_right():
    assert parse_video_name("-a_b-c_000010_000020") == ("-a_b-c", 10, 20)
    assert parse_video_name("__x_000000_000010") == ("__x", 0, 10)
    assert parse_video_name("no_times_here") is None


@pytest.mark.parametrize("layout", ["download", "class-folders"])
def test_index_finds_csv_and_videos_in_real_layouts(tmp_path, layout):
    root = make_kinetics(tmp_path / "k400", layout)
    train = KineticsIndex(root, "train")
    assert train.classes == ["abseiling", "air drumming", "zumba"]
    assert [(Path(p).name, y) for p, y in train.videos] == [
        ("-a_b-c_000010_000020.mp4", 1), ("_x_Y9_000000_000010.mp4", 2),
        ("plainid0001_000031_000041.mp4", 1), ("Ab_cd_ef_gh_000005_000015.mp4", 0)]
    assert train.skipped == {} and train.info[train.videos[0][0]].num_frames == 40
    val = KineticsIndex(root, "val")
    assert val.classes == train.classes and [y for _, y in val.videos] == [2, 0]


def test_test_csv_without_label_column(tmp_path):
    root = make_kinetics(tmp_path / "k400")
    (root / "annotations" / "test.csv").write_text(csv_text(VAL, "test", label=False))
    shutil.copytree(root / "val", root / "test")
    test = KineticsIndex(root, "test")
    assert [y for _, y in test.videos] == [-1, -1] and len(test.classes) == 3


def test_pytorchvideo_list_file_and_class_tree(tmp_path):
    root = make_kinetics(tmp_path / "k400", "class-folders")
    for csv_file in root.glob("*.csv"):
        csv_file.unlink()
    tree = KineticsIndex(root, "train")  # no CSV: <split>/<class>/<video>
    assert tree.layout == "tree" and tree.classes == ["abseiling", "air drumming", "zumba"]
    assert sorted(y for _, y in tree.videos) == [0, 1, 1, 2]
    listed = [f"train/{lab}/{video_name(yt, s, e)} {i}" for i, (lab, yt, s, e, _) in enumerate(TRAIN[:3])]
    (root / "train.csv").write_text("\n".join(listed) + "\n")  # pytorchvideo's `path label` lines
    index = KineticsIndex(root, "train")
    assert index.layout == "list" and index.classes == ["0", "1", "2"]
    assert [y for _, y in index.videos] == [0, 1, 2]
    assert KineticsIndex(root / "train.csv", "train").videos == index.videos  # the file as the root


def test_annotation_file_given_as_the_root(tmp_path):
    root = make_kinetics(tmp_path / "k400")
    index = KineticsIndex(root / "annotations" / "validate.csv", "val")
    assert [Path(p).name for p, _ in index.videos] == ["v-al_1_000002_000012.mp4", "_val2_000000_000010.mp4"]
    assert index.classes == ["abseiling", "air drumming", "zumba"]  # from annotations/train.csv


def test_bad_videos_are_skipped_and_counted_never_fatal(tmp_path):
    root = make_kinetics(tmp_path / "k400")
    deleted = root / "train" / video_name("_x_Y9", 0, 10)
    deleted.unlink()
    truncated = root / "train" / video_name("Ab_cd_ef_gh", 5, 15)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with open(root / "annotations" / "validate.csv", "a") as f:
        f.write("unseen class,zz_9,0,10,validate\n")
    train = KineticsIndex(root, "train")
    assert train.skipped == {"missing": [str(deleted)], "unreadable": [str(truncated)]}
    assert len(train.videos) == 2 and train.num_skipped == 2
    val = KineticsIndex(root, "val")
    assert len(val.videos) == 2 and len(val.skipped["unknown_label"]) == 1
    assert "'unseen class'" in val.skipped["unknown_label"][0]
    clips = KineticsClips(train, num_frames=32, stride=1)  # the 24-frame video is too short for 32
    assert clips.skipped["too_short"] == [str(root / "train" / video_name("plainid0001", 31, 41))]
    assert len(clips) == 1


def test_missing_split_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"no val.csv .* for split 'val'"):
        KineticsIndex(tmp_path, "val")


def test_eval_clips_follow_constant_clips_per_video_sampler(tmp_path):
    from pytorchvideo.data.clip_sampling import ConstantClipsPerVideoSampler

    root = make_kinetics(tmp_path / "k400")
    index = KineticsIndex(root, "train")
    clips = KineticsClips(index, num_frames=4, stride=3, clips_per_video=3)
    assert len(clips) == 3 * 4
    # 40 frames at 25 fps; a clip spans 12 frames: starts at 0, 28/3 and 56/3 frames.
    sampler = ConstantClipsPerVideoSampler(Fraction(12, 25), 3)
    starts = [sampler(0.0, Fraction(40, 25), {}).clip_start_sec * 25 for _ in range(3)]
    assert starts == [0, Fraction(28, 3), Fraction(56, 3)]
    got = [clips[i] for i in range(3)]
    assert [s["clip_index"] for s in got] == [0, 1, 2] and {s["video_index"] for s in got} == {0}
    assert [frame_indices(s["frames"]) for s in got] == [[0, 3, 6, 9], [10, 13, 16, 19], [19, 22, 25, 28]]
    assert got[0]["frames"].dtype == torch.uint8 and got[0]["frames"].shape == (4, 16, 24, 3)
    assert got[0]["label"] == 1


def test_decoders_agree_and_training_clips_repeat_per_seed(tmp_path):
    root = make_kinetics(tmp_path / "k400")
    index = KineticsIndex(root, "train")
    ours = KineticsClips(index, num_frames=5, stride=2, seed=3)
    pytorchvideo = KineticsClips(index, num_frames=5, stride=2, seed=3, decoder="pytorchvideo")
    for i in range(len(ours)):
        indices = frame_indices(ours[i]["frames"])
        assert indices == frame_indices(pytorchvideo[i]["frames"])
        assert all(b - a == 2 for a, b in zip(indices, indices[1:]))
    first = [frame_indices(ours[i]["frames"])[0] for i in range(len(ours))]
    assert first == [frame_indices(ours[i]["frames"])[0] for i in range(len(ours))]
    ours.set_epoch(1)
    assert first != [frame_indices(ours[i]["frames"])[0] for i in range(len(ours))]
    # A video shorter than the clip span repeats its last frame.
    short = KineticsClips(index, num_frames=16, stride=2)
    assert frame_indices(short[2]["frames"]) == list(range(0, 24, 2)) + [23] * 4


def test_video_broken_after_indexing_is_dropped_from_the_batch(tmp_path):
    root = make_kinetics(tmp_path / "k400")
    clips = KineticsClips(KineticsIndex(root, "val"), num_frames=4, stride=2, clips_per_video=2)
    os.remove(clips.videos[0][0])
    loader = torch.utils.data.DataLoader(clips, batch_size=4, collate_fn=collate_clips, num_workers=1)
    batch = next(iter(loader))
    assert batch["frames"].shape == (2, 4, 16, 24, 3)
    assert batch["label"].tolist() == [0, 0] and batch["clip_index"].tolist() == [0, 1]
    assert batch["skipped"] == [(clips.videos[0][0], "missing")] * 2
    clips.note_skipped(batch["skipped"])
    assert clips.skipped == {"missing": [clips.videos[0][0]]} and clips.num_skipped == 1


def test_index_feeds_pytorchvideo_labeled_video_dataset(tmp_path):
    from pytorchvideo.data import LabeledVideoDataset
    from pytorchvideo.data.clip_sampling import UniformClipSampler

    index = KineticsIndex(make_kinetics(tmp_path / "k400"), "val")
    dataset = LabeledVideoDataset(index.pytorchvideo_paths(), UniformClipSampler(Fraction(1)),
                                  torch.utils.data.SequentialSampler, decode_audio=False)
    sample = next(iter(dataset))
    assert sample["label"] == 2 and sample["video"].shape == (3, 25, 16, 24)
