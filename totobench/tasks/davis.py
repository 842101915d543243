"""DAVIS-2017 semi-supervised video object segmentation by label propagation (no training).

Every frame is resized to the model's input size and read as an image; the patch features of
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

from totobench.features.extract import progress_bar
from totobench.tasks.base import LayerRow, RunContext, Task, TaskOutput, register_task

PROPAGATION_DEFAULTS = {"context": 20, "radius": 12, "topk": 10, "temperature": 0.05}
REPORTED = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def frames_to_model_input(frames: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 1, 3, R, R] in [0, 1] (aspect not kept: the labels are
    mapped back to H x W afterwards)."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255)
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp_(0, 1).unsqueeze(1)


@torch.inference_mode()
def sequence_features(backbone, frames: torch.Tensor, layers: list[int], batch_size: int,
                      device: torch.device) -> dict[int, torch.Tensor]:
    """Per-frame patch features {layer: [T, g, g, D]} (each frame its own image sequence)."""
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for chunk in frames.split(batch_size):
        feats = backbone.forward_frames(chunk.to(device), layers, kind="image")
        for layer, f in zip(layers, feats):
            b, _, hw, d = f.shape
            g = int(round(hw ** 0.5))
            out[layer].append(f[:, 0].reshape(b, g, g, d).float().cpu())
    return {layer: torch.cat(parts) for layer, parts in out.items()}


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
        resolution = self.cfg.get("input", {}).get("resolution") or ctx.backbone.config.resolution
        layer_dirs = {layer: ctx.artifacts_dir / f"layer_{layer:02d}" for layer in ctx.layers}
        t_feat = t_prop = 0.0
        with progress_bar(ctx.console) as progress:
            job = progress.add_task(f"{self.name} sequences", total=len(sequences), rate="")
            for seq in sequences:
                names = data.frame_names(seq)
                frames = np.stack([data.load_frame(seq, i) for i in range(len(names))])
                first = data.load_mask(seq, 0)
                num_labels = data.num_objects(seq) + 1
                height, width = first.shape
                t0 = time.perf_counter()
                feats = sequence_features(ctx.backbone, frames_to_model_input(frames, resolution),
                                          ctx.layers, ctx.batch_size, ctx.device)
                t1 = time.perf_counter()
                for layer in ctx.layers:
                    g = feats[layer].shape[1]
                    soft = label_propagation(feats[layer], mask_to_soft_labels(first, num_labels, (g, g)), **params)
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
                    "selection_split": "none (no training)", "report_split": split, "seed": ctx.seed,
                    "num_sequences": len(sequences), "results_dirs": {str(l): str(p) for l, p in layer_dirs.items()}}
        return TaskOutput(per_layer=rows, protocol=protocol, dataset_fingerprint=data.fingerprint(),
                          timing_s={"extract": t_feat, "propagate": t_prop,
                                    "evaluate": time.perf_counter() - t0})
