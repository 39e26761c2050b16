"""Keep freed CPU memory in the process for the next tensor of that size.

torch's CPU tensors come from malloc. glibc gives a large freed block straight back to the kernel
and maps a fresh one for the next large tensor, which the kernel then faults in and zeroes page by
page: an encoder's attention scores are tens of MB per layer, so a first 4 x 30 s encoder call here
spent ~0.5 s of its ~2.7 s in page faults, and a training step 5-13% of its time in the kernel.
Raising glibc's mmap and trim thresholds keeps freed memory for reuse (what a caching allocator
does); torch's THP_MEM_ALLOC_ENABLE backs large tensors with 2 MB pages, 512x fewer faults.
Peak RSS stays at the peak of what was live. Set SERINUS_KEEP_FREED_MEMORY=0 to leave malloc as it is.

Loading is the exception (`returning_freed_memory`): weights arrive one tensor at a time and are
converted (packed, or quantised to int8) as they come, so every float32 buffer is freed for good;
kept, they would leave the heap ~100 MB above the loaded model for the rest of the process (the
180m-flash architecture in int8: 598 MB peak against 510 MB).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_GLIBC_MMAP_THRESHOLD = 128 << 10  # glibc's default (it then adapts; any mallopt fixes it)
_kept_threshold: int | None = None  # set once keep_freed_memory() is in effect


def _glibc():
    """libc with mallopt and malloc_trim, unless opted out or not Linux/glibc (musl has no mallopt)."""
    if os.environ.get("SERINUS_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _huge_pages_for_large_tensors() -> None:
    # torch reads this once, at its first large allocation: set before any
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Once per process, on Linux with glibc: freed blocks under `threshold` bytes stay in the heap.
    Returns whether the malloc settings are in effect."""
    global _kept_threshold
    if _kept_threshold is not None:
        return True
    libc = _glibc()
    if libc is None:
        return False
    _huge_pages_for_large_tensors()
    if libc.mallopt(_M_MMAP_THRESHOLD, threshold) and libc.mallopt(_M_TRIM_THRESHOLD, threshold):
        _kept_threshold = threshold
    return _kept_threshold is not None


@contextlib.contextmanager
def returning_freed_memory():
    """Within: blocks of 256 KB and more are mapped on their own and go back to the kernel when
    freed. After: the heap is trimmed and the threshold in force before comes back (the kept-memory
    one once `keep_freed_memory` is in effect, else glibc's default)."""
    libc = _glibc()
    if libc is None:
        yield
        return
    _huge_pages_for_large_tensors()
    libc.mallopt(_M_MMAP_THRESHOLD, 256 << 10)
    try:
        yield
    finally:
        libc.malloc_trim(0)
        libc.mallopt(_M_MMAP_THRESHOLD, _kept_threshold or _GLIBC_MMAP_THRESHOLD)
