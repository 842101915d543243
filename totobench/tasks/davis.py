"""DAVIS-2017 semi-supervised video object segmentation by label propagation (no training).

Every frame is resized (to the model's resolution, or larger: `input.resolution`, `keep_aspect`,
`tile`) and read as an image; the patch features of
each requested layer propagate the first frame's ground truth through the video (the space-time
correspondence protocol: first frame + previous frames, spatial radius, top-k, temperature).
Soft labels are upsampled to the frame's original size, turned into indexed PNGs in the DAVIS
results layout (one folder per layer) and scored with the official J&F rules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from totobench.data.preprocess import resize_to
from totobench.errors import ConfigError, DataError
from totobench.features.estimate import TaskEstimate, split_estimate
from totobench.features.extract import extract_features
from totobench.probes.base import SOFT_MASKS, ProbeData
from totobench.paths import portable_path
from totobench.progress import progress_bar
from totobench.tasks.base import DatasetSpec, Evaluation, InputSpec, LayerRow, QuickSpec, RunContext, Task
REPORTED = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def input_size(height: int, width: int, resolution: int, keep_aspect: bool, patch: int) -> tuple[int, int]:
    """The (H, W) frames are resized to: resolution x resolution, or with keep_aspect the short
    side at `resolution` and the long side scaled alike, rounded to a multiple of the patch size."""
    if not keep_aspect:
        return resolution, resolution
    scale = resolution / min(height, width)
    snap = lambda v: max(patch, int(round(v * scale / patch)) * patch)  # noqa: E731
    return snap(height), snap(width)


def window_starts(length: int, window: int, patch: int) -> list[int]:
    """Fewest window offsets (multiples of `patch`) whose windows of `window` pixels cover `length`
    pixels, spread evenly, the last one flush with the end."""
    if length <= window:
        return [0]
    n = -(-length // window)
    return sorted({int(round(i * (length - window) / (n - 1) / patch)) * patch for i in range(n)})


def tile_boxes(height: int, width: int, window: int | None, patch: int) -> list[tuple[int, int, int, int]]:
    """(y, x, h, w) pixel boxes the model reads a frame of height x width through: the whole frame
    (window None, or the frame is one window), or window x window tiles covering it."""
    if window is None or (height == window and width == window):
        return [(0, 0, height, width)]
    return [(y, x, min(window, height), min(window, width))
            for y in window_starts(height, window, patch) for x in window_starts(width, window, patch)]


def stitch_tiles(tiles: torch.Tensor, boxes: list, height: int, width: int, patch: int) -> torch.Tensor:
    """tiles [T, num_boxes, th*tw, D] (token features of each box, raster order) -> [T, h, w, D]
    with h = height / patch; cells seen by several boxes get the mean of their features."""
    T, D = tiles.shape[0], tiles.shape[-1]
    out = torch.zeros(T, height // patch, width // patch, D)
    count = torch.zeros(height // patch, width // patch, 1)
    for j, (y, x, th, tw) in enumerate(boxes):
        cells = (slice(y // patch, (y + th) // patch), slice(x // patch, (x + tw) // patch))
        out[:, cells[0], cells[1]] += tiles[:, j].reshape(T, th // patch, tw // patch, D).float()
        count[cells] += 1
    return out / count


@torch.inference_mode()
def sequence_features(backbone, frames: torch.Tensor, layers: list[int], batch_size: int,
                      device: torch.device, window: int | None = None) -> dict[int, torch.Tensor]:
    """Per-frame patch features {layer: [T, h, w, D]} of frames [T, 1, 3, H, W], h = H / patch,
    computed in memory (the task goes through the feature cache instead; same layout).

    Each frame is its own image sequence. window=None reads the whole frame as one sequence;
    window=R cuts it into R x R tiles (overlapping where R does not divide the frame), reads each
    tile as an image at the resolution the model was trained at, and stitches the tile grids
    (overlapping cells averaged): a fine feature grid without asking the model to read rows longer
    than it has seen."""
    p = backbone.inputs.patch_size
    T, _, _, H, W = frames.shape
    boxes = tile_boxes(H, W, window, p)
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for y, x, th, tw in boxes:
        crop = frames[..., y:y + th, x:x + tw]
        per_box = {layer: [] for layer in layers}
        for chunk in crop.split(batch_size):
            for layer, f in zip(layers, backbone.forward_frames(chunk.to(device), layers, kind="image")):
                per_box[layer].append(f[:, 0].float().cpu())
        for layer in layers:
            parts[layer].append(torch.cat(per_box[layer]))
    return {layer: stitch_tiles(torch.stack(parts[layer], 1), boxes, H, W, p) for layer in layers}


class DavisTiles(Dataset):
    """Extractor items of one DAVIS sequence: every (frame, tile box) pair, frame-major, as uint8
    [1, 3, th, tw] crops of the frame resized to `size` (each read as its own image)."""
    yields_dicts = True

    def __init__(self, data, seq: str, size: tuple[int, int], boxes: list):
        self.data, self.seq, self.size, self.boxes = data, seq, size, boxes
        self.num_frames = len(data.frame_names(seq))
        self._last: tuple[int, torch.Tensor] | None = None  # items are frame-major: decode each frame once

    def _resized(self, frame: int) -> torch.Tensor:
        if self._last is None or self._last[0] != frame:
            self._last = (frame, resize_to(self.data.load_frame(self.seq, frame)[None], self.size))
        return self._last[1]

    def __len__(self):
        return self.num_frames * len(self.boxes)

    def __getitem__(self, i):
        frame, box = divmod(i, len(self.boxes))
        y, x, th, tw = self.boxes[box]
        crop = self._resized(frame)[..., y:y + th, x:x + tw].mul(255).round().to(torch.uint8)
        return {"frames": crop, "label": 0, "index": i, "group": frame, "path": f"{self.seq}/{frame}",
                "skip_reason": None}


@dataclass(frozen=True)
class DavisDatasetSpec(DatasetSpec):
    format: str = "davis"
    resolution_folder: str | None = None     # null: the only folder under JPEGImages/ (e.g. 480p)


@dataclass(frozen=True)
class DavisInput(InputSpec):
    """resolution: the short side frames are resized to (a multiple of the patch size); null:
    `scale` x the model's resolution (the paper reads DAVIS at 256 px with 128 px models: 2x)."""
    scale: float = field(default=2.0, metadata={"gt": 0})
    keep_aspect: bool = True       # false: squash every frame to a square
    tile: bool | None = None       # true: read the frame through tiles at the model's resolution, stitch the
                                   # grids; null: the whole frame, or tiles for a model with a fixed size


