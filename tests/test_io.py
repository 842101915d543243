"""The one atomic write: unique temp names per writer, rename on success, nothing left on failure."""

import os

import pytest

from totobench.io import atomic_path, atomic_write, atomic_write_json, temp_path, temp_writer, writer_tag


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
