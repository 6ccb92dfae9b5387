"""Everything a store holds, read past the engine, to prove that a call wrote nothing."""

from __future__ import annotations

import copy
import sqlite3
from typing import Any

from tests.backends import Backend


def store_state(backend: Backend) -> Any:
    """Every document (with its version), index, log, operation id and sequence of the store.

    Read straight from the backend (the memory store's dicts, the SQLite
    file, every Redis key under the test's prefix, the PostgreSQL schema's
    tables), so nothing the engine caches can hide a write.
    """
    if backend.name == "memory":
        return _memory(backend.open())
    assert backend.spec is not None
    url, prefix = backend.spec
    if backend.name == "sqlite":
        return _sqlite(url.removeprefix("sqlite:///"))
    if backend.name in ("redis", "redis-cluster"):
        return _redis(url, prefix, cluster=backend.name == "redis-cluster")
    return _postgres(url)


def _memory(storage: Any) -> Any:
    shards = {}
    for name, shard in storage._shards.items():
        with shard.lock:
            shards[name] = copy.deepcopy({
                "docs": dict(shard.docs),
                "indexes": {k: dict(v.scores) for k, v in shard.indexes.items()},
                "logs": {k: list(v) for k, v in shard.logs.items()},
                "ops": dict(shard.ops),
            })  # fmt: skip
    with storage._global_lock:
        indexes = {k: dict(v.scores) for k, v in storage._global.items()}
    return {"shards": shards, "global": indexes, "seq": repr(storage._seq)}  # count(n): next n


def _sqlite(path: str) -> Any:
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(map(repr, conn.execute(f"SELECT * FROM {t}"))) for t in sorted(tables)}
    finally:
        conn.close()


def _redis(url: str, prefix: str, *, cluster: bool) -> Any:
    import redis

    client: Any = (
        redis.cluster.RedisCluster.from_url(url.replace("+cluster", ""))
        if cluster
        else redis.Redis.from_url(url)
    )
    try:
        found = {}
        for key in sorted(client.scan_iter(match=prefix + "*")):
            kind = client.type(key).decode()
            if kind == "hash":
                value: Any = sorted(client.hgetall(key).items())
            elif kind == "zset":
                value = client.zrange(key, 0, -1, withscores=True)
            elif kind == "list":
                value = client.lrange(key, 0, -1)
            elif kind == "set":
                value = sorted(client.smembers(key))
            else:
                value = client.get(key)
            found[key] = (kind, value)
        return found
    finally:
        client.close()


def _postgres(url: str) -> Any:
    import psycopg

    base, _, query = url.partition("?")
    schema = dict(p.split("=", 1) for p in query.split("&") if p)["schema"]
    with psycopg.connect(base, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (schema,),
        )]  # fmt: skip
        state = {
            t: sorted(map(repr, conn.execute(f'SELECT * FROM "{schema}"."{t}"')))
            for t in sorted(tables)
        }
        state["seq"] = [repr(conn.execute(f'SELECT last_value FROM "{schema}".seq').fetchone())]
        return state
