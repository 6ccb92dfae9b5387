"""Storage backends for the contract suite: every test using ``backend`` runs on each."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from agentpolicy import PolicyEngine, Storage
from agentpolicy.storage import MemoryStorage, SQLiteStorage
from agentpolicy.testing import ManualClock

BACKENDS = ["memory", "sqlite", "redis", "redis-cluster"]


@attrs.define
class Backend:
    """One storage under test: ``open()`` gives another handle on the same state."""

    name: str
    open: Callable[[], Storage]
    opened: list[Storage] = attrs.field(factory=list)

    def handle(self) -> Storage:
        storage = self.open()
        self.opened.append(storage)
        return storage

    def engine(self, clock: ManualClock, **kwargs: object) -> PolicyEngine:
        return PolicyEngine(storage=self.handle(), clock=clock, **kwargs)  # type: ignore[arg-type]


def make_backend(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
    if name in ("redis", "redis-cluster"):
        from agentpolicy.storage.redis import RedisStorage

        url = request.getfixturevalue("redis_url" if name == "redis" else "redis_cluster_url")
        prefix = f"test-{uuid.uuid4().hex[:12]}:"  # never flush: every test has its own keys
        return Backend(name, lambda: RedisStorage(url, key_prefix=prefix))
    if name == "memory":
        shared = MemoryStorage()
        return Backend(name, lambda: shared)
    if name == "sqlite":
        path = tmp_path / "policies.db"
        return Backend(name, lambda: SQLiteStorage(path))
    raise ValueError(name)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = make_backend(request.param, tmp_path, request)
    yield b
    for storage in b.opened:
        storage.close()
