"""Host tuning the `totobench` command applies once at start: keep freed memory for reuse.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB, its dynamic maximum
on 64-bit) with a fresh mmap and unmaps it on free, so each large temporary tensor costs a page
fault per 4 kB page, every time. The features of a batch of clips are just above that size (64
clips x 512 tokens x 256 channels in fp32 = 33.5 MB), so on CPU a broadcast subtraction or an
fp16 -> fp32 copy of a batch ran ~10x slower than its arithmetic (benchmarks/host_malloc.py).
`keep_freed_memory()` raises the mmap threshold to 1 GiB and the trim threshold to 2 GiB with
mallopt(3): large blocks come from the heap and are reused, at the price of up to that much freed
memory kept by the process. It changes no number (the same arithmetic on the same values).
No-op off glibc (macOS, musl) or with $TOTOBENCH_MALLOC=system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (once per process); whether they are in effect."""
    global _applied
    if _applied is None:
        _applied = False if os.environ.get("TOTOBENCH_MALLOC") == "system" else _mallopt()
    return _applied


def _mallopt() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