@dataclass(frozen=True)
class DavisQuick(QuickSpec):
    max_sequences: int = field(default=2, metadata={"min": 1})


class DavisLabelPropagation(Task):
    kind = "label_propagation"
    Dataset = DavisDatasetSpec
    Input = DavisInput
    Quick = DavisQuick
    consumes = SOFT_MASKS
    default_probe = "label_propagation"

    @classmethod
    def metric_names(cls, cfg) -> tuple[str, ...]:
        return REPORTED

    def resolve_input(self, backbone) -> dict:
        inputs = super().resolve_input(backbone)
        model_res, patch = backbone.inputs.resolution, backbone.inputs.patch_size
        if self.cfg.input.resolution is None:
            inputs["resolution"] = int(round(self.cfg.input.scale * model_res / patch)) * patch
        if inputs["resolution"] % patch:
            raise ConfigError(f"{self.cfg.path}: input.resolution must be a multiple of the patch size "
                              f"{patch}, got {inputs['resolution']}")
        if inputs["tile"] is None:
            inputs["tile"] = backbone.inputs.fixed_size
        if backbone.inputs.fixed_size and not inputs["tile"]:
            raise ConfigError(f"{self.cfg.path}: input.tile is false, but {backbone.name} reads only "
                              f"{model_res}x{model_res} frames; set input.tile to true")
        return inputs

    def deviations(self, spec, inputs: dict, ctx: RunContext) -> list[str]:
        out = super().deviations(spec, inputs, ctx)
        r = ctx.backbone.inputs.resolution
        if inputs["resolution"] != 2 * r:
            out.append(f"frames read at {inputs['resolution']} px (short side); the paper reads 256 px with "
                       f"128 px models: 2x the model's resolution, {2 * r} px here")
        if inputs["tile"]:
            out.append(f"each frame read as {r} x {r} tiles (each its own sequence) whose token grids are "
                       f"stitched; the paper reads the whole frame")
        if not inputs["keep_aspect"]:
            out.append("frames squashed to squares (the paper keeps the aspect ratio)")
        return out

    def estimate(self, ctx: RunContext, inputs: dict, spec) -> TaskEstimate:
        """Every frame (or tile) of the val sequences, read as an image and stored per sequence; nothing
        trains, so nothing streams. Frame sizes come from each sequence's first mask (annotations
        only); `dataset.size` (val frames) replaces the frame count, the sequences' sizes kept."""
        from totobench.data.davis import DavisDataset
        data = DavisDataset(ctx.data_root, self.cfg.dataset.val_split, resolution=self.cfg.dataset.resolution_folder)
        patch = ctx.backbone.inputs.patch_size
        window = ctx.backbone.inputs.resolution if inputs["tile"] else None
        items: dict[tuple[int, int], int] = {}     # (tile height, tile width) -> tiles to read
        frames = 0
        for seq in data.sequences[: self.quick_limit("max_sequences", ctx.quick)]:
            n = len(data.frame_names(seq))
            size = input_size(*data.load_mask(seq, 0).shape, inputs["resolution"], inputs["keep_aspect"], patch)
            for _, _, th, tw in tile_boxes(*size, window, patch):
                items[(th, tw)] = items.get((th, tw), 0) + n
            frames += n
        size = self.cfg.dataset.size
        wanted = size if isinstance(size, int) else (size[-1] if size else None)
        scale = wanted / frames if wanted is not None and frames else 1.0
        splits = [split_estimate(ctx.backbone, ctx.layers, "val", round(n * scale), 1, th, tw, "image", spec.pooling)
                  for (th, tw), n in items.items()]
        return TaskEstimate.of(self.name, splits, ctx.cache_budget, streamable=False)

    def evaluate(self, ctx: RunContext, inputs: dict, spec) -> Evaluation:
        from totobench.data.davis import DavisDataset
        from totobench.metrics.davis import evaluate_davis
        split = self.cfg.dataset.val_split
        data = DavisDataset(ctx.data_root, split, resolution=self.cfg.dataset.resolution_folder)
        sequences = data.sequences[: self.quick_limit("max_sequences", ctx.quick)]
        layer_dirs = {layer: ctx.artifacts_dir / f"layer_{layer:02d}" for layer in ctx.layers}
        timing = {"extract": 0.0, "propagate": 0.0}
        skipped: dict[str, str] = {}    # sequence -> why (an unreadable frame or mask)
        grid = None
        with progress_bar(ctx.console) as progress:
            job = progress.add_task(f"{self.name} sequences", total=len(sequences), rate="")
            for seq in sequences:
                try:
                    grid = self._propagate(ctx, data, seq, inputs, spec, layer_dirs, timing)
                except DataError as err:
                    if ctx.strict:
                        raise DataError(f"{err} (without --strict the sequence is skipped and listed)") from None
                    skipped[seq] = str(err)
                progress.update(job, advance=1)
        sequences = [seq for seq in sequences if seq not in skipped]
        if not sequences:
            raise DataError(f"{ctx.data_root}: no DAVIS sequence could be read ({next(iter(skipped.values()))})")
        if skipped:
            ctx.console.print(f"[yellow]skipped {len(skipped)} unreadable sequence(s) (listed in the result file)[/]")
        t0 = time.perf_counter()
        rows = []
        for layer in ctx.layers:
            scores = evaluate_davis(ctx.data_root, layer_dirs[layer], split, sequences=sequences,
                                    resolution=data.resolution)
            rows.append(LayerRow(layer=layer, metrics={k: scores[k] for k in REPORTED}))
        timing["evaluate"] = time.perf_counter() - t0
        facts = {"feature_grid": list(grid), "num_sequences": len(sequences),
                 "results_dirs": {str(l): portable_path(p) for l, p in layer_dirs.items()}}
        extra = {"skipped": {"val": skipped}, "num_skipped": {"val": len(skipped)}}
        return Evaluation(rows=rows, fingerprint=data.fingerprint(), facts=facts, extra=extra, timing=timing)

    def _propagate(self, ctx: RunContext, data, seq: str, inputs: dict, spec, layer_dirs: dict,
                   timing: dict) -> tuple[int, int]:
        """Features of one sequence (through the cache), its masks propagated at every layer and
        written as indexed PNGs. Returns the feature grid (h, w)."""
        from totobench.metrics.davis import write_indexed_png
        from totobench.probes.label_propagation import mask_to_soft_labels, soft_labels_to_mask
        patch = ctx.backbone.inputs.patch_size
        window = ctx.backbone.inputs.resolution if inputs["tile"] else None
        names = data.frame_names(seq)
        first = data.load_mask(seq, 0)
        height, width = first.shape
        t0 = time.perf_counter()
        size = input_size(height, width, inputs["resolution"], inputs["keep_aspect"], patch)
        boxes = tile_boxes(*size, window, patch)
        tiles = extract_features(
            ctx.backbone, DavisTiles(data, seq, size, boxes), ctx.layers, kind="image", pooling=spec.pooling,
            cache=ctx.cache, batch_size=ctx.batch_size, num_workers=ctx.num_workers, device=ctx.device,
            console=None, desc=f"{self.name} {seq}",
            key_parts={"transform": f"davis-{size[0]}x{size[1]}-tiles{boxes}", "sequence": seq,
                       "dataset": data.fingerprint(), "frames": len(names)})
        feats = {layer: stitch_tiles(torch.from_numpy(np.array(tiles.feats[layer], dtype=np.float32)).reshape(
            len(names), len(boxes), -1, ctx.backbone.dim), boxes, *size, patch) for layer in ctx.layers}
        t1 = time.perf_counter()
        grid = tuple(next(iter(feats.values())).shape[1:3])
        first_labels = mask_to_soft_labels(first, data.num_objects(seq) + 1, grid)
        results = self.probe.fit(None, ProbeData(feats=feats, targets=first_labels), spec, self.probe_context(ctx))
        for layer, result in results.items():
            out_dir = layer_dirs[layer] / seq
            out_dir.mkdir(parents=True, exist_ok=True)
            for i, name in enumerate(names):
                mask = first if i == 0 else soft_labels_to_mask(result.outputs[i], (height, width))
                write_indexed_png(out_dir / f"{name}.png", mask)
        timing["extract"] += t1 - t0
        timing["propagate"] += time.perf_counter() - t1
        return grid
