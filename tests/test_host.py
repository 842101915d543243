"""totobench/host.py: the command keeps freed memory for reuse (glibc), and can be told not to."""

import contextlib
import ctypes
import ctypes.util
import subprocess
import sys

import pytest

from totobench import cli, host

PROBE = "from totobench.host import keep_freed_memory; print(keep_freed_memory())"


def _applied(env_value: str | None) -> str:
    import os
    env = {k: v for k, v in os.environ.items() if k != "TOTOBENCH_MALLOC"}
    if env_value is not None:
        env["TOTOBENCH_MALLOC"] = env_value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_thresholds_are_set_unless_the_system_allocator_is_asked_for():
    assert _applied(None) == "True"
    assert _applied("system") == "False"


def test_the_command_applies_it_before_main_and_main_alone_does_not(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("kept"))
    monkeypatch.setattr(cli, "main", lambda argv=None: calls.append("main") or 0)
    assert cli.entry() == 0
    assert calls == ["kept", "main"]


def test_main_called_in_process_leaves_the_allocator_alone(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("kept"))
    assert cli.main(["ls", "tasks"]) == 0
    assert calls == []


def test_the_console_script_is_entry():
    import tomllib
    from pathlib import Path
    scripts = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["totobench"] == "totobench.cli:entry"


def test_it_is_applied_once_per_process(monkeypatch):
    seen = []
    monkeypatch.setattr(host, "_applied", None)
    monkeypatch.setattr(host, "_mallopt", lambda: seen.append(1) or True)
    assert host.keep_freed_memory() and host.keep_freed_memory()
    assert seen == [1]


@pytest.mark.skipif(host._libc_mallopt() is None, reason="glibc only")
def test_blocks_handed_out_inside_zeroed_allocations_start_as_zeros():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def reused_block(zeroed: bool) -> bytes:
        """Fill a block with 0xAB, free it, allocate the same size again: what the new block holds."""
        old = libc.malloc(4096)
        ctypes.memset(old, 0xAB, 4096)
        libc.free(old)
        with host.zeroed_allocations() if zeroed else contextlib.nullcontext():
            new = libc.malloc(4096)
        content = ctypes.string_at(new + 64, 4096 - 64)  # past the words malloc keeps in a freed block
        libc.free(new)
        return content

    assert reused_block(zeroed=False).count(0xAB) > 3000  # glibc hands the freed block back as it was
    assert reused_block(zeroed=True) == bytes(4096 - 64)
    assert reused_block(zeroed=False).count(0xAB) > 3000  # and the setting ends with the block
