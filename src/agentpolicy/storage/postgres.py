"""PostgreSQL storage (the ``postgres`` extra), on psycopg 3 and psycopg_pool.

Every rule stays in Python (:mod:`agentpolicy.ledger`); the database keeps
documents, indexes, logs and operation ids in five plain tables of one
schema, and the shards' lock rows in a sixth (see ``docs/postgresql.md``).

**Locking.** A session that will write is one ``READ COMMITTED``
transaction that first takes its shard's row in ``shards`` with
``SELECT ... FOR UPDATE`` (sent with ``BEGIN`` and the first read in one
round trip). Every session that writes a shard holds that row until it
commits, so two engines deciding for the same agent take turns, and two
agents never wait on each other: nothing else is locked, no table and no
advisory lock. What a session reads under its shard's lock cannot change
before it commits, so its commit checks nothing it read. A session that
only reads (``write=False``) takes no lock; if it commits after all, its
commit takes the shard's lock, compares every expected version and
answers a conflict when one changed.

**Commits.** One pipeline: the operation id, every write, ``COMMIT``. An
operation id seen before (its row exists) answers the first result and
writes nothing. A deadlock or serialization failure (40P01, 40001) rolls
back and is tried again (then reported as a conflict, which the runner
retries). When the connection is lost during a commit, whether it was
applied is unknown: the commit is sent again on a new connection, where its
operation id makes it apply at most once; if no connection can be had
either, :class:`~agentpolicy.errors.StorageUnavailableError` says that the
outcome is unknown.

**Failures.** Connecting gives up after ``connect_timeout`` (2 s), waiting
for a pooled connection after ``pool_timeout`` (3 s), waiting for a shard's
lock after ``lock_timeout`` (10 s); each is ``STORAGE_UNAVAILABLE``, and
nothing was allowed. A pooled connection found dead is replaced and the
statement sent again, so the storage recovers by itself when the server is
back.

**Stalls.** A server that stops answering (paused, or a network that
stops delivering) sends no error, so the client bounds every round trip
itself: ``round_trip_timeout`` (default ``lock_timeout`` + 2 s, so that a
legitimate wait for a lock ends with the server's own lock timeout first).
When it passes, a watchdog shuts the connection's socket down (a duplicate
of its descriptor: the one libpq polls is never closed under it), the
blocked call wakes with an error at once, and the connection is closed and
never used again (the pool replaces it). Before the commit was sent, the
error says that nothing was allowed or changed; a stalled commit follows the
rule of a lost one: sent once more on a new connection (at most once more
after a stall), else "unknown".

**Housekeeping.** A document written with a ``ttl`` expires at its
commit's time (the engine's clock) plus the ttl. Every 1,000 commits a
storage deletes, right after a commit and outside its transaction, up to
5,000 documents that expired a day before that commit's time (by an index
on the expiry, skipping rows that are locked) and operation ids older than
two days (by key range: ids begin with their time); the extra day is for
engines whose clocks run ahead (``storage.base.PRUNE_SLACK_US``). History
is never dropped unless the engine sets a retention.

**Schema.** Tables live in the schema named by ``?schema=`` (default
``agentpolicy``), created on first use under a transaction-scoped advisory
lock; ``schema_version`` records the layout. An older layout is upgraded in
one transaction; a newer one is refused (``upgrade agentpolicy``).

**One protocol, two drivers.** What a session sends, in which order, and
what each error means is written once, as generators that yield requests
(send these statements, in one pipeline or alone; take a new connection)
and receive the rows; :class:`PostgresStorage` sends them with psycopg's
Connection, :class:`~agentpolicy.storage.postgres_async.AsyncPostgresStorage`
awaits them with its AsyncConnection.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import zlib
from collections.abc import Generator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
import psycopg.conninfo
import psycopg.errors
from psycopg_pool import ConnectionPool, PoolTimeout

from agentpolicy.errors import InternalError, PolicyValidationError, StorageUnavailableError
from agentpolicy.storage._pg_url import (
    bad_postgres_url,
    libpq_reason,
    option_problem,
    shown_postgres_url,
    split_postgres_url,
)
from agentpolicy.storage.base import (
    CONFLICT,
    NEXT_SEQ,
    OP_KEEP_US,
    PRUNE_SLACK_US,
    Doc,
    Encoded,
    Outcome,
    Txn,
    Written,
    op_prefix,
)

__all__ = ["SCHEMA_VERSION", "PostgresStorage"]

T = TypeVar("T")

SCHEMA_VERSION = 1
"""The layout of the tables this agentpolicy writes (the ``schema_version`` table)."""

_LAYOUT: tuple[str, ...] = (
    'CREATE TABLE IF NOT EXISTS @s.shards (shard text COLLATE "C" PRIMARY KEY)',
    'CREATE TABLE IF NOT EXISTS @s.docs (name text COLLATE "C" PRIMARY KEY, '
    "version bigint NOT NULL, body text NOT NULL, expires bigint) WITH (fillfactor = 80)",
    "CREATE INDEX IF NOT EXISTS docs_by_expiry ON @s.docs (expires) WHERE expires IS NOT NULL",
    'CREATE TABLE IF NOT EXISTS @s.idx (ix text COLLATE "C" NOT NULL, '
    'member text COLLATE "C" NOT NULL, score bigint NOT NULL, PRIMARY KEY (ix, member))',
    "CREATE INDEX IF NOT EXISTS idx_by_score ON @s.idx (ix, score, member)",
    'CREATE TABLE IF NOT EXISTS @s.logs (log text COLLATE "C" NOT NULL, seq bigint NOT NULL, '
    "at bigint NOT NULL, body text NOT NULL, PRIMARY KEY (log, seq))",
    'CREATE TABLE IF NOT EXISTS @s.ops (op text COLLATE "C" PRIMARY KEY, '
    "at bigint NOT NULL, result text NOT NULL)",
    "CREATE SEQUENCE IF NOT EXISTS @s.seq",
)
"""The statements that create the current layout in an empty schema."""

_UPGRADES: dict[int, tuple[str, ...]] = {}
"""The statements that take a layout from version ``n`` to ``n + 1`` (none yet)."""

_LOCK_KEY = 0x61706F6C << 32  # 'apol': the advisory lock of schema setup, plus a schema's crc32
_TRIM_EVERY = 64
_PRUNE_EVERY = 1000
_PRUNE_BATCH = 5000
_LOCK_MARGIN = timedelta(seconds=2)  # the default round_trip_timeout is lock_timeout plus this
_WATCHDOG_IDLE = 30.0  # seconds the watchdog thread stays without work before it ends
_ATTEMPTS = 4  # tries of one statement or commit when a connection is lost or a deadlock hits
_MAX_APPENDS_KEPT = 100_000
_RETRYABLE = (
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
    psycopg.errors.TransactionRollback,
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Stalled(psycopg.OperationalError):
    """A round trip that outlived ``round_trip_timeout``: its connection was shut down, closed."""


class _Watch:
    """One round trip's bound: a duplicate of its connection's socket, shut down when it fires.

    The duplicate descriptor is this watch's own: shutting it down ends the
    connection (a socket is shared by its descriptors) and wakes whoever
    polls the original, which is never closed here; and it keeps the socket
    itself alive until the watch is closed, so a descriptor number reused
    after libpq closed its own can never be hit.
    """

    __slots__ = ("deadline", "fired", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.fired = False

    @staticmethod
    def socket_of(conn: Any) -> socket.socket | None:
        """A duplicate of ``conn``'s socket (``None``: it has none, being closed)."""
        if conn is None:
            return None
        try:
            # fromfd duplicates the descriptor; the family given is never used (only shutdown)
            return socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        except (psycopg.Error, OSError):
            return None

    def fire(self) -> None:
        self.fired = True
        with contextlib.suppress(OSError):  # already shut down, or reset by the peer
            self.sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """The sync store's bound on round trips: one thread that fires the watches past their time.

    Arming and disarming a watch is a dict operation under a lock, without
    waking the thread: every watch has the same bound, so the first armed is
    the first due, and a watch armed while the thread sleeps for one bound is
    due after it wakes. The thread starts with the first watch and ends after
    a while without any, or when its storage closes.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._cond = threading.Condition(threading.Lock())
        self._armed: dict[_Watch, None] = {}  # in the order they are due
        self._thread: threading.Thread | None = None
        self._closed = False

    def arm(self, conn: Any) -> _Watch | None:
        sock = _Watch.socket_of(conn)
        if sock is None:
            return None  # a closed connection: the statement fails at once
        with self._cond:
            watch = _Watch(sock, time.monotonic() + self.seconds)
            self._armed[watch] = None
            if self._thread is None or not self._thread.is_alive():  # (not alive: forked)
                self._thread = threading.Thread(
                    target=self._run, name="agentpolicy-postgres-watchdog", daemon=True
                )
                self._thread.start()
        return watch

    def disarm(self, watch: _Watch | None) -> bool:
        """Stop watching; whether the watch had fired (then the connection is shut down)."""
        if watch is None:
            return False
        with self._cond:
            self._armed.pop(watch, None)
        watch.sock.close()  # the duplicate only
        return watch.fired

    def close(self) -> None:
        """Let the thread end once nothing is armed."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        cond = self._cond
        busy = time.monotonic()  # when a watch was last seen armed
        with cond:
            while True:
                now = time.monotonic()
                if not self._armed:
                    if self._closed or now - busy >= _WATCHDOG_IDLE:
                        self._thread = None
                        return
                    cond.wait(self.seconds)  # anything armed meanwhile is due after this
                    continue
                busy = now
                watch = next(iter(self._armed))
                if watch.deadline > now:
                    cond.wait(watch.deadline - now)
                    continue
                del self._armed[watch]
                watch.fire()  # under the lock: a watch disarmed is never fired after


