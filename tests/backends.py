"""Storage backends for the contract suite: every test using ``backend`` runs on each."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from agentpolicy import PolicyEngine, Storage
from agentpolicy.storage import MemoryStorage, open_async_storage, open_storage
from agentpolicy.testing import ManualClock

BACKENDS = ["memory", "sqlite", "redis", "redis-cluster", "postgres"]
SHARED = ["sqlite", "redis", "redis-cluster", "postgres"]
"""Backends that several processes can share (memory is one process: threads stand in)."""
ASYNC_BACKENDS = ["redis-async", "redis-cluster-async", "postgres-async"]
"""The async stores, seen through blocking calls (``tests.async_stores.BlockingStorage``)."""

Spec = tuple[str, str]
"""What another process needs to open the same store: its URL and key prefix."""


def forget_keys(url: str, prefix: str) -> None:
    """Delete the keys under ``prefix`` (one test's own) on the Redis at ``url``."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) == 500:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


def open_spec(spec: Spec) -> Storage:
    """Open the store a :data:`Spec` names (in a worker process)."""
    url, prefix = spec
    return open_storage(url, key_prefix=prefix)


@attrs.define
class Backend:
    """One storage under test: ``open()`` gives another handle on the same state.

    ``spec`` lets another process open the same store; memory has none.
    """

    name: str
    open: Callable[[], Storage]
    spec: Spec | None = None
    opened: list[Storage] = attrs.field(factory=list)

    def handle(self) -> Storage:
        storage = self.open()
        self.opened.append(storage)
        return storage

    def engine(self, clock: ManualClock, **kwargs: object) -> PolicyEngine:
        return PolicyEngine(storage=self.handle(), clock=clock, **kwargs)  # type: ignore[arg-type]


def make_backend(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
    if name.endswith("-async"):  # the same store and spec, opened with open_async_storage
        from tests.async_stores import BlockingStorage

        sync = make_backend(name.removesuffix("-async"), tmp_path, request)
        assert sync.spec is not None
        url, prefix = sync.spec

        def open_async() -> Storage:
            inner = open_async_storage(url, key_prefix=prefix)
            assert inner is not None
            return BlockingStorage(inner)  # type: ignore[return-value]

        return Backend(name, open_async, sync.spec)
    if name in ("redis", "redis-cluster"):
        url = request.getfixturevalue("redis_url" if name == "redis" else "redis_cluster_url")
        prefix = f"test-{uuid.uuid4().hex[:12]}:"  # never flush: every test has its own keys
        if name == "redis":  # REDIS_URL may name a Redis others use: leave none of them behind
            request.addfinalizer(lambda: forget_keys(url, prefix))
        spec = (url, prefix)
        return Backend(name, lambda: open_spec(spec), spec)
    if name == "postgres":
        from tests.postgres_servers import drop_schema, with_schema

        server: str = request.getfixturevalue("postgres_url")
        schema = f"t_{uuid.uuid4().hex[:16]}"  # every test has its own schema, dropped after it
        request.addfinalizer(lambda: drop_schema(server, schema))
        spec = (with_schema(server, schema), "")
        return Backend(name, lambda: open_spec(spec), spec)
    if name == "memory":
        shared = MemoryStorage()
        return Backend(name, lambda: shared)
    if name == "sqlite":
        spec = (f"sqlite:///{tmp_path / 'policies.db'}", "")
        return Backend(name, lambda: open_spec(spec), spec)
    raise ValueError(name)


def serve(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Backend]:
    """A backend for one test; every storage it opened is closed after it."""
    b = make_backend(name, tmp_path, request)
    yield b
    for storage in b.opened:
        storage.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from serve(request.param, tmp_path, request)


@pytest.fixture(params=SHARED)
def shared_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A backend that several processes can open at once."""
    yield from serve(request.param, tmp_path, request)
