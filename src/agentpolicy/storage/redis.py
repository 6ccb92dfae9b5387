"""Redis storage (the ``redis`` extra): one budget shared by every process, on Redis or Cluster.

The store is optimistic. Reads may be answered from a cache of documents
this process has seen; a commit is one script (``redis_commit.lua``, no rule
of the ledger in it) that checks the version of everything the step read and
only then writes, so a stale read costs a retry, never a wrong decision. In
the steady state an authorize is exactly one command.

Every key of one shard shares a hash tag (``agent-policy:{agent-1}:h/agent-1``)
derived injectively from the shard's id (:func:`agentpolicy.ledger.keys.tag`),
so on a Redis Cluster a commit runs on one slot; every key the script
touches is passed in ``KEYS``. Global indexes (``@...``) live outside any
shard: on a single Redis they change in the same script; on a Cluster they
are written as hints just before (additions) and after (everything) the
commit.

A commit carries an operation id that the script records, so a commit sent
again after a timeout (by us, or by redis-py's retries, or by the Cluster
client) is applied once and answers the first result. When no answer comes
at all, the error says that the outcome is unknown. Amounts never enter
Redis as numbers: documents are JSON text. Expiries are durations
(``PEXPIRE``) on the server's clock, never instants from the engine's clock.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import timedelta
from importlib import resources
from typing import Any, TypeVar

import redis
import redis.cluster
import redis.exceptions
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from agentpolicy.errors import InternalError, StorageUnavailableError
from agentpolicy.ledger.keys import tag
from agentpolicy.storage.base import CONFLICT, NEXT_SEQ, OP_KEEP_US, Doc, Outcome, Txn

__all__ = ["RedisStorage"]

T = TypeVar("T")

_CACHE_SIZE = 50_000
_UNAVAILABLE = ("CLUSTERDOWN", "TRYAGAIN", "LOADING", "MASTERDOWN", "READONLY", "BUSY ")


def _script() -> str:
    return (resources.files("agentpolicy.storage") / "redis_commit.lua").read_text("utf-8")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class _RedisSession:
    fresh = False

    __slots__ = ("prefix", "shard", "storage")

    def __init__(self, storage: RedisStorage, shard: str) -> None:
        self.storage = storage
        self.shard = shard
        self.prefix = f"{storage.key_prefix}{{{tag(shard)}}}:"

    def key(self, name: str) -> str:
        if name.startswith("@"):
            return self.storage.key_prefix + name
        return self.prefix + name

    def get(self, names: Sequence[str], guess: frozenset[str] = frozenset()) -> dict[str, Doc]:
        cache = self.storage.cache
        found: dict[str, Doc] = {}
        fetch: list[tuple[str, str]] = []
        for name in names:
            key = self.key(name)
            if name in guess:
                cached = cache.get(key)
                if cached is not None and cached[0]:
                    found[name] = cached
                continue
            fetch.append((name, key))
        if fetch:
            client = self.storage.client

            def read() -> list[Any]:
                if len(fetch) == 1:
                    return [client.hmget(fetch[0][1], "v", "b")]
                pipe = client.pipeline(transaction=False)
                for _, key in fetch:
                    pipe.hmget(key, "v", "b")
                return list(pipe.execute())

            for (name, key), (version, body) in zip(fetch, self.storage.guard(read), strict=True):
                if version is None:
                    cache.pop(key, None)
                    continue
                doc = (int(version), json.loads(body))
                self.storage.remember(key, doc)
                found[name] = doc
        return found

    def scan(self, index: str, upto: int, limit: int) -> list[tuple[str, int]]:
        key = self.key(index)
        rows = self.storage.guard(
            lambda: self.storage.client.zrangebyscore(
                key, "-inf", upto, start=0, num=limit, withscores=True
            )
        )
        return [(member, int(score)) for member, score in rows]

    def commit(self, txn: Txn) -> Outcome:
        storage = self.storage
        keys_: list[str] = [self.prefix + "#op:" + txn.op, self.prefix + "#seq"]
        position: dict[str, int] = {}

        def ref(key: str) -> str:
            found = position.get(key)
            if found is None:
                keys_.append(key)
                found = position[key] = len(keys_)
            return str(found)

        args: list[Any] = [OP_KEEP_US // 1000, _dumps(txn.result), txn.at, len(txn.expect)]
        for name, version in txn.expect.items():
            args += [ref(self.key(name)), version]
        args.append(len(txn.put))
        put_keys = []
        for name, body in txn.put.items():
            key = self.key(name)
            put_keys.append((key, body))
            expected = txn.expect.get(name)
            args += [
                ref(key),
                _dumps(body),
                txn.ttl.get(name, 0),
                "" if expected is None else expected + 1,
            ]
        args.append(len(txn.delete))
        args += [ref(self.key(name)) for name in txn.delete]
        inline = [op for op in txn.index if storage.inline_globals or not op[0].startswith("@")]
        later = [
            op for op in txn.index if not (storage.inline_globals or not op[0].startswith("@"))
        ]
        args.append(len(inline))
        for index, member, score in inline:
            code = "" if score is None else "s" if score == NEXT_SEQ else score
            args += [ref(self.key(index)), member, code]
        args.append(len(txn.append))
        for log, entry, keep_after, max_len in txn.append:
            args += [
                ref(self.key(log)),
                _dumps(entry),
                "" if keep_after is None else keep_after,
                "" if max_len is None else max_len,
            ]
        if later:  # hints outside the shard's slot: add before, so a crash loses none
            storage.apply_global([op for op in later if op[2] is not None])
        reply = storage.run_commit(keys_, args)
        kind = reply[0]
        if kind == "R":
            for key, _ in put_keys:
                storage.cache.pop(key, None)
            return Outcome(applied=False, replayed=True, result=json.loads(reply[1]))
        if kind == "C":
            for j in range(1, len(reply), 3):
                key, version, body = reply[j], int(reply[j + 1]), reply[j + 2]
                if version:
                    storage.remember(key, (version, json.loads(body)))
                else:
                    storage.cache.pop(key, None)
            return CONFLICT
        for (key, body), version in zip(put_keys, reply[1:], strict=True):
            storage.remember(key, (int(version), body))
        for name in txn.delete:
            storage.cache.pop(self.key(name), None)
        if later:
            storage.apply_global(later)
        return Outcome(applied=True, replayed=False, result=txn.result)


class RedisStorage:
    """Storage on Redis (``redis://``, ``rediss://``) or Redis Cluster (``redis+cluster://``).

    ``key_prefix`` separates tenants on one server; ``timeout`` bounds one
    command (redis-py then retries twice, which the operation ids make safe).
    """

    default_history_retention: int | None = 90 * 86_400_000_000
    """Redis keeps 90 days of history by default, so memory stays bounded."""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "agent-policy:",
        timeout: timedelta = timedelta(seconds=2),
    ) -> None:
        self.key_prefix = key_prefix
        self.cluster = url.startswith(("redis+cluster://", "rediss+cluster://"))
        self.global_indexes_atomic = not self.cluster
        self.inline_globals = not self.cluster
        seconds = timeout.total_seconds()
        options: dict[str, Any] = {
            "socket_timeout": seconds,
            "socket_connect_timeout": seconds,
            "decode_responses": True,
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.05), 2),
        }
        try:
            if self.cluster:
                plain = url.replace("+cluster", "", 1)
                self.client: Any = redis.cluster.RedisCluster.from_url(plain, **options)
            else:
                self.client = redis.Redis.from_url(url, **options)
        except (redis.exceptions.RedisError, ValueError, IndexError) as exc:
            raise StorageUnavailableError(f"cannot reach Redis: {type(exc).__name__}") from None
        self.cache: dict[str, Doc] = {}
        self._commit = self.client.register_script(_script())
        self._schema_checked = False

    def _check_schema(self) -> None:
        """Convert data of agentpolicy 0.1 under this prefix, once (on first use)."""
        if self._schema_checked:
            return
        from agentpolicy.storage._migrate import redis_v01  # noqa: PLC0415 - rarely needed

        self._schema_checked = True  # the conversion itself opens sessions
        try:
            self.guard(lambda: redis_v01(self), writing=True)
        except BaseException:
            self._schema_checked = False
            raise

    # -- plumbing ------------------------------------------------------------------------

    def guard(self, call: Callable[[], T], *, writing: bool = False) -> T:
        """Run a Redis call; turn Redis failures into structured errors."""
        try:
            return call()
        except redis.exceptions.ResponseError as exc:
            text = str(exc)
            down = isinstance(exc, redis.exceptions.ClusterError)  # CLUSTERDOWN, MASTERDOWN, ...
            if down or text.startswith(_UNAVAILABLE) or "NOSCRIPT" in text:
                word = type(exc).__name__ if down else text.split(" ", 1)[0]
                raise StorageUnavailableError(
                    f"Redis is unavailable ({word}); nothing was allowed or changed"
                ) from None
            raise InternalError(f"Redis refused a command: {text}") from None
        except (redis.exceptions.TimeoutError, redis.exceptions.ConnectionError) as exc:
            if writing:
                raise StorageUnavailableError(
                    f"Redis did not answer ({type(exc).__name__}), so whether this change was "
                    "recorded is unknown: a reservation it made expires by itself, and the "
                    "same idempotency key answers the first decision"
                ) from None
            raise StorageUnavailableError(
                f"Redis is unavailable ({type(exc).__name__}); nothing was allowed or changed"
            ) from None
        except redis.exceptions.RedisError as exc:
            raise StorageUnavailableError(
                f"Redis is unavailable ({type(exc).__name__}); nothing was allowed or changed"
            ) from None

    def remember(self, key: str, doc: Doc) -> None:
        """Keep a document this process has seen (bounded)."""
        cache = self.cache
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        cache[key] = doc

    def run_commit(self, keys_: list[str], args: list[Any]) -> Any:
        """Send the commit script (resent by redis-py after a timeout: applied once)."""
        return self.guard(lambda: self._commit(keys=keys_, args=args), writing=True)

    def apply_global(self, ops: list[tuple[str, str, int | None]]) -> None:
        """Write global index entries outside a commit (Cluster only: they are hints)."""

        def write() -> None:
            for index, member, score in ops:
                key = self.key_prefix + index
                if score is None:
                    self.client.zrem(key, member)
                else:
                    self.client.zadd(key, {member: score})

        self.guard(write)

    # -- the storage protocol ----------------------------------------------------------------

    def session(self, shard: str, *, write: bool = True) -> Any:
        """A session on ``shard`` (optimistic: nothing to hold)."""
        self._check_schema()
        return _Session(_RedisSession(self, shard))

    def log(self, shard: str, name: str, limit: int) -> list[tuple[int, int, Any]]:
        """The newest ``limit`` entries of a log, newest first."""
        self._check_schema()
        key = f"{self.key_prefix}{{{tag(shard)}}}:{name}"
        lines = self.guard(lambda: self.client.lrange(key, 0, limit - 1))
        out = []
        for line in lines:
            seq, at, entry = line.split("\t", 2)
            out.append((int(seq), int(at), json.loads(entry)))
        return out

    def close(self) -> None:
        """Close the connection pool (on a Cluster, every node's: redis-py leaves them open)."""
        nodes = self.client.get_nodes() if self.cluster else []
        self.client.close()
        for node in nodes:
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()


class _Session:
    """A context manager that yields its session (Redis holds nothing open)."""

    __slots__ = ("session",)

    def __init__(self, session: _RedisSession) -> None:
        self.session = session

    def __enter__(self) -> _RedisSession:
        return self.session

    def __exit__(self, *exc: object) -> None:
        return None
