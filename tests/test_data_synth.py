"""The generated data world: deterministic bytes, and files that the ecosystem's own tools open."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from totobench.cli import main
from totobench.data import world_scenes as scenes
from totobench.data.synth import KINETICS_FPS, KINETICS_FRAMES, SIZES, synth, voc_palette
from totobench.data.world_content import digit_pool, stream_rng


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_tree(a: Path, b: Path) -> None:
    """Same files, same bytes."""
    ca, cb = checksums(a), checksums(b)
    assert ca.keys() == cb.keys()
    differ = [n for n in ca if ca[n] != cb[n]]
    assert not differ, f"{len(differ)} files differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    synth(out, seed=0, size="tiny")
    return out


def test_same_seed_gives_identical_tree(world, tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path / "again"), "--seed", "0", "--size", "tiny"]) == 0
    first = checksums(world)
    assert len(first) > 200
    assert_same_tree(tmp_path / "again", world)


def test_bytes_do_not_depend_on_the_number_of_worker_processes(world, tmp_path):
    synth(tmp_path / "two_workers", seed=0, size="tiny", roots=["kinetics400", "davis"], workers=2)
    for root in ("kinetics400", "davis"):
        assert_same_tree(tmp_path / "two_workers" / root, world / root)


def test_another_seed_gives_other_content(world, tmp_path):
    synth(tmp_path / "s1", seed=1, size="tiny", roots=["imagenet"])
    a, b = checksums(world / "imagenet"), checksums(tmp_path / "s1" / "imagenet")
    assert a.keys() == b.keys()  # same layout ...
    same = [k for k in a if a[k] == b[k]]
    assert same == ["LOC_synset_mapping.txt"]  # ... every image different


def test_imagenet_opens_with_torchvision_image_folder(world):
    from torchvision.datasets import ImageFolder

    train = ImageFolder(str(world / "imagenet" / "train"))
    val = ImageFolder(str(world / "imagenet" / "val"))
    assert len(train.classes) == 16 and train.classes == sorted(train.classes)
    assert train.classes == val.classes == list(scenes.OBJECT_WNIDS)
    assert len(train) == 16 * SIZES["tiny"].imagenet_train and len(val) == 16 * SIZES["tiny"].imagenet_val
    image, label = train[5]
    assert image.mode == "RGB" and min(image.size) == 80 and label == train.targets[5]
    mapping = (world / "imagenet" / "LOC_synset_mapping.txt").read_text().splitlines()
    assert mapping[0] == f"{scenes.OBJECT_WNIDS[0]} zero, digit zero"
    assert all(re.fullmatch(r"n\d{8} .+", line) for line in mapping) and len(mapping) == 16


def test_kinetics_csv_and_videos_match_the_real_format(world):
    root = world / "kinetics400"
    raw = (root / "train.csv").read_text().splitlines()
    assert raw[0] == "label,youtube_id,time_start,time_end,split"
    assert any(line.startswith('"moving left",') for line in raw)  # labels with spaces are quoted
    rows = [r for split in ("train", "val") for r in csv.DictReader(open(root / f"{split}.csv"))]
    assert len(rows) == 10 * (SIZES["tiny"].kinetics_train + SIZES["tiny"].kinetics_val)
    assert {r["label"] for r in rows} == set(scenes.ACTIONS) and {r["split"] for r in rows} == {"train", "val"}
    ids = [r["youtube_id"] for r in rows]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{11}", i) for i in ids) and len(set(ids)) == len(ids)
    assert any(i.startswith("-") for i in ids) and any("_" in i for i in ids)
    for r in rows[:4]:
        start, end = int(r["time_start"]), int(r["time_end"])
        assert end - start == KINETICS_FRAMES / KINETICS_FPS
        path = root / r["split"] / f"{r['youtube_id']}_{start:06d}_{end:06d}.mp4"
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264" and stream.average_rate == KINETICS_FPS
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert len(frames) == KINETICS_FRAMES and frames[0].shape == (80, 96, 3)
        assert np.abs(frames[-1].astype(int) - frames[0]).mean() > 0.5  # something moves


def test_davis_masks_are_voc_palette_images_with_all_objects_in_frame_0(world):
    root = world / "davis"
    train = (root / "ImageSets" / "2017" / "train.txt").read_text().split()
    val = (root / "ImageSets" / "2017" / "val.txt").read_text().split()
    assert len(train) == len(val) == 2 and not set(train) & set(val)
    for seq in train + val:
        jpgs = sorted((root / "JPEGImages" / "480p" / seq).iterdir())
        pngs = sorted((root / "Annotations" / "480p" / seq).iterdir())
        assert [p.name for p in jpgs] == [f"{t:05d}.jpg" for t in range(SIZES["tiny"].davis_frames)]
        assert [p.stem for p in pngs] == [p.stem for p in jpgs]
        first = Image.open(pngs[0])
        assert first.mode == "P" and first.size == (128, 96) == Image.open(jpgs[0]).size
        assert first.getpalette()[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
        ids = np.unique(np.asarray(first))
        assert ids[0] == 0 and list(ids[1:]) == list(range(1, len(ids))) and len(ids) >= 3  # 0, 1..K, K >= 2
        later = np.unique(np.concatenate([np.asarray(Image.open(p)).ravel() for p in pngs]))
        assert set(later) <= set(ids)


def test_voc_palette_known_entries():
    p = voc_palette()
    assert len(p) == 768
    assert p[3 * 4:3 * 4 + 3] == [0, 0, 128] and p[3 * 15:3 * 15 + 3] == [192, 128, 128]


def test_ego4d_annotations_load_with_json_and_point_at_real_frames(world):
    root = world / "ego4d"
    for split in ("train", "val"):
        doc = json.loads((root / "annotations" / f"fho_sta_{split}.json").read_text())
        meta = doc["info"]["video_metadata"]
        nouns = {c["id"] for c in doc["info"]["noun_categories"]}
        verbs = {c["id"] for c in doc["info"]["verb_categories"]}
        assert len(meta) == 2 and len(doc["annotations"]) == 2 * 2 * SIZES["tiny"].ego_interactions
        for a in doc["annotations"]:
            m = meta[a["video_uid"]]
            assert a["uid"] == f"{a['video_uid']}_{a['frame']:07d}"
            assert 0 <= a["clip_frame"] <= a["frame"] < m["num_frames"]
            (obj,) = a["objects"]
            x1, y1, x2, y2 = obj["box"]
            assert 0 <= x1 < x2 <= m["frame_width"] and 0 <= y1 < y2 <= m["frame_height"]
            assert obj["noun_category_id"] in nouns and obj["verb_category_id"] in verbs
            assert 0.3 - 1e-9 <= obj["time_to_contact"] <= 1.5 + 1e-9
        for uid, m in meta.items():
            with av.open(str(root / "v2" / "full_scale" / f"{uid}.mp4")) as container:
                stream = container.streams.video[0]
                assert (stream.frames, stream.average_rate) == (m["num_frames"], m["fps"])
                assert (stream.codec_context.width, stream.codec_context.height) == (128, 96)


def test_hand_touches_the_annotated_box_at_time_to_contact():
    video = scenes.table_video(stream_rng(3, "test"), 96, 128, 2, "eval")
    empty = video.frames[0].astype(int)  # no hand in the first frames
    for act in video.interactions:
        x1, y1, x2, y2 = (int(v) for v in video.boxes[act.object_index])
        inside = lambda t: np.abs(video.frames[t, y1:y2, x1:x2].astype(int) - empty[y1:y2, x1:x2]).sum(-1) > 60
        assert inside(act.contact_frame).sum() >= 5  # the hand reaches into the box at contact
        assert inside(act.contact_frame).sum() > inside(act.contact_frame - 3).sum()  # not before
        assert not inside(act.start_frame - 1).any()  # and is not in view before the approach


def test_davis_objects_leave_and_come_back():
    comebacks = 0
    for i in range(6):
        _, masks = scenes.object_sequence(stream_rng(0, "test", i), 96, 128, 24, "train", quick_return=True)
        present = np.array([[(m == k).sum() > 0 for k in range(1, masks[0].max() + 1)] for m in masks])
        assert present[0].all()
        for p in present.T:  # per object: absent in some frame, present again in a later one
            gone = np.flatnonzero(~p)
            comebacks += len(gone) > 0 and p[gone[0]:].any()
    assert comebacks >= 3


def test_evaluation_streams_and_handwriting_are_disjoint_from_pretraining():
    train, evaluation = digit_pool("train"), digit_pool("eval")
    for d in range(10):
        assert len(train[d]) > 100 and len(evaluation[d]) > 40 and not set(train[d]) & set(evaluation[d])
    a = stream_rng(0, "pretrain/images", 7).random(4)
    assert not np.allclose(a, stream_rng(0, "imagenet/val", 7).random(4))
    assert np.array_equal(a, stream_rng(0, "pretrain/images", 7).random(4))


def test_unknown_size_and_negative_seed_are_config_errors(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--seed", "-1", "--size", "tiny"]) == 2
    assert "--seed" in capsys.readouterr().err
    from totobench.errors import ConfigError
    with pytest.raises(ConfigError, match="size"):
        synth(tmp_path, size="huge")
