"""Token shards: a tokenized corpus on disk that pre-training streams from (`totobench tokenize`).

A shard folder holds
    index.json              format, version, tokenizer (spec, sha256, codebook size), resolution,
                            tokens per frame, frames per clip and frame stride, sources, shards,
                            skipped files; no timestamps, so the same inputs give the same bytes
    <shard>.tokens          the token ids, a raw little-endian uint16 array (uint32 when the
                            codebook has more than 65536 codes); np.memmap can open it
    <shard>.seqs.npy        int64 [sequences, 5]: offset (in tokens), length (tokens), kind
                            (0 image, 1 video), source id, held-out bucket (0..9999)
One sequence is one file: an image's tokens, or a video's frames taken every `stride`-th frame,
frame after frame, each in raster order. The held-out bucket is the stable hash of the file's path
that `corpus.heldout_bucket` computes, so the held-out fraction is chosen when training, not here.

While a shard is open its rows are appended to <shard>.seqs.bin; the writer's state file
(progress*.json) records after every batch of files how many tokens and rows are final, so a rerun
after a kill truncates the rest and continues with identical bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from totobench.errors import ConfigError, DataError
from totobench.io import atomic_path, atomic_write_json
from totobench.model.sequence import build_sequence, clip_frame_indices, clip_span, num_clip_starts

FORMAT = "totobench-token-shards"
VERSION = 1
KINDS = ("image", "video")  # the kind column: index into KINDS
COLUMNS = ("offset", "length", "kind", "source", "bucket")


def token_dtype(codebook_size: int) -> np.dtype:
    """uint16 when every code fits in 16 bits, else uint32 (little-endian either way)."""
    return np.dtype("<u2") if codebook_size <= 1 << 16 else np.dtype("<u4")


def _save_npy(path: Path, rows: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, rows)  # a file object: np.save would add ".npy" to a temporary name


class ShardWriter:
    """Appends sequences to the shards `<prefix>_00000`, `<prefix>_00001`, ... of one writer (one
    rank), closing a shard once it holds at least `shard_tokens` tokens.

    `state` is the dict of the state file (created when absent); `checkpoint()` makes everything
    appended so far durable and records it there. A writer opened on an existing state drops what
    was appended after its last checkpoint."""

    def __init__(self, folder: Path, prefix: str, dtype: np.dtype, shard_tokens: int, state_path: Path):
        self.folder, self.prefix, self.dtype, self.shard_tokens = folder, prefix, np.dtype(dtype), shard_tokens
        self.state_path = state_path
        self.state = json.loads(state_path.read_text()) if state_path.is_file() else \
            {"next_batch": 0, "shards": [], "skipped": []}
        self._tokens = self._rows = None
        if self.state["shards"] and not self.state["shards"][-1]["closed"]:
            self._reopen(self.state["shards"][-1])

    def _paths(self, name: str) -> tuple[Path, Path, Path]:
        f = self.folder
        return f / f"{name}.tokens", f / f"{name}.seqs.bin", f / f"{name}.seqs.npy"

    def _reopen(self, shard: dict) -> None:
        """Continue the open shard from its last checkpoint: cut what came after it."""
        tok_path, rows_path, _ = self._paths(shard["name"])
        self._tokens, self._rows = open(tok_path, "r+b"), open(rows_path, "r+b")
        self._tokens.truncate(shard["tokens"] * self.dtype.itemsize)
        self._rows.truncate(shard["sequences"] * len(COLUMNS) * 8)
        self._tokens.seek(0, os.SEEK_END)
        self._rows.seek(0, os.SEEK_END)
        self._count = [shard["tokens"], shard["sequences"]]

    def _open_new(self) -> None:
        name = f"{self.prefix}_{len(self.state['shards']):05d}"
        tok_path, rows_path, _ = self._paths(name)
        self._tokens, self._rows = open(tok_path, "wb"), open(rows_path, "wb")
        self._count = [0, 0]
        self.state["shards"].append({"name": name, "tokens": 0, "sequences": 0, "closed": False})

    def append(self, tokens: np.ndarray, kind: str, source: int, bucket: int) -> None:
        """One sequence: `tokens` (codes, any integer dtype, flat) of a file of `kind`."""
        if self._tokens is None:
            self._open_new()
        data = np.ascontiguousarray(tokens, dtype=self.dtype).reshape(-1)
        row = np.array([self._count[0], len(data), KINDS.index(kind), source, bucket], dtype="<i8")
        self._tokens.write(data.tobytes())
        self._rows.write(row.tobytes())
        self._count[0] += len(data)
        self._count[1] += 1

    def checkpoint(self, next_batch: int, skipped: list[dict]) -> None:
        """Make the appended sequences durable, record that batches before `next_batch` are done
        (and the files they skipped), and close the open shard when it is full."""
        self.state["skipped"].extend(skipped)
        self.state["next_batch"] = next_batch
        if self._tokens is not None:
            for f in (self._tokens, self._rows):
                f.flush()
                os.fsync(f.fileno())
            shard = self.state["shards"][-1]
            shard["tokens"], shard["sequences"] = self._count
            if self._count[0] >= self.shard_tokens:
                self._close()
                return
        atomic_write_json(self.state_path, self.state)

    def flush(self) -> None:
        """Hand the appended bytes to the OS (no checkpoint: a rerun still drops them)."""
        if self._tokens is not None:
            self._tokens.flush()
            self._rows.flush()

    def finish(self) -> None:
        """Close the last shard (after a final checkpoint)."""
        if self._tokens is not None:
            self._close()

    def _close(self) -> None:
        shard = self.state["shards"][-1]
        tok_path, rows_path, npy_path = self._paths(shard["name"])
        self._tokens.close()
        self._rows.close()
        self._tokens = self._rows = None
        rows = np.fromfile(rows_path, dtype="<i8").reshape(-1, len(COLUMNS))
        _save_npy(npy_path, rows)
        shard["closed"] = True
        atomic_write_json(self.state_path, self.state)
        rows_path.unlink()  # only after the state says closed: a kill before keeps the shard reopenable


def write_index(folder: Path, header: dict, state_paths: list[Path]) -> dict:
    """Merge the writers' states (in rank order) into folder/index.json: `header` (the settings),
    the shards, totals and the skipped files. Returns the index."""
    shards, skipped = [], []
    for path in state_paths:
        state = json.loads(Path(path).read_text())
        if state["shards"] and not state["shards"][-1]["closed"]:
            raise DataError(f"{path}: its last shard is still open; rerun the same command to finish it")
        shards += [{k: s[k] for k in ("name", "tokens", "sequences")} for s in state["shards"]]
        skipped += state["skipped"]
    kinds = np.zeros(len(KINDS), np.int64)
    for s in shards:
        kinds += np.bincount(np.load(folder / f"{s['name']}.seqs.npy")[:, 2], minlength=len(KINDS))
    index = {"format": FORMAT, "version": VERSION, **header, "columns": list(COLUMNS), "kinds": list(KINDS),
             "totals": {"sequences": sum(s["sequences"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                        "images": int(kinds[0]), "videos": int(kinds[1]), "skipped": len(skipped)},
             "shards": shards, "skipped": sorted(skipped, key=lambda s: s["path"])}
    atomic_write_json(folder / "index.json", index)
    return index


def read_index(folder: Path) -> dict:
    """index.json of a shard folder. Raises DataError when it is missing, unreadable or of another format."""
    path = Path(folder) / "index.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; make token shards with `totobench tokenize ... --out {folder}`")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise DataError(f"{path}: not a {FORMAT} index of version {VERSION}")
    return index


def match_sources(name: str, paths: list[str], folder: Path) -> int:
    """The position in `paths` (the sources an index records) of the one source `name` names: its
    whole path or its last components (`videos`, `kinetics400/train`). Raises ConfigError when
    `name` names none or several."""
    want = Path(name).parts
    hits = [i for i, p in enumerate(paths) if want and Path(p).parts[-len(want):] == want]
    if len(hits) != 1:
        found = "none" if not hits else f"{len(hits)} ({', '.join(paths[i] for i in hits)}): give more of its path"
        raise ConfigError(f"data.shard_weights: {name!r} names {found} of the sources of "
                          f"{folder / 'index.json'} ({', '.join(paths)})")
    return hits[0]


class ShardCorpus:
    """Token shards as the pre-training corpus: what train.py uses of TokenCorpus (`mc`, `has`,
    `sample`, and so `batch_for_step`), with memory independent of the corpus size.

    Tokens are read with pread (mapped pages would count in the RSS and grow with the pages
    touched); in memory are only the rows of the shards' sequence tables (40 bytes per file).
    Each (source, kind) with files is one stream. `source_weights` ({name: weight}, the config's
    `data.shard_weights`, see `match_sources`) gives each source its share of the draws, split
    equally over its kinds; None: every stream equally likely. A file is held out when its
    bucket < heldout_fraction * 10000 (as `corpus.heldout_bucket` splits a folder).
    Raises DataError for a missing or inconsistent shard, ConfigError when `mc` or a weight does
    not fit."""

    def __init__(self, folder: str | os.PathLike, mc, heldout_fraction: float = 0.0,
                 source_weights: dict[str, float] | None = None):
        self.folder, self.mc = Path(folder), mc
        self._fds: dict[int, int] = {}  # shard position -> open file descriptor
        self.index = index = read_index(self.folder)
        self._check_model(mc)
        self.dtype = np.dtype(index["dtype"])
        self.step = mc.frame_stride // int(index["stride"])  # stored frames between two clip frames
        self.rows = self._load_rows()
        self.streams, self.items = self._split(heldout_fraction)
        self.weights = self._stream_weights(source_weights)
        if not self.has("train"):
            held = sum(len(self.items[(s, "heldout")]) for s in range(len(self.streams)))
            raise DataError(f"{self.folder}: no training sequence: {held} usable files, all held out "
                            f"(videos need >= {clip_span(mc.num_frames, self.step)} stored frames)")

    def _check_model(self, mc) -> None:
        ix, where = self.index, self.folder / "index.json"
        if int(ix["codebook_size"]) != mc.codebook_size:
            raise ConfigError(f"{where}: codebook of {ix['codebook_size']} codes, the model's "
                              f"model.codebook_size is {mc.codebook_size}")
        if int(ix["resolution"]) != mc.resolution or int(ix["tokens_per_frame"]) != mc.tokens_per_frame:
            raise ConfigError(f"{where}: frames of {ix['resolution']} px ({ix['tokens_per_frame']} tokens), "
                              f"the model's are {mc.resolution} px ({mc.tokens_per_frame} tokens)")
        if mc.frame_stride % int(ix["stride"]):
            raise ConfigError(f"{where}: frames stored every {ix['stride']} frames; the model's "
                              f"frame_stride {mc.frame_stride} must be a multiple of it")

    def _load_rows(self) -> np.ndarray:
        """int64 [files, 6]: the five columns and the shard's position in index['shards']."""
        parts = []
        for j, shard in enumerate(self.index["shards"]):
            path = self.folder / f"{shard['name']}.seqs.npy"
            try:
                rows = np.load(path)
            except (OSError, ValueError) as err:
                raise DataError(f"{path}: unreadable sequence table ({err})") from None
            if rows.shape != (shard["sequences"], len(COLUMNS)):
                raise DataError(f"{path}: {rows.shape[0]} sequences, index.json says {shard['sequences']}")
            parts.append(np.concatenate([rows, np.full((len(rows), 1), j, np.int64)], axis=1))
        return np.concatenate(parts) if parts else np.zeros((0, len(COLUMNS) + 1), np.int64)

    def _split(self, fraction: float) -> tuple[list[tuple[int, str]], dict]:
        """Streams [(source, kind)] and their usable row numbers per split."""
        tpf = int(self.index["tokens_per_frame"])
        span = clip_span(self.mc.num_frames, self.step)
        usable = (self.rows[:, 2] == 0) | (self.rows[:, 1] // tpf >= span)
        streams = sorted({(int(s), KINDS[int(k)]) for s, k in self.rows[usable][:, [3, 2]]})
        items = {}
        for s, (source, kind) in enumerate(streams):
            mine = np.flatnonzero(usable & (self.rows[:, 3] == source) & (self.rows[:, 2] == KINDS.index(kind)))
            held = self.rows[mine, 4] < fraction * 10000
            if fraction > 0 and not held.any() and len(mine) > 1:
                held[-1] = True  # tiny streams: still keep one file out, as corpus.list_sources does
            items[(s, "train")], items[(s, "heldout")] = mine[~held], mine[held]
        return streams, items

    def _stream_weights(self, source_weights: dict[str, float] | None) -> np.ndarray | None:
        """float64 [streams]: a source's weight over its streams; None when no weight is given."""
        if source_weights is None:
            return None
        paths = [s["path"] for s in self.index["sources"]]
        weight_of = {match_sources(name, paths, self.folder): float(w) for name, w in source_weights.items()}
        if len(weight_of) < len(source_weights):
            raise ConfigError(f"data.shard_weights: two names of one source ({', '.join(source_weights)})")
        missing = sorted({paths[src] for src, _ in self.streams} - {paths[i] for i in weight_of})
        if missing:
            raise ConfigError(f"data.shard_weights: no weight for the source {missing[0]} of "
                              f"{self.folder / 'index.json'} (give every source one)")
        kinds = np.bincount([src for src, _ in self.streams], minlength=len(paths))
        return np.array([weight_of[src] / kinds[src] for src, _ in self.streams])

    @property
    def tokenizer_spec(self) -> str:
        """The tokenizer the shards were made with (`totobench tokenize --tokenizer`)."""
        return self.index["tokenizer"]["spec"]

    def has(self, split: str) -> bool:
        """Whether any stream has a usable file in `split`."""
        return any(len(self.items[(s, split)]) for s in range(len(self.streams)))

    def _read(self, row: int, start: int, count: int) -> np.ndarray:
        """`count` tokens of sequence `row` from token `start` of it, as int64."""
        offset, length, shard = int(self.rows[row, 0]), int(self.rows[row, 1]), int(self.rows[row, 5])
        if shard not in self._fds:
            self._fds[shard] = os.open(self.folder / f"{self.index['shards'][shard]['name']}.tokens", os.O_RDONLY)
        size = self.dtype.itemsize
        data = os.pread(self._fds[shard], count * size, (offset + start) * size)
        if len(data) != count * size or start + count > length:
            raise DataError(f"{self.folder}: shard {self.index['shards'][shard]['name']} is truncated")
        return np.frombuffer(data, dtype=self.dtype).astype(np.int64)

    def sample(self, key: list[int], split: str = "train") -> torch.Tensor:
        """One sequence LongTensor [L] drawn with np.random.default_rng(key): a stream, then a clip
        of a video (frames `mc.frame_stride` apart) or `mc.images_per_sequence` images."""
        rng = np.random.default_rng(key)
        usable = [s for s in range(len(self.streams)) if len(self.items[(s, split)])]
        s = usable[int(rng.choice(len(usable), p=self._draw_probabilities(usable)))]
        items, kind, mc, tpf = self.items[(s, split)], self.streams[s][1], self.mc, self.mc.tokens_per_frame
        if kind == "video":
            row = int(items[int(rng.integers(len(items)))])
            stored = int(self.rows[row, 1]) // tpf
            start = int(rng.integers(num_clip_starts(stored, mc.num_frames, self.step)))
            picks = clip_frame_indices(start, mc.num_frames, self.step)
            span = self._read(row, start * tpf, (picks[-1] - start + 1) * tpf).reshape(-1, tpf)
            frames = span[[p - start for p in picks]]
        else:
            rows = items[rng.integers(len(items), size=mc.images_per_sequence)]
            frames = np.stack([self._read(int(r), 0, tpf) for r in rows])
        return build_sequence(torch.from_numpy(frames), kind, mc)

    def centred_clips(self, split: str = "heldout", limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The centred clip of each usable video of `split` ("heldout", "train" or "all"), in shard
        order: (token ids int64 [N, num_frames, tokens per frame] of frames `mc.frame_stride` apart,
        their sequence rows [N]); at most `limit` clips. Raises DataError when there is none."""
        tpf, mc = self.mc.tokens_per_frame, self.mc
        splits = ("train", "heldout") if split == "all" else (split,)
        rows = sorted(int(r) for s, (_, kind) in enumerate(self.streams) if kind == "video"
                      for part in splits for r in self.items[(s, part)])[:limit]
        if not rows:
            raise DataError(f"{self.folder}: no {split} video of >= {clip_span(mc.num_frames, self.step)} stored "
                            f"frames to take a clip of {mc.num_frames} frames from")
        clips = []
        for row in rows:
            stored = int(self.rows[row, 1]) // tpf
            start = (stored - clip_span(mc.num_frames, self.step)) // 2
            picks = clip_frame_indices(start, mc.num_frames, self.step)
            span = self._read(row, start * tpf, (picks[-1] - start + 1) * tpf).reshape(-1, tpf)
            clips.append(span[[p - start for p in picks]])
        return np.stack(clips), np.asarray(rows)

    def _draw_probabilities(self, usable: list[int]) -> np.ndarray | None:
        """The chance of each stream of `usable` to be drawn; None: all equal."""
        return None if self.weights is None else self.weights[usable] / self.weights[usable].sum()

    def facts(self) -> dict:
        """The corpus as training.json records it: the folder and, per stream, its file counts and
        its share of the training draws (`weight`)."""
        names = self.index["sources"]
        usable = [s for s in range(len(self.streams)) if len(self.items[(s, "train")])]
        p = self._draw_probabilities(usable)
        share = dict(zip(usable, np.full(len(usable), 1 / len(usable)) if p is None else p))
        return {"shards": str(self.folder), "tokens": int(self.rows[:, 1].sum()), "sources": [
            {"kind": kind, "path": names[source]["path"], "weight": round(float(share.get(s, 0.0)), 6),
             "train_files": len(self.items[(s, "train")]), "heldout_files": len(self.items[(s, "heldout")])}
            for s, (source, kind) in enumerate(self.streams)]}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        self.close()
