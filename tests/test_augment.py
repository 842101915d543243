"""Training-time augmentation (probe.augment): deterministic per (seed, epoch, item), new every epoch,
the right shapes and ranges, a flip that mirrors, one crop box per clip."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from totobench.data.augment import (augment_clip, augment_image, item_generator, random_resized_crop_box)
from totobench.tasks.base import Split


def _image(h=48, w=72):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_draws_depend_only_on_seed_epoch_and_index():
    image = _image()
    same = [augment_image(image, 32, item_generator(0, 3, 7)) for _ in range(2)]
    assert torch.equal(same[0], same[1])
    others = [augment_image(image, 32, item_generator(*key)) for key in ((0, 4, 7), (0, 3, 8), (1, 3, 7))]
    assert all(not torch.equal(same[0], other) for other in others)


def test_output_shapes_dtypes_and_boxes():
    out = augment_image(_image(), 32, item_generator(0, 0, 0))
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.uint8
    clip = augment_clip(torch.randint(0, 256, (5, 80, 96, 3), dtype=torch.uint8), 64, item_generator(0, 0, 0))
    assert clip.shape == (5, 3, 64, 64) and clip.dtype == torch.uint8
    for i in range(200):
        top, left, h, w = random_resized_crop_box(80, 96, item_generator(0, 0, i))
        assert 0 <= top and top + h <= 80 and 0 <= left and left + w <= 96
        assert 0.08 * 80 * 96 * 0.9 <= h * w <= 80 * 96                       # area fraction (rounding slack)
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1                            # aspect ratio (rounding slack)
    # a frame no draw fits (far wider than 4/3): the centred box of ratio 4/3, full height
    assert random_resized_crop_box(10, 200, item_generator(0, 0, 0)) == (0, 93, 10, 13)


def test_the_flip_mirrors_the_crop_in_about_half_the_items():
    image = _image()
    flipped = 0
    for i in range(40):
        out = augment_image(image, 32, item_generator(0, 0, i))[0]
        replay = item_generator(0, 0, i)  # the same draws, by hand: box, then the flip
        top, left, h, w = random_resized_crop_box(48, 72, replay)
        crop = TF.resized_crop(image, top, left, h, w, [32, 32], interpolation=InterpolationMode.BICUBIC,
                               antialias=True)
        flip = float(torch.rand((), generator=replay)) < 0.5
        assert torch.equal(out, crop.flip(-1) if flip else crop)
        flipped += flip
    assert 10 <= flipped <= 30


def test_one_box_for_every_frame_of_a_clip():
    frame = torch.randint(0, 256, (1, 80, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = augment_clip(frame.expand(4, -1, -1, -1), 32, item_generator(0, 1, 2))
    assert all(torch.equal(out[0], out[t]) for t in range(1, 4))


def test_imagenet_epochs_are_augmented_deterministically(tiny_world):
    from totobench.data.imagenet import ImageNetFolder
    from totobench.data.preprocess import image_transform
    from totobench.tasks.classification import ImageClassification, SingleFrames
    from totobench.tasks.config import load_task_config
    folder = ImageNetFolder(tiny_world / "imagenet", "train")
    keep = list(range(len(folder)))
    split = Split("train", SingleFrames(folder, keep, image_transform(32)), {}, info={"resolution": 32})
    task = ImageClassification(load_task_config("imagenet"))
    a, b, c = task.augmented(split, 0, 0), task.augmented(split, 0, 0), task.augmented(split, 1, 0)
    assert len(a) == len(split.dataset) and list(a.labels_and_groups()[0]) == [y for _, y in folder.samples]
    assert a[1]["frames"].shape == (1, 3, 32, 32) and a[1]["label"] == split.dataset[1]["label"]
    assert torch.equal(a[1]["frames"], b[1]["frames"]) and not torch.equal(a[1]["frames"], c[1]["frames"])


def test_kinetics_epochs_move_the_clip_and_its_crop(tiny_world):
    from totobench.data.kinetics import KineticsIndex
    from totobench.tasks.config import load_task_config
    from totobench.tasks.kinetics import ClipViews, VideoClassification
    index = KineticsIndex(tiny_world / "kinetics400", "train", min_frames=4)
    split = Split("train", ClipViews(index, 4, 2, 32, True, segments=2), {})
    task = VideoClassification(load_task_config("k400"))
    a, b, c = task.augmented(split, 0, 0), task.augmented(split, 0, 0), task.augmented(split, 1, 0)
    assert len(a) == len(split.dataset) and (a.labels_and_groups()[0] == split.dataset.labels_and_groups()[0]).all()
    assert torch.equal(a[3]["frames"], b[3]["frames"]) and not torch.equal(a[3]["frames"], c[3]["frames"])
    assert a[3]["frames"].shape == (4, 3, 32, 32) and split.dataset.augment_epoch is None  # the split is untouched
    with pytest.raises(ValueError, match="only training clips"):
        ClipViews(index, 4, 2, 32, False).for_epoch(0, 0)
    assert math.isclose(len(a) / len(index.videos), 2)


def test_an_augmented_run_names_its_augmentation(tiny_world, micro_checkpoint, tmp_path):
    from totobench.cli import main
    from totobench.results.schema import load_result
    assert main(["run", "--model", str(micro_checkpoint), "--tasks", "imagenet,k400", "--layers", "-1", "--quick",
                 "--data-root", str(tiny_world), "--set", "probe.epochs=1", "--set", "probe.augment=true",
                 "--out", str(tmp_path)]) == 0
    imagenet = load_result(tmp_path / "micro" / "imagenet.json")["protocol"]
    assert imagenet["data"]["augmentation"].startswith("RandomResizedCrop scale (0.08, 1)")
    assert not any("augmentation" in d for d in imagenet["deviations"])     # MAE's recipe: faithful
    k400 = load_result(tmp_path / "micro" / "k400.json")["protocol"]
    assert k400["data"]["augmentation"].startswith("a random place for each clip")
    assert any(d.startswith("training augmentation without V-JEPA's RandAugment") for d in k400["deviations"])
