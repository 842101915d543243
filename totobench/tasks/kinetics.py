"""Action recognition (Kinetics-400 format) by probing the frozen clip features of every layer.

A clip is `frames` frames taken every `stride`-th frame; each frame is resized (short side) and
cropped to the resolution, and the frames form one video sequence. Test views follow V-JEPA 2's
frozen video evaluation (facebookresearch/vjepa2 `evals/video_classification_frozen`), which we read
as follows:

- the video is cut into `num_segments` equal partitions and one clip is taken per partition
  (`src/datasets/video_dataset.py` loadvideo_decord): inside its partition when the partition is longer
  than a clip's span (at a random place, at test time too: the val loader keeps the default
  random_clip_sampling), else spread evenly from the first frame, start = i * ((frames - span) //
  (num_segments - 1)) (allow_clip_overlap, the case of Kinetics' 10 s videos with 8 clips of 64 frames);
- each clip gives `num_views_per_segment` spatial views (`EvalVideoTransform`: short side to the
  resolution, crops evenly spaced along the long side: left/centre/right or top/centre/bottom; the
  same crop three times for a square frame); training uses the same segments, one view, augmented;
- every clip goes through the encoder on its own; the tokens of one view's segments are concatenated
  along time into one probe input, no position embedding added (`ClipAggregation`, use_pos_embed false);
- the classifier scores each view; the softmax scores of the views are averaged (`run_one_epoch`).

Here: `segments` clips per probe input (`segment_start`: the same partitions; at test time the clip of
a long partition is centred, not drawn at random), `views` spatial views of a non-square video (1 for a
square one: the same average), the tokens of a view's segments joined (features/views.py JoinedRows)
and the class scores of a video's views averaged after a softmax (`video_level_metrics`).
Videos that are missing, unreadable or too short are skipped, counted and reported.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field

import av

import numpy as np
import torch
from torch.utils.data import Dataset

from totobench.data.augment import augment_clip, item_generator
from totobench.data.preprocess import resize_and_crop
from totobench.data.video import read_frames, video_info
from totobench.errors import ConfigError, DataError
from totobench.features.extract import LayerFeatures
from totobench.features.views import JoinedRows
from totobench.metrics.classification import topk_accuracy
from totobench.probes.base import ProbeData
from totobench.tasks.base import (InputSpec, LayerRow, QuickSpec, RunContext, Split, Task, skipped_report)

REFERENCE_SEGMENTS, REFERENCE_VIEWS = 8, 3   # V-JEPA 2's Kinetics-400 frozen evaluation (configs/eval/*/k400.yaml)


@dataclass(frozen=True)
class ClipInput(InputSpec):
    frames: int | None = field(default=None, metadata={"min": 1})          # null: the model's clip length
    stride: int | None = field(default=None, metadata={"min": 1})          # null: the model's frame stride
    segments: int = field(default=1, metadata={"min": 1})                  # clips per probe input, tokens joined
    views: int = field(default=3, metadata={"min": 1})                     # test-time crops of a non-square video
    train_clips_per_video: int = field(default=1, metadata={"min": 1})     # probe inputs per training video


@dataclass(frozen=True)
class ClipQuick(QuickSpec):
    max_train_per_class: int = field(default=2, metadata={"min": 1})
    max_val_per_class: int = field(default=1, metadata={"min": 1})


def segment_start(num_frames: int, span: int, segments: int, segment: int,
                  generator: torch.Generator | None = None) -> int:
    """First frame of clip `segment` (0-based) of `segments` in a video of `num_frames` frames, a clip
    covering `span` = frames x stride frames (V-JEPA 2's partitions, see the module docstring).

    Partitions of num_frames // segments frames: when one is longer than `span`, the clip lies inside
    it, at a uniform random place drawn from `generator`, centred without one; otherwise the clips are
    spread evenly, start = segment * ((num_frames - span) // (segments - 1)), 0 when the video is no
    longer than one clip."""
    part = num_frames // segments
    if part > span:
        room = part - span
        offset = room // 2 if generator is None else int(torch.randint(0, room + 1, (), generator=generator))
        return segment * part + offset
    if segments == 1:
        return 0
    return segment * (max(0, num_frames - span) // (segments - 1))


class ClipViews(Dataset):
    """The clips of one split's videos as extractor items; `segments` consecutive items make one probe input.

    Items run video by video, then input (`samples` per training video; one per view at test time),
    then segment: items r * segments .. r * segments + segments - 1 are the clips of probe input r.
    training: `samples` inputs per video, each clip at a random place in its partition (drawn from
    (seed, item)), centre crop. Evaluation: centred clips, `views` crops along the long side of a
    non-square video, 1 crop of a square one. augment_epoch (training only): the items of that
    training epoch, each clip at a place and with a RandomResizedCrop drawn from (seed, epoch, item).
    Item i -> {"frames" [T, 3, R, R] uint8 (None when the video cannot be decoded), "label", "index": i,
    "group": video index, "path", "skip_reason"}.
    """
    yields_dicts = True

    def __init__(self, index, frames: int, stride: int, resolution: int, training: bool, segments: int = 1,
                 views: int = 1, seed: int = 0, samples: int = 1, augment_epoch: int | None = None):
        self.frames, self.stride, self.resolution, self.training = frames, stride, resolution, training
        self.segments, self.seed, self.augment_epoch = segments, seed, augment_epoch
        self.skipped_up_front = {reason: list(paths) for reason, paths in index.skipped.items()}
        self.videos = list(index.videos)
        self.lengths, per_video, self.views = [], [], []
        for path, _ in self.videos:
            info = index.info.get(path) or video_info(path)
            self.lengths.append(info.num_frames)
            self.views.append(1 if training or info.width == info.height else views)
            per_video.append((samples if training else self.views[-1]) * segments)
        self.offsets = np.concatenate([[0], np.cumsum(per_video)]).astype(np.int64)

    def __len__(self):
        return int(self.offsets[-1])

    def for_epoch(self, epoch: int, seed: int) -> "ClipViews":
        """These training items as augmented for training epoch `epoch` with `seed` (same items, same order)."""
        if not self.training:
            raise ValueError("only training clips are augmented")
        out = copy.copy(self)
        out.augment_epoch, out.seed = epoch, seed
        return out

    def labels_and_groups(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels [N], groups [N]: the video of each item) without decoding any."""
        per_video = np.diff(self.offsets)
        labels = np.array([label for _, label in self.videos], dtype=np.int64)
        return np.repeat(labels, per_video), np.repeat(np.arange(len(self.videos)), per_video)

    def locate(self, i: int) -> tuple[int, int, int]:
        """(video, input within the video, segment) of item i."""
        video = int(np.searchsorted(self.offsets, i, side="right")) - 1
        within, segment = divmod(i - int(self.offsets[video]), self.segments)
        return video, within, segment

    def __getitem__(self, i):
        video, within, segment = self.locate(i)
        path, label = self.videos[video]
        sample = {"frames": None, "label": label, "index": i, "group": video, "path": path, "skip_reason": None}
        generator = None
        if self.training:  # the cached training clips draw with epoch -1, an augmented epoch with its own
            generator = item_generator(self.seed, -1 if self.augment_epoch is None else self.augment_epoch, i)
        n, span = self.lengths[video], self.frames * self.stride
        start = segment_start(n, span, self.segments, segment, generator)
        try:
            indices = [min(start + k * self.stride, n - 1) for k in range(self.frames)]
            clip = torch.from_numpy(read_frames(path, indices))
        except (DataError, RuntimeError, OSError, ValueError, av.FFmpegError) as err:
            missing = isinstance(err, FileNotFoundError) or not os.path.exists(path)
            sample["skip_reason"] = "missing" if missing else "unreadable"
            return sample
        if self.augment_epoch is not None:
            sample["frames"] = augment_clip(clip, self.resolution, generator)
        else:
            view = 0 if self.training else within
            sample["frames"] = resize_and_crop(clip, self.resolution, view, self.views[video])
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


def joined_probe_inputs(features: LayerFeatures, segments: int) -> tuple[dict, np.ndarray]:
    """({layer: rows of the probe inputs}, first item of each input): the `segments` consecutive
    rows of an input joined (JoinedRows), inputs with a clip that could not be read left out. The
    extracted arrays themselves when every input is one readable row."""
    valid = features.valid.reshape(-1, segments).all(axis=1)
    starts = np.flatnonzero(valid) * segments
    if segments == 1 and valid.all():
        return dict(features.feats), starts
    return {layer: JoinedRows(rows, starts, segments) for layer, rows in features.feats.items()}, starts


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
    augmentation = ("a random place for each clip in its partition + one RandomResizedCrop per clip, scale "
                    "(0.08, 1) ratio (3/4, 4/3), no flip (V-JEPA's frozen-evaluation training transform without "
                    "its RandAugment and random erasing)")

    def splits(self, ctx: RunContext, inputs: dict) -> tuple[Split, Split]:
        from totobench.data.kinetics import KineticsIndex
        ds = self.cfg.dataset
        frames, stride, resolution = inputs["frames"], inputs["stride"], inputs["resolution"]
        segments, views, samples = inputs["segments"], inputs["views"], inputs["train_clips_per_video"]
        train_index = KineticsIndex(ctx.data_root, ds.train_split, min_frames=frames)
        val_index = KineticsIndex(ctx.data_root, ds.val_split, min_frames=frames)
        limit_per_class(train_index, self.quick_limit("max_train_per_class", ctx.quick))
        limit_per_class(val_index, self.quick_limit("max_val_per_class", ctx.quick))
        if not train_index.videos or not val_index.videos:
            raise ConfigError(f"{ctx.data_root}: no usable videos in the train or val split")
        train = ClipViews(train_index, frames, stride, resolution, True, segments, 1, ctx.seed, samples)
        val = ClipViews(val_index, frames, stride, resolution, False, segments, views, ctx.seed)
        for clips in (train, val):
            dropped = [(path, reason) for reason, paths in clips.skipped_up_front.items() for path in paths]
            if ctx.strict and dropped:
                raise DataError(f"{dropped[0][0]}: {dropped[0][1]} (without --strict it is skipped and listed "
                                f"in the result)")
        transform = f"shortside-crop-{resolution}-f{frames}-s{stride}"
        kind, batch = "video" if frames > 1 else "image", max(1, ctx.batch_size // max(frames, 1))
        # frames of the token grid: a video model with tubelets gives frames / tubelet
        token_frames = ctx.backbone.token_grid(frames, resolution, resolution, kind)[0]
        info = {"num_classes": len(train_index.classes), "frames": frames, "token_frames": token_frames,
                "segments": segments}
        sampling = "vjepa2-segments"  # part of the cache key: clip places changed with the segments
        return (Split("train", train, {"dataset": train_index.fingerprint(), "split": "train", "clips": sampling,
                                       "views": f"random{samples}x{segments}seg", "seed": ctx.seed,
                                       "transform": transform, "n": len(train)}, kind, batch, dict(info)),
                Split("val", val, {"dataset": val_index.fingerprint(), "split": "val", "clips": sampling,
                                   "views": f"{segments}seg-x{views}views", "transform": transform, "n": len(val)},
                      kind, batch, dict(info)))

    def augmented(self, split: Split, epoch: int, seed: int) -> Dataset:
        """The train split's items for epoch `epoch`, augmented: the same items in the same order as
        `split.dataset` (`segments` consecutive items per probe input), each clip at a random place in
        its partition with its own RandomResizedCrop, drawn from (seed, epoch, item index)."""
        return split.dataset.for_epoch(epoch, seed)

    def views_per_entry(self, split: str, inputs: dict) -> int:
        """Extractor items per video (for estimates): segments x training inputs, or segments x views
        (every video counted as non-square)."""
        per_input = inputs["train_clips_per_video"] if split == "train" else inputs["views"]
        return int(inputs["segments"]) * int(per_input)

    def probe_data(self, split: Split, features: LayerFeatures) -> ProbeData:
        """One probe input per run of `segments` items (JoinedRows), its label and video (targets, for
        averaging the views' scores). A streamed split (tasks/streaming.py) takes these labels and
        targets, and joins the same runs as it reads them (features.stream.StreamedRows)."""
        segments = split.info["segments"]
        grid = clip_token_grid(features, split.info["token_frames"])
        feats, starts = joined_probe_inputs(features, segments)
        return ProbeData(feats=feats, labels=features.labels[starts], num_classes=split.info["num_classes"],
                         # the joined segments' frames follow each other on the grid's time axis
                         token_grid=(grid[0] * segments, grid[1], grid[2]) if grid else None,
                         targets=features.groups[starts])

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
        views = sorted(set(val.dataset.views))
        return {"eval_views": f"{self.cfg.input.segments} segment(s) joined x {'/'.join(map(str, views))} "
                              f"spatial view(s), softmax scores averaged over views",
                "num_train_videos": len(train.dataset.videos), "num_val_videos": len(val.dataset.videos),
                "num_classes": train.info["num_classes"],
                "token_grid": list(train_data.token_grid) if train_data.token_grid else None,
                "augmentation": self.augmentation if getattr(self.cfg.probe, "augment", False) else "none"}

    def fingerprint(self, train: Split, val: Split) -> str:
        return f"{train.key['dataset']}+{val.key['dataset']}"

    def deviations(self, spec, inputs: dict, ctx: RunContext) -> list[str]:
        out = super().deviations(spec, inputs, ctx)
        model = ctx.backbone.inputs
        if (inputs["frames"], inputs["stride"]) != (model.num_frames, model.frame_stride):
            out.append(f"clips of {inputs['frames']} frame(s) every {inputs['stride']}, not the model's own "
                       f"{model.num_frames} every {model.frame_stride}: a control")
        if inputs["segments"] != REFERENCE_SEGMENTS:
            out.append(f"{inputs['segments']} segment(s) per probe input; V-JEPA 2's frozen evaluation joins "
                       f"{REFERENCE_SEGMENTS} (fewer: cheaper)")
        if inputs["views"] != REFERENCE_VIEWS:
            out.append(f"{inputs['views']} spatial view(s) of a non-square video; V-JEPA 2 averages {REFERENCE_VIEWS}")
        if getattr(spec, "augment", False):
            out.append("training augmentation without V-JEPA's RandAugment (rand-m7-n4-mstd0.5-inc1) and random "
                       "erasing (p 0.25)")
        return out
