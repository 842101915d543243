"""Action recognition (Kinetics-400 format) by probing the frozen clip features of every layer.

A clip is `frames` frames taken every `stride`-th frame; each frame is resized (short side) and
cropped to the resolution and tokenized on its own, and the frames form one video sequence.
Training uses `train_clips_per_video` clips at random (seeded) positions; evaluation uses
`clips_per_video` x `crops_per_clip` views per video whose class scores are averaged.
Videos that are missing, unreadable or too short are skipped, counted and reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from totobench.data.preprocess import resize_and_crop
from totobench.errors import ConfigError, DataError
from totobench.features.extract import LayerFeatures
from totobench.metrics.classification import topk_accuracy
from totobench.probes.base import ProbeData
from totobench.tasks.base import (InputSpec, LayerRow, QuickSpec, RunContext, Split, Task, readable_rows,
                                  skipped_report)


@dataclass(frozen=True)
class ClipInput(InputSpec):
    frames: int | None = field(default=None, metadata={"min": 1})          # null: the model's clip length
    stride: int | None = field(default=None, metadata={"min": 1})          # null: the model's frame stride
    clips_per_video: int = field(default=2, metadata={"min": 1})           # test-time views: clips x crops,
    crops_per_clip: int = field(default=1, metadata={"min": 1})            # class scores averaged
    train_clips_per_video: int = field(default=1, metadata={"min": 1})     # random clips per training video


@dataclass(frozen=True)
class ClipQuick(QuickSpec):
    max_train_per_class: int = field(default=2, metadata={"min": 1})
    max_val_per_class: int = field(default=1, metadata={"min": 1})


class ClipViews(Dataset):
    """Views of the videos of one split as extractor items.

    Training: `clips` random clips per video (the KineticsClips training sampler at epochs
    0..clips-1), centre crop. Evaluation: the KineticsClips constant clips x `crops` spatial crops.
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


def video_level_metrics(scores: torch.Tensor, labels: np.ndarray, groups: np.ndarray) -> dict:
    """Average softmax scores of the views of each video, then top-1/top-5 over videos."""
    groups_t = torch.as_tensor(np.array(groups))
    uniq, inverse = torch.unique(groups_t, return_inverse=True)
    probs = scores.softmax(-1)
    summed = torch.zeros(len(uniq), probs.shape[1]).index_add_(0, inverse, probs)
    video_labels = torch.zeros(len(uniq), dtype=torch.long)
    video_labels[inverse] = torch.as_tensor(np.array(labels), dtype=torch.long)
    return topk_accuracy(summed, video_labels, ks=(1, 5))


