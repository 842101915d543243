"""Ego4D short-term object-interaction anticipation (STA) on frozen features of every layer.

For each annotated frame, a clip of `frames` frames (every `stride`-th) ending at that frame is
read as one video sequence; the last frame's patch tokens of each layer feed a trainable head
(objectness, box, noun, verb, time to contact per location) trained on train. Val detections are
decoded to boxes in original pixels, written in the challenge format (one file per layer), and
scored with the official Top-5 mAP rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from totobench.data.preprocess import resize_and_crop
from totobench.io import atomic_write
from totobench.probes.base import STA_OUTPUTS, ProbeData
from totobench.tasks.base import (Evaluation, InputSpec, LayerRow, QuickSpec, RunContext, Split, Task,
                                  skipped_report)


class StaClips(Dataset):
    """Clips ending at the annotated frames of an STA annotation file, as extractor items.
    Frames are resized to R x R without cropping (boxes are normalised by the frame size)."""
    yields_dicts = True

    def __init__(self, root, annotations: list[dict], frames: int, stride: int, resolution: int):
        self.root, self.annotations = root, annotations
        self.frames, self.stride, self.resolution = frames, stride, resolution

    def __len__(self):
        return len(self.annotations)

    def __getitem__(self, i):
        from totobench.data.ego4d import sta_clip, sta_video_path
        from totobench.errors import DataError
        ann = self.annotations[i]
        sample = {"frames": None, "label": 0, "index": i, "group": i, "path": ann["uid"], "skip_reason": None}
        try:
            clip = sta_clip(sta_video_path(self.root, ann["video_uid"]), ann["frame"], self.frames, self.stride)
        except DataError:
            sample["skip_reason"] = "unreadable"
            return sample
        sample["frames"] = resize_and_crop(torch.from_numpy(clip), self.resolution, keep_aspect=False)
        return sample


def frame_size(ann_file, ann: dict) -> tuple[float, float]:
    meta = ann_file.video_metadata.get(ann["video_uid"], {})
    return float(meta["frame_width"]), float(meta["frame_height"])


@dataclass(frozen=True)
class StaInput(InputSpec):
    frames: int | None = field(default=None, metadata={"min": 1})   # null: the model's clip length; ends at the annotated frame
    stride: int | None = field(default=None, metadata={"min": 1})


@dataclass(frozen=True)
class StaQuick(QuickSpec):
    max_train: int = field(default=24, metadata={"min": 1})
    max_val: int = field(default=12, metadata={"min": 1})
    epochs: int | None = field(default=5, metadata={"min": 1})


class Ego4dSta(Task):
    kind = "ego4d_sta"
    Input = StaInput
    Quick = StaQuick
    consumes = STA_OUTPUTS
    default_probe = "sta_head"

    @classmethod
    def metric_names(cls, cfg) -> tuple[str, ...]:
        return ("Noun", "Noun+Verb", "Noun+TTC", "Overall")

    def splits(self, ctx: RunContext, inputs: dict) -> tuple[Split, Split]:
        from totobench.data.ego4d import find_sta_annotations, load_sta, sta_fingerprint
        ds = self.cfg.dataset
        frames, stride, resolution = inputs["frames"], inputs["stride"], inputs["resolution"]
        kind, batch = "video" if frames > 1 else "image", max(1, ctx.batch_size // frames)
        out = []
        for name, split, limit in (("train", ds.train_split, "max_train"), ("val", ds.val_split, "max_val")):
            ann = load_sta(find_sta_annotations(ctx.data_root, split))
            items = [a for a in ann.annotations if a["objects"] or name == "val"][: self.quick_limit(limit, ctx.quick)]
            key = {"transform": f"square-{resolution}-f{frames}-s{stride}-last",
                   "dataset": sta_fingerprint(ctx.data_root, ann), "n": len(items)}
            out.append(Split(name, StaClips(ctx.data_root, items, frames, stride, resolution), key, kind, batch,
                             info={"annotations": ann, "items": items}))
        return out[0], out[1]

    def probe_data(self, split: Split, features) -> ProbeData:
        from totobench.probes.sta_head import sta_targets
        keep = np.flatnonzero(features.valid)
        ann, items = split.info["annotations"], [split.info["items"][i] for i in keep]
        grid = self._grid
        data = ProbeData(feats={layer: np.asarray(f)[keep] for layer, f in features.feats.items()},
                         num_classes=(len(ann.nouns), len(ann.verbs)), token_grid=(1, grid, grid))
        sizes = [frame_size(ann, item) for item in items]
        if split.name == "train":
            data.targets = sta_targets([item["objects"] for item in items], sizes, (grid, grid), *data.num_classes)
        else:
            data.targets = {"items": items, "sizes": sizes}
        return data

    def evaluate(self, ctx: RunContext, inputs: dict, spec) -> Evaluation:
        self._grid = inputs["resolution"] // ctx.backbone.inputs.patch_size
        ev = super().evaluate(ctx, inputs, spec)
        ev.extra.pop("feature_cache", None)
        return ev

    def score(self, ctx, results, val, val_data) -> list[LayerRow]:
        from totobench.metrics.ego4d_sta import sta_top5_map
        from totobench.probes.sta_head import decode_sta
        rows = []
        scored, all_items = val_data.targets["items"], val.info["items"]
        for layer, result in sorted(results.items()):
            detections = decode_sta(result.outputs, val_data.targets["sizes"], topk=self.cfg.probe.topk)
            predictions = {a["uid"]: d for a, d in zip(scored, detections)}
            predictions.update({a["uid"]: [] for a in all_items if a["uid"] not in predictions})
            document = {"version": "1.0", "challenge": "ego4d_short_term_object_interaction_anticipation",
                        "results": predictions}
            atomic_write(ctx.artifacts_dir / f"layer_{layer:02d}" / "predictions.json", json.dumps(document))
            metrics = sta_top5_map([a for a in all_items if a["objects"]], document)
            # NaN = no frame had a detection at all; that is a score of 0, and JSON has no NaN
            rows.append(LayerRow(layer=layer, metrics={k: 0.0 if v != v else v for k, v in metrics.items()}))
        return rows

    def facts(self, train, val, train_data, val_data) -> dict:
        num_nouns, num_verbs = train_data.num_classes
        return {"num_train": len(next(iter(train_data.feats.values()))),
                "num_val": len(val_data.targets["items"]), "num_nouns": num_nouns, "num_verbs": num_verbs}

    def fingerprint(self, train: Split, val: Split) -> str:
        return val.key["dataset"]

    def skipped(self, ctx, train, val, tr, va) -> dict:
        return {"skipped_uids": {"train": sorted({p for p, _ in tr.skipped}), "val": sorted({p for p, _ in va.skipped})},
                **skipped_report(ctx, {"train": tr.skipped, "val": va.skipped})}
