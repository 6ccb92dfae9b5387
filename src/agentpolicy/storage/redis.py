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

What the store decides (key names, the script's ``KEYS`` and ``ARGV``, what
its reply means, the cache, which failure is which error) lives in
:mod:`agentpolicy.storage._redis_protocol`, shared with
:class:`~agentpolicy.storage.redis_async.AsyncRedisStorage`; this module
only sends its requests with redis-py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import redis
import redis.cluster
import redis.exceptions
from redis.retry import Retry

from agentpolicy.errors import StorageUnavailableError
from agentpolicy.storage import _redis_protocol as rp
from agentpolicy.storage.base import Doc, Outcome, Txn

__all__ = ["RedisStorage"]

T = TypeVar("T")

_log = logging.getLogger(__name__)


class _Retry(Retry):
    """redis-py's retries, noting a failed attempt (see ``rp.resent``)."""

    def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        return super().call_with_retry(do, rp.noting(fail), *args, **kwargs)


class _RedisSession:
    fresh = False

    __slots__ = ("prefix", "shard", "storage")

    def __init__(self, storage: RedisStorage, shard: str) -> None:
        self.storage = storage
        self.shard = shard
        self.prefix = storage.keys.shard_prefix(shard)

    def get(self, names: Sequence[str], guess: frozenset[str] = frozenset()) -> dict[str, Doc]:
        return self.storage.drive(self.storage.keys.get(self.prefix, names, guess))

    def scan(self, index: str, upto: int, limit: int) -> list[tuple[str, int]]:
        return self.storage.drive(self.storage.keys.scan(self.prefix, index, upto, limit))

    def commit(self, txn: Txn) -> Outcome:
        return self.storage.drive(self.storage.keys.commit(self.prefix, txn))


class RedisStorage:
    """Storage on Redis (``redis://``, ``rediss://``) or Redis Cluster (``redis+cluster://``).

    ``key_prefix`` separates tenants on one server; ``timeout`` bounds one
    command (redis-py then retries twice, which the operation ids make safe),
    and how long a call waits for a free connection when all
    :data:`~agentpolicy.storage._redis_protocol.POOL_SIZE` of a node's are in
    use (then ``STORAGE_UNAVAILABLE``: nothing was sent).
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
        self.cluster, plain = rp.cluster_url(url)
        self.global_indexes_atomic = not self.cluster
        self.keys = rp.Keyspace(key_prefix, cluster=self.cluster)
        options = {**rp.client_options(timeout, _Retry), **rp.pool_options(timeout)}
        try:
            if self.cluster:  # every node's pool is made of this class, with these options
                self.client: Any = redis.cluster.RedisCluster.from_url(
                    plain, connection_pool_class=redis.BlockingConnectionPool, **options
                )
            else:
                pool = redis.BlockingConnectionPool.from_url(url, **options)
                self.client = redis.Redis.from_pool(pool)
        except (*rp.FAILURES, ValueError, IndexError) as exc:
            raise rp.unreachable(exc) from None
        self._commit = self.client.register_script(rp.script())
        self._schema_checked = False
        self._schema_lock = threading.Lock()
        self._converting: int | None = None  # the thread converting data of 0.1

    def _check_schema(self) -> None:
        """Convert data of agentpolicy 0.1 under this prefix, once (on first use).

        Other threads wait for the conversion (one that went on would find
        an agent of 0.1 without its policy, and a policy it set would make
        the conversion skip that agent); the converting thread's own
        sessions do not.
        """
        if self._schema_checked or self._converting == threading.get_ident():
            return
        from agentpolicy.storage._migrate import redis_v01  # noqa: PLC0415 - rarely needed

        with self._schema_lock:
            if self._schema_checked:
                return
            self._converting = threading.get_ident()
            try:
                # the caller's call has not begun: a failure is told as of it (nothing of it ran)
                self.guard(lambda: redis_v01(self))
            except StorageUnavailableError as exc:
                raise rp.before_the_call(exc) from None
            finally:
                self._converting = None
            self._schema_checked = True

    # -- plumbing ------------------------------------------------------------------------

    def guard(self, call: Callable[[], T], *, writing: bool = False) -> T:
        """Run a Redis call; turn Redis failures into structured errors."""
        rp.first_attempt()
        try:
            return call()
        except rp.FAILURES as exc:
            raise rp.failure(exc, writing=writing, again=rp.resent()) from None

    def drive(self, steps: rp.Steps[T]) -> T:
        """Run an operation of :mod:`~agentpolicy.storage._redis_protocol`: send what it asks."""
        answer: Any = None
        while True:
            try:
                request = steps.send(answer)
            except StopIteration as done:
                result: T = done.value
                return result
            try:
                answer = self._send(request)
            except rp.FAILURES as exc:
                lost = rp.lost_hints(request, exc)
                if lost is None:
                    raise rp.failure(
                        exc, writing=request.writing, cluster=self.cluster, again=rp.resent()
                    ) from None
                _log.warning(lost)
                answer = None

    def _send(self, request: rp.Request) -> Any:
        client = self.client
        rp.first_attempt()
        if isinstance(request, rp.Eval):  # resent by redis-py after a timeout: applied once
            return self._commit(keys=request.keys, args=request.args)
        if isinstance(request, rp.Read):
            if len(request.keys) == 1:
                return [client.hmget(request.keys[0], "v", "b")]
            pipe = client.pipeline(transaction=False)
            for key in request.keys:
                pipe.hmget(key, "v", "b")
            return list(pipe.execute())
        if isinstance(request, rp.Scan):
            return client.zrangebyscore(
                request.key, "-inf", request.upto, start=0, num=request.limit, withscores=True
            )
        if isinstance(request, rp.Lines):
            return client.lrange(request.key, 0, request.limit - 1)
        for key, member, score in request.ops:
            if score is None:
                client.zrem(key, member)
            else:
                client.zadd(key, {member: score})
        return None

    # -- the storage protocol ----------------------------------------------------------------

    def session(self, shard: str, *, write: bool = True) -> Any:
        """A session on ``shard`` (optimistic: nothing to hold)."""
        self._check_schema()
        return _Session(_RedisSession(self, shard))

    def log(self, shard: str, name: str, limit: int) -> list[tuple[int, int, Any]]:
        """The newest ``limit`` entries of a log, newest first."""
        self._check_schema()
        return self.drive(self.keys.log(shard, name, limit))

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