class _Statements:
    """The SQL of one schema, written out once."""

    def __init__(self, schema: str) -> None:
        q = f'"{schema}"'  # a checked plain identifier: safe to quote as is

        def s(text: str) -> str:
            return text.replace("@s", q)

        self.schema = q
        self.begin = "BEGIN ISOLATION LEVEL READ COMMITTED"
        self.lock = s("SELECT 1 FROM @s.shards WHERE shard = %s FOR UPDATE")
        self.add_shard = s("INSERT INTO @s.shards (shard) VALUES (%s) ON CONFLICT DO NOTHING")
        self.get = s("SELECT name, version, body FROM @s.docs WHERE name = ANY(%s)")
        self.versions = s("SELECT name, version FROM @s.docs WHERE name = ANY(%s)")
        self.done = s("SELECT result FROM @s.ops WHERE op = %s")
        self.scan = s(
            "SELECT member, score FROM @s.idx WHERE ix = %s AND score <= %s::bigint "
            "ORDER BY score, member LIMIT %s"
        )
        self.op = s("INSERT INTO @s.ops (op, at, result) VALUES (%s, %s::bigint, %s)")
        self.put = s(
            "INSERT INTO @s.docs AS d (name, version, body, expires) "
            "VALUES (%s, 1, %s, %s::bigint) ON CONFLICT (name) DO UPDATE "
            "SET version = d.version + 1, body = excluded.body, expires = excluded.expires"
        )
        self.delete = s("DELETE FROM @s.docs WHERE name = ANY(%s)")
        self.index = s(
            "INSERT INTO @s.idx (ix, member, score) "
            "VALUES (%s, %s, coalesce(%s::bigint, nextval('@s.seq'))) "
            "ON CONFLICT (ix, member) DO UPDATE SET score = excluded.score"
        )
        self.unindex = s("DELETE FROM @s.idx WHERE ix = %s AND member = %s")
        self.append = s(
            "INSERT INTO @s.logs (log, seq, at, body) "
            "VALUES (%s, nextval('@s.seq'), %s::bigint, %s)"
        )
        self.trim_age = s("DELETE FROM @s.logs WHERE log = %s AND at < %s::bigint")
        self.trim_len = s(
            "DELETE FROM @s.logs WHERE log = %s AND seq <= (SELECT seq FROM @s.logs "
            "WHERE log = %s ORDER BY seq DESC OFFSET %s LIMIT 1)"
        )
        self.log = s("SELECT seq, at, body FROM @s.logs WHERE log = %s ORDER BY seq DESC LIMIT %s")
        self.prune_ops = s(
            "DELETE FROM @s.ops WHERE op IN (SELECT op FROM @s.ops WHERE op < %s "
            "LIMIT %s FOR UPDATE SKIP LOCKED)"
        )
        self.prune_docs = s(
            "DELETE FROM @s.docs WHERE name IN (SELECT name FROM @s.docs "
            "WHERE expires <= %s::bigint LIMIT %s FOR UPDATE SKIP LOCKED)"
        )
        self.layout = tuple(s(text) for text in _LAYOUT)

    def upgrade(self, version: int) -> tuple[str, ...]:
        """The statements from layout ``version`` to the next."""
        return tuple(text.replace("@s", self.schema) for text in _UPGRADES[version])


