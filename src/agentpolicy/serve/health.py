"""``/healthz``'s check of the store: one at a time, however often it is asked.

A check runs the store's ping in a thread of its own. A store that hangs
(a black-holed Redis, a stalled disk) holds that thread until it answers;
``/healthz`` answers 503 after :data:`WAIT_SECONDS`, and every caller asking
meanwhile waits on the same check instead of starting another. So a load
balancer polling ``/healthz`` while the store hangs leaves one thread
behind, not one per poll (the anyio worker of an abandoned call stayed
blocked on the store: 100 polls, 100 threads).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio

__all__ = ["WAIT_SECONDS", "StoreCheck"]

WAIT_SECONDS = 2.0
"""How long ``/healthz`` waits for the store's answer before it reports none."""

_POLL_SECONDS = 0.005


class _Run:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: Exception | None = None


class StoreCheck:
    """Pings the store in one thread at a time; callers share the check in flight."""

    def __init__(self, ping: Callable[[], object]) -> None:
        self._ping = ping
        self._lock = threading.Lock()
        self._running: _Run | None = None

    def _start(self) -> _Run:
        with self._lock:
            run = self._running
            if run is None or run.done.is_set():  # none in flight: a fresh check
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
