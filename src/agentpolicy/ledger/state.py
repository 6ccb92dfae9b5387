"""What every ledger step shares: settings, the agent's head, counters, history, events, expiry.

The **head** of an agent is the one document every change to its budget
writes, so its version guards everything else of the agent (counters, open
reservations, pending approvals)::

    {"pv": policy version (0: none),
     "c":  {window key: [window end, decimals, spent, reserved]},
     "due": earliest time something of the agent may expire (a lower bound) or None,
     "hz": the horizon: no request stamped before it can be decided}

Counters of a window are kept until ``counter_grace`` after the window ends;
when they are dropped the horizon moves to the end of that window, and a
request stamped before the horizon is refused (its window's usage is gone),
so no request is ever checked against a window whose counters were dropped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import attrs

from agentpolicy.errors import StorageUnavailableError
from agentpolicy.ledger import keys
from agentpolicy.ledger.docs import Body, approval_record, delivery_doc
from agentpolicy.ledger.runner import View
from agentpolicy.records import Vote
from agentpolicy.storage._time import micros
from agentpolicy.storage.base import NEXT_SEQ, Txn
from agentpolicy.windows import Window

__all__ = [
    "MAX_SCORE",
    "ClockBehindError",
    "Head",
    "LedgerConfig",
    "Route",
    "emit",
    "expire_due",
    "record",
]

MAX_SCORE = 2**62
"""A score above every instant (microseconds) the ledger writes."""

EXPIRE_BATCH = 200
"""At most this many reservations expire in one step (the rest in the next one)."""

Route = tuple[str, frozenset[str]]
"""A webhook endpoint's id and the events it wants (empty: all)."""

_DAY_MS = 86_400_000


@attrs.frozen
class LedgerConfig:
    """Settings of the ledger's rules (all durations in microseconds unless named ``_ms``)."""

    reservation_ttl: int = 300_000_000
    idempotency_ttl: int = 86_400_000_000
    counter_grace: int = 3_600_000_000
    history_retention: int | None = None
    max_denials: int = 10_000
    keep_closed_ms: int = 8 * _DAY_MS
    routes: tuple[Route, ...] = ()


class ClockBehindError(StorageUnavailableError):
    """The request's time is before the agent's horizon: the engine's clock is behind."""


EMPTY_HEAD: Body = {"pv": 0, "c": {}, "due": None, "hz": 0}


class Head:
    """An agent's head, copied on first change so the document read stays as it was."""

    __slots__ = ("agent", "body", "changed", "old_due")

    def __init__(self, agent: str, body: Body | None) -> None:
        self.agent = agent
        self.body: Body = EMPTY_HEAD if body is None else body
        self.changed = False
        self.old_due: int | None = self.body["due"]

    @classmethod
    def read(cls, view: View, agent: str) -> Head:
        """The agent's head as the view has it (reading it if needed)."""
        return cls(agent, view.doc(keys.head(agent)))

    def _own(self) -> Body:
        if not self.changed:
            self.body = {**self.body, "c": dict(self.body["c"])}
            self.changed = True
        return self.body

    @property
    def counters(self) -> dict[str, list[int]]:
        """Counters by window key: ``[end, decimals, spent, reserved]`` (do not change them)."""
        counters: dict[str, list[int]] = self.body["c"]
        return counters

    def set(self, field: str, value: Any) -> None:
        """Change a top-level field."""
        if self.body.get(field) != value:
            self._own()[field] = value

    def apply(self, windows: Iterable[str], value: int, decimals: int, op: str) -> None:
        """``reserve``, ``unreserve`` or ``settle`` an amount in these windows' counters.

        Windows whose counters were already dropped get nothing back.
        """
        counters = self._own()["c"]
        for key in windows:
            c = counters.get(key)
            if c is None:
                continue
            counters[key] = _counter(c, value, decimals, op)

    def reserve(self, windows: Iterable[Window], value: int, decimals: int) -> None:
        """Add an amount to ``reserved`` in these windows (a counter begins with its window)."""
        counters = self._own()["c"]
        for w in windows:
            c = counters.get(w.key)
            if c is None:
                c = [micros(w.end), 0, 0, 0]
            counters[w.key] = _counter(c, value, decimals, "reserve")

    def prune(self, now: int, grace: int) -> None:
        """Drop counters of windows that ended ``grace`` or more ago; move the horizon."""
        horizon = self.body["hz"]
        stale = [k for k, c in self.body["c"].items() if c[0] + grace <= now]
        if not stale:
            return
        counters = self._own()["c"]
        for key in stale:
            horizon = max(horizon, counters.pop(key)[0])
        self.body["hz"] = horizon

    def lower_due(self, when: int) -> None:
        """Something of the agent expires at ``when``."""
        due = self.body["due"]
        if due is None or when < due:
            self.set("due", when)

    def write(self, txn: Txn) -> None:
        """Add the head to the transaction if it changed (and the global ``@due`` index)."""
        if not self.changed:
            return
        txn.put[keys.head(self.agent)] = self.body
        due = self.body["due"]
        if due != self.old_due:
            txn.index.append((keys.DUE, self.agent, due))


