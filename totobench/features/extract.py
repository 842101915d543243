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
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader, Dataset

from totobench import parallel
from totobench.io import FileLock
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
    """Yield ({layer: token grids [B, T', h, w, D] float32 on device}, batch) per batch of a loader
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
    """Token grids [B, T, h, w, D] -> "mean": [B, D]; "tokens": [B, T*h*w, D] (raster order, frame
    after frame); "last_frame": [B, h*w, D] of the last frame; "tokens_pool{k}": each frame's grid
    average-pooled k x k first, [B, T*(h/k)*(w/k), D] (fewer tokens for attentive probes)."""
    if pooling == "mean":
        return tokens.mean(dim=(1, 2, 3))
    if pooling == "tokens":
        return tokens.flatten(1, 3)
    if pooling == "last_frame":
        return tokens[:, -1].flatten(1, 2)
    if pooling.startswith("tokens_pool"):
        k = int(pooling.removeprefix("tokens_pool"))
        b, t, h, w, d = tokens.shape
        grid = tokens.reshape(b * t, h, w, d).permute(0, 3, 1, 2)
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
    and assembled here by dataset index. Other processes may extract the same split into the
    same cache at the same time: chunks are shared out among them through their locks, and
    whoever merges first leaves the merged entries to the others.
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
    found = _load_split(cache, keys, meta_key, layers)
    if found is not None:
        return found
    items = dataset if _yields_dicts(dataset) else Indexed(dataset)
    cache.remove_stale_temp()
    for attempt in range(MERGE_ATTEMPTS):
        feats = {layer: cache.load(keys[layer]) for layer in layers}
        missing = [layer for layer in layers if feats[layer] is None]
        job = {"op": "extract", "items": items, "layers": missing or layers[:1], "kind": kind, "pooling": pooling,
               "base": base, "chunks": plan_chunks(len(items), batch_size), "batch_size": batch_size,
               "num_workers": num_workers, "cache_root": str(cache.root), "desc": desc,
               "merged_marks": _merged_marks(cache, [keys[layer] for layer in missing], meta_key)}
        if missing or attempt:  # every layer there but not labels/groups: first wait for whoever is merging them
            _run_job(backbone, job, device, console)
        assembled = _assemble(cache, job, keys, meta_key, feats, len(items), backbone.dim)
        if assembled is not None:
            return assembled
    raise RuntimeError(f"feature chunks of {desc} kept disappearing from {cache.root} before they could be "
                       f"merged ({MERGE_ATTEMPTS} attempts); is another program deleting files there?")


MERGE_ATTEMPTS = 3  # extract + merge rounds; a second one only when merged entries turned out missing or corrupt


def _load_split(cache: FeatureCache, keys: dict[int, str], meta_key: str, layers: list[int]) -> LayerFeatures | None:
    """The whole split from its merged entries, or None when one is missing or corrupt."""
    feats = {layer: cache.load(keys[layer]) for layer in layers}
    meta = cache.load(meta_key)
    skipped_record = cache.load_json(meta_key)
    if any(f is None for f in feats.values()) or meta is None or skipped_record is None:
        return None
    meta = np.asarray(meta)
    return LayerFeatures(feats, meta[:, 0], meta[:, 1], from_cache=True,
                         skipped=[tuple(s) for s in skipped_record])


def _merged_marks(cache: FeatureCache, keys: list[str], meta_key: str) -> list[str]:
    """The merged entries (of the missing layers, and labels/groups unless there) whose records, once
    all there, tell the extractors that another process has merged the split (then they stop
    extracting); [] when a missing layer's record is there but failed its check (it must be
    recomputed, so no record may cut the extraction short)."""
    if any(cache.committed(key) for key in keys):
        return []
    return [*keys, meta_key] if not cache.committed(meta_key) else list(keys)


def _run_job(backbone, job: dict, device: torch.device, console: Console | None) -> None:
    """Run an extraction job here, and under torchrun on every rank too; prints what was reused."""
    rank_info = parallel.info()
    shared = rank_info.active and distributed.picklable(job["items"])
    world = rank_info.world_size if shared else 1
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
        console.print(f"[dim]{job['desc']}: chunks computed per rank {[r['computed'] for r in reports]}[/]")
    if console is not None and reused:
        console.print(f"[dim]{job['desc']}: resumed, {reused} of {len(job['chunks'])} chunks were already "
                      f"in the cache[/]")


MIN_CHUNKS = 8  # a split is cut in at least this many chunks (when it has the batches): work for 8 ranks
WAIT_POLL_S = 0.2  # how often a process waiting for chunks another one extracts looks again


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
    """Keys of a chunk's entries: one per layer, and its labels/groups entry (whose JSON record is the
    chunk's done-mark), which is private to the job's layer set: a job extracting other layers of the
    same split merges and drops its own chunks without touching this job's."""
    span = f"{chunk[0]}:{chunk[1]}"
    return ({layer: cache_key(**base, layer=layer, chunk=span) for layer in layers},
            cache_key(**base, what="labels-groups", chunk=span, layers=list(layers)))


