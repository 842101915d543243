"""One-pass multi-layer feature extraction.

A dataset yields `(frames, label)` with frames [T, 3, R, R] (uint8 or float in [0, 1]) at the
model's resolution. Each batch goes through the backbone once and gives the token features of
every requested layer; these are pooled (mean over tokens) or kept whole (for attentive probes)
and written straight into float16 memory-mapped cache shards, so memory stays flat as the
dataset grows and a second run with the same key never touches the backbone.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader, Dataset

from totobench import parallel
from totobench.progress import progress_bar
from totobench.data.preprocess import to_unit_float
from totobench.features import distributed
from totobench.features.cache import DISK_FULL, FeatureCache, cache_key, write_error


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
        frames = to_unit_float(batch["frames"]).to(device, non_blocking=True)
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

    The pass runs in chunks of whole batches, each committed to the cache as it completes, so a
    killed run resumes at the first missing chunk. Under torchrun the chunks are shared out
    among the ranks (see totobench.features.distributed; the other ranks run `serve_extraction`)
    and assembled here by dataset index.
    Raises CacheWriteError (one line, temporary files removed) when the disk fills up.
    """
    device = torch.device(device)
    if cache is None or not cache.enabled:  # no cache wanted: chunks still go through a private folder
        with tempfile.TemporaryDirectory(prefix="totobench-features-") as tmp:
            return extract_features(backbone, dataset, layers, kind=kind, pooling=pooling,
                                    cache=FeatureCache(Path(tmp)), key_parts=key_parts,
                                    batch_size=batch_size, num_workers=num_workers, device=device,
                                    console=console, desc=desc)  # memmaps outlive the unlinked files
    base = dict(key_parts, checkpoint=getattr(backbone, "features_id", backbone.sha256), pooling=pooling)
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

    rank_info = parallel.info()
    items = dataset if _yields_dicts(dataset) else Indexed(dataset)
    n = len(items)
    shared = rank_info.active and distributed.picklable(items)
    world = rank_info.world_size if shared else 1
    job = {"op": "extract", "items": items, "layers": missing, "kind": kind, "pooling": pooling,
           "base": base, "chunks": plan_chunks(n, batch_size), "batch_size": batch_size,
           "num_workers": num_workers, "cache_root": str(cache.root), "desc": desc}
    cache.remove_stale_temp()
    if shared:
        distributed.send_job(job)
    try:
        report = run_extraction_job(backbone, job, device, rank=0, world_size=world, console=console)
    except Exception as err:  # noqa: BLE001 - the other ranks must still reach the gather
        if shared:
            distributed.send_report(distributed.failure_report(err))
        raise
    reports = distributed.collect_reports(report) if shared else [report]  # raises a rank's failure
    reused = sum(r["reused"] for r in reports)
    if console is not None and shared:
        console.print(f"[dim]{desc}: chunks computed per rank {[r['computed'] for r in reports]}[/]")
    if console is not None and reused:
        console.print(f"[dim]{desc}: resumed, {reused} of {len(job['chunks'])} chunks were already in the cache[/]")
    return _assemble(cache, job, keys, meta_key, feats, n, backbone.dim)


MIN_CHUNKS = 8  # a split is cut in at least this many chunks (when it has the batches): work for 8 ranks


