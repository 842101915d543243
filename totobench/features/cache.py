"""On-disk feature cache: float16 memory-mapped shards, one per (entry key, layer).

A key is the sha256 of everything the features depend on: checkpoint sha256, layer, pooling,
transform, dataset fingerprint, split/subset and the extraction code version. Each shard is
written to a temporary file, hashed, then renamed next to a small JSON record of its shape and
sha256; a reader checks both and treats any mismatch (a truncated or corrupt shard) as a miss,
so a shard is either complete or absent and never read half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

FEATURE_CODE_VERSION = "1"  # bump when extraction or pooling changes what a key's bytes mean


def _file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_key(**parts: Any) -> str:
    """A stable hex key from keyword parts (JSON with sorted keys, then sha256)."""
    parts = {"code_version": FEATURE_CODE_VERSION, **parts}
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


class ShardWriter:
    """Fill a [N, ...] float16 shard batch by batch, then `commit()` it atomically."""

    def __init__(self, final: Path, shape: tuple[int, ...], dtype=np.float16):
        self.final = final
        self.tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=shape)

    def write(self, start: int, values: np.ndarray) -> None:
        self.array[start:start + len(values)] = values

    def commit(self) -> np.ndarray:
        self.array.flush()
        shape, dtype = list(self.array.shape), str(self.array.dtype)
        del self.array
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        record = {"shape": shape, "dtype": dtype, "sha256": _file_sha256(self.tmp),
                  "bytes": self.tmp.stat().st_size}
        meta_tmp = self.final.with_suffix(".json.tmp")
        meta_tmp.write_text(json.dumps(record))
        os.replace(self.tmp, self.final)
        os.replace(meta_tmp, self.final.with_suffix(".json"))
        return np.load(self.final, mmap_mode="r")

    def abort(self) -> None:
        if hasattr(self, "array"):
            del self.array
        self.tmp.unlink(missing_ok=True)


class FeatureCache:
    """Shards under `root/<key>.npy` with `root/<key>.json` records."""

    def __init__(self, root: Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npy"

    def load(self, key: str) -> np.ndarray | None:
        """The shard as a read-only memmap, or None when absent, truncated or corrupt."""
        if not self.enabled:
            return None
        path = self.path(key)
        meta_path = path.with_suffix(".json")
        try:
            record = json.loads(meta_path.read_text())
            if path.stat().st_size != record["bytes"] or _file_sha256(path) != record["sha256"]:
                raise ValueError("size or checksum mismatch")
            array = np.load(path, mmap_mode="r")
            if list(array.shape) != record["shape"]:
                raise ValueError("shape mismatch")
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            self.misses += 1
            return None
        self.hits += 1
        return array

    def writer(self, key: str, shape: tuple[int, ...], dtype=np.float16) -> ShardWriter:
        self.root.mkdir(parents=True, exist_ok=True)
        return ShardWriter(self.path(key), shape, dtype)

    def load_json(self, key: str):
        """A small JSON record saved with `save_json`, or None."""
        if not self.enabled:
            return None
        try:
            return json.loads((self.root / f"{key}.record.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def save_json(self, key: str, obj) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"{key}.record.json"
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, final)

    def save(self, key: str, values: np.ndarray) -> np.ndarray:
        """Write a whole (small) array, e.g. labels, atomically; returns the memmap."""
        w = self.writer(key, values.shape, values.dtype)
        w.write(0, values)
        return w.commit()