# -- the session's protocol, without I/O ----------------------------------------------------------
#
# What a session sends, in which order, and what each error means lives once, here, as
# generators: they yield requests (below) and receive their answers; an error a request
# raised is thrown into the generator at the ``yield`` (``gen.throw``), where the same
# ``except`` clauses decide. :func:`_drive` sends the requests with a psycopg Connection;
# ``postgres_async`` has the same few lines with ``await`` on an AsyncConnection.


_Statement = tuple[str, Sequence[Any] | None]
"""A statement and its parameters (``None``: none, sent as psycopg sends a bare query)."""


class _Pipeline:
    """Send ``statements`` in one round trip (a pipeline); answer their rows (when ``rows``)."""

    __slots__ = ("rows", "statements")

    def __init__(self, statements: Sequence[_Statement], *, rows: bool) -> None:
        self.statements = statements
        self.rows = rows


class _Execute:
    """Send one statement on its own; answer its rows (``[]`` for a statement without rows)."""

    __slots__ = ("params", "query")

    def __init__(self, query: str, params: Sequence[Any] | None = None) -> None:
        self.query = query
        self.params = params


class _Replace:
    """Give the connection in hand back to the pool (it is dead) and take another."""

    __slots__ = ()


class _Call:
    """Run the session's method ``name`` (``_check`` or ``_apply``): the seams tests replace."""

    __slots__ = ("args", "name")

    def __init__(self, name: str, *args: Any) -> None:
        self.name = name
        self.args = args


_REPLACE = _Replace()
_Request = _Pipeline | _Execute | _Replace | _Call
_Steps = Generator[_Request, Any, T]


def _drive(steps: _Steps[T], owner: Any) -> T:
    """Run ``steps`` with ``owner.conn``, a psycopg Connection (``owner``: a session)."""
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
                answer = _round_trip(owner.conn, request, owner.storage._watchdog)
            elif isinstance(request, _Call):
                answer = getattr(owner, request.name)(*request.args)
            else:
                owner._replace()
        except Exception as exc:  # thrown into the steps, which decide what it means
            error = exc


def _round_trip(conn: Any, request: _Pipeline | _Execute, watchdog: _Watchdog) -> Any:
    """Send one request on ``conn`` and answer its rows, within the watchdog's bound.

    Past the bound the socket is shut down under the waiting call, which then
    fails; the connection is closed (the pool replaces it) and the error is
    :class:`_Stalled`. An answer that came just as the bound passed stands.
    """
    watch = watchdog.arm(conn)
    try:
        if isinstance(request, _Pipeline):
            with conn.pipeline():
                cursors = [conn.execute(q, p) for q, p in request.statements]
            if not request.rows:
                answer: Any = None
            else:
                answer = [c.fetchall() if c.description else [] for c in cursors]
        else:
            cursor = conn.execute(request.query, request.params)
            answer = cursor.fetchall() if cursor.description else []
    except psycopg.Error as exc:
        if isinstance(request, _Pipeline):
            _forget_prepared(conn)
        if watchdog.disarm(watch):
            conn.close()
            raise _Stalled(f"no answer within {watchdog.seconds:g} s") from exc
        raise
    except BaseException:  # KeyboardInterrupt: psycopg cancelled the statement first
        if isinstance(request, _Pipeline):
            _forget_prepared(conn)
        if watchdog.disarm(watch):
            conn.close()
        raise
    if watchdog.disarm(watch):
        conn.close()
    return answer


