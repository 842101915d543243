"""Ego4D short-term object-interaction anticipation (STA) on frozen features of every layer.

For each annotated frame, a clip of `frames` frames (every `stride`-th) ending at that frame is
read as one video sequence; the last frame's patch tokens of each layer feed a trainable head
(objectness, box, noun, verb, time to contact per location) trained on train. Val detections are
decoded to boxes in original pixels, written in the challenge format (one file per layer), and
scored with the official Top-5 mAP rules.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from torch.utils.data import Dataset

from totobench.features.extract import extract_features
from totobench.tasks.base import LayerRow, RunContext, Task, TaskOutput, register_task

HEAD_DEFAULTS = {"epochs": 30, "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 64, "hidden": 256, "topk": 20}


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
        square = torch.nn.functional.interpolate(
            torch.from_numpy(clip).permute(0, 3, 1, 2).float(), size=(self.resolution, self.resolution),
            mode="bilinear", antialias=True, align_corners=False)
        sample["frames"] = square.round().clamp(0, 255).to(torch.uint8)
        return sample


def frame_size(ann_file, ann: dict) -> tuple[float, float]:
    meta = ann_file.video_metadata.get(ann["video_uid"], {})
    return float(meta["frame_width"]), float(meta["frame_height"])


@register_task("ego4d_sta")
class Ego4dSta(Task):

    def run(self, ctx: RunContext) -> TaskOutput:
        from totobench.data.ego4d import find_sta_annotations, load_sta, sta_fingerprint
        from totobench.metrics.ego4d_sta import sta_top5_map
        from totobench.probes.sta_head import decode_sta, sta_targets, train_sta_head
        ds = self.cfg["dataset"]
        inp = self.cfg.get("input", {})
        mc = ctx.backbone.config
        frames = inp.get("frames") or mc.num_frames
        stride = inp.get("stride") or mc.frame_stride
        resolution = inp.get("resolution") or mc.resolution
        head = {**HEAD_DEFAULTS, **{k: v for k, v in self.cfg.get("probe", {}).items() if k != "name"}}
        if ctx.quick and "epochs" in self.cfg.get("quick", {}):
            head["epochs"] = self.cfg["quick"]["epochs"]
        train_ann = load_sta(find_sta_annotations(ctx.data_root, ds.get("train_split", "train")))
        val_ann = load_sta(find_sta_annotations(ctx.data_root, ds.get("val_split", "val")))
        train_items = [a for a in train_ann.annotations if a["objects"]][: self.quick_limit("max_train", ctx.quick, 40)]
        val_items = val_ann.annotations[: self.quick_limit("max_val", ctx.quick, 20)]
        num_nouns, num_verbs = len(train_ann.nouns), len(train_ann.verbs)
        t0 = time.perf_counter()
        common = dict(kind="video" if frames > 1 else "image", pooling="last_frame", cache=ctx.cache,
                      batch_size=max(1, ctx.batch_size // frames), num_workers=ctx.num_workers,
                      device=ctx.device, console=ctx.console)
        key = {"transform": f"square-{resolution}-f{frames}-s{stride}-last"}
        tr = extract_features(ctx.backbone, StaClips(ctx.data_root, train_items, frames, stride, resolution),
                              ctx.layers, desc=f"{self.name} train", key_parts={
                                  **key, "dataset": sta_fingerprint(ctx.data_root, train_ann), "n": len(train_items)},
                              **common)
        va = extract_features(ctx.backbone, StaClips(ctx.data_root, val_items, frames, stride, resolution),
                              ctx.layers, desc=f"{self.name} val", key_parts={
                                  **key, "dataset": sta_fingerprint(ctx.data_root, val_ann), "n": len(val_items)},
                              **common)
        t1 = time.perf_counter()
        grid = mc.grid if resolution == mc.resolution else resolution // mc.patch_size
        keep_tr = np.flatnonzero(tr.valid)
        keep_va = np.flatnonzero(va.valid)
        targets = sta_targets([train_items[i]["objects"] for i in keep_tr],
                              [frame_size(train_ann, train_items[i]) for i in keep_tr], (grid, grid),
                              num_nouns, num_verbs)
        val_sizes = [frame_size(val_ann, val_items[i]) for i in keep_va]
        scored = [val_items[i] for i in keep_va]
        rows = []
        for layer in ctx.layers:
            x_tr = torch.from_numpy(np.asarray(tr.feats[layer])[keep_tr].astype(np.float32)).reshape(len(keep_tr), grid, grid, -1)
            x_va = torch.from_numpy(np.asarray(va.feats[layer])[keep_va].astype(np.float32)).reshape(len(keep_va), grid, grid, -1)
            model = train_sta_head(x_tr, targets, num_nouns, num_verbs, epochs=head["epochs"], lr=head["lr"],
                                   seed=ctx.seed, batch_size=head["batch_size"],
                                   weight_decay=head["weight_decay"], hidden=head["hidden"])
            with torch.no_grad():
                detections = decode_sta(model(x_va), val_sizes, topk=head["topk"])
            results = {a["uid"]: d for a, d in zip(scored, detections)}
            results.update({a["uid"]: [] for a in val_items if a["uid"] not in results})
            predictions = {"version": "1.0", "challenge": "ego4d_short_term_object_interaction_anticipation",
                           "results": results}
            out = ctx.artifacts_dir / f"layer_{layer:02d}" / "predictions.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(predictions))
            metrics = sta_top5_map([a for a in val_items if a["objects"]], predictions)
            # NaN = no frame had a detection at all; that is a score of 0, and JSON has no NaN
            metrics = {k: 0.0 if v != v else v for k, v in metrics.items()}
            rows.append(LayerRow(layer=layer, metrics=metrics))
        t2 = time.perf_counter()
        protocol = {"probe": "sta_head", "grid": {}, "settings": head, "frames": frames, "stride": stride,
                    "resolution": resolution, "selection_split": "none (fixed hyper-parameters)",
                    "report_split": ds.get("val_split", "val"), "seed": ctx.seed,
                    "num_train": len(keep_tr), "num_val": len(keep_va),
                    "num_nouns": num_nouns, "num_verbs": num_verbs}
        skipped = {"train": sorted({p for p, _ in tr.skipped}), "val": sorted({p for p, _ in va.skipped})}
        return TaskOutput(per_layer=rows, protocol=protocol,
                          dataset_fingerprint=sta_fingerprint(ctx.data_root, val_ann),
                          extra={"skipped_uids": skipped}, timing_s={"extract": t1 - t0, "probe": t2 - t1})
