"""The server's return of freed heap memory to the system (``qasr_jax.memory``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qasr_jax.memory import HeapTrimmer

# Run in a fresh process, so the heap measured is only this script's: it frees most of ~256 MiB of small blocks
# spread over 4 threads (4 glibc arenas), keeping every 64th block so no arena can shrink from its top, then
# reads the resident anonymous memory before and after ``release_free_heap``, and the allocator's own figures
# before the churn and before the release.
SCRIPT = r"""
import ctypes, json, threading
from qasr_jax.memory import heap_stats, release_free_heap

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def rss_anon_mib():  # the heap's resident pages, without the file pages of code and libraries
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:")) / 1024

def churn():
    blocks = []
    for _ in range(16384):  # 16384 x 4 KiB = 64 MiB per thread, below the mmap threshold: heap memory
        p = libc.malloc(4096)
        ctypes.memset(p, 1, 4096)
        blocks.append(p)
    for i, p in enumerate(blocks):
        if i % 64:
            libc.free(p)

start = heap_stats()
threads = [threading.Thread(target=churn) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
before, stats = rss_anon_mib(), heap_stats()
released = release_free_heap()
print(json.dumps({"before": before, "after": rss_anon_mib(), "released": released, "start": start,
                  "stats": stats}))
"""


def test_release_free_heap_gives_freed_pages_back_to_the_system() -> None:
    out = subprocess.run([sys.executable, "-c", "import ctypes.util\n" + SCRIPT], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    assert result["released"], "the C library has no malloc_trim: the server's heap trimming is glibc's"
    # What the churn left free in the arenas, by the allocator's count: ~252 MiB with glibc's default arenas,
    # less where fewer arenas are allowed (freed blocks at an arena's top go back at once), never nothing.
    stats = result["stats"]
    freed_mib = (stats["free"] - result["start"]["free"]) / 2**20
    assert freed_mib > 64 and stats["in_use"] < stats["free"], result
    # The release gives back the whole pages of those free bytes (all but about 1/63 of each freed run), and
    # cannot give back more than the arenas held free.
    dropped_mib = result["before"] - result["after"]
    assert 0.9 * freed_mib <= dropped_mib <= stats["free"] / 2**20, result


def test_heap_trimmer_trims_every_n_jobs_and_when_idle_after_work() -> None:
    heap = HeapTrimmer(every=3)
    heap.idle()
    assert heap.trims == 0  # nothing finished yet: idle does not trim
    heap.finished()
    heap.finished()
    heap.due()
    assert heap.trims == 0
    heap.finished()
    heap.due()
    assert heap.trims == 1 and heap.pending == 0
    heap.finished()
    heap.idle()
    assert heap.trims == 2
    heap.idle()
    assert heap.trims == 2
    off = HeapTrimmer(every=0)
    off.finished(10)
    off.due()
    off.idle()
    assert off.trims == 0
    with pytest.raises(ValueError, match="every"):
        HeapTrimmer(every=-1)


def test_trim_collects_cyclic_garbage_at_most_every_interval() -> None:
    """Objects in a reference cycle (as a finished job and its chunks are) are freed by the trim's collection,
    which runs again only once ``collect_interval`` has passed."""
    import gc
    import weakref

    import numpy as np

    class Node:
        pass

    def cycle() -> weakref.ref:
        a, b = Node(), Node()
        a.other, b.other, a.data = b, a, np.ones(1 << 20)
        return weakref.ref(a)

    heap = HeapTrimmer(every=1, collect_interval=3600.0)
    gc.disable()
    try:
        first = cycle()
        heap.trim()
        assert first() is None and heap.collections == 1
        second = cycle()
        heap.trim()  # within the interval: no collection, the cycle stays
        assert second() is not None and heap.collections == 1
        heap._collected_at -= 3600.0
        heap.trim()
        assert second() is None and heap.collections == 2
    finally:
        gc.enable()
