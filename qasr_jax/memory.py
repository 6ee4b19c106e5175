"""Giving a long-running server's freed heap memory back to the operating system.

glibc's malloc keeps what a thread frees in that thread's arena for reuse, and returns it to the system only
from the top of an arena. A server's threads (the event loop, the audio-decoding pool, the engine loops, XLA's
own threads) allocate and free request-sized buffers (upload bodies, decoded audio, host copies of results)
across many arenas, so the freed pages stay resident: the resident set climbs slowly with traffic while the
bytes in use stay flat. And a finished request's objects, tied in reference cycles, wait for Python's rare
oldest-generation collection. ``HeapTrimmer``, when its loop goes idle and after every ``every`` finished jobs,
collects that garbage (at most every ``collect_interval`` seconds) and calls glibc's ``malloc_trim(0)``, which
gives back every whole free page of every arena (elsewhere than glibc: the collection only).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import time
from collections.abc import Callable


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _function(name: str, argtypes: list, restype: object) -> Callable | None:
    """The C library's ``name``, typed; None where the library lacks it (not glibc)."""
    function = getattr(_libc(), name, None)
    if function is None:
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


def _malloc_trim() -> Callable[[int], int] | None:
    return _function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)


def release_free_heap() -> bool:
    """Return the heap's free pages to the system now; False where the C library cannot (not glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
    )]  # fmt: skip


def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    return _function("mallinfo2", [], _MallInfo2)  # glibc >= 2.33


def heap_stats() -> dict[str, int] | None:
    """glibc's heap figures over all arenas, in bytes: ``in_use`` (allocated by malloc and not freed), ``free``
    (freed but kept in the arenas) and ``mapped`` (large blocks in their own maps); None where not glibc."""
    info = _mallinfo2()
    if info is None:
        return None
    m = info()
    return {"in_use": int(m.uordblks) + int(m.hblkhd), "free": int(m.fordblks), "mapped": int(m.hblkhd)}


class HeapTrimmer:
    """Counts finished jobs and releases free heap pages every ``every`` of them, and when its loop goes idle
    after any work, collecting cyclic garbage first at most every ``collect_interval`` seconds. ``every=0`` turns
    it off. Called from one thread (the loop that owns it)."""

    def __init__(self, every: int = 32, collect_interval: float = 5.0) -> None:
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        self.every = every
        self.collect_interval = collect_interval
        self.pending = 0
        self.trims = 0
        self.collections = 0
        self.seconds = 0.0
        self._collected_at = -float("inf")

    def finished(self, jobs: int = 1) -> None:
        self.pending += jobs

    def due(self) -> None:
        """After a step: trim once ``every`` jobs finished since the last trim."""
        if self.every and self.pending >= self.every:
            self.trim()

    def idle(self) -> None:
        """The loop is about to wait for work: trim if anything finished since the last trim."""
        if self.every and self.pending:
            self.trim()

    def trim(self) -> None:
        started = time.perf_counter()
        # A finished request's objects sit in reference cycles (a job and its chunks point at each other), so they
        # wait for Python's oldest-generation collection, which runs rarely in a process holding as many
        # long-lived objects as a loaded model: a served process's bytes in use climbed ~25 MiB per 500 requests
        # that way. A full collection costs ~0.1 s here, so it runs at most every ``collect_interval`` seconds.
        if started - self._collected_at >= self.collect_interval:
            gc.collect()
            self.collections += 1
            self._collected_at = started
        if release_free_heap():
            self.trims += 1
        self.seconds += time.perf_counter() - started
        self.pending = 0


__all__ = ["HeapTrimmer", "heap_stats", "release_free_heap"]
