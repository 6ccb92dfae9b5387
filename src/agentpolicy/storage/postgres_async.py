"""PostgreSQL storage for asyncio (the ``postgres`` extra), on psycopg's AsyncConnection and pool.

The same store as :class:`~agentpolicy.storage.postgres.PostgresStorage`, on
the same tables, with the same guarantees: a writing session is one ``READ
COMMITTED`` transaction that first locks its shard's row (``SELECT ... FOR
UPDATE``); a commit is one pipelined round trip, applied once per operation
id; deadlocks are retried; a connection lost during a commit is resent on a
new connection, else the error says the outcome is unknown; every wait is
bounded and fails closed; the pool reconnects by itself; the schema is
created, upgraded or refused under the advisory lock; housekeeping runs
every 1,000 commits. A round trip unanswered after ``round_trip_timeout``
has its socket shut down by a timer of the event loop (the same watch as
the sync store's, without its thread), so a stalled server fails the call
closed instead of holding it for ever.

None of that is written here. The session's protocol (what to send, in
which order, what each error means) and the schema's setup are the
generators of :mod:`agentpolicy.storage.postgres`; this module awaits their
requests on a :class:`psycopg.AsyncConnection` taken from a
:class:`psycopg_pool.AsyncConnectionPool`, so no call blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from agentpolicy.errors import StorageUnavailableError
from agentpolicy.storage._turns import Turns
from agentpolicy.storage.base import Doc, Outcome, Txn
from agentpolicy.storage.postgres import (
    _Call,
    _Execute,
    _first_line,
    _forget_prepared,
    _Holder,
    _Pipeline,
    _PostgresBase,
    _SessionSteps,
    _Stalled,
    _Steps,
    _Watch,
)

__all__ = ["AsyncPostgresStorage"]

T = TypeVar("T")


async def _drive(steps: _Steps[T], owner: Any) -> T:
    """Run ``steps`` with ``owner.conn``, a psycopg AsyncConnection (``owner``: a session)."""
    answer: Any = None
    error: Exception | None = None
    while True:
        try:
            request = steps.send(answer) if error is None else steps.throw(error)
        except StopIteration as done:
            result: T = done.value
            return result
        error = answer = None
        try:
            if isinstance(request, _Pipeline | _Execute):
                answer = await _round_trip(owner.conn, request, owner.storage.round_trip_timeout)
            elif isinstance(request, _Call):
                answer = await getattr(owner, request.name)(*request.args)
            else:
                await owner._replace()
        except Exception as exc:  # thrown into the steps, which decide what it means
            error = exc


_CANCEL_GRACE = 0.5
"""Seconds a cancelled round trip lets psycopg cancel its statement before the connection is cut."""


async def _round_trip(conn: Any, request: _Pipeline | _Execute, seconds: float) -> Any:
    """Send one request on ``conn`` and answer its rows, within ``seconds``.

    A timer of the event loop shuts the socket down past the bound (see
    :class:`~agentpolicy.storage.postgres._Watch`): the awaited call fails, the
    connection is closed (the pool replaces it) and the error is ``_Stalled``.
    The request runs in a task of its own, so that a caller cancelled
    meanwhile is not held by psycopg's cancelling of the statement (see
    :func:`_interrupt`).
    """
    sock = _Watch.socket_of(conn)
    watch = None if sock is None else _Watch(sock, seconds)
    loop = asyncio.get_running_loop()
    timer = None if watch is None else loop.call_later(seconds, watch.fire)

    def fired() -> bool:
        if watch is None or timer is None:
            return False
        timer.cancel()
        watch.sock.close()  # the duplicate only
        return watch.fired

    work = loop.create_task(_exchange(conn, request))
    try:
        answer = await asyncio.shield(work)
    except psycopg.Error as exc:
        if isinstance(request, _Pipeline):
            _forget_prepared(conn)
        if fired():
            await conn.close()
            raise _Stalled(f"no answer within {seconds:g} s") from exc
        raise
    except BaseException:  # cancelled: the statement is cancelled on the server, or cut off
        if not work.done():
            await _interrupt(work, watch, seconds)
        if isinstance(request, _Pipeline):
            _forget_prepared(conn)
        if fired():
            await conn.close()
        raise
    if fired():
        await conn.close()
    return answer


async def _exchange(conn: Any, request: _Pipeline | _Execute) -> Any:
    """The request's statements on ``conn``, and their rows (``None`` if none are wanted)."""
    if isinstance(request, _Pipeline):
        async with conn.pipeline():
            cursors = [await conn.execute(q, p) for q, p in request.statements]
        if not request.rows:
            return None
        return [await c.fetchall() if c.description else [] for c in cursors]
    cursor = await conn.execute(request.query, request.params)
    return await cursor.fetchall() if cursor.description else []


