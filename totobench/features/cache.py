"""On-disk feature cache: float16 memory-mapped shards, one per (entry key, layer).

A key is the sha256 of everything the features depend on: checkpoint sha256, layer, pooling,
transform, dataset fingerprint, split/subset and the extraction code version. Each shard is
written to a temporary file, hashed, then renamed next to a small JSON record of its shape and
sha256; a reader checks both and treats any mismatch (a truncated or corrupt shard) as a miss,
so a shard is either complete or absent and never read half-written. A temporary file is
allocated in full when created, so a full disk fails there with CacheWriteError (and the file
is removed) instead of killing the process with SIGBUS when a memory-mapped page is written.

Many processes may share one cache folder, on one machine or on a shared file system. Temporary
names are `totobench.io.temp_path`'s (private to their writer, carrying its host and pid); a
committed entry that checks out is never replaced (another process may have it mapped: the
second writer of a key keeps the first one's entry); `lock(key)` is the advisory lock the
extractor holds while it computes or merges entries; `remove_stale_temp` deletes only the
temporary files of writers that provably died (e.g. a run killed with SIGKILL) or that nobody
touched for a day, and the lock files of dead holders.
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
from totobench.io import LOCK_SUFFIX, FileLock, atomic_write, break_stale_lock, temp_abandoned, temp_path

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


def _file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_entry(path: Path) -> np.ndarray | None:
    """The shard at `path` as a read-only memmap when it and its record (`.json` beside it) agree
    on size, sha256 and shape; None when either is absent, truncated or corrupt."""
    try:
        record = json.loads(path.with_suffix(".json").read_text())
        if path.stat().st_size != record["bytes"] or _file_sha256(path) != record["sha256"]:
            raise ValueError("size or checksum mismatch")
        array = np.load(path, mmap_mode="r")
        if list(array.shape) != record["shape"]:
            raise ValueError("shape mismatch")
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
    return array


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
        a read-only memmap. When another writer already committed this key and its entry checks
        out, that entry stays (a reader may have it mapped) and this one is dropped.
        Raises CacheWriteError (temp files removed) when a write fails."""
        try:
            self.array.flush()
            shape, dtype = list(self.array.shape), str(self.array.dtype)
            del self.array
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
            record = {"shape": shape, "dtype": dtype, "sha256": _file_sha256(self.tmp),
                      "bytes": self.tmp.stat().st_size}
            committed = load_entry(self.final)
            if committed is not None:
                self.tmp.unlink(missing_ok=True)
                return committed
            # mapped before the rename: the data stays readable whoever later removes the name
            array = np.load(self.tmp, mmap_mode="r")
            # the record is written last: a shard without a matching record is a miss
            os.replace(self.tmp, self.final)
            atomic_write(self.final.with_suffix(".json"), json.dumps(record))
        except OSError as err:
            self.abort()
            raise write_error(err, self.final.parent) from None
        return array

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
        array = load_entry(self.path(key))
        if array is None:
            self.misses += 1
            return None
        self.hits += 1
        return array

    def committed(self, key: str) -> bool:
        """Whether `key` has a record (cheap: no checksum; `load` is the check)."""
        return self.path(key).with_suffix(".json").exists()

    def lock(self, key: str) -> FileLock:
        """The advisory lock of entry `key` (`.<key>.lock`): who computes or merges it right now."""
        return FileLock(self.root / f".{key}{LOCK_SUFFIX}")

    def claim(self, key: str) -> FileLock | None:
        """The lock of `key`, taken, or None when another live process holds it. Raises
        CacheWriteError when the folder cannot take the lock file."""
        lock = self.lock(key)
        try:
            return lock if lock.try_acquire() else None
        except OSError as err:
            raise write_error(err, self.root) from None

    def writer(self, key: str, shape: tuple[int, ...], dtype=np.float16) -> ShardWriter:
        """A ShardWriter for `key`. Raises CacheWriteError when the folder cannot take it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(err, self.root) from None
        return ShardWriter(self.path(key), shape, dtype)

    def delete(self, key: str) -> None:
        """Remove an entry (shard, record and JSON record), if present. Only for entries no other
        process can still want (the extractor deletes merged chunks under the split's lock)."""
        path = self.path(key)
        for p in (path.with_suffix(".json"), path, self.root / f"{key}.record.json"):
            p.unlink(missing_ok=True)

    def remove_stale_temp(self) -> list[Path]:
        """Delete the temporary files of writers that provably died (a killed run on this host) or
        that nobody touched for a day (see `totobench.io.temp_abandoned`), and the lock files of
        dead holders; returns the temporary files removed."""
        removed = []
        if not self.root.is_dir():
            return removed
        for p in self.root.glob(".*.tmp"):
            if temp_abandoned(p):
                p.unlink(missing_ok=True)
                removed.append(p)
        for p in self.root.glob(f".*{LOCK_SUFFIX}"):
            break_stale_lock(p)
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
