"""Readers of the real dataset formats, on tiny fixtures written here (independent of the
generator). The `make_*` builders are reused by tests/test_data_check.py."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from totobench.data.davis import DavisDataset, voc_palette
from totobench.data.ego4d import find_sta_annotations, load_sta, sta_clip, sta_video_path
from totobench.data.fingerprint import dataset_fingerprint
from totobench.data.imagenet import ImageNetFolder
from totobench.data.video import write_mp4
from totobench.errors import DataError

# Fixture videos are uniform grey frames whose level encodes the frame index: frame t = 6 * t
# (so at most 42 frames).
LEVEL = 6


def grey_video(path: Path, num_frames: int, fps: int = 25, size: tuple[int, int] = (16, 24)) -> None:
    frames = np.zeros((num_frames, *size, 3), np.uint8)
    frames[:] = (np.arange(num_frames) * LEVEL).astype(np.uint8)[:, None, None, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, frames, fps)


def frame_indices(frames) -> list[int]:
    """Frame index of each decoded grey frame [T, H, W, 3] (H.264 moves a level by a few units)."""
    return [int(round(float(f.float().mean()) / LEVEL)) for f in torch.as_tensor(np.asarray(frames))]


# ImageNet ---------------------------------------------------------------------------------------

IMAGENET_CLASSES = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
                    "n01484850": "great white shark"}
COLOURS = {"n01440764": (200, 30, 30), "n01443537": (30, 200, 30), "n01484850": (30, 30, 200)}


def make_imagenet(root: Path, flat_val: bool = True) -> Path:
    """train/<wnid>/ 2 JPEGs per class; val/ flat + LOC_val_solution.csv (or class folders)."""
    for wnid, colour in COLOURS.items():
        for i in range(2):
            path = root / "train" / wnid / f"{wnid}_{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20 + i * 4, 16), colour).save(path, quality=95)
    rows = []
    for i, wnid in enumerate(["n01484850", "n01440764", "n01443537", "n01440764"]):
        image_id = f"ILSVRC2012_val_{i + 1:08d}"
        folder = root / "val" if flat_val else root / "val" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (18, 18), COLOURS[wnid]).save(folder / f"{image_id}.JPEG", quality=95)
        rows.append([image_id, f"{wnid} 1 2 10 12 {wnid} 3 3 9 9"])
    if flat_val:
        with open(root / "LOC_val_solution.csv", "w", newline="") as f:
            csv.writer(f).writerows([["ImageId", "PredictionString"], *rows])
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{k} {v}\n" for k, v in IMAGENET_CLASSES.items()))
    return root


def test_imagenet_class_folders_match_torchvision_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder

    root = make_imagenet(tmp_path / "in")
    train = ImageNetFolder(root, "train")
    reference = ImageFolder(root / "train")
    assert train.classes == reference.classes == sorted(IMAGENET_CLASSES)
    assert [(Path(p), y) for p, y in train.samples] == [(Path(p), y) for p, y in reference.samples]
    assert train.class_names["n01440764"] == "tench, Tinca tinca"
    image, label = train[2]
    assert image.mode == "RGB" and image.size == (20, 16) and label == 1
    assert np.abs(np.asarray(image)[8, 8].astype(int) - COLOURS["n01443537"]).max() <= 4


def test_imagenet_flat_val_takes_first_wnid_of_prediction_string(tmp_path):
    root = make_imagenet(tmp_path / "in")
    val = ImageNetFolder(root, "val", transform=lambda im: np.asarray(im).shape)
    assert [(Path(p).name, y) for p, y in val.samples] == [
        ("ILSVRC2012_val_00000001.JPEG", 2), ("ILSVRC2012_val_00000002.JPEG", 0),
        ("ILSVRC2012_val_00000003.JPEG", 1), ("ILSVRC2012_val_00000004.JPEG", 0)]
    assert val[0] == ((18, 18, 3), 2)


def test_imagenet_val_class_folders_and_kaggle_layout(tmp_path):
    root = make_imagenet(tmp_path / "in", flat_val=False)
    assert [y for _, y in ImageNetFolder(root, "val").samples] == [0, 0, 1, 2]
    kaggle = tmp_path / "kaggle"
    shutil.copytree(root, kaggle / "ILSVRC" / "Data" / "CLS-LOC")
    shutil.move(kaggle / "ILSVRC" / "Data" / "CLS-LOC" / "LOC_synset_mapping.txt", kaggle)
    assert len(ImageNetFolder(kaggle, "train")) == 6


def test_imagenet_errors_name_the_file(tmp_path):
    root = make_imagenet(tmp_path / "in")
    with open(root / "LOC_val_solution.csv", "a") as f:
        f.write("ILSVRC2012_val_00000009,n99999999 1 2 3 4\n")
    Image.new("RGB", (8, 8)).save(root / "val" / "ILSVRC2012_val_00000009.JPEG")
    with pytest.raises(DataError, match=r"ILSVRC2012_val_00000009.JPEG: label n99999999 is not one of the 3"):
        ImageNetFolder(root, "val")
    (root / "LOC_val_solution.csv").unlink()
    with pytest.raises(DataError, match="LOC_val_solution.csv: flat val/ folder needs"):
        ImageNetFolder(root, "val")
    with pytest.raises(DataError, match="missing test/ folder"):
        ImageNetFolder(root, "test")


def test_fingerprint_depends_on_relative_paths_and_sizes_only(tmp_path):
    root = make_imagenet(tmp_path / "a")
    first = ImageNetFolder(root, "train").fingerprint()
    copy = tmp_path / "b"
    shutil.copytree(root, copy)  # other absolute paths and mtimes
    assert ImageNetFolder(copy, "train").fingerprint() == first and len(first) == 16
    with open(copy / "train" / "n01440764" / "n01440764_0.JPEG", "ab") as f:
        f.write(b"\0")
    assert ImageNetFolder(copy, "train").fingerprint() != first
    assert dataset_fingerprint(root, ["x", "y"]) == dataset_fingerprint(root, ["y", "x"])


# DAVIS 2017 -------------------------------------------------------------------------------------

def davis_mask(ids: np.ndarray) -> Image.Image:
    mask = Image.fromarray(ids.astype(np.uint8), mode="P")
    mask.putpalette(voc_palette())
    return mask


def make_davis(root: Path, resolution: str = "480p", frames: int = 3) -> Path:
    """Sequences bear (2 objects + a 255 border) and car (1 object), val; dog, train."""
    for split, sequences in (("val", ["bear", "car"]), ("train", ["dog"])):
        (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "2017" / f"{split}.txt").write_text("".join(s + "\n" for s in sequences))
        for n, seq in enumerate(sequences):
            (root / "JPEGImages" / resolution / seq).mkdir(parents=True, exist_ok=True)
            (root / "Annotations" / resolution / seq).mkdir(parents=True, exist_ok=True)
            for t in range(frames):
                Image.new("RGB", (24, 16), (10 * t, 50 * n, 100)).save(
                    root / "JPEGImages" / resolution / seq / f"{t:05d}.jpg", quality=95)
                ids = np.zeros((16, 24), np.uint8)
                ids[2:6, 2 + t:8 + t] = 1
                if seq == "bear":
                    ids[8:14, 10:20] = 2
                    ids[0, :] = 255
                davis_mask(ids).save(root / "Annotations" / resolution / seq / f"{t:05d}.png")
    return root


def test_davis_reads_sequences_frames_and_palette_masks(tmp_path):
    root = make_davis(tmp_path / "davis")
    davis = DavisDataset(root, "val")
    assert davis.resolution == "480p" and davis.sequences == ["bear", "car"]
    assert davis.frame_names("bear") == ["00000", "00001", "00002"]
    frame = davis.load_frame("car", 2)
    assert frame.dtype == np.uint8 and frame.shape == (16, 24, 3)
    assert np.abs(frame[8, 8].astype(int) - (20, 50, 100)).max() <= 4
    mask = davis.load_mask("bear", 1)
    assert mask.dtype == np.uint8 and mask.shape == (16, 24)
    assert sorted(np.unique(mask).tolist()) == [0, 1, 2, 255] and mask[3, 3] == 1 and mask[3, 2] == 0
    assert davis.num_objects("bear") == 2 and davis.num_objects("car") == 1
    assert DavisDataset(root, "train").sequences == ["dog"]
    assert davis.fingerprint() != DavisDataset(root, "train").fingerprint()


def test_davis_any_resolution_folder_name(tmp_path):
    root = make_davis(tmp_path / "davis", resolution="Full-Resolution")
    assert DavisDataset(root).resolution == "Full-Resolution"
    make_davis(root, resolution="480p")
    with pytest.raises(DataError, match=r"several resolutions \(480p, Full-Resolution\)"):
        DavisDataset(root)
    assert DavisDataset(root, resolution="480p").image_dir == root / "JPEGImages" / "480p"


def test_davis_rejects_rgb_mask_and_missing_sequence(tmp_path):
    root = make_davis(tmp_path / "davis")
    Image.new("RGB", (24, 16)).save(root / "Annotations" / "480p" / "car" / "00001.png")
    with pytest.raises(DataError, match=r"car/00001.png: mask is mode RGB, expected an indexed PNG"):
        DavisDataset(root).load_mask("car", 1)
    shutil.rmtree(root / "JPEGImages" / "480p" / "bear")
    with pytest.raises(DataError, match="bear: sequence bear listed in val.txt has no frame folder"):
        DavisDataset(root)
    assert DavisDataset(root, strict=False).sequences == ["car"]


# Ego4D STA --------------------------------------------------------------------------------------

def sta_annotation(video: str, frame: int, noun: int = 1, verb: int = 0, key: str = "video_uid",
                   objects: bool = True) -> dict:
    a = {"uid": f"{video}_{frame:07d}", key: video, "frame": frame, "clip_uid": f"clip-{video}",
         "clip_frame": frame}
    if objects:
        a["objects"] = [{"box": [2.0, 3.0, 10.5, 12.0], "noun_category_id": noun, "verb_category_id": verb,
                         "time_to_contact": 0.5}]
    return a


def make_ego4d(root: Path, layout: str = "v2/full_scale") -> Path:
    """Videos vid-a (40 frames) and vid-b (30); train annotations use video_uid, val video_id."""
    grey_video(root / layout / "vid-a.mp4", 40, fps=30)
    grey_video(root / layout / "vid-b.mp4", 30, fps=30)
    info = {"video_metadata": {v: {"fps": 30.0, "frame_width": 24, "frame_height": 16} for v in ("vid-a", "vid-b")},
            "noun_categories": [{"id": i, "name": n} for i, n in enumerate(["apple", "ball", "cup"])],
            "verb_categories": [{"id": i, "name": n} for i, n in enumerate(["take", "put"])]}
    files = {"train": [sta_annotation("vid-a", 20), sta_annotation("vid-b", 5, noun=2, verb=1)],
             "val": [sta_annotation("vid-a", 30, key="video_id"), sta_annotation("vid-b", 2, key="video_id")],
             "test_unannotated": [sta_annotation("vid-b", 10, objects=False)]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, annotations in files.items():
        with open(root / "annotations" / f"fho_sta_{split}.json", "w") as f:
            json.dump({"version": "1.0", "split": split, "info": info, "annotations": annotations}, f)
    return root


def test_sta_annotations_are_normalised(tmp_path):
    root = make_ego4d(tmp_path / "ego4d")
    val = load_sta(find_sta_annotations(root, "val"))
    assert val.nouns == ["apple", "ball", "cup"] and val.verbs == ["take", "put"]
    assert [a["video_uid"] for a in val.annotations] == ["vid-a", "vid-b"]
    assert val.annotations[0]["objects"] == [{"box": [2.0, 3.0, 10.5, 12.0], "noun_category_id": 1,
                                              "verb_category_id": 0, "time_to_contact": 0.5}]
    assert val.video_metadata["vid-b"]["frame_width"] == 24
    test = load_sta(find_sta_annotations(root, "test"))
    assert not test.has_objects and test.annotations[0]["objects"] is None


def test_sta_validation_names_uid_and_field(tmp_path):
    root = make_ego4d(tmp_path / "ego4d")
    path = root / "annotations" / "fho_sta_train.json"
    data = json.loads(path.read_text())
    del data["annotations"][1]["objects"][0]["box"]
    data["annotations"][0]["objects"][0]["noun_category_id"] = "ball"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"fho_sta_train.json: vid-a_0000020: objects\[0\]: noun_category_id: "
                                        r"expected an int in 0..2, got 'ball' \(and 1 more problems\)"):
        load_sta(path)
    relaxed = load_sta(path, strict=False)
    assert relaxed.annotations == [] and relaxed.problems[1] == (
        "vid-b_0000005: objects[0]", "box: missing (expected [x1, y1, x2, y2] in pixels)")


def test_sta_clip_ends_at_the_annotated_frame(tmp_path):
    root = make_ego4d(tmp_path / "ego4d", layout="v1/full_scale")
    video = sta_video_path(root, "vid-a")
    assert video == root / "v1" / "full_scale" / "vid-a.mp4"
    clip = sta_clip(video, 20, num_frames=4, stride=3)
    assert clip.shape == (4, 16, 24, 3) and clip.dtype == np.uint8
    assert frame_indices(clip) == [11, 14, 17, 20]
    assert frame_indices(sta_clip(video, 2, num_frames=3, stride=2)) == [0, 0, 2]  # clamped at the start
    with pytest.raises(DataError, match="video vid-zzz.mp4 not found"):
        sta_video_path(root, "vid-zzz")
    with pytest.raises(DataError, match="vid-a.mp4"):
        sta_clip(video, 45, num_frames=2, stride=1)
