"""Keep freed CPU memory in the process for the next tensor of that size.

torch's CPU tensors come from malloc. glibc gives a large freed block straight back to the kernel
and maps a fresh one for the next large tensor, which the kernel then faults in and zeroes page by
page: an encoder's attention scores are tens of MB per layer, so a first 4 x 30 s encoder call here
spent ~0.5 s of its ~2.7 s in page faults, and a training step 5-13% of its time in the kernel.
Raising glibc's mmap and trim thresholds keeps freed memory for reuse (what a caching allocator
does); torch's THP_MEM_ALLOC_ENABLE backs large tensors with 2 MB pages, 512x fewer faults.
Peak RSS stays at the peak of what was live. Set SERINUS_KEEP_FREED_MEMORY=0 to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_applied = False


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Once per process, on Linux with glibc: freed blocks under `threshold` bytes stay in the heap.
    Returns whether the malloc settings are in effect."""
    global _applied
    if _applied:
        return True
    if os.environ.get("SERINUS_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch at its next large allocation
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))
    return _applied