def _chunk_done(cache: FeatureCache, base: dict, layers: list[int], chunk: tuple[int, int]) -> bool:
    keys, meta_key = _chunk_keys(base, layers, chunk)
    record = cache.load_json(meta_key)
    if record is None or cache.load(meta_key) is None:
        return False
    return record.get("row_shape") is None or all(cache.load(k) is not None for k in keys.values())


def serve_extraction(backbone, device: torch.device) -> int:
    """Ranks > 0 under torchrun: run the jobs rank 0 sends (extraction, or a "run" job: see
    features.distributed) until it sends STOP; returns 0."""
    rank_info = parallel.info()
    while (job := distributed.receive_job()) is not None:
        try:
            if job.get("op") == "run":  # e.g. a streamed probe trained by every rank in step
                report = distributed.run_job(job, backbone, device)
            else:
                report = run_extraction_job(backbone, job, device, rank=rank_info.rank,
                                            world_size=rank_info.world_size)
        except Exception as err:  # noqa: BLE001 - reported to rank 0, which raises it as one line
            report = distributed.failure_report(err)
        distributed.send_report(report)
    return 0


def run_extraction_job(backbone, job: dict, device: torch.device, *, rank: int = 0, world_size: int = 1,
                       console: Console | None = None) -> dict:
    """Extract this rank's chunks of a job (chunk i goes to rank i % world_size) into cache
    entries, skipping chunks already there. A chunk another process is extracting (it holds the
    chunk's lock) is left to it and waited for once this rank's other chunks are done; the chunk of
    a holder that died is taken over. Stops early when another process has merged the whole split.
    Returns {"computed": k, "reused": k}."""
    cache = FeatureCache(Path(job["cache_root"]))
    mine = [c for i, c in enumerate(job["chunks"]) if i % world_size == rank]
    pending = [c for c in mine if not _chunk_done(cache, job["base"], job["layers"], c)]
    if rank > 0:
        console = Console(quiet=True)  # one progress display: rank 0's
    desc = job["desc"] if world_size == 1 else f"{job['desc']} (rank {rank})"
    computed, waiting_told = 0, False
    with progress_bar(console) as progress:
        task = progress.add_task(desc, total=sum(stop - start for start, stop in pending), rate="")
        while pending:
            claims = _ChunkClaims(cache, job, pending, on_skip=lambda k: progress.update(task, advance=k))
            if claims.first is not None:
                computed += _extract_claimed(backbone, job, claims, device, progress, task)
            elif claims.deferred and not claims.merged:
                if console is not None and not waiting_told:
                    console.print(f"[dim]{desc}: waiting for {len(claims.deferred)} chunks another process "
                                  f"is extracting[/]")
                    waiting_told = True
                time.sleep(WAIT_POLL_S)
            pending = [] if claims.merged else claims.deferred
    return {"computed": computed, "reused": len(mine) - computed}


class _ChunkClaims:
    """The batch sampler of one pass over a job's pending chunks. It claims a chunk (takes its lock)
    when the loader reaches it and yields its batches; a chunk another process holds is deferred to
    the next pass, one that another process finished meanwhile is skipped, and nothing more is
    claimed once another process has merged the whole split. Batches are remembered in the order
    they were handed out (`handed`), which is the order the loader returns them in."""

    def __init__(self, cache: FeatureCache, job: dict, pending: list[tuple[int, int]], on_skip):
        self.cache, self.job, self.on_skip = cache, job, on_skip
        self.todo = list(pending)
        self.deferred: list[tuple[int, int]] = []
        self.locks: dict[tuple[int, int], FileLock] = {}
        self.handed: deque[list[int]] = deque()
        self.merged = False
        self.first = self._claim_next()  # claimed before any loader exists: no loader when there is none

    def _claim_next(self) -> tuple[int, int] | None:
        base, layers, marks = self.job["base"], self.job["layers"], self.job.get("merged_marks", [])
        while self.todo:
            if marks and all(self.cache.committed(key) for key in marks):
                self.merged, self.todo = True, []
                return None
            chunk = self.todo.pop(0)
            lock = self.cache.claim(_chunk_keys(base, layers, chunk)[1])
            if lock is None:
                self.deferred.append(chunk)
            elif _chunk_done(self.cache, base, layers, chunk):
                lock.release()
                self.on_skip(chunk[1] - chunk[0])
            else:
                self.locks[chunk] = lock
                return chunk
        return None

    def __iter__(self) -> Iterator[list[int]]:
        chunk, self.first = self.first, None
        step = self.job["batch_size"]
        while chunk is not None:
            for start in range(chunk[0], chunk[1], step):
                self.handed.append(list(range(start, min(start + step, chunk[1]))))
                yield self.handed[-1]
            chunk = self._claim_next()

    def release(self, chunk: tuple[int, int]) -> None:
        lock = self.locks.pop(chunk, None)
        if lock is not None:
            lock.release()

    def close(self) -> None:
        for chunk in list(self.locks):
            self.release(chunk)