def _forget_prepared(conn: Any) -> None:
    """After a failed pipeline: make psycopg forget, and deallocate, every statement it prepared.

    psycopg prepares a statement at its sixth use on a connection, and in a
    pipeline it records the statement as prepared when it queues the PREPARE,
    before the server runs it. When that PREPARE fails (its table's lock
    timed out, the call was cancelled or interrupted) or never runs (an
    earlier statement of the pipeline failed), psycopg still believes it
    exists, and every later use of that statement on the connection, in any
    later call, fails with "prepared statement ... does not exist". Forgetting
    them all puts both sides back in step: psycopg sends ``DEALLOCATE ALL``
    before its next statement and prepares again after a few uses.
    """
    prepared = getattr(conn, "_prepared", None)  # psycopg's own cache: it has no public reset
    if prepared is not None:
        prepared.clear()


class _Holder:
    """A connection in hand, for steps that run outside a session (schema setup)."""

    __slots__ = ("conn", "storage")

    def __init__(self, conn: Any, storage: Any) -> None:
        self.conn = conn
        self.storage = storage


class _SessionSteps:
    """What a PostgreSQL session does, shared by the sync and the async session.

    The attributes are the session's state: its storage, shard, whether it
    expects to write, the connection in hand, whether that connection's
    transaction holds the shard's row, and the versions read while it does.
    """

    __slots__ = ("conn", "locked", "read", "shard", "sql", "storage", "write")

    fresh = True

    def __init__(self, storage: _PostgresBase, shard: str, write: bool) -> None:
        self.storage = storage
        self.sql = storage.sql
        self.shard = shard
        self.write = write
        self.conn: Any = None
        self.locked = False  # in a transaction that holds the shard's row
        self.read: dict[str, int] = {}  # versions read while holding it

    def _connection(self) -> Any:
        conn = self.conn
        if conn is None:
            raise InternalError("a PostgreSQL session was used outside its with block")
        return conn

    def _is_lost(self) -> bool:
        conn = self.conn
        return conn is None or conn.closed or conn.broken

    def _gone(self, exc: psycopg.Error) -> bool:
        """Whether ``exc`` is the connection's, not the server's answer: lost, or may have acted.

        A server's refusal carries an SQLSTATE. A client-side error without one
        (psycopg's "cannot exit pipeline mode while busy" or "consuming input
        failed" as the backend was ended) leaves the connection unmarked, but
        what was sent may have run: it counts as a lost connection (a read is
        sent again on a new one; a commit's outcome is looked up there).
        """
        return self._is_lost() or (
            isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None
        )

    def _exit_steps(self) -> _Steps[None]:
        """Before the connection goes back: end a transaction still open (a failed call's)."""
        if self.locked:
            self.locked = False
            # a lost connection: the server ends the transaction, the pool replaces it
            with contextlib.suppress(psycopg.Error):
                yield _Execute("ROLLBACK")

    def _replace_steps(self) -> _Steps[None]:
        """Drop a dead connection and take another (the lock and what was read go with it)."""
        self.locked = False
        self.read = {}
        yield _REPLACE

    def _rollback_steps(self) -> _Steps[None]:
        self.locked = False
        self.read = {}
        self._connection()
        yield _Execute("ROLLBACK")

    def _safe_rollback_steps(self) -> _Steps[None]:
        try:
            yield from self._rollback_steps()
        except psycopg.Error:
            self.locked = False
            self.read = {}

    def _send_steps(
        self, queries: Sequence[_Statement], *, lock: bool
    ) -> _Steps[list[list[tuple[Any, ...]]]]:
        """Run ``queries`` in one round trip, first taking the shard's lock when ``lock``."""
        self._connection()
        sql = self.sql
        take = lock and not self.locked
        rows: list[list[tuple[Any, ...]]]
        if not take:
            rows = yield _Pipeline(queries, rows=True)
            return rows
        self.locked = True
        rows = yield _Pipeline([(sql.begin, None), (sql.lock, (self.shard,)), *queries], rows=True)
        if rows[1]:
            return rows[2:]
        # the shard's first session: add its row, lock it, and read again under the lock
        yield _Execute(sql.add_shard, (self.shard,))
        yield _Execute(sql.lock, (self.shard,))
        rows = yield _Pipeline(queries, rows=True)
        return rows

    def _rows_steps(
        self, queries: Sequence[_Statement], *, lock: bool
    ) -> _Steps[list[list[tuple[Any, ...]]]]:
        """:meth:`_send_steps`, on a new connection when the one in hand turns out to be dead.

        A new connection holds no lock and has read nothing: the commit then
        checks every version it expects.
        """
        for attempt in range(_ATTEMPTS):
            try:
                return (yield from self._send_steps(queries, lock=lock))
            except psycopg.Error as exc:
                if isinstance(exc, _Stalled) or not self._gone(exc) or attempt == _ATTEMPTS - 1:
                    raise self.storage._error(exc) from None  # a stall waited long enough
            yield from self._replace_steps()
        raise InternalError("unreachable")  # pragma: no cover

    def _get_steps(self, names: Sequence[str]) -> _Steps[dict[str, Doc]]:
        (rows,) = yield from self._rows_steps([(self.sql.get, (list(names),))], lock=self.write)
        decode = self.storage._written.decode
        found = {name: (version, decode(name, body)) for name, version, body in rows}
        if self.locked:
            read = self.read
            for name in names:
                doc = found.get(name)
                read[name] = 0 if doc is None else doc[0]
        return found

    def _scan_steps(self, index: str, upto: int, limit: int) -> _Steps[list[tuple[str, int]]]:
        (rows,) = yield from self._rows_steps(
            [(self.sql.scan, (index, upto, limit))], lock=self.write
        )
        return [(member, score) for member, score in rows]

    def _log_steps(self, name: str, limit: int) -> _Steps[list[tuple[int, int, Any]]]:
        (rows,) = yield from self._rows_steps([(self.sql.log, (name, limit))], lock=False)
        return [(seq, at, json.loads(body)) for seq, at, body in rows]

    def _commit_steps(self, txn: Txn) -> _Steps[Outcome]:
        sent = False  # whether this attempt's COMMIT was sent
        unknown = False  # whether a connection was lost after a COMMIT was sent
        stalled = False  # whether a COMMIT sent was not answered within the bound
        lost = False
        storage = self.storage
        for _ in range(_ATTEMPTS):
            sent = False
            try:
                if not (self.locked and self._verified(txn.expect)):
                    outcome = yield _Call("_check", txn)
                    if outcome is not None:
                        return outcome  # type: ignore[no-any-return]
                sent = True
                yield _Call("_apply", txn)
            except psycopg.errors.UniqueViolation as exc:
                yield from self._safe_rollback_steps()
                if exc.diag.constraint_name != "ops_pkey":
                    raise storage._error(exc) from None
                return (yield from self._replayed_steps(txn))
            except _RETRYABLE:  # a deadlock or a serialization failure: rolled back
                yield from self._safe_rollback_steps()
                continue
            except psycopg.Error as exc:
                if not self._gone(exc):  # the server refused: this attempt was rolled back
                    yield from self._safe_rollback_steps()
                    if unknown:
                        raise storage._unknown(
                            stalled,
                            f"the retry on a new connection was refused ({_first_line(exc)})",
                        ) from None
                    raise storage._error(exc) from None
                lost = True
                unknown = unknown or sent
                if isinstance(exc, _Stalled):
                    if not unknown:  # no COMMIT was ever sent: nothing changed
                        raise storage._error(exc) from None
                    if stalled:  # the resend stalled too: no third wait
                        raise storage._unknown(
                            stalled, "the commit sent again stalled too"
                        ) from None
                    stalled = True
                yield from self._reconnect_steps(unknown, stalled)
                continue
            yield from storage._committed_steps(txn.at)
            return Outcome(applied=True, replayed=False, result=txn.result)
        if unknown:  # every resend's connection was lost too (a new one was made each time)
            raise storage._unknown(
                stalled,
                ("then the connection was lost" if stalled else "again")
                + f" on each of {_ATTEMPTS - 1} new connections",
            )
        if lost:
            raise StorageUnavailableError(
                f"PostgreSQL at {storage.shown_url} kept dropping the connection; "
                "nothing was allowed or changed"
            )
        return CONFLICT  # a deadlock every time: the runner runs the step again

    def _reconnect_steps(self, unknown: bool, stalled: bool) -> _Steps[None]:
        try:
            yield from self._replace_steps()
        except StorageUnavailableError:
            if unknown:
                raise self.storage._unknown(stalled) from None
            raise

    def _verified(self, expect: dict[str, int]) -> bool:
        read = self.read
        return all(read.get(name) == version for name, version in expect.items())

    def _check_steps(self, txn: Txn) -> _Steps[Outcome | None]:
        """Take the shard's lock; answer a replay or a conflict, or ``None`` to go on."""
        names = list(txn.expect)
        versions, done = yield from self._send_steps(
            [(self.sql.versions, (names,)), (self.sql.done, (txn.op,))], lock=True
        )
        if done:
            yield from self._rollback_steps()
            return Outcome(applied=False, replayed=True, result=json.loads(done[0][0]))
        current = dict(versions)
        if any(current.get(name, 0) != version for name, version in txn.expect.items()):
            yield from self._rollback_steps()
            return CONFLICT
        self.read = dict(txn.expect)
        return None

    def _replayed_steps(self, txn: Txn) -> _Steps[Outcome]:
        """The first result of an operation applied before (its id is taken)."""
        try:
            (rows,) = yield from self._rows_steps([(self.sql.done, (txn.op,))], lock=False)
        except StorageUnavailableError:
            raise self.storage._unknown() from None
        if not rows:
            raise InternalError(f"operation {txn.op} was seen but its result is gone")
        return Outcome(applied=False, replayed=True, result=json.loads(rows[0][0]))

    def _apply_steps(self, txn: Txn) -> _Steps[None]:
        """Send the operation id, every write and ``COMMIT`` in one round trip (a pipeline).

        Statements are prepared by psycopg after a few uses. One statement of
        arrays for all the writes measured no faster, so each write is its own.
        """
        self._connection()
        sql = self.sql
        at = txn.at
        text = Encoded(txn)
        self.storage._written.remember(txn, text)
        out: list[_Statement] = [(sql.op, (txn.op, at, text.result))]
        add = out.append
        ttl = txn.ttl
        for name, body in text.put.items():
            add((sql.put, (name, body, at + ttl[name] * 1000 if name in ttl else None)))
        if txn.delete:
            add((sql.delete, (list(txn.delete),)))
        if txn.index:
            final: dict[tuple[str, str], int | None] = {}
            for index, member, score in txn.index:  # the last change of a member counts
                final.pop((index, member), None)
                final[(index, member)] = score
            for (index, member), score in final.items():
                if score is None:
                    add((sql.unindex, (index, member)))
                else:
                    add((sql.index, (index, member, None if score == NEXT_SEQ else score)))
        for (log, _, _, _), entry in zip(txn.append, text.append, strict=True):
            add((sql.append, (log, at, entry)))
        if txn.append:
            out += self._trims(txn)
        add(("COMMIT", None))
        yield _Pipeline(out, rows=False)
        self.locked = False

    def _trims(self, txn: Txn) -> list[_Statement]:
        """Trim a log by age and length once every 64 of its appends (in this process)."""
        appends = self.storage._appends
        out: list[_Statement] = []
        for log, _, keep_after, max_len in txn.append:
            if keep_after is None and max_len is None:
                continue
            count = appends.get(log, 0) + 1
            if len(appends) > _MAX_APPENDS_KEPT:
                appends.clear()
            appends[log] = count
            if count % _TRIM_EVERY:
                continue
            if keep_after is not None:
                out.append((self.sql.trim_age, (log, keep_after)))
            if max_len is not None:
                out.append((self.sql.trim_len, (log, log, max_len)))
        return out


