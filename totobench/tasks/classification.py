"""Image classification (ImageNet format) by probing the frozen features of every layer.

The probe is the YAML's `probe.name` (any probe that gives class scores: `attentive`, the paper's;
`linear`; `knn`). Hyper-parameters are chosen on a held-out slice of train; val is reported.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Dataset

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

    def __getitem__(self, i):
        path, label = self.folder.samples[self.keep[i]]
        item = {"frames": None, "label": label, "index": i, "group": i, "path": str(path), "skip_reason": None}
        try:
            item["frames"] = self.transform(load_rgb(path)).unsqueeze(0)
        except DataError as err:
            item["skip_reason"] = f"unreadable image ({str(err).split(' (', 1)[-1].rstrip(')')})"
        return item


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

    def _split(self, ctx: RunContext, split: str, limit: int | None, resolution: int, name: str) -> Split:
        folder = ImageNetFolder(ctx.data_root, split)
        keep = per_class_subset([y for _, y in folder.samples], limit)
        key = {"dataset": folder.fingerprint(), "split": split, "subset": subset_id(keep, len(folder)),
               "transform": f"resize-shortside-centercrop-{resolution}", "kind": "image"}
        return Split(name, SingleFrames(folder, keep, image_transform(resolution)), key,
                     kind="image", batch_size=ctx.batch_size, info={"num_classes": len(folder.classes)})

    def splits(self, ctx: RunContext, inputs: dict) -> tuple[Split, Split]:
        ds, resolution = self.cfg.dataset, inputs["resolution"]
        train = self._split(ctx, ds.train_split, self.quick_limit("max_train_per_class", ctx.quick), resolution, "train")
        val = self._split(ctx, ds.val_split, self.quick_limit("max_val_per_class", ctx.quick), resolution, "val")
        val.info["num_classes"] = train.info["num_classes"]
        return train, val

    def facts(self, train, val, train_data, val_data) -> dict:
        return {"num_train": len(train.dataset), "num_val": len(val.dataset),
                "num_classes": train.info["num_classes"]}

    def fingerprint(self, train: Split, val: Split) -> str:
        return train.key["dataset"]
