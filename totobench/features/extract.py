"""One-pass multi-layer feature extraction.

A dataset yields `(frames, label)` with frames [T, 3, R, R] (uint8 or float in [0, 1]) at the
model's resolution. Each batch goes through the backbone once and gives the token features of
every requested layer; these are pooled (mean over tokens) or kept whole (for attentive probes)
and written straight into float16 memory-mapped cache shards, so memory stays flat as the
dataset grows and a second run with the same key never touches the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from torch.utils.data import DataLoader, Dataset

from totobench.features.cache import FeatureCache, cache_key


def progress_bar(console: Console | None = None) -> Progress:
    """The progress bar every long loop uses: items, items/s and ETA."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=console, transient=False)


def _as_float_frames(frames: torch.Tensor) -> torch.Tensor:
    if frames.dtype == torch.uint8:
        return frames.float().div_(255.0)
    return frames.float()


def make_loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    """In-order loader; decoding runs in `num_workers` worker processes."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_indexed, persistent_workers=False, pin_memory=False)


class Indexed(Dataset):
    """Wrap a `(frames, label)` dataset so items also carry their position (for `collate_indexed`)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        frames, label = self.base[i]
        return {"frames": frames, "label": label, "index": i, "group": i, "path": None, "skip_reason": None}


def collate_indexed(samples: list[dict]) -> dict:
    """Batch dict items {frames, label, index, group, path, skip_reason}; items whose frames are
    None (a video that failed to decode) are dropped and listed under "skipped"."""
    good = [s for s in samples if s["frames"] is not None]
    batch = {"skipped": [(s["path"], s["skip_reason"]) for s in samples if s["frames"] is None]}
    for key in ("label", "index", "group"):
        batch[key] = torch.tensor([int(s[key]) for s in good], dtype=torch.long)
    batch["frames"] = torch.stack([torch.as_tensor(s["frames"]) for s in good]) if good else None
    return batch


@torch.inference_mode()
def iterate_layer_tokens(backbone, loader: DataLoader, layers: list[int], kind: str,
                         device: torch.device) -> Iterator[tuple[dict[int, torch.Tensor], dict]]:
    """Yield ({layer: tokens [B, T, h*w, D] float32 on device}, batch) per batch of a loader
    using `collate_indexed`; one backbone forward per batch for all layers. Batches whose items
    all failed to decode yield an empty dict of tokens."""
    for batch in loader:
        if batch["frames"] is None:
            yield {}, batch
            continue
        frames = _as_float_frames(batch["frames"]).to(device, non_blocking=True)
        outs = backbone.forward_frames(frames, layers, kind=kind)
        yield dict(zip(layers, outs)), batch


def pool_tokens(tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, h*w, D] -> "mean": [B, D]; "tokens": [B, T*h*w, D]; "last_frame": [B, h*w, D] of the last frame; "tokens_pool{k}": each frame's
    token grid average-pooled k x k first, [B, T*(h/k)*(w/k), D] (fewer tokens for attentive probes)."""
    if pooling == "mean":
        return tokens.mean(dim=(1, 2))
    if pooling == "tokens":
        return tokens.flatten(1, 2)
    if pooling == "last_frame":
        return tokens[:, -1]
    if pooling.startswith("tokens_pool"):
        k = int(pooling.removeprefix("tokens_pool"))
        b, t, n, d = tokens.shape
        side = int(round(n ** 0.5))
        grid = tokens.reshape(b * t, side, side, d).permute(0, 3, 1, 2)
        pooled = torch.nn.functional.avg_pool2d(grid, k)
        return pooled.permute(0, 2, 3, 1).reshape(b, -1, d)
    raise ValueError(f"unknown pooling {pooling!r} (expected 'mean', 'tokens' or 'tokens_pool<k>')")


@dataclass
class LayerFeatures:
    """Features of one dataset split: {layer: [N, ...] float16 memmap}, labels [N] (-1 where the
    item could not be decoded), groups [N] (e.g. the video of a clip) and the skipped items."""
    feats: dict[int, np.ndarray]
    labels: np.ndarray
    groups: np.ndarray
    from_cache: bool
    skipped: list[tuple[str, str]]

    @property
    def valid(self) -> np.ndarray:
        return self.labels >= 0


def extract_features(backbone, dataset: Dataset, layers: list[int], *, kind: str, pooling: str,
                     cache: FeatureCache, key_parts: dict, batch_size: int = 64,
                     num_workers: int = 0, device: torch.device | str = "cpu",
                     console: Console | None = None, desc: str = "extract") -> LayerFeatures:
    """Pooled features of every layer for the whole dataset, from the cache when all shards hit.

    `dataset` yields dict items (see `collate_indexed`) or `(frames, label)` pairs. Only the
    layers whose shard is missing are recomputed, in one pass that stops after the deepest of
    them. `key_parts` must identify the dataset split and transform; the checkpoint sha256,
    pooling and layer are added here.
    """
    device = torch.device(device)
    base = dict(key_parts, checkpoint=backbone.sha256, pooling=pooling)
    keys = {layer: cache_key(**base, layer=layer) for layer in layers}
    meta_key = cache_key(**base, what="labels-groups")
    feats = {layer: cache.load(keys[layer]) for layer in layers}
    meta = cache.load(meta_key)
    skipped_record = cache.load_json(meta_key)
    missing = [layer for layer in layers if feats[layer] is None]
    if not missing and meta is not None and skipped_record is not None:
        meta = np.asarray(meta)
        return LayerFeatures(feats, meta[:, 0], meta[:, 1], from_cache=True,
                             skipped=[tuple(s) for s in skipped_record])

    n = len(dataset)
    writers = {}
    meta_buf = np.full((n, 2), -1, dtype=np.int64)
    skipped: list[tuple[str, str]] = []
    items = dataset if _yields_dicts(dataset) else Indexed(dataset)
    loader = make_loader(items, batch_size, num_workers)
    try:
        with progress_bar(console) as progress:
            job = progress.add_task(desc, total=n, rate="")
            for tokens, batch in iterate_layer_tokens(backbone, loader, missing, kind, device):
                index = batch["index"].numpy()
                for layer in missing if tokens else []:
                    pooled = pool_tokens(tokens[layer], pooling).to("cpu", torch.float16).numpy()
                    if layer not in writers:
                        writers[layer] = cache.writer(keys[layer], (n,) + pooled.shape[1:])
                    writers[layer].array[index] = pooled
                meta_buf[index, 0] = batch["label"].numpy()
                meta_buf[index, 1] = batch["group"].numpy()
                skipped.extend(batch["skipped"])
                speed = progress.tasks[0].speed
                progress.update(job, advance=len(index) + len(batch["skipped"]),
                                rate=f"{speed:.1f} items/s" if speed else "")
        for layer in missing:
            if layer not in writers:  # nothing decodable at all
                writers[layer] = cache.writer(keys[layer], (n, backbone.dim))
            feats[layer] = writers.pop(layer).commit()
    finally:
        for w in writers.values():
            w.abort()
    meta = np.asarray(cache.save(meta_key, meta_buf))
    cache.save_json(meta_key, skipped)
    return LayerFeatures(feats, meta[:, 0], meta[:, 1], from_cache=False, skipped=skipped)


def _yields_dicts(dataset: Dataset) -> bool:
    return getattr(dataset, "yields_dicts", False)
