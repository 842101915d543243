"""The one atomic write (unique temp names per writer, rename on success, nothing left on failure)
and the advisory lock files beside it (broken only when their holder is provably gone or silent)."""

import json
import os
import subprocess
import sys
import time

import pytest

from totobench.io import (LOCK_STALE_S, TEMP_STALE_S, FileLock, atomic_path, atomic_write, atomic_write_json,
                          host_tag, temp_abandoned, temp_path, temp_writer, writer_gone, writer_tag)


def test_temp_names_are_unique_per_writer_and_name_their_writer(tmp_path):
    final = tmp_path / "x.json"
    a, b = temp_path(final), temp_path(final)
    assert a != b and a.parent == b.parent == tmp_path and a.name.startswith(".x.json.")
    host, pid = temp_writer(a)
    assert pid == os.getpid() and f"{host}-{pid}" == writer_tag()
    assert temp_writer(tmp_path / "x.json") is None and temp_writer(tmp_path / ".x.json.tmp") is None


def test_atomic_write_replaces_whole_files_and_keeps_the_usual_mode(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write(path, "one")
    atomic_write(path, b"two")
    atomic_write_json(tmp_path / "g.json", {"a": 1})
    assert path.read_text() == "two" and (tmp_path / "g.json").read_text() == '{\n  "a": 1\n}\n'
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    with pytest.raises(ValueError):
        atomic_write_json(path, {"x": float("nan")})
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _foreign_lock(path, host, pid, age=0.0):
    """A lock file as another process writes it, its heartbeat `age` seconds old."""
    path.write_text(json.dumps({"host": host, "pid": pid, "token": "other", "since": 0}))
    os.utime(path, (time.time() - age, time.time() - age))


def test_a_lock_is_exclusive_until_released_and_then_gone(tmp_path):
    first, second = FileLock(tmp_path / ".a.lock"), FileLock(tmp_path / ".a.lock")
    assert first.try_acquire() and not second.try_acquire()
    assert first.owner()["pid"] == os.getpid() and not second.acquire(timeout=0.2)
    first.release()
    assert not (tmp_path / ".a.lock").exists()
    with second:
        assert not first.try_acquire()
    assert list(tmp_path.iterdir()) == []


def test_a_lock_is_broken_only_when_its_holder_is_provably_gone_or_its_heartbeat_stopped(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cases = {"dead": (host_tag(), _dead_pid(), 0.0), "live": (host_tag(), sleeper.pid, 0.0),
                 "elsewhere": ("otherhost", sleeper.pid, 0.0),
                 "elsewhere, silent": ("otherhost", sleeper.pid, LOCK_STALE_S + 5)}
        taken = {}
        for name, (host, pid, age) in cases.items():
            path = tmp_path / f".{name}.lock"
            _foreign_lock(path, host, pid, age)
            taken[name] = FileLock(path).try_acquire()
        assert taken == {"dead": True, "live": False, "elsewhere": False, "elsewhere, silent": True}
        assert not writer_gone(host_tag(), sleeper.pid)
        sleeper.kill()  # SIGKILLed and not reaped yet: a zombie, which still answers kill(pid, 0)
        time.sleep(0.2)
        assert writer_gone(host_tag(), sleeper.pid) and not writer_gone("otherhost", sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_release_leaves_a_lock_that_another_process_took_over(tmp_path):
    lock = FileLock(tmp_path / ".a.lock")
    assert lock.try_acquire()
    _foreign_lock(lock.path, "otherhost", 1)  # ours was judged stale and broken; this one is theirs
    lock.release()
    assert json.loads(lock.path.read_text())["host"] == "otherhost"


def test_temp_files_are_abandoned_when_their_writer_died_or_after_a_day(tmp_path):
    host = host_tag()
    files = {"mine": temp_path(tmp_path / "a"), "dead": tmp_path / f".a.{host}-{_dead_pid()}.0f0f0f0f.tmp",
             "elsewhere": tmp_path / ".a.otherhost-1.0f0f0f0f.tmp", "old": tmp_path / ".a.otherhost-2.0f0f0f0f.tmp",
             "not ours": tmp_path / ".a.tmp"}
    for p in files.values():
        p.write_bytes(b"x")
    day_ago = time.time() - TEMP_STALE_S - 5
    os.utime(files["old"], (day_ago, day_ago))
    assert {k: temp_abandoned(p) for k, p in files.items()} == {
        "mine": False, "dead": True, "elsewhere": False, "old": True, "not ours": False}
