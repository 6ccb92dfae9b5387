"""SQLite storage, on the standard library's ``sqlite3`` only.

A session that will write is one ``BEGIN IMMEDIATE`` transaction: the write
lock is taken before the first read, so the step decides on what it read and
its commit can never conflict. A session that only reads runs on a WAL
snapshot (``BEGIN``); if it turns out to write after all and another process
wrote meanwhile, SQLite refuses the upgrade and the runner starts again with a
write session. The file uses WAL (readers do not block the writer),
``synchronous=NORMAL``, a busy timeout, and retries when the lock stays busy.
Checkpoints run on a thread of their own (:class:`_Checkpointer`), so copying
pages back into the database leaves the commit path. The WAL can start over
only once a checkpoint has caught up with every commit, which a checkpoint
beside busy writers rarely does; so at 10,000 WAL pages (as before) a commit
still checkpoints, and finds only the few pages the thread has not copied.
Each thread has its own connection. A ``schema_version`` table records the
layout; files of agentpolicy 0.1 (schema 2) are converted when opened. A file
holding tables, none of them agentpolicy's schema (another program's
database), is refused by the first open before anything writes to it.

The file is created readable by its owner only (0600; SQLite gives its
``-wal`` and ``-shm`` files the same mode).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

from agentpolicy.errors import ErrorCode, PolicyError, StorageUnavailableError
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

__all__ = ["LOOK_SECONDS", "SCHEMA_VERSION", "SQLiteStorage"]

SCHEMA_VERSION = 3

_T = TypeVar("_T")
_Run: TypeAlias = sqlite3.Cursor | sqlite3.Connection
"""What runs a session's statements: its connection's cursor (or the connection itself)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS docs (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    body TEXT NOT NULL,
    expires INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idx (
    ix TEXT NOT NULL,
    member TEXT NOT NULL,
    score INTEGER NOT NULL,
    PRIMARY KEY (ix, member)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idx_by_score ON idx (ix, score);
CREATE TABLE IF NOT EXISTS logs (
    seq INTEGER PRIMARY KEY,
    log TEXT NOT NULL,
    at INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_by_log ON logs (log, seq);
CREATE TABLE IF NOT EXISTS ops (
    op TEXT PRIMARY KEY,
    at INTEGER NOT NULL,
    result TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sequence (n INTEGER NOT NULL);
"""

_LAYOUT = {
    "schema_version": "version",
    "docs": "name version body expires",
    "idx": "ix member score",
    "logs": "seq log at body",
    "ops": "op at result",
    "sequence": "n",
}
"""The tables of schema 3, each with its columns."""
_LAYOUT_V01 = {
    "schema_version": "version",
    "policies": "agent_id version body updated_at",
    "current_policies": "agent_id version",
    "counters": "agent_id window_key window_end decimals spent reserved",
    "reservations": "id agent_id status expires_at body",
    "approvals": "id agent_id status created_at body",
    "history": "seq agent_id body",
    "idempotency": "agent_id key created_at fingerprint record",
    "outbox": "seq id endpoint_id status body",
}
"""The tables of agentpolicy 0.1 (schema 1 had no ``outbox``), each with its columns."""
_COLUMNS = {name: frozenset(columns.split()) for name, columns in (_LAYOUT_V01 | _LAYOUT).items()}
_V01_CORE = frozenset(_LAYOUT_V01) - {"outbox"}

_TRIM_EVERY = 64
_PRUNE_EVERY = 10_000
_CHECKPOINT_EVERY = 100
"""Commits (of this storage object) between two wake-ups of the checkpoint thread."""
_FALLBACK_AUTOCHECKPOINT = 10_000
"""WAL pages past which a commit checkpoints (what is left) and the WAL starts over."""

LOOK_SECONDS = 0.5
"""How often (at most) a storage checks that its file is still the one it opened."""


class _Token:
    """Held only in a thread's local data: it goes when the thread ends."""

    __slots__ = ("__weakref__",)


_OPEN: weakref.WeakSet[SQLiteStorage] = weakref.WeakSet()
"""Every storage of this process, for :func:`_forked`."""


def _forked() -> None:
    """In a forked child: forget the parent's connections, so every thread opens its own.

    SQLite connections must not be used across ``fork``: the thread that
    forked went on with its parent's connection (the other threads' are of
    no thread here). They are left open, not closed (closing one could
    upset the locks the parent holds), and the bookkeeping lock is made
    anew (another thread may have held it at the fork).
    """
    for storage in list(_OPEN):
        _INHERITED.append((storage._all, storage._local))  # kept from closing when dropped
        storage._all_lock = threading.Lock()
        storage._all = []
        storage._local = threading.local()


_INHERITED: list[object] = []
"""A forked child's inherited connections: never used, never closed."""


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def _busy(exc: sqlite3.Error) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


def _not_ours(conn: sqlite3.Connection) -> list[str]:
    """The tables and views of the file that are not agentpolicy's, when it is not agentpolicy's.

    Empty when the file holds nothing yet, the tables of schema 3 or of 0.1
    (beside any someone added), or only some of agentpolicy's tables (a first
    open cut short), each with its columns: a table named as one of
    agentpolicy's but without them is another program's. Only reads; one
    statement unless some but not all of agentpolicy's tables are there.
    """
    rows = conn.execute(
        "SELECT type, name, rootpage FROM sqlite_master WHERE type IN ('table', 'view')"
    ).fetchall()
    tables = {name for kind, name, root in rows if kind == "table" and root}  # not virtual
    if tables >= _LAYOUT.keys() or tables >= _V01_CORE:
        return []
    others: list[str] = []
    for kind, name, _ in rows:
        if kind == "view":
            others.append(f"view {name[:64]!r}")
        elif name in tables and name in _COLUMNS:
            have = {
                row[0] for row in conn.execute("SELECT name FROM pragma_table_info(?)", (name,))
            }
            if not _COLUMNS[name] <= have:
                others.append(f"{name[:64]!r} (other columns)")
        elif not name.startswith("sqlite_"):  # SQLite's own (sqlite_sequence, sqlite_stat1)
            others.append(f"{name[:64]!r}{' (other columns)' if name in _COLUMNS else ''}")
    return others


class _SQLiteSession:
    fresh = True

    __slots__ = ("conn", "cur", "read", "storage", "write")

    def __init__(
        self, storage: SQLiteStorage, conn: sqlite3.Connection, cur: _Run, write: bool
    ) -> None:
        self.storage = storage
        self.conn = conn
        self.cur = cur  # the connection's own cursor: runs every statement of the session
        self.write = write
        self.read: dict[str, int] = {}  # versions read in this transaction

    def __enter__(self) -> _SQLiteSession:
        statement = "BEGIN IMMEDIATE" if self.write else "BEGIN"
        started = time.monotonic()  # retries of a busy BEGIN fit in one busy_timeout from here
        try:
            self.cur.execute(statement)
        except sqlite3.Error as exc:  # a file damaged since it was opened: DatabaseError
            self.storage._begin_again(self.conn, statement, started, exc)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:  # fmt: skip
        cur = self.cur
        if kind is not None:  # the error goes on (a store's error as StorageUnavailableError)
            cur.execute("ROLLBACK")
            if issubclass(kind, sqlite3.Error):
                raise StorageUnavailableError(
                    f"SQLite database {self.storage.path} failed: {exc}"
                ) from None
            return
        try:
            cur.execute("COMMIT")
        except sqlite3.Error as error:
            if self.conn.in_transaction:
                cur.execute("ROLLBACK")
            raise StorageUnavailableError(
                f"commit failed on {self.storage.path}: {error}"
            ) from None
        if self.write:  # count the commit; every so often wake the checkpoint thread
            storage = self.storage
            storage._commits += 1
            if not storage._commits % _CHECKPOINT_EVERY:
                storage._wake_checkpointer()

    def get(self, names: Sequence[str], guess: frozenset[str] = frozenset()) -> dict[str, Doc]:
        if len(names) == 1:  # the usual read: one document, its name known
            name = names[0]
            row = self.cur.execute(
                "SELECT version, body FROM docs WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                self.read[name] = 0
                return {}
            version = self.read[name] = row[0]
            return {name: (version, self.storage._written.decode(name, row[1]))}
        marks = ",".join("?" * len(names))
        rows = self.cur.execute(
            f"SELECT name, version, body FROM docs WHERE name IN ({marks})",  # noqa: S608
            tuple(names),
        ).fetchall()
        decode = self.storage._written.decode
        found = {name: (version, decode(name, body)) for name, version, body in rows}
        for name in names:
            self.read[name] = found[name][0] if name in found else 0
        return found

    def _holds(self, expect: dict[str, int]) -> bool:
        # Under BEGIN IMMEDIATE nothing read in this transaction can have changed; a read
        # snapshot that is stale fails at its first write. Only what was not read is queried.
        read = self.read
        if self.write:
            for n, v in expect.items():
                if read.get(n) != v:
                    break
            else:
                return True  # every one was read (the usual case): nothing to query
        unread = {n: v for n, v in expect.items() if read.get(n) != v or not self.write}
        if not unread:
            return True
        marks = ",".join("?" * len(unread))
        rows = self.cur.execute(
            f"SELECT name, version FROM docs WHERE name IN ({marks})",  # noqa: S608
            tuple(unread),
        ).fetchall()
        versions = dict(rows)
        return all(versions.get(n, 0) == v for n, v in unread.items())

    def scan(self, index: str, upto: int, limit: int) -> list[tuple[str, int]]:
        rows = self.cur.execute(
            "SELECT member, score FROM idx WHERE ix = ? AND score <= ? ORDER BY score, member "
            "LIMIT ?",
            (index, upto, limit),
        ).fetchall()
        return [(m, s) for m, s in rows]

    def _next_seq(self) -> int:
        row = self.cur.execute("UPDATE sequence SET n = n + 1 RETURNING n").fetchone()
        return int(row[0])

    def commit(self, txn: Txn) -> Outcome:
        c = self.cur
        if txn.expect and not self._holds(txn.expect):
            done = c.execute("SELECT result FROM ops WHERE op = ?", (txn.op,)).fetchone()
            return (
                CONFLICT
                if done is None
                else Outcome(applied=False, replayed=True, result=json.loads(done[0]))
            )
        text = Encoded(txn)
        try:
            inserted = c.execute(
                "INSERT INTO ops (op, at, result) VALUES (?, ?, ?) ON CONFLICT (op) DO NOTHING",
                (txn.op, txn.at, text.result),
            ).rowcount
        except sqlite3.OperationalError as exc:
            if not self.write and _busy(exc):  # a read snapshot that is out of date
                return CONFLICT
            raise
        if not inserted:
            row = c.execute("SELECT result FROM ops WHERE op = ?", (txn.op,)).fetchone()
            return Outcome(applied=False, replayed=True, result=json.loads(row[0]))
        if txn.put:
            ttl = txn.ttl
            c.executemany(
                "INSERT INTO docs (name, version, body, expires) VALUES (?, 1, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET version = version + 1, body = excluded.body, "
                "expires = excluded.expires",
                [
                    (name, body, None if name not in ttl else txn.at + ttl[name] * 1000)
                    for name, body in text.put.items()
                ],
            )
        self.storage._written.remember(txn, text)
        if txn.delete:
            c.executemany("DELETE FROM docs WHERE name = ?", [(n,) for n in txn.delete])
        for index, member, given in txn.index:
            if given is None:
                c.execute("DELETE FROM idx WHERE ix = ? AND member = ?", (index, member))
                continue
            score = self._next_seq() if given == NEXT_SEQ else given
            c.execute(
                "INSERT INTO idx (ix, member, score) VALUES (?, ?, ?) "
                "ON CONFLICT (ix, member) DO UPDATE SET score = excluded.score",
                (index, member, score),
            )
        appends = self.storage._appends
        for (log, _, keep_after, max_len), entry in zip(txn.append, text.append, strict=True):
            c.execute("INSERT INTO logs (log, at, body) VALUES (?, ?, ?)", (log, txn.at, entry))
            if keep_after is None and max_len is None:
                continue
            count = appends.get(log, 0) + 1
            appends[log] = count
            if count % _TRIM_EVERY == 0:  # trimming costs a query: once per 64 appends
                self._trim(log, keep_after, max_len)
        if self.storage._commits_until_prune <= 0:
            # Housekeeping, rarely: operation ids begin with their time, so old ones are a
            # range of the key; documents past their ttl are found by a scan (no index to
            # keep up to date on every commit).
            self.storage._commits_until_prune = _PRUNE_EVERY
            old = txn.at - PRUNE_SLACK_US  # by this engine's clock, which others' may trail
            c.execute("DELETE FROM ops WHERE op < ?", (op_prefix(old - OP_KEEP_US),))
            c.execute("DELETE FROM docs WHERE expires <= ?", (old,))
        self.storage._commits_until_prune -= 1
        return Outcome(applied=True, replayed=False, result=txn.result)

    def _trim(self, log: str, keep_after: int | None, max_len: int | None) -> None:
        if keep_after is not None:
            self.cur.execute("DELETE FROM logs WHERE log = ? AND at < ?", (log, keep_after))
        if max_len is not None:
            self.cur.execute(
                "DELETE FROM logs WHERE log = ? AND seq <= (SELECT seq FROM logs WHERE log = ? "
                "ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (log, log, max_len),
            )


class _Checkpointer:
    """A daemon thread that checkpoints the WAL when commits wake it.

    A ``PASSIVE`` checkpoint copies committed pages from the WAL into the
    database without taking the write lock, so writers go on meanwhile; once
    it has copied everything, the next writer starts the WAL from its
    beginning again. Durability is SQLite's own (WAL, ``synchronous=NORMAL``):
    a checkpoint only moves pages that are already committed. The thread has
    its own connection, releases the GIL while SQLite works, and is stopped
    by :meth:`stop` (``SQLiteStorage.close``); being a daemon, it never holds
    a process open.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.wake = threading.Event()
        self.stopping = False
        self.checkpoints = 0
        self.thread = threading.Thread(target=self._run, name="agentpolicy-sqlite-checkpoint",
                                       daemon=True)  # fmt: skip
        self.thread.start()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:  # pragma: no cover - the storage opened the same file just now
            return
        try:
            conn.execute("PRAGMA busy_timeout = 0")  # a busy checkpoint is skipped, not awaited
            while True:
                self.wake.wait()
                self.wake.clear()
                if self.stopping:
                    return
                with contextlib.suppress(sqlite3.Error):  # busy: the next wake-up tries again
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop the thread, waiting for a checkpoint under way to finish."""
        self.stopping = True
        self.wake.set()
        self.thread.join()


class SQLiteStorage:
    """Storage in one SQLite file (``sqlite:///relative.db``, ``sqlite:////absolute.db``).

    Shared safely by threads and by processes on the same machine. Raises
    :class:`~agentpolicy.errors.StorageUnavailableError` when the file cannot
    be opened, is not a database, holds another program's tables (and not
    agentpolicy's: it is left as it was), or its lock stays busy past
    ``busy_timeout`` (``busy_retries`` retries with jitter fit within it).
    """

    global_indexes_atomic = True
    default_history_retention: int | None = None
    """SQLite keeps every history record by default: it is the audit trail."""

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: timedelta = timedelta(seconds=5),
        busy_retries: int = 8,
    ) -> None:
        self.path = str(path)
        # the file itself, wherever the process's working directory goes after this
        self._file = self.path if self.path in ("", ":memory:") else os.path.abspath(self.path)
        # SQLite keeps the -wal beside the file a symbolic link names, not beside the link
        self._wal = os.path.realpath(self._file) + "-wal"
        self._busy_timeout = busy_timeout
        self._busy_retries = busy_retries
        self._local = threading.local()
        # every connection opened, with its thread's token and its process: closed once the
        # thread ended (its token, held only in the thread's local data, is gone then)
        self._all: list[tuple[weakref.ref[_Token], int, sqlite3.Connection]] = []
        self._all_lock = threading.Lock()
        self._commits_until_prune = _PRUNE_EVERY
        self._appends: dict[str, int] = {}
        self._written = Written()  # what it wrote last: read back without decoding
        self._commits = 0
        self._checkpointer: _Checkpointer | None = None
        self._checkpointer_pid = 0
        _OPEN.add(self)  # a forked child starts with no connection (see _forked)
        self._create_private()
        self._identity: tuple[tuple[int, int] | None, tuple[int, int] | None] | None = None
        self._next_look = 0.0
        self._init_schema()
        if self.path not in ("", ":memory:"):
            self._identity = self._files()

    def _create_private(self) -> None:
        try:
            if self.path == ":memory:" or Path(self.path).exists():
                return
        except OSError as exc:  # a name the system refuses (too long, ...)
            raise StorageUnavailableError(
                f"cannot open SQLite database {self.path[:200]!r}: {exc.strerror}"
            ) from None
        with contextlib.suppress(OSError):  # a missing folder is reported by connect()
            os.close(os.open(self._file, os.O_CREAT | os.O_WRONLY, 0o600))

    def _connection(self, *, first: bool = False) -> sqlite3.Connection:
        """The calling thread's connection; ``first``: the storage's first, which checks the file.

        The first refuses a file that holds another program's tables before
        anything writes to it (switching to WAL writes the file's header).
        """
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # connect() sets the busy timeout, in whole milliseconds as PRAGMA busy_timeout did
            ms = int(self._busy_timeout / timedelta(milliseconds=1))
            try:
                conn = sqlite3.connect(
                    self._file,
                    isolation_level=None,
                    timeout=(ms + 0.5) / 1000,
                    check_same_thread=False,
                )
            except sqlite3.Error as exc:
                raise StorageUnavailableError(
                    f"cannot open SQLite database {self.path}: {exc}"
                ) from None
            try:
                if first:
                    self._refuse_foreign(conn)
                self._patiently(lambda: conn.execute("PRAGMA journal_mode = WAL"))
                conn.execute("PRAGMA synchronous = NORMAL")
                # The checkpoint thread copies pages as commits come; at 10,000 WAL pages
                # (about 40 MB) a commit copies what is left, and the WAL starts over.
                conn.execute(f"PRAGMA wal_autocheckpoint = {_FALLBACK_AUTOCHECKPOINT}")
            except sqlite3.Error as exc:
                conn.close()
                raise StorageUnavailableError(
                    f"cannot open SQLite database {self.path}: {exc}"
                ) from None
            except BaseException:
                conn.close()  # SQLite removes the -wal and -shm it made for a file in WAL mode
                raise
            self._local.conn = conn
            # One cursor per connection runs every session's statements:
            # Connection.execute makes (and drops) a new cursor for each statement.
            self._local.cur = conn.cursor()
            token = self._local.token = _Token()
            with self._all_lock:
                self._all = self._living()
                self._all.append((weakref.ref(token), os.getpid(), conn))
        return conn

    def _living(self) -> list[tuple[weakref.ref[_Token], int, sqlite3.Connection]]:
        """The connections of threads still running; those of threads that ended are closed.

        Each thread has a connection of its own; one that ends leaves its
        connection behind. Without this a program that runs each call on a new
        thread (``/healthz`` did, a threaded server does) held a connection,
        and a file descriptor or two, per thread it ever ran, until none were
        left. A thread's end is seen by its local data going (whoever started
        it: ``threading``, ``_thread`` or a C library). Only this process's
        are closed: a forked child leaves its parent's alone.
        """
        pid = os.getpid()
        kept = []
        for token, owner, conn in self._all:
            if owner == pid and token() is None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            else:
                kept.append((token, owner, conn))
        return kept

    def _refuse_foreign(self, conn: sqlite3.Connection) -> None:
        """Refuse a file that holds tables, none of them agentpolicy's schema, changing nothing."""
        others = self._patiently(lambda: _not_ours(conn))
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if others[5:] else "")
            raise StorageUnavailableError(
                f"SQLite database {self.path} holds another program's tables ({shown}) and "
                "not agentpolicy's: agentpolicy keeps its data in a file of its own (a new or "
                "empty one) and left this one as it was"
            )

    def _patiently(self, work: Callable[[], _T]) -> _T:
        """Run ``work`` on opening, retrying within ``busy_timeout`` while another holds the file.

        Switching a file to WAL answers "database is locked" at once, without
        SQLite's busy handler, while another connection holds it (many
        processes opening a new file together): retried with jitter, each
        wait within what is left of ``busy_timeout``. Reading the tables of a
        file that another process is switching to WAL is retried alike.
        """
        limit = self._busy_timeout.total_seconds()
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                return work()
            except sqlite3.OperationalError as exc:
                left = limit - (time.monotonic() - started)
                if not _busy(exc) or left <= 0:
                    raise
            time.sleep(min(left, random.uniform(0, 0.002 * 2 ** min(attempt, 8))))  # noqa: S311
            attempt += 1

    def _init_schema(self) -> None:
        conn = self._connection(first=True)
        for attempt in range(self._busy_retries + 1):
            try:
                conn.executescript(_SCHEMA)  # idempotent: every statement is IF NOT EXISTS
                break
            except sqlite3.Error as exc:
                if not _busy(exc) or attempt == self._busy_retries:
                    raise StorageUnavailableError(f"cannot set up {self.path}: {exc}") from None
                time.sleep(random.uniform(0, 0.01 * 2**attempt))  # noqa: S311 - jitter
        with self.session("", write=True) as session:
            c = session.conn
            row = c.execute("SELECT max(version) FROM schema_version").fetchone()
            if c.execute("SELECT count(*) FROM sequence").fetchone()[0] == 0:
                c.execute("INSERT INTO sequence (n) VALUES (0)")
            if row[0] is None:
                c.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] < SCHEMA_VERSION:
                from agentpolicy.storage._migrate import sqlite_v2_to_v3  # noqa: PLC0415

                sqlite_v2_to_v3(session, self.path)
                c.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise PolicyError(
                    f"{self.path} has schema version {row[0]}; this agentpolicy knows "
                    f"{SCHEMA_VERSION}: upgrade agentpolicy",
                    code=ErrorCode.STORAGE_UNAVAILABLE,
                )

    def _begin_again(
        self, conn: sqlite3.Connection, statement: str, started: float, exc: sqlite3.Error
    ) -> None:
        """Retry a busy ``BEGIN`` with jitter, every attempt within one ``busy_timeout``.

        ``exc`` is the first attempt's error, begun at ``started``; one that
        is not "busy" is raised at once as
        :class:`~agentpolicy.errors.StorageUnavailableError`.

        SQLite answers "busy" at once in some cases and after waiting
        ``busy_timeout`` in others; a retry waits at most what is left of
        ``busy_timeout`` since the first attempt began, so a lock that
        another process holds fails the call after about ``busy_timeout``
        (it was up to ``busy_retries + 1`` times that).
        """
        if not _busy(exc):
            raise StorageUnavailableError(f"SQLite database {self.path} failed: {exc}") from None
        limit = self._busy_timeout.total_seconds()
        deadline = started + limit
        try:
            for attempt in range(self._busy_retries):
                time.sleep(random.uniform(0, 0.01 * 2**attempt))  # noqa: S311 - jitter
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                conn.execute(f"PRAGMA busy_timeout = {max(1, int(left * 1000))}")
                try:
                    conn.execute(statement)
                except sqlite3.Error as again:
                    if not _busy(again):
                        raise StorageUnavailableError(
                            f"SQLite database {self.path} failed: {again}"
                        ) from None
                    exc = again
                else:
                    return
        finally:
            conn.execute(
                f"PRAGMA busy_timeout = {int(self._busy_timeout / timedelta(milliseconds=1))}"
            )
        raise StorageUnavailableError(
            f"SQLite database {self.path} is busy: another writer held its lock past "
            f"{limit:g} s ({exc}); nothing was allowed or changed"
        )

    def session(self, shard: str, *, write: bool = True) -> _SQLiteSession:
        """One transaction, a context manager: ``BEGIN IMMEDIATE`` to write, a snapshot to read.

        Leaving it commits; an error in it rolls back (a SQLite error is raised
        as :class:`~agentpolicy.errors.StorageUnavailableError`).
        """
        if self._identity is not None and time.monotonic() >= self._next_look:
            self._look()
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None:
            conn = self._connection()
        cur: sqlite3.Cursor | None = getattr(local, "cur", None)
        if cur is None or cur.connection is not conn:  # something put in the connection's place
            return _SQLiteSession(self, conn, conn, write)
        return _SQLiteSession(self, conn, cur, write)

    def _files(self) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """Which files the path and its ``-wal`` are now (device, inode), ``None`` where none."""
        found: list[tuple[int, int] | None] = []
        for name in (self._file, self._wal):
            try:
                st = os.stat(name)
            except OSError:
                found.append(None)
            else:
                found.append((st.st_dev, st.st_ino))
        return found[0], found[1]

    def _look(self) -> None:
        """Refuse to go on when the file (or its ``-wal``) is no longer the one this opened.

        A storage keeps its connections open: a file replaced under it (a
        backup restored, the ``-wal`` and ``-shm`` cleaned up) left it
        working on the old one, which nobody else sees, while a new process
        opening the path saw none of its payments (a limit spent twice, the
        history of one of them lost). Checked at most every
        :data:`LOOK_SECONDS`, before a session.
        """
        self._next_look = time.monotonic() + LOOK_SECONDS
        if self._identity is None:  # pragma: no cover - only called when it is set
            return
        (db, wal), (now_db, now_wal) = self._identity, self._files()
        if now_db == db and (wal is None or now_wal == wal):
            return
        self._next_look = 0.0  # and every session after, until the storage is opened again
        what = "file" if now_db != db else "-wal file"
        raise StorageUnavailableError(
            f"the SQLite {what} of {self.path} was replaced or removed while this storage had "
            "it open, so what it would read and write is not what other processes see; nothing "
            "was allowed or changed. Open the storage again (restart the engine); replace a "
            "database file only while nothing has it open"
        )

    def _wake_checkpointer(self) -> None:
        """Wake the checkpoint thread (a session calls it every ``_CHECKPOINT_EVERY`` commits).

        The thread is started on first need, and again in a forked child.
        """
        if self.path == ":memory:":
            return
        checkpointer = self._checkpointer
        if checkpointer is None or self._checkpointer_pid != os.getpid():
            with self._all_lock:  # started on first need, and again in a forked child
                if self._checkpointer is None or self._checkpointer_pid != os.getpid():
                    self._checkpointer = _Checkpointer(self._file)
                    self._checkpointer_pid = os.getpid()
                checkpointer = self._checkpointer
        checkpointer.wake.set()

    def log(self, shard: str, name: str, limit: int) -> list[tuple[int, int, Any]]:
        """The newest ``limit`` entries of a log, newest first."""
        if self._identity is not None and time.monotonic() >= self._next_look:
            self._look()
        try:
            rows = (
                self._connection()
                .execute(
                    "SELECT seq, at, body FROM logs WHERE log = ? ORDER BY seq DESC LIMIT ?",
                    (name, limit),
                )
                .fetchall()
            )
        except sqlite3.Error as exc:
            raise StorageUnavailableError(f"SQLite database {self.path} failed: {exc}") from None
        return [(seq, at, json.loads(body)) for seq, at, body in rows]

    def integrity_check(self) -> str:
        """Run ``PRAGMA integrity_check``; ``"ok"`` when the file is sound."""
        row = self._connection().execute("PRAGMA integrity_check").fetchone()
        return str(row[0])

    def close(self) -> None:
        """Stop the checkpoint thread; close every connection this storage opened."""
        with self._all_lock:
            checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None and self._checkpointer_pid == os.getpid():
            checkpointer.stop()
        with self._all_lock:
            for _, _, conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()
        self._identity = None  # used again, it opens the file anew (its -wal may be a new one)
