"""On-disk feature cache: float16 memory-mapped shards, one per (entry key, layer).

A key is the sha256 of everything the features depend on: checkpoint sha256, layer, pooling,
transform, dataset fingerprint, split/subset and the extraction code version. Each shard is
written to a temporary file, hashed, then renamed next to a small JSON record of its shape and
sha256; a reader checks both and treats any mismatch (a truncated or corrupt shard) as a miss,
so a shard is either complete or absent and never read half-written. A temporary file is
allocated in full when created, so a full disk fails there with CacheWriteError (and the file
is removed) instead of killing the process with SIGBUS when a memory-mapped page is written.
Temporary names are `totobench.io.temp_path`'s (they carry the host and pid of their writer);
`remove_stale_temp` deletes those of writers that died (e.g. a run killed with SIGKILL).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from totobench.errors import TotobenchError
from totobench.io import atomic_write, temp_path, temp_writer, writer_tag

FEATURE_CODE_VERSION = "1"  # bump when extraction or pooling changes what a key's bytes mean
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CacheWriteError(TotobenchError):
    """The feature cache folder cannot take a write: the disk is full, or it is read-only."""


def write_error(err: OSError, root: Path) -> CacheWriteError:
    """One line for an OSError raised while writing features under `root`."""
    if err.errno in DISK_FULL:
        return CacheWriteError(f"disk full while writing features to {root} (free some space or set "
                               f"$TOTOBENCH_HOME to a larger disk)")
    return CacheWriteError(f"cannot write features to {root} ({err.strerror or err})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        self.tmp = temp_path(final)
        try:
            self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=shape)
            with open(self.tmp, "rb+") as f:  # reserve the blocks now: ENOSPC here, not SIGBUS later
                _preallocate(f.fileno(), os.fstat(f.fileno()).st_size)
        except OSError as err:
            self.abort()
            raise write_error(err, final.parent) from None

    def write(self, start: int, values: np.ndarray) -> None:
        self.array[start:start + len(values)] = values

    def commit(self) -> np.ndarray:
        """Flush, fsync, hash, then rename the shard and its record into place; the shard as
        a read-only memmap. Raises CacheWriteError (temp files removed) when a write fails."""
        try:
            self.array.flush()
            shape, dtype = list(self.array.shape), str(self.array.dtype)
            del self.array
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
            record = {"shape": shape, "dtype": dtype, "sha256": _file_sha256(self.tmp),
                      "bytes": self.tmp.stat().st_size}
            # the record is written last: a shard without a matching record is a miss
            os.replace(self.tmp, self.final)
            atomic_write(self.final.with_suffix(".json"), json.dumps(record))
        except OSError as err:
            self.abort()
            raise write_error(err, self.final.parent) from None
        return np.load(self.final, mmap_mode="r")

    def abort(self) -> None:
        """Drop the temporary file (idempotent)."""
        if hasattr(self, "array"):
            del self.array
        self.tmp.unlink(missing_ok=True)


def _preallocate(fd: int, size: int) -> None:
    if size and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return  # file systems without fallocate: a full disk shows up on write instead
            raise


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
        """A ShardWriter for `key`. Raises CacheWriteError when the folder cannot take it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(err, self.root) from None
        return ShardWriter(self.path(key), shape, dtype)

    def delete(self, key: str) -> None:
        """Remove an entry (shard, record and JSON record), if present."""
        path = self.path(key)
        for p in (path.with_suffix(".json"), path, self.root / f"{key}.record.json"):
            p.unlink(missing_ok=True)

    def remove_stale_temp(self) -> list[Path]:
        """Delete temporary files left by dead writers of this host (a killed run); returns them."""
        removed = []
        host = writer_tag().rpartition("-")[0]
        if not self.root.is_dir():
            return removed
        for p in self.root.glob(".*.tmp"):
            writer = temp_writer(p)
            if writer is not None and writer[0] == host and not _pid_alive(writer[1]):
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed

    def load_json(self, key: str):
        """A small JSON record saved with `save_json`, or None."""
        if not self.enabled:
            return None
        try:
            return json.loads((self.root / f"{key}.record.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def save_json(self, key: str, obj) -> None:
        """Write a small JSON record atomically. Raises CacheWriteError when it cannot."""
        try:
            atomic_write(self.root / f"{key}.record.json", json.dumps(obj))
        except OSError as err:
            raise write_error(err, self.root) from None

    def save(self, key: str, values: np.ndarray) -> np.ndarray:
        """Write a whole (small) array, e.g. labels, atomically; returns the memmap."""
        w = self.writer(key, values.shape, values.dtype)
        try:
            w.write(0, values)
        except BaseException:
            w.abort()
            raise
        return w.commit()