async def _interrupt(work: asyncio.Task[Any], watch: _Watch | None, seconds: float) -> None:
    """End ``work``, the round trip of a caller that was cancelled, within a moment.

    Cancelled, psycopg asks the server to cancel the statement and waits for
    its end, for up to 5 s and 5 s more: a server that does not answer would
    hold the cancelled caller (``asyncio.wait_for(authorize, 0.3)``) for
    10 s. It gets :data:`_CANCEL_GRACE` seconds (a server that answers
    cancels in milliseconds, and the connection stays usable); then it is
    cancelled again (psycopg then closes the connection) and the socket is
    shut down, so the caller goes on at once. Whatever the request was,
    whether it applied stays as unknown as after any cancellation.
    """
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):  # cancelled once more: cut off at once
        await asyncio.wait((work,), timeout=min(seconds, _CANCEL_GRACE))
    if not work.done():
        work.cancel()
        if watch is not None:
            watch.fire()
        while not work.done():
            try:
                await asyncio.wait((work,))
            except asyncio.CancelledError:
                work.cancel()
    if not work.cancelled():
        work.exception()  # retrieved: what it failed with does not matter any more


class _AsyncPostgresSession(_SessionSteps):
    """A session on an AsyncConnection: the shared steps, awaited by :func:`_drive`.

    A writing session first waits for its turn on the shard among this
    process's writers (:mod:`agentpolicy.storage._turns`), so tasks of one
    process waiting for the same agent's row do not hold the pool's
    connections meanwhile.
    """

    __slots__ = ("turn",)

    storage: AsyncPostgresStorage

    async def __aenter__(self) -> _AsyncPostgresSession:
        self.turn = False
        if self.write:
            await self.storage._turns.take(self.shard)
            self.turn = True
        try:
            self.conn = await self.storage._getconn()
        except BaseException:
            self._give_turn()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        conn = self.conn
        try:
            if conn is None:
                return
            try:
                await _drive(self._exit_steps(), self)
            finally:
                self.conn = None
                await self.storage._putconn(conn)
        finally:
            self._give_turn()

    def _give_turn(self) -> None:
        if self.turn:
            self.turn = False
            self.storage._turns.give(self.shard)

    async def _replace(self) -> None:
        conn = self.conn
        self.conn = None
        if conn is not None:
            await conn.close()  # never handed out again: see the sync session's _replace
            await self.storage._putconn(conn)
            with contextlib.suppress(psycopg.Error, PoolTimeout):
                await self.storage._pool.check()  # the idle ones the server ended too
        self.conn = await self.storage._getconn()

    async def _check(self, txn: Txn) -> Outcome | None:
        return await _drive(self._check_steps(txn), self)

    async def _apply(self, txn: Txn) -> None:
        await _drive(self._apply_steps(txn), self)

    # -- the async session protocol ----------------------------------------------------------

    async def get(
        self, names: Sequence[str], guess: frozenset[str] = frozenset()
    ) -> dict[str, Doc]:
        return await _drive(self._get_steps(names), self)

    async def scan(self, index: str, upto: int, limit: int) -> list[tuple[str, int]]:
        return await _drive(self._scan_steps(index, upto, limit), self)

    async def commit(self, txn: Txn) -> Outcome:
        return await _drive(self._commit_steps(txn), self)


