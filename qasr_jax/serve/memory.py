"""Giving a long-running server's freed heap memory back to the operating system.

glibc's malloc keeps what a thread frees in that thread's arena for reuse, and returns it to the system only
from the top of an arena. A server's threads (the event loop, the audio-decoding pool, the engine loops, XLA's
own threads) allocate and free request-sized buffers (upload bodies, decoded audio, host copies of results)
across many arenas, so the freed pages stay resident: the resident set climbs slowly with traffic while the
bytes in use stay flat. ``HeapTrimmer`` calls glibc's ``malloc_trim(0)``, which gives back every whole free
page of every arena, when its loop goes idle and after every ``every`` finished jobs. Elsewhere (musl, macOS)
it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time
from collections.abc import Callable


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def release_free_heap() -> bool:
    """Return the heap's free pages to the system now; False where the C library cannot (not glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class HeapTrimmer:
    """Counts finished jobs and releases free heap pages every ``every`` of them, and when its loop goes idle
    after any work. ``every=0`` turns it off. Called from one thread (the loop that owns it)."""

    def __init__(self, every: int = 32) -> None:
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        self.every = every
        self.pending = 0
        self.trims = 0
        self.seconds = 0.0

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
        if release_free_heap():
            self.trims += 1
        self.seconds += time.perf_counter() - started
        self.pending = 0


__all__ = ["HeapTrimmer", "release_free_heap"]