def _counter(c: list[int], value: int, decimals: int, op: str) -> list[int]:
    end, d, spent, reserved = c
    if decimals > d:
        k = 10 ** (decimals - d)
        spent, reserved, d = spent * k, reserved * k, decimals
    elif decimals < d:
        value *= 10 ** (d - decimals)
    if op == "reserve":
        return [end, d, spent, reserved + value]
    if op == "unreserve":
        return [end, d, spent, max(0, reserved - value)]
    return [end, d, spent + value, max(0, reserved - value)]


def record(txn: Txn, cfg: LedgerConfig, agent: str, entry: Body, *, denial: bool = False) -> None:
    """Append a history entry: denials to their own log, kept to ``max_denials`` entries."""
    keep = None if cfg.history_retention is None else txn.at - cfg.history_retention
    if denial:
        txn.append.append((keys.denials_log(agent), entry, keep, cfg.max_denials))
    else:
        txn.append.append((keys.changes_log(agent), entry, keep, None))


def emit(
    txn: Txn,
    cfg: LedgerConfig,
    shard: str,
    event: str,
    approval_id: str,
    approval: Body,
    vote: Vote | None = None,
) -> None:
    """Write ``event`` to the outbox for every endpoint that wants it (same commit)."""
    wanting = [endpoint for endpoint, events in cfg.routes if not events or event in events]
    if not wanting:
        return
    from agentpolicy.views import approval_data, vote_data  # noqa: PLC0415 - formats events only

    event_id = "evt_" + os.urandom(16).hex()
    payload: Body = {
        "id": event_id,
        "event": event,
        "approval": approval_data(approval_record(approval_id, approval)),
    }
    if vote is not None:
        payload["decision"] = vote_data(vote)
    for endpoint in wanting:
        delivery_id = f"{event_id}.{endpoint}"
        txn.put[keys.webhook(delivery_id)] = delivery_doc(
            delivery_id=delivery_id, event_id=event_id, endpoint_id=endpoint, event=event,
            agent=approval["agent"], approval_id=approval_id, created=txn.at, payload=payload,
        )  # fmt: skip
        txn.index.append((keys.outbox_queue(shard), delivery_id, NEXT_SEQ))
    txn.index.append((keys.OUTBOX, shard, 0))


Closed = list[tuple[str, Body]]
"""Ids with the documents they were closed to."""


def expire_due(
    view: View, txn: Txn, cfg: LedgerConfig, shard: str, head: Head, now: int
) -> tuple[Closed, Closed]:
    """Expire the agent's reservations and holds whose time is up (``now >= expiresAt``).

    Gives their amounts back to the windows they counted in, expires the
    approvals the holds were for, and sets the head's next ``due``. Returns
    the reservations and approvals it expired, with their new documents.
    """
    due = head.body["due"]
    if due is None or due > now:
        return [], []
    agent = head.agent
    index = keys.open_index(agent)
    ripe = [member for member, _ in view.scan(index, now, EXPIRE_BATCH)]
    if len(ripe) == EXPIRE_BATCH:
        head.set("due", now)  # more to do: the next step goes on
    else:  # the first one after those that are due
        after = view.scan(index, MAX_SCORE, len(ripe) + 1)[len(ripe) :]
        head.set("due", after[0][1] if after else None)
    names = [keys.reservation(r) for r in ripe]
    view.read(names)
    expired: Closed = []
    held_for: list[str] = []
    for rid, name in zip(ripe, names, strict=True):
        txn.index.append((index, rid, None))
        doc = view.doc(name)
        if doc is None or doc["st"] not in ("held", "reserved"):
            continue  # already closed: the index entry was stale
        closed = {**doc, "st": "expired", "u": now}
        txn.put[name] = closed
        txn.ttl[name] = cfg.keep_closed_ms
        request = doc["req"]
        head.apply(doc["w"], int(request["amount"]), request["decimals"], "unreserve")
        entry: Body = {"ev": "expire", "rid": rid, "pv": doc["pv"]}
        if doc["apr"] is not None:
            entry["aid"] = doc["apr"]
            if doc["st"] == "held":
                held_for.append(doc["apr"])
        record(txn, cfg, agent, entry)
        expired.append((rid, closed))
    lapsed: Closed = []
    approval_names = [keys.approval(a) for a in held_for]
    view.read(approval_names)
    for aid, name in zip(held_for, approval_names, strict=True):
        approval = view.doc(name)
        if approval is None or approval["st"] != "pending":
            continue
        gone = {**approval, "st": "expired", "dec": now}
        txn.put[name] = gone
        txn.ttl[name] = cfg.keep_closed_ms
        txn.index.append((keys.pending_index(agent), aid, None))
        txn.index.append((keys.PENDING, aid, None))
        record(txn, cfg, agent, {"ev": "approval_expired", "aid": aid})
        emit(txn, cfg, shard, "approval.expired", aid, gone)
        lapsed.append((aid, gone))
    return expired, lapsed