def plan_chunks(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] item ranges made of whole batches of `batch_size`, at most
    chunk_batches() batches each, and at least MIN_CHUNKS of them when there are that many
    batches. Whole batches: every rank sees the batches one process would, so the numbers are
    the same; independent of the world size: a run killed under torchrun resumes in one process."""
    num_batches = -(-n // batch_size)
    per = max(1, min(chunk_batches(), -(-num_batches // MIN_CHUNKS)))
    return [(b * batch_size, min(n, (b + per) * batch_size)) for b in range(0, num_batches, per)]


def chunk_batches() -> int:
    """Batches per committed chunk ($TOTOBENCH_CHUNK_BATCHES, default 8): what a killed run loses at most."""
    return max(1, int(os.environ.get("TOTOBENCH_CHUNK_BATCHES", "8")))


def _chunk_keys(base: dict, layers: list[int], chunk: tuple[int, int]) -> tuple[dict[int, str], str]:
    span = f"{chunk[0]}:{chunk[1]}"
    return ({layer: cache_key(**base, layer=layer, chunk=span) for layer in layers},
            cache_key(**base, what="labels-groups", chunk=span))


def _chunk_done(cache: FeatureCache, base: dict, layers: list[int], chunk: tuple[int, int]) -> bool:
    keys, meta_key = _chunk_keys(base, layers, chunk)
    record = cache.load_json(meta_key)
    if record is None or cache.load(meta_key) is None:
        return False
    return record.get("row_shape") is None or all(cache.load(k) is not None for k in keys.values())


def serve_extraction(backbone, device: torch.device) -> int:
    """Ranks > 0 under torchrun: run the extraction jobs rank 0 sends until it sends STOP; returns 0."""
    rank_info = parallel.info()
    while (job := distributed.receive_job()) is not None:
        try:
            report = run_extraction_job(backbone, job, device, rank=rank_info.rank,
                                        world_size=rank_info.world_size)
        except Exception as err:  # noqa: BLE001 - reported to rank 0, which raises it as one line
            report = distributed.failure_report(err)
        distributed.send_report(report)
    return 0


def run_extraction_job(backbone, job: dict, device: torch.device, *, rank: int = 0, world_size: int = 1,
                       console: Console | None = None) -> dict:
    """Extract this rank's chunks of a job (chunk i goes to rank i % world_size) into cache
    entries, skipping chunks already there. Returns {"computed": k, "reused": k}."""
    cache = FeatureCache(Path(job["cache_root"]))
    base, layers, batch_size = job["base"], job["layers"], job["batch_size"]
    mine = [c for i, c in enumerate(job["chunks"]) if i % world_size == rank]
    todo = [c for c in mine if not _chunk_done(cache, base, layers, c)]
    report = {"computed": len(todo), "reused": len(mine) - len(todo)}
    if not todo:
        return report
    batches = [list(range(s, min(s + batch_size, stop))) for start, stop in todo
               for s in range(start, stop, batch_size)]
    loader = DataLoader(job["items"], batch_sampler=batches, num_workers=job["num_workers"],
                        collate_fn=collate_indexed, pin_memory=False)
    if rank > 0:
        console = Console(quiet=True)  # one progress display: rank 0's
    chunk_of = {s: c for c in todo for s in range(c[0], c[1], batch_size)}
    state = None  # the chunk being filled: writers, labels/groups, skipped items
    desc = job["desc"] if world_size == 1 else f"{job['desc']} (rank {rank})"
    try:
        with progress_bar(console) as progress:
            task = progress.add_task(desc, total=sum(stop - start for start, stop in todo), rate="")
            tokens_iter = iterate_layer_tokens(backbone, loader, layers, job["kind"], device)
            for batch_index, (tokens, batch) in zip(batches, tokens_iter):
                chunk = chunk_of[batch_index[0]]
                if state is None:
                    state = _ChunkState(chunk)
                state.add(cache, base, layers, tokens, batch, job["pooling"])
                if batch_index[-1] == chunk[1] - 1:
                    state.commit(cache, base, layers)
                    state = None
                speed = progress.tasks[0].speed
                progress.update(task, advance=len(batch_index), rate=f"{speed:.1f} items/s" if speed else "")
    except OSError as err:
        if err.errno in DISK_FULL:
            raise write_error(err, cache.root) from None
        raise
    finally:
        if state is not None:
            state.abort()
    return report


class _ChunkState:
    """Rows of one chunk being extracted: per-layer shard writers (made at the first decodable
    batch), labels/groups and skipped items; committed as cache entries once complete."""

    def __init__(self, chunk: tuple[int, int]):
        self.chunk = chunk
        self.writers = {}
        self.meta = np.full((chunk[1] - chunk[0], 2), -1, dtype=np.int64)
        self.skipped: list = []
        self.row_shape = None

    def add(self, cache, base, layers, tokens, batch, pooling) -> None:
        rows = batch["index"].numpy() - self.chunk[0]
        for layer in layers if tokens else []:
            pooled = pool_tokens(tokens[layer], pooling).to("cpu", torch.float16).numpy()
            if layer not in self.writers:
                keys, _ = _chunk_keys(base, layers, self.chunk)
                self.row_shape = list(pooled.shape[1:])
                self.writers[layer] = cache.writer(keys[layer], (len(self.meta),) + pooled.shape[1:])
            self.writers[layer].array[rows] = pooled
        self.meta[rows, 0] = batch["label"].numpy()
        self.meta[rows, 1] = batch["group"].numpy()
        self.skipped.extend(batch["skipped"])

    def commit(self, cache, base, layers) -> None:
        _, meta_key = _chunk_keys(base, layers, self.chunk)
        for layer, writer in list(self.writers.items()):
            writer.commit()
            del self.writers[layer]  # only once committed: a failed one is still aborted
        cache.save(meta_key, self.meta)
        cache.save_json(meta_key, {"skipped": self.skipped, "row_shape": self.row_shape})  # the chunk's done-mark

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


def _assemble(cache: FeatureCache, job: dict, keys: dict[int, str], meta_key: str,
              feats: dict, n: int, dim: int) -> LayerFeatures:
    """Copy the chunks of a finished job, by dataset index, into one shard per layer plus the
    labels/groups shard and the skipped record; then drop the chunk entries."""
    base, layers = job["base"], job["layers"]
    chunks = []
    for chunk in job["chunks"]:
        chunk_keys, chunk_meta_key = _chunk_keys(base, layers, chunk)
        record, meta = cache.load_json(chunk_meta_key), cache.load(chunk_meta_key)
        if record is None or meta is None:
            raise RuntimeError(f"feature chunk {chunk} of {job['desc']} is missing from {cache.root} after extraction")
        chunks.append((chunk, chunk_keys, chunk_meta_key, record, meta))
    shapes = [tuple(record["row_shape"]) for _, _, _, record, _ in chunks if record["row_shape"] is not None]
    row_shape = shapes[0] if shapes else (dim,)  # (dim,) when nothing at all could be decoded
    writers = {}
    meta_buf = np.full((n, 2), -1, dtype=np.int64)
    skipped = []
    try:
        for layer in layers:
            writers[layer] = cache.writer(keys[layer], (n,) + row_shape)
        for (start, stop), chunk_keys, _, record, meta in chunks:
            meta_buf[start:stop] = meta
            skipped.extend(tuple(s) for s in record["skipped"])
            if record["row_shape"] is None:
                continue  # nothing decodable in this chunk: its rows stay zero, labels -1
            for layer in layers:
                rows = cache.load(chunk_keys[layer])
                if rows is None:
                    raise RuntimeError(f"feature chunk {(start, stop)} of layer {layer} is corrupt in {cache.root}")
                writers[layer].array[start:stop] = rows
        for layer in layers:
            feats[layer] = writers[layer].commit()
            del writers[layer]
        meta = np.asarray(cache.save(meta_key, meta_buf))
        cache.save_json(meta_key, [list(s) for s in skipped])
    except OSError as err:
        if err.errno in DISK_FULL:
            raise write_error(err, cache.root) from None
        raise
    finally:
        for w in writers.values():
            w.abort()
    for _, chunk_keys, chunk_meta_key, _, _ in chunks:
        for key in (*chunk_keys.values(), chunk_meta_key):
            cache.delete(key)
    return LayerFeatures(feats, meta[:, 0], meta[:, 1], from_cache=False, skipped=skipped)


def _yields_dicts(dataset: Dataset) -> bool:
    return getattr(dataset, "yields_dicts", False)