def _extract_claimed(backbone, job: dict, claims: _ChunkClaims, device: torch.device, progress, task) -> int:
    """Extract the chunks `claims` hands out, committing (then releasing) each as it completes;
    returns how many. Raises CacheWriteError when the disk fills up (the chunk in hand is dropped)."""
    cache = claims.cache
    base, layers = job["base"], job["layers"]
    loader = DataLoader(job["items"], batch_sampler=claims, num_workers=job["num_workers"],
                        collate_fn=collate_indexed, pin_memory=device.type == "cuda")  # faster host->GPU copies
    state = None  # the chunk being filled: writers, labels/groups, skipped items
    committed = 0
    try:
        for tokens, batch in iterate_layer_tokens(backbone, loader, layers, job["kind"], device):
            batch_index = claims.handed.popleft()
            if state is None:
                state = _ChunkState(next(c for c in claims.locks if c[0] <= batch_index[0] < c[1]))
            state.add(cache, base, layers, tokens, batch, job["pooling"])
            if batch_index[-1] == state.chunk[1] - 1:
                state.commit(cache, base, layers)
                claims.release(state.chunk)
                state, committed = None, committed + 1
            speed = progress.tasks[0].speed
            progress.update(task, advance=len(batch_index), rate=f"{speed:.1f} items/s" if speed else "")
    except OSError as err:
        if err.errno in DISK_FULL:
            raise write_error(err, cache.root) from None
        raise
    finally:
        if state is not None:
            state.abort()
        claims.close()
    return committed


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
              feats: dict, n: int, dim: int) -> LayerFeatures | None:
    """Merge the chunks of a finished job, by dataset index, into one entry per layer plus the
    labels/groups entry and the skipped record, then drop the chunk entries. This runs under the
    split's lock: one process merges at a time and no chunk is dropped while another merges it.
    Entries another process merged meanwhile are taken as they are. Returns None when a chunk
    this merge needs is gone (dropped by a merger whose entry then failed its check): extract again."""
    with cache.lock(meta_key):
        for layer in job["layers"]:
            feats[layer] = cache.load(keys[layer])
        need = [layer for layer in job["layers"] if feats[layer] is None]
        meta, skipped = cache.load(meta_key), cache.load_json(meta_key)
        if need or meta is None or skipped is None:
            merged = _merge_chunks(cache, job, need, keys, meta_key, feats, n, dim)
            if merged is None:
                return None
            meta, skipped = merged
        for chunk in job["chunks"]:
            chunk_keys, chunk_meta_key = _chunk_keys(job["base"], job["layers"], chunk)
            for key in (*chunk_keys.values(), chunk_meta_key):
                cache.delete(key)
    meta = np.asarray(meta)
    return LayerFeatures(feats, meta[:, 0], meta[:, 1], from_cache=False, skipped=[tuple(s) for s in skipped])


def _merge_chunks(cache: FeatureCache, job: dict, need: list[int], keys: dict[int, str], meta_key: str,
                  feats: dict, n: int, dim: int) -> tuple[np.ndarray, list] | None:
    """Write the merged entries of the layers in `need` (into `feats`), and the labels/groups entry
    and skipped record unless they are there; (labels/groups, skipped), or None when a chunk is gone."""
    base, layers = job["base"], job["layers"]
    chunks = []
    for chunk in job["chunks"]:
        chunk_keys, chunk_meta_key = _chunk_keys(base, layers, chunk)
        record, meta = cache.load_json(chunk_meta_key), cache.load(chunk_meta_key)
        if record is None or meta is None:
            return None
        chunks.append((chunk, chunk_keys, record, meta))
    shapes = [tuple(record["row_shape"]) for _, _, record, _ in chunks if record["row_shape"] is not None]
    row_shape = shapes[0] if shapes else (dim,)  # (dim,) when nothing at all could be decoded
    writers = {}
    meta_buf = np.full((n, 2), -1, dtype=np.int64)
    skipped = []
    try:
        for layer in need:
            writers[layer] = cache.writer(keys[layer], (n,) + row_shape)
        for (start, stop), chunk_keys, record, meta in chunks:
            meta_buf[start:stop] = meta
            skipped.extend(tuple(s) for s in record["skipped"])
            if record["row_shape"] is None:
                continue  # nothing decodable in this chunk: its rows stay zero, labels -1
            for layer in need:
                rows = cache.load(chunk_keys[layer])
                if rows is None:
                    return None
                writers[layer].array[start:stop] = rows
        for layer in need:
            feats[layer] = writers[layer].commit()
            del writers[layer]
        meta = cache.save(meta_key, meta_buf)  # an entry already there stays
        if cache.load_json(meta_key) is None:
            cache.save_json(meta_key, [list(s) for s in skipped])
    except OSError as err:
        if err.errno in DISK_FULL:
            raise write_error(err, cache.root) from None
        raise
    finally:
        for w in writers.values():
            w.abort()
    return meta, skipped


def _yields_dicts(dataset: Dataset) -> bool:
    return getattr(dataset, "yields_dicts", False)
