"""Host tuning through glibc's mallopt(3): keep freed memory for reuse; zero fresh allocations.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB, its dynamic maximum
on 64-bit) with a fresh mmap and unmaps it on free, so each large temporary tensor costs a page
fault per 4 kB page, every time. The features of a batch of clips are just above that size (64
clips x 512 tokens x 256 channels in fp32 = 33.5 MB), so on CPU a broadcast subtraction or an
fp16 -> fp32 copy of a batch ran ~10x slower than its arithmetic (benchmarks/host_malloc.py).
`keep_freed_memory()` raises the mmap threshold to 1 GiB and the trim threshold to 2 GiB with
mallopt(3): large blocks come from the heap and are reused, at the price of up to that much freed
memory kept by the process. It changes no number (the same arithmetic on the same values).
No-op off glibc (macOS, musl) or with $TOTOBENCH_MALLOC=system.

`zeroed_allocations()` makes every block malloc hands out inside it start as zeros. x264 reads memory
it never wrote in its macroblock-tree lookahead, so the same frames encoded in two processes (or
after other allocations) now and then gave other bytes (3 of 8 processes, 120 encodes each, of one
clip); with fresh blocks zeroed, 5,120 encodes (4 clips, 16 processes with other allocations
between encodes) gave one output per clip, the one a fresh process gives.
tests/test_world_deterministic.py checks whole tiny worlds. Off glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
M_PERTURB = -6  # allocations are filled with the complement of this byte, freed blocks with it
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (once per process); whether they are in effect."""
    global _applied
    if _applied is None:
        _applied = False if os.environ.get("TOTOBENCH_MALLOC") == "system" else _mallopt()
    return _applied


@contextmanager
def zeroed_allocations() -> Iterator[None]:
    """Within the block, malloc'd memory starts as zeros (glibc; elsewhere a no-op)."""
    mallopt = _libc_mallopt()
    if mallopt is None:
        yield
        return
    mallopt(M_PERTURB, 0xFF)
    try:
        yield
    finally:
        mallopt(M_PERTURB, 0)


@cache
def _libc_mallopt():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def _mallopt() -> bool:
    mallopt = _libc_mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