class _PostgresSession(_SessionSteps):
    """A session on a psycopg Connection: :class:`_SessionSteps` driven by :func:`_drive`."""

    __slots__ = ()

    storage: PostgresStorage

    def __enter__(self) -> _PostgresSession:
        self.conn = self.storage._getconn()
        return self

    def __exit__(self, *exc: object) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            _drive(self._exit_steps(), self)
        finally:  # even when interrupted: a connection never given back is lost to the pool
            self.conn = None
            self.storage._putconn(conn)

    def _replace(self) -> None:
        conn = self.conn
        self.conn = None
        if conn is not None:
            # lost, or it may have acted on what it sent (see _gone): closed, so the pool never
            # hands it out again (one psycopg has not marked broken went back as healthy)
            conn.close()
            self.storage._putconn(conn)
            self.storage._check_pool()
        self.conn = self.storage._getconn()

    def _rows(self, queries: Sequence[_Statement], *, lock: bool) -> list[list[tuple[Any, ...]]]:
        return _drive(self._rows_steps(queries, lock=lock), self)

    def _check(self, txn: Txn) -> Outcome | None:
        return _drive(self._check_steps(txn), self)

    def _apply(self, txn: Txn) -> None:
        _drive(self._apply_steps(txn), self)

    # -- the session protocol --------------------------------------------------------------------

    def get(self, names: Sequence[str], guess: frozenset[str] = frozenset()) -> dict[str, Doc]:
        return _drive(self._get_steps(names), self)

    def scan(self, index: str, upto: int, limit: int) -> list[tuple[str, int]]:
        return _drive(self._scan_steps(index, upto, limit), self)

    def commit(self, txn: Txn) -> Outcome:
        return _drive(self._commit_steps(txn), self)


