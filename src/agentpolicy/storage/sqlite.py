"""SQLite storage, on the standard library's ``sqlite3`` only.

Every operation that writes is one ``BEGIN IMMEDIATE`` transaction (pure reads
run on a WAL snapshot with a plain ``BEGIN``): the write lock is
taken before the first read, so a read-then-write can never fail halfway
with ``SQLITE_BUSY_SNAPSHOT`` and two processes can never both spend the same
budget. The file uses WAL (readers do not block the writer),
``synchronous=NORMAL``, a busy timeout, and retries when the lock stays
busy. Each thread has its own connection. A ``schema_version`` table records
the layout.
"""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import attrs

from agentpolicy.codec import decode, encode
from agentpolicy.errors import ErrorCode, PolicyError, StorageUnavailableError
from agentpolicy.records import (
    Approval,
    Counter,
    HistoryRecord,
    PolicyRecord,
    Reservation,
    WebhookDelivery,
)
from agentpolicy.storage._state import IdempotencyEntry, TransactionalStorage
from agentpolicy.storage._time import instant, micros

__all__ = ["SCHEMA_VERSION", "SQLiteStorage"]

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS policies (
    agent_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    body TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (agent_id, version)
);
CREATE TABLE IF NOT EXISTS current_policies (
    agent_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    agent_id TEXT NOT NULL,
    window_key TEXT NOT NULL,
    window_end INTEGER NOT NULL,
    decimals INTEGER NOT NULL,
    spent TEXT NOT NULL,
    reserved TEXT NOT NULL,
    PRIMARY KEY (agent_id, window_key)
);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    status TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_open ON reservations (agent_id, expires_at)
    WHERE status IN ('held', 'reserved');
CREATE INDEX IF NOT EXISTS reservations_due ON reservations (expires_at)
    WHERE status IN ('held', 'reserved');
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS approvals_pending ON approvals (agent_id, created_at)
    WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_agent ON history (agent_id, seq);
