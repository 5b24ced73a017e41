"""Keep freed tensor memory in the process: the CPU step allocates the same large buffers every step.

glibc's malloc serves blocks above ``M_MMAP_THRESHOLD`` (128 KiB at start, adapting up to
32 MiB) with fresh ``mmap`` pages and returns freed heap tops above ``M_TRIM_THRESHOLD`` to the
kernel. A training step allocates dozens of such blocks ([12, 79510] float32 is 3.8 MB; a
b = 500 batch is 19 MB), so every step pays a page fault per 4 KiB touched: measured on the
2-core box (1 torch thread), ``V * 0.99 + V`` on [12, 79510] took 4.9-7.2 ms with the defaults
and 0.6-0.9 ms with the settings below; ``index_select`` of a b = 500 batch 17-23 ms vs 4-7 ms
(``benchmarks/train_step.py`` has the step-level numbers).

Fixing both thresholds (32 MiB mmap, 1 GiB trim) makes freed blocks reusable, as a caching
allocator (jemalloc, tcmalloc, or CUDA's) would. The price: the process keeps its peak heap
(up to 1 GiB more) until it exits; trial processes are short-lived. Opt out with
``TUNEGUARD_MALLOC_TUNING=0``. No-op off glibc (macOS, musl) and when already applied.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the malloc settings once per process; True when they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("TUNEGUARD_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
