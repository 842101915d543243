"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Every file totobench writes for others to read (results, checkpoints, cache shards, masks, JSON
side files) goes through `atomic_path`: the bytes go to a temporary file in the same folder whose
name is unique to this writer (host, pid and a random suffix, so concurrent writers never share
one), are flushed and fsynced, then renamed over the target. On any failure the temporary file
is removed and the target is left as it was.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TEMP_SUFFIX = ".tmp"


def writer_tag() -> str:
    """`<host>-<pid>`: who writes a temporary file (stale-file cleanup reads it back)."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def temp_path(final: Path) -> Path:
    """`.<name>.<host>-<pid>.<random>.tmp` beside `final`: private to this writer."""
    return final.with_name(f".{final.name}.{writer_tag()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def temp_writer(tmp: Path) -> tuple[str, int] | None:
    """(host, pid) of the writer of a temporary file made by `temp_path`, None if not one of ours."""
    name = tmp.name
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    parts = name[: -len(TEMP_SUFFIX)].rsplit(".", 2)
    if len(parts) != 3:
        return None
    host, _, pid = parts[1].rpartition("-")
    return (host, int(pid)) if host and pid.isdigit() else None


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to (by any writer: open(), torch.save,
    safetensors, numpy); on leaving the block it is fsynced and renamed over `path`.

    Parent folders are created. If the block raises, the temporary file is removed, `path` is
    untouched and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp-style writers make 0600: give the usual mode
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write bytes (or UTF-8 text) to `path` atomically. Returns `path` as a Path."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(raw)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> Path:
    """`obj` as indented JSON (no NaN) plus a newline, written atomically."""
    options = {"indent": 2, "allow_nan": False, **dumps}
    return atomic_write(path, json.dumps(obj, **options) + "\n")