class _PostgresBase:
    """What both PostgreSQL stores share: settings, SQL, errors, schema setup, housekeeping."""

    global_indexes_atomic = True
    default_history_retention: int | None = None
    """PostgreSQL keeps every history record by default: it is the audit trail."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int,
        connect_timeout: timedelta,
        pool_timeout: timedelta,
        lock_timeout: timedelta,
        round_trip_timeout: timedelta | None,
    ) -> None:
        conninfo, self.schema = split_postgres_url(url)
        self.shown_url = shown_postgres_url(url)
        self._written = Written()  # what it wrote last: read back without decoding
        try:
            params = psycopg.conninfo.conninfo_to_dict(conninfo)
        except psycopg.Error as exc:
            raise bad_postgres_url(libpq_reason(str(exc))) from None
        problem = option_problem(conninfo, params)
        if problem is not None:  # libpq would refuse it only when connecting: "unavailable"
            raise bad_postgres_url(problem)
        if pool_size < 1:
            raise PolicyValidationError.single("$.poolSize", "must be at least 1")
        if round_trip_timeout is None:
            round_trip_timeout = lock_timeout + _LOCK_MARGIN
        if round_trip_timeout <= timedelta(0):
            raise PolicyValidationError.single("$.roundTripTimeout", "must be positive")
        self.round_trip_timeout = round_trip_timeout.total_seconds()
        """The client's bound on one round trip, in seconds."""
        ms = timedelta(milliseconds=1)
        ours = (
            f"-c lock_timeout={max(1, lock_timeout // ms)} "
            f"-c idle_in_transaction_session_timeout={max(1, 3 * lock_timeout // ms)}"
        )
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "options": f"{ours} {params.get('options') or ''}".strip(),
        }
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = max(1, round(connect_timeout.total_seconds()))
        if "application_name" not in params:
            kwargs["application_name"] = "agentpolicy"
        self._conninfo = conninfo
        self._kwargs = kwargs
        self._pool_options: dict[str, Any] = {
            "min_size": 1,
            "max_size": pool_size,
            "open": False,
            "timeout": pool_timeout.total_seconds(),
            "reconnect_timeout": max(1.0, pool_timeout.total_seconds()),
            "name": f"agentpolicy-{self.schema}",
            "num_workers": 2,
        }
        self.sql = _Statements(self.schema)
        self._opened = False
        self._closed = False
        self._ready = False
        self._commits_until_prune = _PRUNE_EVERY
        self._appends: dict[str, int] = {}

    # -- errors ----------------------------------------------------------------------------------

    def _down_error(self, reason: str | None) -> StorageUnavailableError:
        """Why no connection came: the server's own words, or a pool that stayed busy."""
        if reason is None:
            reason = f"all {self._pool_options['max_size']} connections of the pool stayed busy"
        return StorageUnavailableError(
            f"PostgreSQL at {self.shown_url} is unavailable ({reason}); "
            "nothing was allowed or changed"
        )

    def _closed_error(self) -> StorageUnavailableError:
        return StorageUnavailableError("this PostgreSQL storage was closed")

    def _error(self, exc: psycopg.Error) -> StorageUnavailableError | InternalError:
        """A structured error for a failed statement (nothing was changed)."""
        if isinstance(exc, _Stalled):
            return StorageUnavailableError(
                f"PostgreSQL at {self.shown_url} did not answer within "
                f"{self.round_trip_timeout:g} s (round_trip_timeout), so the connection was "
                "dropped; nothing was allowed or changed"
            )
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return StorageUnavailableError(
                "an agent's rows stayed locked by another session past the lock timeout; "
                "nothing was allowed or changed"
            )
        if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
            return StorageUnavailableError(
                f"the tables of schema {self.schema} are missing (dropped while in use?): "
                f"{_first_line(exc)}; nothing was allowed or changed"
            )
        if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
            return StorageUnavailableError(
                f"PostgreSQL at {self.shown_url} accepts no writes ({_first_line(exc)}: a "
                "standby, or default_transaction_read_only): agentpolicy needs a primary that "
                "accepts writes, even to read a budget; nothing was allowed or changed"
            )
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            return StorageUnavailableError(
                f"PostgreSQL at {self.shown_url} refused a statement for lack of privilege "
                f"({_first_line(exc)}): the role needs CREATE on the database to make schema "
                f"{self.schema} (or CREATE and USAGE on it, made by a DBA), and to read and write "
                "the tables in it; nothing was allowed or changed"
            )
        if isinstance(exc, psycopg.errors.QueryCanceled):
            return StorageUnavailableError(
                f"PostgreSQL at {self.shown_url} cancelled a statement ({_first_line(exc)}); "
                "nothing was allowed or changed"
            )
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return StorageUnavailableError(
                f"PostgreSQL at {self.shown_url} is unavailable ({_first_line(exc)}); "
                "nothing was allowed or changed"
            )
        sqlstate = getattr(exc, "sqlstate", None) or "?"
        return InternalError(f"PostgreSQL refused a statement ({sqlstate}): {_first_line(exc)}")

    def _unknown(self, stalled: bool = False, then: str | None = None) -> StorageUnavailableError:
        """A commit whose outcome is unknown: how it was lost, and ``then``, what a resend met."""
        what = (
            f"PostgreSQL at {self.shown_url} did not answer a commit within "
            f"{self.round_trip_timeout:g} s (round_trip_timeout)"
            if stalled
            else f"the connection to PostgreSQL at {self.shown_url} was lost during a commit"
        )
        if then is None:
            then = "it could not be asked again" if stalled else "it could not be made again"
        return StorageUnavailableError(
            f"{what} and {then}, so whether this change was recorded is unknown: a reservation "
            "it made expires by itself, and the same idempotency key answers the first decision"
        )

    # -- schema ----------------------------------------------------------------------------------

    def _setup_steps(self, conn: Any) -> _Steps[None]:
        """Create, upgrade or refuse the schema's layout (``conn``: the connection in hand)."""
        try:
            if (yield from self._version_steps()) != SCHEMA_VERSION:
                yield from self._migrate_steps()
        except psycopg.Error as exc:
            if conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                with contextlib.suppress(psycopg.Error):
                    yield _Execute("ROLLBACK")
            error = self._error(exc)
            if isinstance(error, InternalError):  # not a bug: tables it did not make are in the way
                raise StorageUnavailableError(
                    f"the tables of agentpolicy could not be set up in schema {self.schema} "
                    f"({_first_line(exc)}): does it hold tables of another program? Give "
                    "agentpolicy a schema of its own (?schema=); nothing was allowed or changed"
                ) from None
            raise error from None

    def _version_steps(self) -> _Steps[int | None]:
        found = yield _Execute("SELECT to_regclass(%s)", (f"{self.sql.schema}.schema_version",))
        if not found or found[0][0] is None:
            return None
        rows = yield _Execute(
            f"SELECT max(version) FROM {self.sql.schema}.schema_version"  # noqa: S608 - checked name
        )
        return None if not rows else rows[0][0]

    def _migrate_steps(self) -> _Steps[None]:
        """Create or upgrade the layout in one transaction, under the schema's advisory lock."""
        yield _Execute("BEGIN")
        try:
            version = yield from self._layout_steps()
        except Exception:
            with contextlib.suppress(psycopg.Error):  # a lost connection rolls back by itself
                yield _Execute("ROLLBACK")  # all or nothing: DDL is transactional
            raise
        if version is not None and version > SCHEMA_VERSION:
            yield _Execute("ROLLBACK")
            raise StorageUnavailableError(
                f"the PostgreSQL schema {self.schema} has layout version {version}; this "
                f"agentpolicy knows {SCHEMA_VERSION}: upgrade agentpolicy"
            )
        yield _Execute("COMMIT")

    def _layout_steps(self) -> _Steps[int | None]:
        """Inside the setup's transaction: create an absent layout, upgrade an older one.

        Answers the version found (``None``: there was none); a newer one is left alone.
        """
        q = self.sql.schema
        key = _LOCK_KEY | zlib.crc32(self.schema.encode())
        yield _Execute("SELECT pg_advisory_xact_lock(%s::bigint)", (key,))
        exists = yield _Execute("SELECT to_regnamespace(%s)", (q,))
        if not exists or exists[0][0] is None:
            yield _Execute(f"CREATE SCHEMA {q}")
        yield _Execute(f"CREATE TABLE IF NOT EXISTS {q}.schema_version (version integer NOT NULL)")
        row = yield _Execute(f"SELECT max(version) FROM {q}.schema_version")  # noqa: S608
        version: int | None = None if not row else row[0][0]
        if version is None:
            for statement in self.sql.layout:
                yield _Execute(statement)
            yield _Execute(
                f"INSERT INTO {q}.schema_version (version) VALUES (%s)",  # noqa: S608
                (SCHEMA_VERSION,),
            )
        elif version < SCHEMA_VERSION:
            for step in range(version, SCHEMA_VERSION):
                for statement in self.sql.upgrade(step):
                    yield _Execute(statement)
            yield _Execute(
                f"UPDATE {q}.schema_version SET version = %s",  # noqa: S608
                (SCHEMA_VERSION,),
            )
        return version

    # -- housekeeping ------------------------------------------------------------------------------

    def _committed_steps(self, at: int) -> _Steps[None]:
        """Count a commit; every 1,000 delete old operation ids and documents past their ttl."""
        self._commits_until_prune -= 1
        if self._commits_until_prune > 0:
            return
        self._commits_until_prune = _PRUNE_EVERY
        old = at - PRUNE_SLACK_US  # by this engine's clock, which others' may trail
        with contextlib.suppress(psycopg.Error):  # housekeeping only: the next round tries again
            yield _Pipeline(
                [
                    (self.sql.prune_ops, (op_prefix(old - OP_KEEP_US), _PRUNE_BATCH)),
                    (self.sql.prune_docs, (old, _PRUNE_BATCH)),
                ],
                rows=False,
            )


