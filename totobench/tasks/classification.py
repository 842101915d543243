"""Image classification (ImageNet format) by probing frozen features of every layer.

Protocols, chosen by `probe.name` in the task YAML:
- `attentive` (the paper's): a learnable query attends over one layer's tokens;
- `linear`: a grid of linear heads on mean-pooled tokens, all layers x lr x wd at once;
- `knn`: cosine kNN on mean-pooled tokens.
Hyper-parameters are chosen on a held-out slice of train; val is reported.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2 as T

from totobench.errors import ConfigError
from totobench.features.extract import extract_features
from totobench.tasks.base import LayerRow, RunContext, Task, TaskOutput, register_task

PROBES = ("attentive", "linear", "knn")


def eval_transform(resolution: int) -> T.Compose:
    """Resize the short side, center crop to `resolution`, -> float [3, R, R] in [0, 1]."""
    return T.Compose([T.ToImage(), T.Resize(resolution, antialias=True), T.CenterCrop(resolution),
                      T.ToDtype(torch.float32, scale=True)])


class SingleFrames(Dataset):
    """Wrap an (image, label) dataset as (frames [1, 3, R, R], label) for the extractor."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return self.transform(image).unsqueeze(0), label


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


@register_task("classification")
class ImageClassification(Task):

    def _split(self, ctx: RunContext, split: str, limit: int | None):
        from totobench.data.imagenet import ImageNetFolder
        folder = ImageNetFolder(ctx.data_root, split)
        resolution = self.cfg.get("input", {}).get("resolution") or ctx.backbone.config.resolution
        keep = per_class_subset([y for _, y in folder.samples], limit)
        data = SingleFrames(folder, eval_transform(resolution))
        key = {"dataset": folder.fingerprint(), "split": split, "subset": _subset_id(keep, len(folder)),
               "transform": f"resize-shortside-centercrop-{resolution}", "kind": "image"}
        return Subset(data, keep), folder, key

    def run(self, ctx: RunContext) -> TaskOutput:
        probe = dict(self.cfg.get("probe", {}))
        name = probe.pop("name", "linear")
        if name not in PROBES:
            raise ConfigError(f"{self.cfg['_path']}: probe.name '{name}' is not one of {', '.join(PROBES)}")
        splits = self.cfg["dataset"]
        train, folder, train_key = self._split(ctx, splits.get("train_split", "train"),
                                               self.quick_limit("max_train_per_class", ctx.quick, 20))
        val, _, val_key = self._split(ctx, splits.get("val_split", "val"),
                                      self.quick_limit("max_val_per_class", ctx.quick, 10))
        num_classes = len(folder.classes)
        pooling = probe.pop("pooling", "tokens" if name == "attentive" else "mean")
        t0 = time.perf_counter()
        common = dict(kind="image", pooling=pooling, cache=ctx.cache, batch_size=ctx.batch_size,
                      num_workers=ctx.num_workers, device=ctx.device, console=ctx.console)
        tr = extract_features(ctx.backbone, train, ctx.layers, key_parts=train_key, desc=f"{self.name} train", **common)
        va = extract_features(ctx.backbone, val, ctx.layers, key_parts=val_key, desc=f"{self.name} val", **common)
        t1 = time.perf_counter()
        if ctx.quick and "epochs" in self.cfg.get("quick", {}):
            probe["epochs"] = self.cfg["quick"]["epochs"]
        rows = fit_probe(name, probe, tr, va, num_classes, ctx)
        t2 = time.perf_counter()
        protocol = {"probe": name, "grid": {k: v for k, v in probe.items() if isinstance(v, list)},
                    "settings": {k: v for k, v in probe.items() if not isinstance(v, list)},
                    "pooling": pooling, "selection_split": f"train-holdout-{int(probe.get('holdout', 0.1) * 100)}pct",
                    "report_split": splits.get("val_split", "val"), "seed": ctx.seed,
                    "num_train": len(train), "num_val": len(val), "num_classes": num_classes}
        return TaskOutput(per_layer=rows, protocol=protocol, dataset_fingerprint=folder.fingerprint(),
                          extra={"feature_cache": "hit" if tr.from_cache and va.from_cache else "miss"},
                          timing_s={"extract": t1 - t0, "probe": t2 - t1})


def _subset_id(keep: list[int], n: int) -> str:
    digest = hashlib.sha256(np.asarray(keep, dtype=np.int64).tobytes()).hexdigest()[:12]
    return "all" if len(keep) == n else f"{len(keep)}:{digest}"


def fit_probe(name: str, probe: dict, tr, va, num_classes: int, ctx: RunContext,
              return_scores: bool = False) -> list[LayerRow]:
    """Train the probe `name` on the cached train features of every layer, report on val.

    Features stay memory-mapped; the probes read rows batch by batch. With `return_scores`
    each row's `extra["val_scores"]` holds the reported head's val logits [M, C]."""
    ytr, yva = torch.from_numpy(np.array(tr.labels)), torch.from_numpy(np.array(va.labels))
    opts = dict(probe, seed=ctx.seed, return_scores=return_scores)
    if name == "linear":
        from totobench.probes.linear import fit_linear_grid as fit
        opts["device"] = ctx.device
    elif name == "knn":
        from totobench.probes.knn import fit_knn_layers as fit
    else:
        from totobench.probes.attentive import fit_attentive_grid as fit
        opts["device"] = ctx.device
        # saved after every epoch so a killed run resumes; keyed so other settings never reuse it
        run_id = hashlib.sha256(json.dumps([probe, getattr(ctx.backbone, 'features_id', ctx.backbone.sha256), ctx.layers, len(ytr), ctx.seed],
                                           sort_keys=True, default=str).encode()).hexdigest()[:12]
        opts["state_path"] = ctx.artifacts_dir / f"attentive_state_{run_id}.pt"
        ctx.artifacts_dir.mkdir(parents=True, exist_ok=True)
    out = fit(tr.feats, ytr, va.feats, yva, num_classes, **opts)
    if "state_path" in opts:
        opts["state_path"].unlink(missing_ok=True)
    return [LayerRow(layer=l, metrics=r["metrics"], best_hparams=r.get("best_hparams", {}),
                     select_score=r.get("select_score"),
                     extra={"val_scores": r["val_scores"]} if return_scores else {})
            for l, r in sorted(out.items())]
