"""In-memory storage: thread-safe, for one process, tests and demos.

One lock serialises every operation. Each operation keeps an undo journal,
so an operation that raises halfway leaves nothing behind. History is kept
per agent up to ``history_limit`` records (the oldest are dropped).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from datetime import datetime
from typing import Any

import attrs

from agentpolicy.records import (
    Approval,
    ApprovalStatus,
    Counter,
    DeliveryStatus,
    HistoryRecord,
    PolicyRecord,
    Reservation,
    WebhookDelivery,
)
from agentpolicy.storage._state import IdempotencyEntry, TransactionalStorage

__all__ = ["MemoryStorage"]

_MISSING = object()


class _Tables:
    def __init__(self, history_limit: int) -> None:
        self.policies: dict[str, PolicyRecord] = {}
        self.versions: dict[tuple[str, int], PolicyRecord] = {}
        self.counters: dict[str, dict[str, Counter]] = {}
        self.reservations: dict[str, Reservation] = {}
        self.open: dict[str, dict[str, datetime]] = {}  # agent -> open reservation -> expiry
        self.approvals: dict[str, Approval] = {}
        self.pending: dict[str, dict[str, None]] = {}  # agent -> pending approvals, in order
        self.history: dict[str, collections.deque[HistoryRecord]] = {}
        self.idempotency: dict[str, dict[str, IdempotencyEntry]] = {}  # agent -> key -> entry
        self.seq = 0
        self.history_limit = history_limit
        self.outbox: dict[str, WebhookDelivery] = {}
        self.outbox_pending: dict[str, None] = {}


class _MemoryTransaction:
    """Row access on the in-memory tables, journaling every change for rollback."""

    def __init__(self, tables: _Tables) -> None:
        self.t = tables
        self.undo: list[Callable[[], None]] = []

    def _set(self, table: MutableMapping[Any, Any], key: Any, value: Any) -> None:
        old = table.get(key, _MISSING)
        self.undo.append(lambda: table.pop(key) if old is _MISSING else table.update({key: old}))
        table[key] = value

    def _pop(self, table: MutableMapping[Any, Any], key: Any) -> None:
        if key in table:
            old = table.pop(key)
            self.undo.append(lambda: table.update({key: old}))

    def _inner(self, table: dict[str, Any], agent_id: str) -> Any:
        if agent_id not in table:
            self._set(table, agent_id, {})
        return table[agent_id]

    def rollback(self) -> None:
        while self.undo:
            self.undo.pop()()

    def get_policy(self, agent_id: str, version: int | None = None) -> PolicyRecord | None:
        if version is None:
            return self.t.policies.get(agent_id)
        return self.t.versions.get((agent_id, version))

    def policy_version(self, agent_id: str) -> int:
        record = self.t.policies.get(agent_id)
        return 0 if record is None else record.version

    def put_policy(self, record: PolicyRecord) -> None:
        self._set(self.t.policies, record.agent_id, record)
        self._set(self.t.versions, (record.agent_id, record.version), record)

    def list_policies(self, prefix: str | None) -> list[PolicyRecord]:
        return [
            r for a, r in sorted(self.t.policies.items()) if prefix is None or a.startswith(prefix)
        ]

    def counters(self, agent_id: str, keys: Iterable[str]) -> dict[str, Counter]:
        mine = self.t.counters.get(agent_id, {})
        return {k: mine[k] for k in keys if k in mine}

    def put_counters(self, agent_id: str, counters: Iterable[Counter]) -> None:
        mine = self._inner(self.t.counters, agent_id)
        for c in counters:
            self._set(mine, c.key, c)

    def prune_counters(self, agent_id: str, now: datetime) -> None:
        mine = self.t.counters.get(agent_id, {})
        for key in [k for k, c in mine.items() if c.window_end <= now]:
            self._pop(mine, key)

    def get_reservation(self, reservation_id: str) -> Reservation | None:
        return self.t.reservations.get(reservation_id)

    def put_reservation(self, reservation: Reservation) -> None:
        self._set(self.t.reservations, reservation.id, reservation)
        mine = self._inner(self.t.open, reservation.agent_id)
        if reservation.status.is_open:
            self._set(mine, reservation.id, reservation.expires_at)
        else:
            self._pop(mine, reservation.id)

    def due_reservations(self, agent_id: str | None, now: datetime) -> list[Reservation]:
        agents = list(self.t.open) if agent_id is None else [agent_id]
        return [
            self.t.reservations[rid]
            for agent in agents
            for rid, expires_at in sorted(
                self.t.open.get(agent, {}).items(), key=lambda item: item[1]
            )
            if now >= expires_at
        ]

    def get_approval(self, approval_id: str) -> Approval | None:
        return self.t.approvals.get(approval_id)

    def put_approval(self, approval: Approval) -> None:
        self._set(self.t.approvals, approval.id, approval)
        mine = self._inner(self.t.pending, approval.agent_id)
        if approval.status is ApprovalStatus.PENDING:
            self._set(mine, approval.id, None)
        else:
            self._pop(mine, approval.id)

    def pending_approvals(self, agent_id: str | None) -> list[Approval]:
        agents = sorted(self.t.pending) if agent_id is None else [agent_id]
        found = [self.t.approvals[i] for a in agents for i in self.t.pending.get(a, {})]
        return sorted(found, key=lambda a: (a.created_at, a.id))

    def add_history(self, record: HistoryRecord) -> None:
        if record.agent_id not in self.t.history:
            self._set(
                self.t.history,
                record.agent_id,
                collections.deque(maxlen=self.t.history_limit),
            )
        log = self.t.history[record.agent_id]
        self.t.seq += 1
        log.append(_with_seq(record, self.t.seq))
        self.undo.append(functools.partial(_drop_last, log))

    def history(self, agent_id: str, limit: int) -> list[HistoryRecord]:
        log = self.t.history.get(agent_id, ())
        return list(reversed(log))[:limit]

    def get_idempotency(self, agent_id: str, key: str) -> IdempotencyEntry | None:
        return self.t.idempotency.get(agent_id, {}).get(key)

    def put_idempotency(self, entry: IdempotencyEntry) -> None:
        self._set(self._inner(self.t.idempotency, entry.agent_id), entry.key, entry)

    def drop_idempotency(self, agent_id: str, before: datetime) -> None:
        mine = self.t.idempotency.get(agent_id, {})
        for key in [k for k, e in mine.items() if e.created_at < before]:
            self._pop(mine, key)

    def new_id(self, kind: str, agent_id: str) -> str:
        return f"{kind}_{uuid.uuid4().hex}"

    def add_outbox(self, delivery: WebhookDelivery) -> None:
        self.t.seq += 1
        self.put_outbox(attrs.evolve(delivery, seq=self.t.seq))

    def put_outbox(self, delivery: WebhookDelivery) -> None:
        self._set(self.t.outbox, delivery.id, delivery)
        if delivery.status is DeliveryStatus.PENDING:
            self._set(self.t.outbox_pending, delivery.id, None)
        else:
            self._pop(self.t.outbox_pending, delivery.id)

    def pending_outbox(self, endpoint_ids: Iterable[str]) -> list[WebhookDelivery]:
        wanted = set(endpoint_ids)
        found = [self.t.outbox[i] for i in self.t.outbox_pending]
        return sorted((d for d in found if d.endpoint_id in wanted), key=lambda d: d.seq)

    def list_outbox(self, status: str | None, limit: int) -> list[WebhookDelivery]:
        found = [d for d in self.t.outbox.values() if status is None or d.status == status]
        return sorted(found, key=lambda d: d.seq, reverse=True)[:limit]


def _drop_last(log: collections.deque[HistoryRecord]) -> None:
    log.pop()


def _with_seq(record: HistoryRecord, seq: int) -> HistoryRecord:
    return attrs.evolve(record, seq=seq)


class MemoryStorage(TransactionalStorage):
    """Thread-safe in-memory storage (``memory://``); its state ends with the process."""

    def __init__(self, history_limit: int = 10_000) -> None:
        self._tables = _Tables(history_limit)
        self._lock = threading.RLock()

    @contextlib.contextmanager
    def _transaction(
        self, agent_id: str | None = None, *, write: bool = True
    ) -> Iterator[_MemoryTransaction]:
        with self._lock:
            tx = _MemoryTransaction(self._tables)
            try:
                yield tx
            except BaseException:
                tx.rollback()
                raise

    def close(self) -> None:
        """Nothing to close; present so every storage can be closed alike."""
