"""A store wrapper that goes down or stalls on demand (for the guard and async tests)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from agentpolicy import StorageUnavailableError
from agentpolicy.storage import MemoryStorage
from agentpolicy.storage.base import Session, Storage


class FaultyStorage:
    """Delegates to ``inner``; ``down`` makes every call fail, ``stall()`` blocks them.

    A stalled call waits (in its own thread) until ``resume()``; ``stalled``
    is set once a call is waiting, so a test knows the call has reached the
    store. A stall that is never resumed fails after ``limit`` seconds, so a
    broken test fails instead of hanging.
    """

    def __init__(self, inner: Storage | None = None, limit: float = 30.0) -> None:
        self.inner: Storage = inner if inner is not None else MemoryStorage()
        self.global_indexes_atomic = self.inner.global_indexes_atomic
        self.default_history_retention = self.inner.default_history_retention
        self.down = False
        self.limit = limit
        self._gate = threading.Event()
        self._gate.set()
        self.stalled = threading.Event()

    def stall(self) -> None:
        self.stalled.clear()
        self._gate.clear()

    def resume(self) -> None:
        self._gate.set()

    def _check(self) -> None:
        if not self._gate.is_set():
            self.stalled.set()
            if not self._gate.wait(self.limit):
                raise StorageUnavailableError("the test never resumed a stalled store")
        if self.down:
            raise StorageUnavailableError("the store is down (test)")

    @contextmanager
    def session(self, shard: str, *, write: bool = True) -> Iterator[Session]:
        self._check()
        with self.inner.session(shard, write=write) as session:
            yield session

    def log(self, shard: str, name: str, limit: int) -> list[tuple[int, int, Any]]:
        self._check()
        return self.inner.log(shard, name, limit)

    def close(self) -> None:
        self.inner.close()