def clip_token_grid(features: LayerFeatures, frames: int) -> tuple[int, int, int] | None:
    """(frames, rows, cols) of the token features of a clip; None unless every row holds
    `frames` square grids of tokens (pooled features have no grid). `frames`: of the token grid."""
    shape = np.asarray(next(iter(features.feats.values()))).shape
    if len(shape) != 3:
        return None
    side = math.isqrt(shape[1] // frames)
    return (frames, side, side) if frames * side * side == shape[1] else None


def limit_per_class(index, per_class: int | None) -> None:
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


class VideoClassification(Task):
    kind = "video_classification"
    Input = ClipInput
    Quick = ClipQuick
    default_probe = "attentive"
    keep_outputs = True    # scores are averaged over the views of each video

    def splits(self, ctx: RunContext, inputs: dict) -> tuple[Split, Split]:
        from totobench.data.kinetics import KineticsIndex
        ds = self.cfg.dataset
        frames, stride, resolution = inputs["frames"], inputs["stride"], inputs["resolution"]
        clips, crops, train_clips = inputs["clips_per_video"], inputs["crops_per_clip"], inputs["train_clips_per_video"]
        train_index = KineticsIndex(ctx.data_root, ds.train_split, min_frames=frames)
        val_index = KineticsIndex(ctx.data_root, ds.val_split, min_frames=frames)
        limit_per_class(train_index, self.quick_limit("max_train_per_class", ctx.quick))
        limit_per_class(val_index, self.quick_limit("max_val_per_class", ctx.quick))
        if not train_index.videos or not val_index.videos:
            raise ConfigError(f"{ctx.data_root}: no usable videos in the train or val split")
        train = ClipViews(train_index, frames, stride, resolution, True, train_clips, 1, ctx.seed)
        val = ClipViews(val_index, frames, stride, resolution, False, clips, crops, ctx.seed)
        for views in (train, val):
            dropped = [(path, reason) for reason, paths in views.skipped_up_front.items() for path in paths]
            if ctx.strict and dropped:
                raise DataError(f"{dropped[0][0]}: {dropped[0][1]} (without --strict it is skipped and listed "
                                f"in the result)")
        transform = f"shortside-crop-{resolution}-f{frames}-s{stride}"
        kind, batch = "video" if frames > 1 else "image", max(1, ctx.batch_size // max(frames, 1))
        # frames of the token grid: a video model with tubelets gives frames / tubelet
        token_frames = ctx.backbone.token_grid(frames, resolution, resolution, kind)[0]
        info = {"num_classes": len(train_index.classes), "frames": frames, "token_frames": token_frames}
        return (Split("train", train, {"dataset": train_index.fingerprint(), "split": "train",
                                       "views": f"random{train_clips}", "seed": ctx.seed, "transform": transform,
                                       "n": len(train)}, kind, batch, dict(info)),
                Split("val", val, {"dataset": val_index.fingerprint(), "split": "val", "views": f"{clips}x{crops}",
                                   "transform": transform, "n": len(val)}, kind, batch, dict(info)))

    def probe_data(self, split: Split, features: LayerFeatures) -> ProbeData:
        f = readable_rows(features)
        return ProbeData(feats=f.feats, labels=f.labels, num_classes=split.info["num_classes"],
                         token_grid=clip_token_grid(f, split.info["token_frames"]),
                         targets=f.groups)

    def score(self, ctx, results, val, val_data) -> list[LayerRow]:
        # reported per video: class scores averaged over its views
        return [LayerRow(layer=layer, metrics=video_level_metrics(r.outputs, val_data.labels, val_data.targets),
                         best_hparams=r.best_hparams, select_score=r.select_score)
                for layer, r in sorted(results.items())]

    def skipped(self, ctx, train, val, tr, va) -> dict:
        # videos missing or too short are dropped by the index, before extraction
        return skipped_report(ctx, {"train": tr.skipped, "val": va.skipped},
                              {"train": train.dataset.skipped_up_front, "val": val.dataset.skipped_up_front})

    def facts(self, train, val, train_data, val_data) -> dict:
        return {"eval_views": f"{self.cfg.input.clips_per_video} clips x {self.cfg.input.crops_per_clip} crops",
                "num_train_videos": len(train.dataset.videos), "num_val_videos": len(val.dataset.videos),
                "num_classes": train.info["num_classes"],
                "token_grid": list(train_data.token_grid) if train_data.token_grid else None}

    def fingerprint(self, train: Split, val: Split) -> str:
        return f"{train.key['dataset']}+{val.key['dataset']}"

    def deviations(self, spec, inputs: dict, ctx: RunContext) -> list[str]:
        out = super().deviations(spec, inputs, ctx)
        model = ctx.backbone.inputs
        if (inputs["frames"], inputs["stride"]) != (model.num_frames, model.frame_stride):
            out.append(f"clips of {inputs['frames']} frame(s) every {inputs['stride']}, not the model's own "
                       f"{model.num_frames} every {model.frame_stride}: a control")
        out.append(f"test views: {inputs['clips_per_video']} clip(s) x {inputs['crops_per_clip']} crop(s), class "
                   f"scores averaged; V-JEPA 2's frozen evaluation joins 8 segments x 3 views into one probe "
                   f"input (the paper does not state its views)")
        return out
