"""Atomic file writes and advisory lock files, safe for many processes on one machine or on a
shared file system (where rename and exclusive create are atomic but locks may be advisory).

Every file totobench writes for others to read (results, checkpoints, cache shards, masks, JSON
side files) goes through `atomic_path`: the bytes go to a temporary file in the same folder whose
name is unique to this writer (host, pid and a random suffix, so concurrent writers never share
one), are flushed and fsynced, then renamed over the target. On any failure the temporary file
is removed and the target is left as it was.

`FileLock` keeps two processes from doing the same work at once (extracting one feature chunk,
training one result). Nothing may rely on it for correctness: a lock can be broken when its
holder froze for longer than the stale bound, so whatever it guards is written atomically anyway.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

TEMP_SUFFIX = ".tmp"
LOCK_SUFFIX = ".lock"
LOCK_STALE_S = 120.0  # a lock not refreshed for this long is stale: its holder's host died or it froze
HEARTBEAT_S = 15.0    # how often a holder refreshes its locks' mtime (well inside LOCK_STALE_S)
TEMP_STALE_S = 24 * 3600.0  # a temporary file untouched this long is abandoned, whoever wrote it


@functools.lru_cache(maxsize=1)
def host_tag() -> str:
    """This machine as temp and lock names carry it: the host name, plus the pid namespace where
    Linux shows it (two containers that share a host name never judge each other's pids)."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"
    try:
        return f"{host}_ns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return host


def writer_tag() -> str:
    """`<host>-<pid>`: who writes a temporary file (stale-file cleanup reads it back)."""
    return f"{host_tag()}-{os.getpid()}"


def writer_gone(host: str, pid: int) -> bool:
    """True only when the writer (host, pid) provably no longer runs: it ran here (same host and
    pid namespace) and that pid is gone or a zombie. A writer on another host is never provably gone."""
    if host != host_tag():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # another user's live process
    try:  # a killed child its parent has not reaped yet still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


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


def temp_abandoned(tmp: Path, max_age: float = TEMP_STALE_S) -> bool:
    """Whether a temporary file made by `temp_path` may be removed: its writer provably died, or
    nothing touched it for `max_age` seconds. False for other files and for files already gone."""
    writer = temp_writer(tmp)
    if writer is None:
        return False
    try:
        age = time.time() - tmp.stat().st_mtime
    except OSError:
        return False
    return writer_gone(*writer) or age > max_age


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


_held: dict[str, str] = {}  # lock path -> token of the locks this process holds (the heartbeat refreshes them)
_held_guard = threading.Lock()
_heartbeat: threading.Thread | None = None


def _refresh_held_locks() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        with _held_guard:
            paths = list(_held)
        for path in paths:
            try:
                os.utime(path)
            except OSError:
                pass


def _hold(path: Path, token: str) -> None:
    global _heartbeat
    with _held_guard:
        _held[str(path)] = token
        if _heartbeat is None or not _heartbeat.is_alive():
            _heartbeat = threading.Thread(target=_refresh_held_locks, name="totobench-lock-heartbeat", daemon=True)
            _heartbeat.start()


def _read_owner(path: Path) -> dict | None:
    """The owner record of a lock file; {} while it is being written or unreadable, None when gone."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _judge(path: Path, stale_after: float) -> tuple[dict | None, bool]:
    """(owner record, stale?) of the lock file `path`; (None, False) when there is none. Stale: its
    holder provably died, or its heartbeat stopped more than `stale_after` seconds ago."""
    owner = _read_owner(path)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None, False
    if owner is None:
        return None, False
    host, pid = owner.get("host"), owner.get("pid")
    if isinstance(host, str) and isinstance(pid, int):
        with _held_guard:
            held_here = owner.get("token") in _held.values()
        if ((host, pid) == (host_tag(), os.getpid()) and not held_here) or writer_gone(host, pid):
            return owner, True  # its holder died (or was an earlier process with our pid)
    return owner, age > stale_after


def break_stale_lock(path: Path, stale_after: float = LOCK_STALE_S) -> bool:
    """Remove the lock file `path` if it is stale. True when there is no lock any more (removed
    here, or released meanwhile), False when a live holder has it."""
    owner, stale = _judge(path, stale_after)
    if owner is None:
        return True
    if not stale:
        return False
    aside = temp_path(path)
    try:
        os.rename(path, aside)  # atomic: of two breakers, one moves the file
    except FileNotFoundError:
        return True
    if _read_owner(aside) != owner:  # a new holder took it between our look and the rename: give it back
        try:
            os.link(aside, path)
        except OSError:
            pass  # a third process took the name meanwhile; locks save work, they guard no data
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


class FileLock:
    """An advisory lock: the file `path`, made with O_CREAT|O_EXCL (atomic on local disks and on
    NFS), holding its owner's host, pid, token and start time. A daemon thread refreshes the mtime
    of held locks every HEARTBEAT_S; the next process that wants a stale lock (its holder provably
    died, or its heartbeat stopped LOCK_STALE_S ago) breaks it (`break_stale_lock`). Only the holder
    removes its lock, on `release`.

        with FileLock(folder / ".x.lock"):   # waits while a live process holds it
            ...
    """

    def __init__(self, path: str | os.PathLike, stale_after: float = LOCK_STALE_S):
        self.path = Path(path)
        self.stale_after = stale_after
        self.token: str | None = None

    def owner(self) -> dict:
        """The current holder's record ({} when unknown or free)."""
        return _read_owner(self.path) or {}

    def try_acquire(self) -> bool:
        """Take the lock if it is free or stale; False at once when a live process holds it."""
        if self.token is not None:
            raise RuntimeError(f"lock {self.path} is already held by this FileLock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # after breaking a stale lock, another process may take the name first
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if not break_stale_lock(self.path, self.stale_after):
                    return False
                continue
            token = secrets.token_hex(8)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"host": host_tag(), "pid": os.getpid(), "token": token, "since": time.time()}, f)
            except BaseException:
                self.path.unlink(missing_ok=True)  # e.g. a full disk: leave no lock nobody holds
                raise
            self.token = token
            _hold(self.path, token)
            return True
        return False

    def acquire(self, timeout: float | None = None, poll: float = 0.05,
                on_wait: Callable[[dict], None] | None = None) -> bool:
        """Wait until the lock is taken (True) or `timeout` seconds passed (False). `on_wait(owner)`
        is called once, when the lock is first found held."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.try_acquire():
            if on_wait is not None:
                on_wait(self.owner())
                on_wait = None
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll)
            poll = min(1.0, poll * 1.5)
        return True

    def release(self) -> None:
        """Drop the lock (idempotent); a lock that was broken and taken by another stays theirs."""
        if self.token is None:
            return
        with _held_guard:
            _held.pop(str(self.path), None)
        if (_read_owner(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.token = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_beside(path: str | os.PathLike) -> FileLock:
    """The FileLock `.<name>.lock` beside `path` (e.g. a result file that one process writes at a time)."""
    path = Path(path)
    return FileLock(path.with_name(f".{path.name}{LOCK_SUFFIX}"))
