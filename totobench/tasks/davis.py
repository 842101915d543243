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

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from totobench.errors import ConfigError
from totobench.features.extract import extract_features, progress_bar
from totobench.tasks.base import LayerRow, RunContext, Task, TaskOutput, register_task

PROPAGATION_DEFAULTS = {"context": 20, "radius": 12, "topk": 10, "temperature": 0.05}
REPORTED = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def input_size(height: int, width: int, resolution: int, keep_aspect: bool, patch: int) -> tuple[int, int]:
    """The (H, W) frames are resized to: resolution x resolution, or with keep_aspect the short
    side at `resolution` and the long side scaled alike, rounded to a multiple of the patch size."""
    if not keep_aspect:
        return resolution, resolution
    scale = resolution / min(height, width)
    snap = lambda v: max(patch, int(round(v * scale / patch)) * patch)  # noqa: E731
    return snap(height), snap(width)


def frames_to_model_input(frames: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 1, 3, h, w] in [0, 1] ((h, w) = size, or size x size; the
    labels are mapped back to H x W afterwards)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2).float().div_(255)  # a writable copy
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.clamp_(0, 1).unsqueeze(1)


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
    p = backbone.config.patch_size
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
            self._last = (frame, frames_to_model_input(self.data.load_frame(self.seq, frame)[None], self.size)[0])
        return self._last[1]

    def __len__(self):
        return self.num_frames * len(self.boxes)

    def __getitem__(self, i):
        frame, box = divmod(i, len(self.boxes))
        y, x, th, tw = self.boxes[box]
        crop = self._resized(frame)[..., y:y + th, x:x + tw].mul(255).round().to(torch.uint8)
        return {"frames": crop, "label": 0, "index": i, "group": frame, "path": f"{self.seq}/{frame}",
                "skip_reason": None}


@register_task("label_propagation")
class DavisLabelPropagation(Task):

    def run(self, ctx: RunContext) -> TaskOutput:
        from totobench.data.davis import DavisDataset
        from totobench.metrics.davis import evaluate_davis, write_indexed_png
        from totobench.probes.label_propagation import (label_propagation, mask_to_soft_labels,
                                                         soft_labels_to_mask)
        ds = self.cfg["dataset"]
        split = ds.get("val_split", "val")
        data = DavisDataset(ctx.data_root, split, resolution=ds.get("resolution_folder"))
        sequences = data.sequences[: self.quick_limit("max_sequences", ctx.quick, 2)]
        params = {**PROPAGATION_DEFAULTS, **{k: v for k, v in self.cfg.get("probe", {}).items() if k != "name"}}
        inp = self.cfg.get("input", {})
        model_res, patch = ctx.backbone.config.resolution, ctx.backbone.config.patch_size
        # the short side the frames are resized to: input.resolution, else input.scale x the model's
        resolution = inp.get("resolution") or int(round(float(inp.get("scale", 1)) * model_res / patch)) * patch
        if resolution % patch:
            raise ConfigError(f"{self.name}: input.resolution must be a multiple of the patch size "
                              f"{patch}, got {resolution}")
        keep_aspect, tile = bool(inp.get("keep_aspect", False)), bool(inp.get("tile", False))
        window = model_res if tile else None
        fingerprint = data.fingerprint()
        layer_dirs = {layer: ctx.artifacts_dir / f"layer_{layer:02d}" for layer in ctx.layers}
        t_feat = t_prop = 0.0
        with progress_bar(ctx.console) as progress:
            job = progress.add_task(f"{self.name} sequences", total=len(sequences), rate="")
            for seq in sequences:
                names = data.frame_names(seq)
                first = data.load_mask(seq, 0)
                num_labels = data.num_objects(seq) + 1
                height, width = first.shape
                t0 = time.perf_counter()
                size = input_size(height, width, resolution, keep_aspect, patch)
                boxes = tile_boxes(*size, window, patch)
                tiles = extract_features(
                    ctx.backbone, DavisTiles(data, seq, size, boxes), ctx.layers, kind="image", pooling="tokens",
                    cache=ctx.cache, batch_size=ctx.batch_size, num_workers=ctx.num_workers, device=ctx.device,
                    console=None, desc=f"{self.name} {seq}",
                    key_parts={"transform": f"davis-{size[0]}x{size[1]}-tiles{boxes}", "sequence": seq,
                               "dataset": fingerprint, "frames": len(names)})
                feats = {layer: stitch_tiles(torch.from_numpy(np.array(tiles.feats[layer], dtype=np.float32)).reshape(
                    len(names), len(boxes), -1, ctx.backbone.dim), boxes, *size, patch) for layer in ctx.layers}
                t1 = time.perf_counter()
                for layer in ctx.layers:
                    grid = tuple(feats[layer].shape[1:3])
                    soft = label_propagation(feats[layer], mask_to_soft_labels(first, num_labels, grid), **params)
                    out_dir = layer_dirs[layer] / seq
                    out_dir.mkdir(parents=True, exist_ok=True)
                    for i, name in enumerate(names):
                        mask = first if i == 0 else soft_labels_to_mask(soft[i], (height, width))
                        write_indexed_png(out_dir / f"{name}.png", mask)
                t_feat += t1 - t0
                t_prop += time.perf_counter() - t1
                progress.update(job, advance=1)
        t0 = time.perf_counter()
        rows = []
        for layer in ctx.layers:
            scores = evaluate_davis(ctx.data_root, layer_dirs[layer], split, sequences=sequences,
                                    resolution=data.resolution)
            rows.append(LayerRow(layer=layer, metrics={k: scores[k] for k in REPORTED}))
        protocol = {"probe": "label_propagation", "grid": {}, "settings": params, "resolution": resolution,
                    "keep_aspect": keep_aspect, "tile": tile, "feature_grid": list(grid),
                    "selection_split": "none (no training)", "report_split": split, "seed": ctx.seed,
                    "num_sequences": len(sequences), "results_dirs": {str(l): str(p) for l, p in layer_dirs.items()}}
        return TaskOutput(per_layer=rows, protocol=protocol, dataset_fingerprint=fingerprint,
                          timing_s={"extract": t_feat, "propagate": t_prop,
                                    "evaluate": time.perf_counter() - t0})
