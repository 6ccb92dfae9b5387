"""``/healthz``'s check of the store: one at a time, however often it is asked.

A check runs the store's ping in a thread of its own. A store that hangs
(a black-holed Redis, a stalled disk) holds that thread until it answers;
``/healthz`` answers 503 after :data:`WAIT_SECONDS`, and every caller asking
meanwhile waits on the same check instead of starting another. So a load
balancer polling ``/healthz`` while the store hangs leaves one thread
behind, not one per poll (the anyio worker of an abandoned call stayed
blocked on the store: 100 polls, 100 threads). A check still under way
after :data:`FRESH_SECONDS` is not joined any more: the next caller starts
a fresh one (a ping stuck on a dead connection would have kept ``/healthz``
at 503 after the store came back), up to :data:`MAX_STUCK` stuck at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio

__all__ = ["FRESH_SECONDS", "MAX_STUCK", "WAIT_SECONDS", "StoreCheck"]

WAIT_SECONDS = 2.0
"""How long ``/healthz`` waits for the store's answer before it reports none."""

FRESH_SECONDS = 10.0
"""How long a check under way is joined; after that the next caller starts another."""

MAX_STUCK = 4
"""The most checks left waiting on a store that does not answer; past them, callers join."""

_POLL_SECONDS = 0.005


class _Run:
    __slots__ = ("done", "error", "started")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: Exception | None = None
        self.started = time.monotonic()


class StoreCheck:
    """Pings the store in one thread at a time; callers share the check in flight."""

    def __init__(self, ping: Callable[[], object]) -> None:
        self._ping = ping
        self._lock = threading.Lock()
        self._running: _Run | None = None
        self._stuck: list[_Run] = []  # checks given up on that have not returned yet

    def _start(self) -> _Run:
        with self._lock:
            run = self._running
            if run is not None and not run.done.is_set():
                self._stuck = [r for r in self._stuck if not r.done.is_set()]
                stale = time.monotonic() - run.started >= FRESH_SECONDS
                if not stale or len(self._stuck) >= MAX_STUCK:
                    return run  # joined: under way, or too many are stuck already
                self._stuck.append(run)
            run = self._running = _Run()
            threading.Thread(
                target=self._work, args=(run,), name="agentpolicy-healthz", daemon=True
            ).start()
            return run

    def _work(self, run: _Run) -> None:
        try:
            self._ping()
        except Exception as exc:  # handed to the caller, which decides
            run.error = exc
        finally:
            run.done.set()

    async def check(self, wait: float | None = None) -> Exception | None:
        """The store's error; ``TimeoutError`` if no answer came in ``wait`` s; else ``None``."""
        run = self._start()
        with anyio.move_on_after(WAIT_SECONDS if wait is None else wait):
            while not run.done.is_set():  # no thread per waiter: a short poll of the event
                await anyio.sleep(_POLL_SECONDS)
        if not run.done.is_set():
            return TimeoutError()
        return run.error
