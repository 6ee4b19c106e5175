"""Shape buckets and the cache of compiled programs, for every caller that compiles per shape.

A jitted program is compiled once per static shape. Callers that see inputs of many sizes (the transcription
engine, the aligner, the trainer's evaluator) pad them up to a few bucket sizes from the ladders here, and keep
their compiled programs in a ``ProgramCache``, which counts them.

Ladders:

- ``bucket_size(n, minimum, steps_per_octave)``: a geometric ladder, ``minimum · (1, 1.5, 2, 3, 4, 6, ...)`` for
  two steps per octave; padding wastes at most 1/(steps_per_octave + 1) of a bucket;
- ``batch_bucket(n, max_batch)``: rows, the next power of two (at most ``max_batch``);
- ``round_up(n, multiple)``: the next multiple (whole encoder windows, token tiles).

The ladders of each quantity are named here once: ``PROMPT_LADDER``, ``STEP_LADDER``, ``WINDOW_LADDER``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any


def bucket_size(n: int, minimum: int = 1, steps_per_octave: int = 2) -> int:
    """The smallest size ≥ ``n`` on a geometric ladder from ``minimum`` with ``steps_per_octave`` sizes per
    doubling: ``minimum · (1, 1.5, 2, 3, 4, 6, ...)`` for 2, ``minimum · (1, 1.25, 1.5, 1.75, 2, 2.5, ...)`` for 4.

    Inputs spanning ``k`` doublings need ``k · steps_per_octave`` programs.
    """
    size = minimum
    while True:
        for step in range(steps_per_octave):
            candidate = size + size * step // steps_per_octave
            if candidate >= n:
                return candidate
        size *= 2


def batch_bucket(n: int, max_batch: int) -> int:
    """Rows of the program that runs ``n`` requests: the next power of two, at most ``max_batch``."""
    if n > max_batch:
        raise ValueError(f"{n} requests do not fit a batch of at most {max_batch}")
    return min(1 << max(n - 1, 0).bit_length(), max_batch)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is at least ``n`` (and at least one multiple)."""
    return -(-max(int(n), 1) // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Ladder:
    """A geometric ladder: ``size(n)`` is the bucket of ``n``."""

    minimum: int
    steps_per_octave: int

    def size(self, n: int) -> int:
        return bucket_size(n, self.minimum, self.steps_per_octave)


# Prompt tokens: prefill cost grows with them, so a finer ladder (32, 40, 48, 56, 64, 80, ...).
PROMPT_LADDER = Ladder(32, 4)
# Generated-token slots: they only size the cache (the loop stops when every row is done).
STEP_LADDER = Ladder(16, 2)
# Audio, in encoder windows (1, 1.5, 2, 3, 4, 6, ... windows).
WINDOW_LADDER = Ladder(1, 2)


class ProgramCache:
    """Compiled programs keyed by their static shape (any hashable key), built on first use and counted.

    ``get(key, build)`` returns the program for ``key``, calling ``build()`` (which lowers and compiles) the first
    time; ``count`` is the number of programs compiled, ``seconds`` their total build time.
    """

    def __init__(self) -> None:
        self._programs: dict[Hashable, Any] = {}
        self._lock = threading.RLock()
        self.seconds = 0.0

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        program = self._programs.get(key)
        if program is None:
            # Threads sharing an engine (a server's upload scheduler and its live streams) build a program once.
            with self._lock:
                program = self._programs.get(key)
                if program is None:
                    started = time.perf_counter()
                    program = build()
                    self.seconds += time.perf_counter() - started
                    self._programs[key] = program
        return program

    @property
    def count(self) -> int:
        return len(self._programs)

    def keys(self) -> list[Hashable]:
        return list(self._programs)


__all__ = [
    "PROMPT_LADDER",
    "STEP_LADDER",
    "WINDOW_LADDER",
    "Ladder",
    "ProgramCache",
    "batch_bucket",
    "bucket_size",
    "round_up",
]
