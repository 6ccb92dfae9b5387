"""Redis storage for asyncio (the ``redis`` extra): :class:`RedisStorage` on ``redis.asyncio``.

The same store as :class:`~agentpolicy.storage.redis.RedisStorage`, with the
same keys, the same script and the same guarantees: a cache of documents,
one ``EVALSHA`` per commit in the steady state, operation ids that make a
resent commit apply once, global-index hints on a Cluster, and the same
structured errors (a commit that got no answer says its outcome is
unknown). Data written by one is read by the other. Everything either store
decides lives once, in :mod:`agentpolicy.storage._redis_protocol`; this
module only awaits its requests with ``redis.asyncio``, so no call blocks
the event loop.

Data of agentpolicy 0.1 under the prefix is converted on first use exactly
as the sync store does it, by the sync store, in a worker thread (it runs
once per prefix, ever); afterwards the first use costs one ``GET``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import redis.asyncio
import redis.asyncio.cluster
import redis.exceptions
from redis.asyncio.retry import Retry

from agentpolicy.storage import _redis_protocol as rp
from agentpolicy.storage._turns import Turns
from agentpolicy.storage.base import Doc, Outcome, Txn

__all__ = ["AsyncRedisStorage"]

T = TypeVar("T")

_log = logging.getLogger(__name__)


class _Retry(Retry):
    """``redis.asyncio``'s retries, noting a failed attempt (see ``rp.resent``)."""

    async def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        return await super().call_with_retry(do, rp.noting(fail), *args, **kwargs)


_DONE = "3"  # the value of <prefix>schema once the prefix holds no data of 0.1


class _AsyncRedisSession:
    fresh = False

    __slots__ = ("prefix", "shard", "storage")

    def __init__(self, storage: AsyncRedisStorage, shard: str) -> None:
        self.storage = storage
        self.shard = shard
        self.prefix = storage.keys.shard_prefix(shard)

    async def get(
        self, names: Sequence[str], guess: frozenset[str] = frozenset()
    ) -> dict[str, Doc]:
        return await self.storage.drive(self.storage.keys.get(self.prefix, names, guess))

    async def scan(self, index: str, upto: int, limit: int) -> list[tuple[str, int]]:
        return await self.storage.drive(self.storage.keys.scan(self.prefix, index, upto, limit))

    async def commit(self, txn: Txn) -> Outcome:
        return await self.storage.drive(self.storage.keys.commit(self.prefix, txn))


class _Opened:
    """``async with storage.session(shard)``: checks the prefix's schema once.

    A writer waits for its turn on the shard among this process's writers
    (see :mod:`agentpolicy.storage._turns`).
    """

    __slots__ = ("session", "turn", "write")

    def __init__(self, session: _AsyncRedisSession, write: bool) -> None:
        self.session = session
        self.write = write
        self.turn = False

    async def __aenter__(self) -> _AsyncRedisSession:
        session = self.session
        storage = session.storage
        await storage._check_schema()
        if self.write:
            await storage._turns.take(session.shard)
            self.turn = True
        return session

    async def __aexit__(self, *exc: object) -> None:
        if self.turn:
            self.turn = False
            self.session.storage._turns.give(self.session.shard)