class PostgresStorage(_PostgresBase):
    """Storage on PostgreSQL (``postgresql://user@host:5432/db?schema=NAME``, ``postgres://``).

    ``schema`` (from the URL, default ``agentpolicy``) holds the tables, so
    one database can hold several independent stores. ``pool_size``
    connections at most; ``connect_timeout``, ``pool_timeout``,
    ``lock_timeout`` and ``round_trip_timeout`` (one round trip's answer,
    measured by the client; default ``lock_timeout`` + 2 s) bound how long a
    call waits before it fails closed with
    :class:`~agentpolicy.errors.StorageUnavailableError`. Nothing connects
    until the first call; the tables are created (or upgraded) then.
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
        self._watchdog = _Watchdog(self.round_trip_timeout)
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self._conninfo, kwargs=self._kwargs, **self._pool_options
        )
        self._lock = threading.Lock()

    # -- connections -----------------------------------------------------------------------------

    def _getconn(self) -> psycopg.Connection[Any]:
        if not self._opened:
            with self._lock:
                if self._closed:
                    raise self._closed_error()
                if not self._opened:
                    self._pool.open(wait=False)
                    self._opened = True
        try:
            conn = self._pool.getconn()
        except PoolTimeout:
            raise self._down() from None
        if not self._ready:
            try:
                self._setup(conn)
            except BaseException:
                self._pool.putconn(conn)
                raise
        return conn

    def _putconn(self, conn: psycopg.Connection[Any]) -> None:
        try:
            self._pool.putconn(conn)
        except psycopg.Error:  # pragma: no cover - a pool already closed
            conn.close()

    def _check_pool(self) -> None:
        """After a lost connection: test the idle ones, and replace those that are dead.

        A server restart ends them all, and each would have cost a call one of
        its tries.
        """
        with contextlib.suppress(psycopg.Error, PoolTimeout):
            self._pool.check()

    def _down(self) -> StorageUnavailableError:
        """Why no connection came: connect once more to learn the server's own words."""
        try:
            psycopg.connect(self._conninfo, **self._kwargs).close()
        except psycopg.Error as exc:
            return self._down_error(_first_line(exc))
        return self._down_error(None)

    def _setup(self, conn: psycopg.Connection[Any]) -> None:
        """Create, upgrade or refuse the schema's layout (once per storage object)."""
        with self._lock:
            if self._ready:
                return
            _drive(self._setup_steps(conn), _Holder(conn, self))
            self._ready = True

    # -- the storage protocol ----------------------------------------------------------------------

    def session(self, shard: str, *, write: bool = True) -> _PostgresSession:
        """A session on ``shard``: a transaction holding the shard's row when ``write``."""
        return _PostgresSession(self, shard, write)

    def log(self, shard: str, name: str, limit: int) -> list[tuple[int, int, Any]]:
        """The newest ``limit`` entries of a log, newest first."""
        with self.session(shard, write=False) as session:
            return _drive(session._log_steps(name, limit), session)

    def close(self) -> None:
        """Close the connection pool (a closed storage refuses further calls)."""
        with self._lock:
            self._closed = True
            self._watchdog.close()
            if self._opened:
                self._opened = False
                self._pool.close(timeout=5)