CREATE TABLE IF NOT EXISTS idempotency (
    agent_id TEXT NOT NULL,
    key TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (agent_id, key)
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    endpoint_id TEXT NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (endpoint_id, seq) WHERE status = 'pending';
"""


def _busy(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


class _SQLiteTransaction:
    """Row access inside one transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.c = conn

    def get_policy(self, agent_id: str, version: int | None = None) -> PolicyRecord | None:
        if version is None:
            row = self.c.execute(
                "SELECT p.version, p.body, p.updated_at FROM current_policies c "
                "JOIN policies p ON p.agent_id = c.agent_id AND p.version = c.version "
                "WHERE c.agent_id = ?",
                (agent_id,),
            ).fetchone()
        else:
            row = self.c.execute(
                "SELECT version, body, updated_at FROM policies WHERE agent_id = ? AND version = ?",
                (agent_id, version),
            ).fetchone()
        if row is None:
            return None
        return PolicyRecord(agent_id, row[0], json.loads(row[1]), datetime.fromisoformat(row[2]))

    def policy_version(self, agent_id: str) -> int:
        row = self.c.execute(
            "SELECT version FROM current_policies WHERE agent_id = ?", (agent_id,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def put_policy(self, record: PolicyRecord) -> None:
        self.c.execute(
            "INSERT INTO policies (agent_id, version, body, updated_at) VALUES (?, ?, ?, ?)",
            (
                record.agent_id,
                record.version,
                json.dumps(record.policy, separators=(",", ":")),
                record.updated_at.isoformat(),
            ),
        )
        self.c.execute(
            "INSERT INTO current_policies (agent_id, version) VALUES (?, ?) "
            "ON CONFLICT (agent_id) DO UPDATE SET version = excluded.version",
            (record.agent_id, record.version),
        )

    def list_policies(self, prefix: str | None) -> list[PolicyRecord]:
        rows = self.c.execute(
            "SELECT c.agent_id, p.version, p.body, p.updated_at FROM current_policies c "
            "JOIN policies p ON p.agent_id = c.agent_id AND p.version = c.version "
            "WHERE substr(c.agent_id, 1, ?) = ? ORDER BY c.agent_id",
            (len(prefix or ""), prefix or ""),
        ).fetchall()
        return [PolicyRecord(a, v, json.loads(b), datetime.fromisoformat(u)) for a, v, b, u in rows]

    def counters(self, agent_id: str, keys: Iterable[str]) -> dict[str, Counter]:
        wanted = list(keys)
        marks = ",".join("?" * len(wanted))
        query = "SELECT window_key, window_end, decimals, spent, reserved FROM counters "
        query += f"WHERE agent_id = ? AND window_key IN ({marks})"
        rows = self.c.execute(query, (agent_id, *wanted)).fetchall()
        return {k: Counter(k, instant(e), d, int(s), int(r)) for k, e, d, s, r in rows}

    def put_counters(self, agent_id: str, counters: Iterable[Counter]) -> None:
        self.c.executemany(
            "INSERT INTO counters (agent_id, window_key, window_end, decimals, spent, reserved) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (agent_id, window_key) DO UPDATE SET "
            "decimals = excluded.decimals, spent = excluded.spent, reserved = excluded.reserved",
            [
                (agent_id, c.key, micros(c.window_end), c.decimals, str(c.spent), str(c.reserved))
                for c in counters
            ],
        )

    def prune_counters(self, agent_id: str, now: datetime) -> None:
        self.c.execute(
            "DELETE FROM counters WHERE agent_id = ? AND window_end <= ?",
            (agent_id, micros(now)),
        )

    def get_reservation(self, reservation_id: str) -> Reservation | None:
        row = self.c.execute(
            "SELECT body FROM reservations WHERE id = ?", (reservation_id,)
        ).fetchone()
        return None if row is None else decode(row[0], Reservation)

    def put_reservation(self, reservation: Reservation) -> None:
        self.c.execute(
            "INSERT INTO reservations (id, agent_id, status, expires_at, body) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
            "expires_at = excluded.expires_at, body = excluded.body",
            (
                reservation.id,
                reservation.agent_id,
                reservation.status.value,
                micros(reservation.expires_at),
                encode(reservation),
            ),
        )

    def due_reservations(self, agent_id: str | None, now: datetime) -> list[Reservation]:
        if agent_id is None:
            rows = self.c.execute(
                "SELECT body FROM reservations WHERE status IN ('held', 'reserved') "
                "AND expires_at <= ? ORDER BY expires_at",
                (micros(now),),
            ).fetchall()
        else:
            rows = self.c.execute(
                "SELECT body FROM reservations WHERE agent_id = ? "
                "AND status IN ('held', 'reserved') AND expires_at <= ? ORDER BY expires_at",
                (agent_id, micros(now)),
            ).fetchall()
        return [decode(b, Reservation) for (b,) in rows]

    def get_approval(self, approval_id: str) -> Approval | None:
        row = self.c.execute("SELECT body FROM approvals WHERE id = ?", (approval_id,)).fetchone()
        return None if row is None else decode(row[0], Approval)

    def put_approval(self, approval: Approval) -> None:
        self.c.execute(
            "INSERT INTO approvals (id, agent_id, status, created_at, body) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
            "body = excluded.body",
            (
                approval.id,
                approval.agent_id,
                approval.status.value,
                micros(approval.created_at),
                encode(approval),
            ),
        )

    def pending_approvals(self, agent_id: str | None) -> list[Approval]:
        if agent_id is None:
            rows = self.c.execute(
                "SELECT body FROM approvals WHERE status = 'pending' ORDER BY created_at, id"
            ).fetchall()
        else:
            rows = self.c.execute(
                "SELECT body FROM approvals WHERE agent_id = ? AND status = 'pending' "
                "ORDER BY created_at, id",
                (agent_id,),
            ).fetchall()
        return [decode(b, Approval) for (b,) in rows]

    def add_history(self, record: HistoryRecord) -> None:
        self.c.execute(
            "INSERT INTO history (agent_id, body) VALUES (?, ?)",
            (record.agent_id, encode(record)),
        )

    def history(self, agent_id: str, limit: int) -> list[HistoryRecord]:
        rows = self.c.execute(
            "SELECT seq, body FROM history WHERE agent_id = ? ORDER BY seq DESC LIMIT ?",
            (agent_id, limit),
        ).fetchall()
        return [attrs.evolve(decode(b, HistoryRecord), seq=s) for s, b in rows]

    def get_idempotency(self, agent_id: str, key: str) -> IdempotencyEntry | None:
        row = self.c.execute(
            "SELECT created_at, fingerprint, record FROM idempotency "
            "WHERE agent_id = ? AND key = ?",
            (agent_id, key),
        ).fetchone()
        if row is None:
            return None
        return IdempotencyEntry(
            agent_id, key, row[1], instant(row[0]), decode(row[2], HistoryRecord)
        )

    def drop_idempotency(self, agent_id: str, before: datetime) -> None:
        self.c.execute(
            "DELETE FROM idempotency WHERE agent_id = ? AND created_at < ?",
            (agent_id, micros(before)),
        )

    def put_idempotency(self, entry: IdempotencyEntry) -> None:
        self.c.execute(
            "INSERT INTO idempotency (agent_id, key, created_at, fingerprint, record) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (agent_id, key) DO UPDATE SET "
            "created_at = excluded.created_at, fingerprint = excluded.fingerprint, "
            "record = excluded.record",
            (
                entry.agent_id,
                entry.key,
                micros(entry.created_at),
                entry.fingerprint,
                encode(entry.record),
            ),
        )

    def new_id(self, kind: str, agent_id: str) -> str:
        return f"{kind}_{uuid.uuid4().hex}"

    def add_outbox(self, delivery: WebhookDelivery) -> None:
        self.c.execute(
            "INSERT INTO outbox (id, endpoint_id, status, body) VALUES (?, ?, ?, ?)",
            (delivery.id, delivery.endpoint_id, delivery.status.value, encode(delivery)),
        )

    def put_outbox(self, delivery: WebhookDelivery) -> None:
        self.c.execute(
            "UPDATE outbox SET status = ?, body = ? WHERE id = ?",
            (delivery.status.value, encode(delivery), delivery.id),
        )

    def _outbox(self, rows: list[tuple[int, str]]) -> list[WebhookDelivery]:
        return [attrs.evolve(decode(b, WebhookDelivery), seq=s) for s, b in rows]

    def pending_outbox(self, endpoint_ids: Iterable[str]) -> list[WebhookDelivery]:
        ids = list(endpoint_ids)
        marks = ",".join("?" * len(ids))
        query = "SELECT seq, body FROM outbox WHERE status = 'pending' "
        query += f"AND endpoint_id IN ({marks}) ORDER BY seq"
        return self._outbox(self.c.execute(query, ids).fetchall())

    def list_outbox(self, status: str | None, limit: int) -> list[WebhookDelivery]:
        if status is None:
            rows = self.c.execute(
                "SELECT seq, body FROM outbox ORDER BY seq DESC LIMIT ?", (limit,)
            ).fetchall()
        else:
            rows = self.c.execute(
                "SELECT seq, body FROM outbox WHERE status = ? ORDER BY seq DESC LIMIT ?",
                (status, limit),
            ).fetchall()
        return self._outbox(rows)


class SQLiteStorage(TransactionalStorage):
    """Storage in one SQLite file (``sqlite:///relative.db``, ``sqlite:////absolute.db``).

    Shared safely by threads and by processes on the same machine. Raises
    :class:`~agentpolicy.errors.StorageUnavailableError` when the file cannot
    be opened or its lock stays busy past ``busy_timeout`` and the retries.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: timedelta = timedelta(seconds=5),
        busy_retries: int = 8,
    ) -> None:
        self.path = str(path)
        self._busy_timeout = busy_timeout
        self._busy_retries = busy_retries
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._init_schema()

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(
                    self.path,
                    isolation_level=None,
                    timeout=self._busy_timeout.total_seconds(),
                    check_same_thread=False,
                )
                conn.execute(
                    f"PRAGMA busy_timeout = {int(self._busy_timeout / timedelta(milliseconds=1))}"
                )
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.Error as exc:
                raise StorageUnavailableError(
                    f"cannot open SQLite database {self.path}: {exc}"
                ) from None
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def _init_schema(self) -> None:
        conn = self._connection()
        for attempt in range(self._busy_retries + 1):
            try:
                conn.executescript(_SCHEMA)  # idempotent: every statement is IF NOT EXISTS
                break
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or attempt == self._busy_retries:
                    raise StorageUnavailableError(f"cannot set up {self.path}: {exc}") from None
                time.sleep(random.uniform(0, 0.01 * 2**attempt))  # noqa: S311 - jitter
        with self._transaction() as tx:
            row = tx.c.execute("SELECT max(version) FROM schema_version").fetchone()
            if row[0] is None:
                tx.c.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] < SCHEMA_VERSION:  # 1 -> 2 added the outbox table, created above
                tx.c.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise PolicyError(
                    f"{self.path} has schema version {row[0]}; this agentpolicy knows "
                    f"{SCHEMA_VERSION}: upgrade agentpolicy",
                    code=ErrorCode.STORAGE_UNAVAILABLE,
                )

    def _begin(self, conn: sqlite3.Connection, write: bool) -> None:
        # A read-then-write must take the write lock first (BEGIN IMMEDIATE); a block
        # that only reads runs on a WAL snapshot and waits for no writer.
        statement = "BEGIN IMMEDIATE" if write else "BEGIN"
        for attempt in range(self._busy_retries + 1):
            try:
                conn.execute(statement)
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or attempt == self._busy_retries:
                    raise StorageUnavailableError(
                        f"SQLite database {self.path} is busy: {exc}"
                    ) from None
                time.sleep(random.uniform(0, 0.01 * 2**attempt))  # noqa: S311 - jitter
            else:
                return

    @contextlib.contextmanager
    def _transaction(self, agent_id: str | None = None, *, write: bool = True) -> Iterator[Any]:
        conn = self._connection()
        self._begin(conn, write)
        try:
            yield _SQLiteTransaction(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            raise StorageUnavailableError(f"commit failed on {self.path}: {exc}") from None

    def integrity_check(self) -> str:
        """Run ``PRAGMA integrity_check``; ``"ok"`` when the file is sound."""
        row = self._connection().execute("PRAGMA integrity_check").fetchone()
        return str(row[0])

    def close(self) -> None:
        """Close every connection this storage opened."""
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()