class AsyncRedisStorage:
    """:class:`~agentpolicy.storage.redis.RedisStorage` for asyncio, on ``redis.asyncio``.

    Takes the same URLs (``redis://``, ``rediss://``, ``redis+cluster://``,
    ``rediss+cluster://``) and options: ``key_prefix`` separates tenants on
    one server; ``timeout`` bounds one command (the client then retries
    twice, which the operation ids make safe), and how long a call waits for
    a free connection when all are in use. Nothing connects until the
    first call. Use it on one event loop; close it with ``await
    storage.aclose()`` (or ``async with``).
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
        self._url = url
        self._timeout = timeout
        options = rp.client_options(timeout, _Retry)
        # Calls wait for a turn here, at most POOL_SIZE in flight, each holding at most
        # one connection (per node), so the client's pool never has to make anyone wait.
        # On a Cluster its nodes cannot wait (they raise MaxConnectionsError at once); on
        # one node redis.asyncio's BlockingConnectionPool waits on an asyncio.Condition,
        # which before Python 3.13 loses a wake-up when the task it woke is cancelled
        # before it runs: a waiter then sat out the whole timeout and failed with every
        # connection free (a release after a cancelled payment, so the amount stayed held).
        # An asyncio.Semaphore hands a cancelled task's turn on.
        self._gate = asyncio.Semaphore(rp.POOL_SIZE)
        try:
            if self.cluster:
                # the spare connections serve the client's own topology refreshes
                self.client: Any = redis.asyncio.cluster.RedisCluster.from_url(
                    plain, max_connections=rp.POOL_SIZE + 10, **options
                )
            else:
                pool = redis.asyncio.BlockingConnectionPool.from_url(
                    url, **options, **rp.pool_options(timeout)
                )
                self.client = redis.asyncio.Redis.from_pool(pool)
        except (*rp.FAILURES, ValueError, IndexError) as exc:
            raise rp.unreachable(exc) from None
        self._commit = self.client.register_script(rp.script())
        self._schema_checked = False
        self._schema_lock = asyncio.Lock()
        self._turns = Turns()

    async def _check_schema(self) -> None:
        """Convert data of agentpolicy 0.1 under this prefix, once (on first use)."""
        if self._schema_checked:
            return
        async with self._schema_lock:
            if self._schema_checked:
                return
            try:
                done = await self._call(lambda: self.client.get(self.key_prefix + "schema"))
            except rp.FAILURES as exc:
                raise rp.before_the_call(rp.failure(exc, writing=False)) from None
            if done != _DONE:
                await asyncio.to_thread(self._convert)
            self._schema_checked = True

    def _convert(self) -> None:
        """The sync store's conversion of 0.1 data (in a worker thread, with its own client)."""
        from agentpolicy.storage.redis import RedisStorage  # noqa: PLC0415 - rarely needed

        converter = RedisStorage(self._url, key_prefix=self.key_prefix, timeout=self._timeout)
        try:
            converter._check_schema()
        finally:
            converter.close()

    # -- plumbing ------------------------------------------------------------------------

    async def drive(self, steps: rp.Steps[T]) -> T:
        """Run an operation of :mod:`~agentpolicy.storage._redis_protocol`: await what it asks."""
        answer: Any = None
        while True:
            try:
                request = steps.send(answer)
            except StopIteration as done:
                result: T = done.value
                return result
            try:
                answer = await self._call(functools.partial(self._send, request))
            except rp.FAILURES as exc:
                lost = rp.lost_hints(request, exc)
                if lost is None:
                    raise rp.failure(
                        exc, writing=request.writing, cluster=self.cluster, again=rp.resent()
                    ) from None
                _log.warning(lost)
                answer = None

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        """Await ``call`` once it has a turn at the pool (waiting up to ``timeout`` for one)."""
        gate = self._gate
        try:
            async with asyncio.timeout(self._timeout.total_seconds()):
                await gate.acquire()
        except TimeoutError:
            raise rp.NoTurn("No connection available.") from None
        try:
            return await call()
        finally:
            gate.release()

    async def _send(self, request: rp.Request) -> Any:
        client = self.client
        rp.first_attempt()
        if isinstance(request, rp.Eval):  # resent by the client after a timeout: applied once
            return await self._commit(keys=request.keys, args=request.args)
        if isinstance(request, rp.Read):
            if len(request.keys) == 1:
                return [await client.hmget(request.keys[0], "v", "b")]
            pipe = client.pipeline(transaction=False)
            for key in request.keys:
                pipe.hmget(key, "v", "b")
            return list(await pipe.execute())
        if isinstance(request, rp.Scan):
            return await client.zrangebyscore(
                request.key, "-inf", request.upto, start=0, num=request.limit, withscores=True
            )
        if isinstance(request, rp.Lines):
            return await client.lrange(request.key, 0, request.limit - 1)
        for key, member, score in request.ops:
            if score is None:
                await client.zrem(key, member)
            else:
                await client.zadd(key, {member: score})
        return None

    # -- the async storage protocol ----------------------------------------------------------

    def session(self, shard: str, *, write: bool = True) -> _Opened:
        """A session on ``shard``, used as ``async with``.

        Optimistic: nothing is held on the server. A writing session waits
        for the other writing sessions of this storage on the same shard, so
        tasks of one process do not make each other's commits conflict (see
        :mod:`agentpolicy.storage._turns`).
        """
        return _Opened(_AsyncRedisSession(self, shard), write)

    async def log(self, shard: str, name: str, limit: int) -> list[tuple[int, int, Any]]:
        """The newest ``limit`` entries of a log, newest first."""
        await self._check_schema()
        return await self.drive(self.keys.log(shard, name, limit))

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()

    async def __aenter__(self) -> AsyncRedisStorage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