class AsyncPostgresStorage(_PostgresBase):
    """:class:`~agentpolicy.storage.postgres.PostgresStorage` for asyncio.

    Takes the same URLs (``postgresql://user@host:5432/db?schema=NAME``,
    ``postgres://``) and options (``pool_size``, ``connect_timeout``,
    ``pool_timeout``, ``lock_timeout``, ``round_trip_timeout``), and keeps
    the same tables: the two share a database. Nothing connects until the
    first call. Use it on one event loop; close it with ``await
    storage.aclose()`` (or ``async with``).
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        connect_timeout: timedelta = timedelta(seconds=2),
        pool_timeout: timedelta = timedelta(seconds=3),
        lock_timeout: timedelta = timedelta(seconds=10),
        round_trip_timeout: timedelta | None = None,
    ) -> None:
        super().__init__(
            url,
            pool_size=pool_size,
            connect_timeout=connect_timeout,
            pool_timeout=pool_timeout,
            lock_timeout=lock_timeout,
            round_trip_timeout=round_trip_timeout,
        )
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            self._conninfo, kwargs=self._kwargs, **self._pool_options
        )
        self._lock = asyncio.Lock()
        # A writer's turn may wait for a pooled connection, then for the agent's row that
        # another process holds (up to lock_timeout, in one round trip): the line waits that
        # out, as each of its writers waited for the row before they took turns.
        self._turns = Turns(self._pool_options["timeout"] + self.round_trip_timeout)

    # -- connections -----------------------------------------------------------------------------

    async def _getconn(self) -> psycopg.AsyncConnection[Any]:
        if not self._opened:
            async with self._lock:
                if self._closed:
                    raise self._closed_error()
                if not self._opened:
                    await self._pool.open(wait=False)
                    self._opened = True
        try:
            conn = await self._pool.getconn()
        except PoolTimeout:
            raise await self._down() from None
        if not self._ready:
            try:
                await self._setup(conn)
            except BaseException:
                await self._pool.putconn(conn)
                raise
        return conn

    async def _putconn(self, conn: psycopg.AsyncConnection[Any]) -> None:
        try:
            await self._pool.putconn(conn)
        except psycopg.Error:  # pragma: no cover - a pool already closed
            await conn.close()

    async def _down(self) -> StorageUnavailableError:
        """Why no connection came: connect once more to learn the server's own words."""
        try:
            conn = await psycopg.AsyncConnection.connect(self._conninfo, **self._kwargs)
        except psycopg.Error as exc:
            return self._down_error(_first_line(exc))
        await conn.close()
        return self._down_error(None)

    async def _setup(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Create, upgrade or refuse the schema's layout (once per storage object)."""
        async with self._lock:
            if self._ready:
                return
            await _drive(self._setup_steps(conn), _Holder(conn, self))
            self._ready = True

    # -- the async storage protocol ----------------------------------------------------------------

    def session(self, shard: str, *, write: bool = True) -> _AsyncPostgresSession:
        """A session on ``shard`` (``async with``): a transaction holding its row when ``write``."""
        return _AsyncPostgresSession(self, shard, write)

    async def log(self, shard: str, name: str, limit: int) -> list[tuple[int, int, Any]]:
        """The newest ``limit`` entries of a log, newest first."""
        async with self.session(shard, write=False) as session:
            return await _drive(session._log_steps(name, limit), session)

    async def aclose(self) -> None:
        """Close the connection pool (a closed storage refuses further calls)."""
        async with self._lock:
            self._closed = True
            if self._opened:
                self._opened = False
                await self._pool.close(timeout=5)

    async def __aenter__(self) -> AsyncPostgresStorage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
