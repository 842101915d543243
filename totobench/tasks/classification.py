"""Image classification (ImageNet format) by probing the frozen features of every layer.

The probe is the YAML's `probe.name` (any probe that gives class scores: `attentive`, the paper's;
`linear`; `knn`). Hyper-parameters are chosen on a held-out slice of train; val is reported.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from totobench.data.augment import augment_image, image_to_uint8, item_generator
from totobench.data.imagenet import ImageNetFolder, load_rgb
from totobench.data.preprocess import image_transform
from totobench.errors import DataError
from totobench.tasks.base import QuickSpec, RunContext, Split, Task


@dataclass(frozen=True)
class ImageQuick(QuickSpec):
    max_train_per_class: int = field(default=12, metadata={"min": 1})
    max_val_per_class: int = field(default=6, metadata={"min": 1})


class SingleFrames(Dataset):
    """Images `keep` of an ImageNet folder as extractor items {"frames" [1, 3, R, R], "label", ...};
    an image that cannot be decoded becomes a skipped item (frames None) naming its file."""
    yields_dicts = True

    def __init__(self, folder, keep: list[int], transform):
        self.folder, self.keep, self.transform = folder, keep, transform

    def __len__(self):
        return len(self.keep)

    def labels_and_groups(self) -> tuple[list[int], list[int]]:
        """Every item's (label, group) without decoding (streamed probes need them up front)."""
        return [self.folder.samples[k][1] for k in self.keep], list(range(len(self.keep)))

    def __getitem__(self, i):
        path, label = self.folder.samples[self.keep[i]]
        item = {"frames": None, "label": label, "index": i, "group": i, "path": str(path), "skip_reason": None}
        try:
            item["frames"] = self.frames(i, load_rgb(path))
        except DataError as err:
            item["skip_reason"] = f"unreadable image ({str(err).split(' (', 1)[-1].rstrip(')')})"
        return item

    def frames(self, i: int, image) -> torch.Tensor:
        """Item i's decoded image -> [1, 3, R, R] (float in [0, 1])."""
        return self.transform(image).unsqueeze(0)


class AugmentedFrames(SingleFrames):
    """The items of a SingleFrames split for training epoch `epoch`: each image augmented
    (data/augment.py augment_image: RandomResizedCrop + flip) as drawn from (seed, epoch, item index),
    uint8 [1, 3, R, R]. Same items, labels and order as the split it augments."""

    def __init__(self, folder, keep: list[int], resolution: int, seed: int, epoch: int):
        super().__init__(folder, keep, transform=None)
        self.resolution, self.seed, self.epoch = resolution, seed, epoch

    def frames(self, i: int, image) -> torch.Tensor:
        return augment_image(image_to_uint8(image), self.resolution, item_generator(self.seed, self.epoch, i))


def per_class_subset(labels: list[int], limit: int | None) -> list[int]:
    """Indices of the first `limit` items of each class (all when limit is None), in order."""
    if limit is None:
        return list(range(len(labels)))
    seen: dict[int, int] = defaultdict(int)
    keep = []
    for i, y in enumerate(labels):
        if seen[y] < limit:
            keep.append(i)
            seen[y] += 1
    return keep


def subset_id(keep: list[int], n: int) -> str:
    """"all", or "<count>:<hash of the indices>" (part of the feature-cache key)."""
    digest = hashlib.sha256(np.asarray(keep, dtype=np.int64).tobytes()).hexdigest()[:12]
    return "all" if len(keep) == n else f"{len(keep)}:{digest}"


class ImageClassification(Task):
    kind = "classification"
    Quick = ImageQuick
    augmentation = ("RandomResizedCrop scale (0.08, 1) ratio (3/4, 4/3), bicubic, to the model's resolution + "
                    "horizontal flip p 0.5 (MAE's linear-probe recipe, which AIM's probe follows)")

    def _split(self, ctx: RunContext, split: str, limit: int | None, resolution: int, name: str) -> Split:
        folder = ImageNetFolder(ctx.data_root, split)
        keep = per_class_subset([y for _, y in folder.samples], limit)
        key = {"dataset": folder.fingerprint(), "split": split, "subset": subset_id(keep, len(folder)),
               "transform": f"resize-shortside-centercrop-{resolution}", "kind": "image"}
        return Split(name, SingleFrames(folder, keep, image_transform(resolution)), key, kind="image",
                     batch_size=ctx.batch_size, info={"num_classes": len(folder.classes), "resolution": resolution})

    def augmented(self, split: Split, epoch: int, seed: int) -> Dataset:
        """The train split's items for epoch `epoch`, augmented (AugmentedFrames): same items and
        order as `split.dataset`, different pixels every epoch, the same ones for the same (seed, epoch)."""
        return AugmentedFrames(split.dataset.folder, split.dataset.keep, split.info["resolution"], seed, epoch)

    def splits(self, ctx: RunContext, inputs: dict) -> tuple[Split, Split]:
        ds, resolution = self.cfg.dataset, inputs["resolution"]
        train = self._split(ctx, ds.train_split, self.quick_limit("max_train_per_class", ctx.quick), resolution, "train")
        val = self._split(ctx, ds.val_split, self.quick_limit("max_val_per_class", ctx.quick), resolution, "val")
        val.info["num_classes"] = train.info["num_classes"]
        return train, val

    def facts(self, train, val, train_data, val_data) -> dict:
        return {"num_train": len(train.dataset), "num_val": len(val.dataset),
                "num_classes": train.info["num_classes"],
                "augmentation": self.augmentation if getattr(self.cfg.probe, "augment", False) else "none"}

    def fingerprint(self, train: Split, val: Split) -> str:
        return train.key["dataset"]
