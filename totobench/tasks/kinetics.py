"""Action recognition (Kinetics-400 format) by probing frozen clip features of every layer.

A clip is `frames` frames taken every `stride`-th frame; each frame is resized (short side) and
cropped to the model's resolution and tokenized on its own, and the frames form one video
sequence. Training uses `train_clips_per_video` clips at random (seeded) positions; evaluation
uses `clips_per_video` x `crops_per_clip` views per video whose class scores are averaged.
Videos that are missing, unreadable or too short are skipped, counted and reported.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from totobench.errors import ConfigError
from totobench.features.extract import extract_features
from totobench.metrics.classification import topk_accuracy
from totobench.tasks.base import LayerRow, RunContext, Task, TaskOutput, register_task
from totobench.tasks.classification import fit_probe

PROBES = ("attentive", "linear")


def resize_and_crop(frames: torch.Tensor, resolution: int, crop: int = 1, num_crops: int = 1) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, 3, R, R]: short side to R, then crop `crop` of
    `num_crops` evenly spaced along the long side (one crop = center)."""
    x = frames.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    span_h, span_w = nh - resolution, nw - resolution
    frac = 0.5 if num_crops == 1 else crop / (num_crops - 1)
    top, left = round(span_h * frac), round(span_w * frac)
    x = x[..., top:top + resolution, left:left + resolution]
    return x.round().clamp(0, 255).to(torch.uint8)


class ClipViews(Dataset):
    """Views of the videos of one split as extractor items.

    Training: `clips` random clips per video (the KineticsClips training sampler at epochs
    0..clips-1), center crop. Evaluation: the KineticsClips constant clips x `crops` spatial crops.
    Item i -> {"frames" [T, 3, R, R] uint8, "label", "index": i, "group": video index, ...}.
    """
    yields_dicts = True

    def __init__(self, index, frames: int, stride: int, resolution: int, training: bool,
                 clips: int, crops: int, seed: int):
        from totobench.data.kinetics import KineticsClips
        self.resolution, self.crops = resolution, crops
        if training:
            self.sources = []
            for epoch in range(clips):
                src = KineticsClips(index, frames, stride, clips_per_video=None, seed=seed)
                src.set_epoch(epoch)
                self.sources.append(src)
            self.crops = 1
        else:
            self.sources = [KineticsClips(index, frames, stride, clips_per_video=clips, seed=seed)]
        self.per_source = len(self.sources[0])
        self.skipped_up_front = self.sources[0].skipped
        self.videos = self.sources[0].videos

    def __len__(self):
        return len(self.sources) * self.per_source * self.crops

    def __getitem__(self, i):
        item, crop = divmod(i, self.crops)
        source, j = divmod(item, self.per_source)
        sample = dict(self.sources[source][j])
        if sample["frames"] is not None:
            sample["frames"] = resize_and_crop(sample["frames"], self.resolution, crop, self.crops)
        sample["index"], sample["group"] = i, sample["video_index"]
        return sample


def _skipped_summary(views: ClipViews, decode_failures: list[tuple[str, str]]) -> dict:
    """{reason: sorted unique paths}: skipped before decoding (missing, too short) and while decoding."""
    out: dict[str, set] = {reason: set(paths) for reason, paths in views.skipped_up_front.items()}
    for path, reason in decode_failures:
        out.setdefault(reason or "unreadable", set()).add(path)
    return {reason: sorted(paths) for reason, paths in sorted(out.items()) if paths}


def video_level_metrics(scores: torch.Tensor, labels: np.ndarray, groups: np.ndarray) -> dict:
    """Average softmax scores of the views of each video, then top-1/top-5 over videos."""
    groups_t = torch.as_tensor(np.array(groups))
    uniq, inverse = torch.unique(groups_t, return_inverse=True)
    probs = scores.softmax(-1)
    summed = torch.zeros(len(uniq), probs.shape[1]).index_add_(0, inverse, probs)
    video_labels = torch.zeros(len(uniq), dtype=torch.long)
    video_labels[inverse] = torch.as_tensor(np.array(labels), dtype=torch.long)
    return topk_accuracy(summed, video_labels, ks=(1, 5))


