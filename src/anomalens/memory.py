"""Keep freed memory in the process for reuse: the CPU allocator setting of `anomalens` commands.

glibc's ``malloc`` serves large blocks (above a threshold that moves between 128 KiB and 32 MiB) with fresh
``mmap`` pages and unmaps them when they are freed, and it returns the free top of its heap to the system
beyond 128 KiB. A forward pass allocates its activations anew at every block, so on CPU every large
activation is first touched through one page fault per 4 KiB page, which the kernel zero-fills: 114,000
to 250,000 faults per ViT-L-14-336 call at 518 px, about 3 % of the call (docs/performance.md §8).
Two ``mallopt`` settings remove them: no ``mmap`` blocks (``M_MMAP_MAX`` = 0, everything comes from
the heap, where freed blocks are reused) and a trim threshold of `RETAIN_BYTES` (up to that much free
memory stays mapped). The cost is a resident size that stays near its peak plus up to `RETAIN_BYTES`.

`anomalens` commands call `retain_freed_memory` before they run; a program that uses the library may call
it once at start-up. ``ANOMALENS_MALLOC=system`` leaves the allocator as it is. Standard library only.
"""

from __future__ import annotations

import ctypes
import os
import sys

RETAIN_BYTES = 1 << 30
"""Free memory at the top of the heap that ``malloc`` keeps mapped instead of returning it (1 GiB)."""

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def retain_freed_memory(retain_bytes: int = RETAIN_BYTES) -> bool:
    """Make glibc's ``malloc`` reuse freed memory instead of mapping fresh pages (process-wide).

    Returns True when the settings took effect; False on a C library without ``mallopt`` (macOS, Windows,
    musl ignores it) or when the environment says ``ANOMALENS_MALLOC=system``.
    """
    if os.environ.get("ANOMALENS_MALLOC") == "system" or not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, retain_bytes))
