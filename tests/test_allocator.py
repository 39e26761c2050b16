"""serinus.allocator: with glibc's thresholds raised, a large tensor freed and made again reuses its
memory instead of faulting fresh pages in; the opt-out leaves malloc as it is."""

import subprocess
import sys

import pytest

CHECK = """
import resource
from serinus.allocator import keep_freed_memory
applied = keep_freed_memory() and keep_freed_memory()
import torch
x = torch.ones(16 << 20); del x  # 64 MB: above glibc's largest own mmap threshold (32 MB)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(16 << 20); del x
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(**env):
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", **env}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_and_the_opt_out():
    applied, faults = _run()
    assert applied and faults < 1000  # the second 64 MB comes from the heap, already mapped
    applied, faults = _run(SERINUS_KEEP_FREED_MEMORY="0")
    assert not applied and faults > 8000  # 16,384 fresh 4 KB pages


LOADING = """
import resource
from serinus.allocator import keep_freed_memory, returning_freed_memory
import torch
keep_freed_memory()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
base = rss()
with returning_freed_memory():  # as while weights stream in: each freed buffer goes back
    for _ in range(8):
        x = torch.ones(4 << 20); del x  # 16 MB each, under the kept-memory threshold
    inside = rss() - base
x = torch.ones(16 << 20); del x  # after: kept for reuse again
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(16 << 20); del x
print(inside, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_loading_gives_freed_memory_back_and_then_keeps_it_again():
    out = subprocess.run([sys.executable, "-c", LOADING], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"}).stdout.split()
    inside, faults = int(out[0]), int(out[1])
    assert inside < 8  # MB still held after eight 16 MB buffers came and went
    assert faults < 1000  # afterwards the freed 64 MB is reused, not faulted in again