@register_task("video_classification")
class VideoClassification(Task):

    def run(self, ctx: RunContext) -> TaskOutput:
        from totobench.data.kinetics import KineticsIndex
        probe = dict(self.cfg.get("probe", {}))
        name = probe.pop("name", "attentive")
        if name not in PROBES:
            raise ConfigError(f"{self.cfg['_path']}: probe.name '{name}' is not one of {', '.join(PROBES)}")
        positions = probe.pop("positions", "none")
        if positions not in ("none", None, "spacetime") or (positions == "spacetime" and name != "attentive"):
            raise ConfigError(f"{self.cfg['_path']}: probe.positions must be 'none' or 'spacetime' (attentive probe "
                              f"only), got {positions!r} for probe '{name}'")
        inp = self.cfg.get("input", {})
        mc = ctx.backbone.config
        frames = inp.get("frames") or mc.num_frames
        stride = inp.get("stride") or mc.frame_stride
        resolution = inp.get("resolution") or mc.resolution
        clips, crops = inp.get("clips_per_video", 2), inp.get("crops_per_clip", 3)
        train_clips = probe.pop("train_clips_per_video", 2)
        ds = self.cfg["dataset"]
        t0 = time.perf_counter()
        train_index = KineticsIndex(ctx.data_root, ds.get("train_split", "train"), min_frames=frames)
        val_index = KineticsIndex(ctx.data_root, ds.get("val_split", "val"), min_frames=frames)
        _limit(train_index, self.quick_limit("max_train_per_class", ctx.quick, 4))
        _limit(val_index, self.quick_limit("max_val_per_class", ctx.quick, 2))
        if not train_index.videos or not val_index.videos:
            raise ConfigError(f"{ctx.data_root}: no usable videos in the train or val split")
        train = ClipViews(train_index, frames, stride, resolution, True, train_clips, 1, ctx.seed)
        val = ClipViews(val_index, frames, stride, resolution, False, clips, crops, ctx.seed)
        pooling = probe.pop("pooling", "tokens" if name == "attentive" else "mean")
        if positions == "spacetime" and pooling != "tokens" and not pooling.startswith("tokens_pool"):
            raise ConfigError(f"{self.cfg['_path']}: probe.positions 'spacetime' needs every token (pooling 'tokens' "
                              f"or 'tokens_pool<k>'), got pooling {pooling!r}")
        transform = f"shortside-crop-{resolution}-f{frames}-s{stride}"
        common = dict(kind="video" if frames > 1 else "image", pooling=pooling, cache=ctx.cache,
                      batch_size=max(1, ctx.batch_size // max(frames, 1)), num_workers=ctx.num_workers,
                      device=ctx.device, console=ctx.console)
        tr = extract_features(ctx.backbone, train, ctx.layers, desc=f"{self.name} train", key_parts={
            "dataset": train_index.fingerprint(), "split": "train", "views": f"random{train_clips}",
            "seed": ctx.seed, "transform": transform, "n": len(train)}, **common)
        va = extract_features(ctx.backbone, val, ctx.layers, desc=f"{self.name} val", key_parts={
            "dataset": val_index.fingerprint(), "split": "val", "views": f"{clips}x{crops}",
            "transform": transform, "n": len(val)}, **common)
        t1 = time.perf_counter()
        if ctx.quick and "epochs" in self.cfg.get("quick", {}):
            probe["epochs"] = self.cfg["quick"]["epochs"]
        num_classes = len(train_index.classes)
        tr_sel, va_sel = _select(tr), _select(va)
        if positions == "spacetime":
            probe["positions"] = _clip_token_grid(self.cfg["_path"], tr_sel, frames)
        rows = fit_probe(name, probe, tr_sel, va_sel, num_classes, ctx, return_scores=True)
        for row in rows:  # report per video: scores averaged over its views
            row.metrics = video_level_metrics(row.extra.pop("val_scores"), va_sel.labels, va_sel.groups)
        t2 = time.perf_counter()
        skipped = {"train": _skipped_summary(train, tr.skipped), "val": _skipped_summary(val, va.skipped)}
        n_skipped = {split: sum(len(p) for p in s.values()) for split, s in skipped.items()}
        if any(n_skipped.values()):
            ctx.console.print(f"[yellow]skipped videos: {n_skipped} (listed in the result file)[/]")
        protocol = {"probe": name, "grid": {k: v for k, v in probe.items() if isinstance(v, list)},
                    "settings": {k: v for k, v in probe.items() if not isinstance(v, list)},
                    "pooling": pooling, "frames": frames, "stride": stride, "resolution": resolution,
                    "train_clips_per_video": train_clips, "eval_views": f"{clips} clips x {crops} crops",
                    "selection_split": f"train-holdout-{int(probe.get('holdout', 0.1) * 100)}pct",
                    "report_split": ds.get("val_split", "val"), "seed": ctx.seed,
                    "num_train_videos": len(train.videos), "num_val_videos": len(val.videos),
                    "num_classes": num_classes}
        return TaskOutput(per_layer=rows, protocol=protocol,
                          dataset_fingerprint=f"{train_index.fingerprint()}+{val_index.fingerprint()}",
                          extra={"skipped": skipped, "num_skipped": n_skipped},
                          timing_s={"extract": t1 - t0, "probe": t2 - t1})


def _clip_token_grid(path, features, frames: int) -> tuple[int, int, int]:
    """(frames, rows, cols) of the token features of a clip (probe.positions: spacetime)."""
    tokens = np.asarray(next(iter(features.feats.values()))).shape[1]
    side = math.isqrt(tokens // frames)
    if frames * side * side != tokens:
        raise ConfigError(f"{path}: probe.positions needs a square token grid per frame, "
                          f"got {tokens} tokens for {frames} frames (pooling 'tokens' or 'tokens_pool<k>')")
    return frames, side, side


def _limit(index, per_class: int | None) -> None:
    """Keep the first `per_class` videos of each class (for --quick)."""
    if per_class is None:
        return
    seen: dict[int, int] = {}
    keep = []
    for path, label in index.videos:
        if seen.get(label, 0) < per_class:
            keep.append((path, label))
            seen[label] = seen.get(label, 0) + 1
    index.videos = keep


def _select(f):
    """Only the decodable rows of a split's features."""
    from totobench.features.extract import LayerFeatures
    keep = np.flatnonzero(f.valid)
    if len(keep) == len(f.labels):
        return f
    return LayerFeatures({l: np.asarray(a)[keep] for l, a in f.feats.items()}, f.labels[keep],
                         f.groups[keep], f.from_cache, f.skipped)
