"""The one thread a scheduler runs on: turns while there is work, heap trimming when idle, and one failure path.

``WorkLoop`` is the base of both schedulers (``Scheduler`` for uploads, ``StreamScheduler`` for live streams). A
subclass says when it has work (``_has_work``, called under ``_lock``), what one turn does (``_turn``, called
without the lock), and what happens to every open request when a turn raises (``_fail_open``); the loop:

1. when there is nothing to do, give freed heap pages back to the system (``qasr_jax.memory``) and wait;
2. run one turn, then a heap trim when one is due;
3. on an exception from a turn (a bug, out of memory): remember it as ``failure``, refuse new work
   (``_stopping``), fail every open request with it, and end the thread.

``stop`` lets the work already taken finish, then ends the thread.
"""

from __future__ import annotations

import threading

from qasr_jax.memory import HeapTrimmer


class WorkLoop:
    """A scheduler's thread (see the module docstring)."""

    def __init__(self, name: str, trim_every: int) -> None:
        self.failure: BaseException | None = None
        self.heap = HeapTrimmer(trim_every)
        self._name = name
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- what a subclass provides --

    def _has_work(self) -> bool:
        raise NotImplementedError

    def _turn(self) -> None:
        raise NotImplementedError

    def _fail_open(self, error: BaseException) -> None:
        raise NotImplementedError

    # -- the thread --

    def start(self) -> None:
        """Run turns on a thread of its own whenever there is work."""
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the work already submitted, then end the thread; no new work is taken meanwhile."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    idle = not self._has_work()
                if idle:
                    self.heap.idle()
                with self._lock:
                    while not self._has_work():
                        if self._stopping:
                            return
                        self._lock.wait(0.5)
                self._turn()
                self.heap.due()
        except BaseException as error:
            self.failure = error
            with self._lock:
                self._stopping = True
            self._fail_open(error)
            raise


__all__ = ["WorkLoop"]
