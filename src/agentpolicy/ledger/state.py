"""What every ledger step shares: settings, the agent's head, history, events, expiry.

The **head** of an agent is the one document every change to its budget
writes, so its version guards everything else of the agent (counters, open
reservations, pending approvals, its scope books)::

    {"pv": policy version (0: none),
     "c":  {counter key: counter} (see agentpolicy.ledger.tallies),
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

from agentpolicy.ledger import keys
from agentpolicy.ledger.docs import Body, approval_record, delivery_doc, levels_of
from agentpolicy.ledger.runner import View
from agentpolicy.ledger.tallies import (
    EMPTY_SCOPE_BOOK,
    MAX_SCORE,
    Book,
    ClockBehindError,
)
from agentpolicy.records import Vote
from agentpolicy.storage.base import NEXT_SEQ, Txn

__all__ = [
    "EMPTY_HEAD",
    "MAX_SCORE",
    "SPENT_ON_EXPIRY",
    "SPENT_ON_EXPIRY_DETAILS",
    "ClockBehindError",
    "Head",
    "LedgerConfig",
    "Route",
    "close_reservation",
    "closing",
    "emit",
    "emit_approval",
    "expire_due",
    "lapse",
    "more_due",
    "needs_books",
    "record",
    "undo",
]

EXPIRE_BATCH = 200
"""At most this many reservations expire in one step (the rest in the next one).

A step that found more due than this (:func:`more_due`) commits what it
expired and its call runs it again, so no call decides or reports with
amounts of expired reservations still counted.
"""

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


EMPTY_HEAD: Body = {"pv": 0, "c": {}, "due": None, "hz": 0}


class Head(Book):
    """An agent's head: its policy version, its own counters, its next expiry, its horizon."""

    __slots__ = ("agent",)

    def __init__(self, agent: str, body: Body | None) -> None:
        Book.__init__(self, keys.head(agent), body, EMPTY_HEAD)
        self.agent = agent

    @classmethod
    def read(cls, view: View, agent: str) -> Head:
        """The agent's head as the view has it (reading it if needed)."""
        return cls(agent, view.doc(keys.head(agent)))

    def lower_due(self, when: int) -> None:
        """Something of the agent expires at ``when``."""
        due = self.body["due"]
        if due is None or when < due:
            self.set("due", when)

    def write(self, txn: Txn) -> None:
        """Add the head to the transaction if it changed (and the global ``@due`` index)."""
        if not self.changed:
            return
        txn.put[self.name] = self.body
        due = self.body["due"]
        if due != self.old_due:
            txn.index.append((keys.DUE, self.agent, due))


class Books:
    """The books one step touches, by name: heads (the agent's first), and others read on demand."""

    __slots__ = ("by_name", "head", "view")

    def __init__(self, view: View, head: Head) -> None:
        self.view = view
        self.head = head
        self.by_name: dict[str, Book] = {head.name: head}

    def add(self, head: Head) -> Head:
        """Take in another budget's head (an ancestor's), unless it is here already."""
        found = self.by_name.setdefault(head.name, head)
        return found if isinstance(found, Head) else head

    def heads(self, agents: Iterable[str]) -> list[Head]:
        """The heads of these agents (read if needed), as :class:`Head` objects."""
        agents = list(agents)
        wanted = [a for a in agents if not isinstance(self.by_name.get(keys.head(a)), Head)]
        names = [keys.head(a) for a in wanted]
        self.view.read(names, guess=names)
        for agent in wanted:
            old = self.by_name.get(keys.head(agent))
            head = Head(agent, self.view.doc(keys.head(agent)) if old is None else old.body)
            if old is not None:
                head.changed = old.changed
            self.by_name[head.name] = head
        found: list[Head] = []
        for agent in agents:
            book = self.by_name[keys.head(agent)]
            assert isinstance(book, Head)  # noqa: S101 - made one just above
            found.append(book)
        return found

    def need(self, names: Iterable[str]) -> None:
        """Read the books not read yet (in one request)."""
        missing = [n for n in names if n not in self.by_name]
        if missing:
            self.view.read(missing, guess=missing)
            for name in missing:
                self.by_name[name] = Book(name, self.view.doc(name), EMPTY_SCOPE_BOOK)

    def __getitem__(self, name: str) -> Book:
        found = self.by_name.get(name)
        if found is None:
            self.need((name,))
            found = self.by_name[name]
        return found

    def write(self, txn: Txn) -> None:
        """Put every book that changed (heads also move the global ``@due`` index)."""
        for name, book in self.by_name.items():
            if isinstance(book, Head):
                book.write(txn)
            elif book.changed:
                txn.put[name] = book.body


def undo(books: Books | None, txn: Txn, doc: Body, rid: str, op: str) -> None:
    """Give back (``unreserve``) or spend (``settle``) a reservation in its counters.

    Spending it changes no calendar counter (they count it from its reserve
    on), only rolling ones, which keep each entry's status. ``books`` is
    ``None`` when the caller found that nothing is moved (:func:`needs_books`).
    """
    if books is None:
        return
    request = doc["req"]
    value, decimals = int(request["amount"]), request["decimals"]
    targets = doc.get("tg")
    if targets is None:  # written before scoped and rolling limits: the head's windows
        targets = [[books.head.name, key, "c", 0] for key in doc["w"]]
    groups = _groups(targets)
    calendar = op != "settle"
    books.need([name for name, _, rolling in groups if calendar or rolling])
    for name, items, rolling in groups:
        if items and calendar:
            books[name].calendars(items, value, decimals, op)
        for key, seconds in rolling:
            books[name].rolling(txn, key, seconds, value, decimals, op, doc["c"], rid)


def needs_books(doc: Body, op: str) -> bool:
    """Whether undoing a reservation (``op``, as :func:`undo`) moves any counter.

    Spending one that counts in calendar counters alone moves none: its
    step needs no book (nor the agent's head).
    """
    if op != "settle":
        return True
    targets = doc.get("tg")
    return targets is not None and any(rolling for _, _, rolling in _groups(targets))


def closing(doc: Body, status: str) -> str:
    """How closing an open reservation to ``status`` undoes it: ``settle`` or ``unreserve``.

    A reservation marked sent (``snt``, see ``agentpolicy.ledger.claims``)
    that expires is spent, not given back: its payment left and no outcome
    was reported, so the payee may have been paid.
    """
    spent = status == "confirmed" or (status == "expired" and "snt" in doc)
    return "settle" if spent else "unreserve"


_Group = tuple[str, tuple[tuple[str, None], ...], tuple[tuple[str, int], ...]]


def _groups(targets: Any) -> list[_Group]:
    """A reservation's targets by book: ``(book, calendar items, rolling (key, seconds))``.

    Targets an hour's reservations share (a tuple, never changed) are grouped once.
    """
    shared = type(targets) is tuple
    if shared:
        found = _GROUPS.get(id(targets))
        if found is not None and found[0] is targets:
            return found[1]
    by_book: dict[str, tuple[list[tuple[str, None]], list[tuple[str, int]]]] = {}
    for name, key, kind, extra in targets:
        calendar, rolling = by_book.setdefault(name, ([], []))
        if kind == "c":
            calendar.append((key, None))
        else:
            rolling.append((key, extra))
    groups = [(name, tuple(c), tuple(r)) for name, (c, r) in by_book.items()]
    if shared:
        if len(_GROUPS) > 4096:
            _GROUPS.clear()
        _GROUPS[id(targets)] = (targets, groups)
    return groups


_GROUPS: dict[int, tuple[Any, list[_Group]]] = {}
"""Targets by book, by the targets' identity (kept alive here, so an id is never reused)."""


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
    agent: str,
    thread: str,
    payload: Any,
) -> None:
    """Write ``event`` to the outbox for every endpoint that wants it (same commit).

    ``payload`` is a function returning the event's body (called only when an
    endpoint wants the event). Events of one ``thread`` (an approval id, or
    ``""`` for budget events) reach an endpoint in the order they were written.
    """
    wanting = [endpoint for endpoint, events in cfg.routes if not events or event in events]
    if not wanting:
        return
    event_id = "evt_" + os.urandom(16).hex()
    body: Body = {"id": event_id, "event": event, **payload()}
    for endpoint in wanting:
        delivery_id = f"{event_id}.{endpoint}"
        txn.put[keys.webhook(delivery_id)] = delivery_doc(
            delivery_id=delivery_id, event_id=event_id, endpoint_id=endpoint, event=event,
            agent=agent, approval_id=thread, created=txn.at, payload=body,
        )  # fmt: skip
        txn.index.append((keys.outbox_queue(shard), delivery_id, NEXT_SEQ))
    txn.index.append((keys.OUTBOX, shard, 0))


def emit_approval(
    txn: Txn,
    cfg: LedgerConfig,
    shard: str,
    event: str,
    approval_id: str,
    approval: Body,
    vote: Vote | None = None,
) -> None:
    """Write an approval event (its payload: the approval, and the vote that caused it)."""

    def payload() -> Body:
        from agentpolicy.views import approval_data, vote_data  # noqa: PLC0415 - events only

        data: Body = {"approval": approval_data(approval_record(approval_id, approval))}
        if vote is not None:
            data["decision"] = vote_data(vote)
        return data

    emit(txn, cfg, shard, event, approval["agent"], approval_id, payload)


Closed = list[tuple[str, Body]]
"""Ids with the documents they were closed to."""


def expire_due(
    view: View,
    txn: Txn,
    cfg: LedgerConfig,
    shard: str,
    books: Books,
    now: int,
    head: Head | None = None,
) -> tuple[Closed, Closed]:
    """Expire the reservations and holds listed under a head whose time is up (``now >= x``).

    ``head`` is the agent's head by default; an ancestor's head lists the
    open reservations of every budget below it too, so expiring under it
    frees what they held in its counters. Gives their amounts back to every
    counter they counted in, expires the approvals the holds were for, and
    sets the head's next ``due``. Returns the reservations and approvals it
    expired, with their new documents.
    """
    head = books.head if head is None else head
    due = head.body["due"]
    if due is None or due > now:
        return [], []
    index = keys.open_index(head.agent)
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
        doc = _as_written(view, txn, name)
        if doc is not None and doc["x"] > now and doc["st"] in ("held", "reserved"):
            head.lower_due(doc["x"])  # given a later end after the scan (a claim: claims.py)
            continue  # its index entry was moved with it
        txn.index.append((index, rid, None))
        if doc is None or doc["st"] not in ("held", "reserved"):
            continue  # already closed (maybe by this step, under another budget): stale entry
        closed = close_reservation(txn, cfg, books, rid, doc, "expired", now)
        if doc["apr"] is not None and doc["st"] == "held":
            held_for.append(doc["apr"])
        expired.append((rid, closed))
    return expired, lapse(view, txn, cfg, shard, held_for, now)


def _as_written(view: View, txn: Txn, name: str) -> Body | None:
    """A document as this step left it so far (its own write, else the store's).

    A reservation is listed under every budget it counts in, and one step
    expires under several of them (an agent's head, then each ancestor's):
    what an earlier one closed must not be closed again.
    """
    written: Body | None = txn.put.get(name)
    return written if written is not None else view.doc(name)


def more_due(head: Head, now: int) -> bool:
    """Whether expiries are still due under ``head`` after :func:`expire_due` ran (a full batch)."""
    due = head.body["due"]
    return due is not None and due <= now


def lapse(
    view: View, txn: Txn, cfg: LedgerConfig, shard: str, approval_ids: list[str], now: int
) -> Closed:
    """Expire the pending approvals whose holds were just closed; return them."""
    lapsed: Closed = []
    names = [keys.approval(a) for a in approval_ids]
    view.read(names)
    for aid, name in zip(approval_ids, names, strict=True):
        approval = _as_written(view, txn, name)
        if approval is None or approval["st"] != "pending":
            continue
        gone = {**approval, "st": "expired", "dec": now}
        txn.put[name] = gone
        txn.ttl[name] = cfg.keep_closed_ms
        txn.index.append((keys.pending_index(approval["agent"]), aid, None))
        txn.index.append((keys.PENDING, aid, None))
        record(txn, cfg, approval["agent"], {"ev": "approval_expired", "aid": aid})
        emit_approval(txn, cfg, shard, "approval.expired", aid, gone)
        lapsed.append((aid, gone))
    return lapsed


_EVENTS = {"confirmed": "confirm", "released": "release", "expired": "expire"}
SPENT_ON_EXPIRY = "counted as spent: its payment was sent and it was neither confirmed nor released"
"""The ``detail`` of the history record of a sent reservation that expired."""

SPENT_ON_EXPIRY_DETAILS = frozenset(
    {SPENT_ON_EXPIRY, "counted as spent: its payment was sent and no outcome was reported"}
)
"""Every ``detail`` a sent reservation's expiry was recorded with (the earlier one too)."""


def close_reservation(
    txn: Txn,
    cfg: LedgerConfig,
    books: Books | None,
    rid: str,
    doc: Body,
    status: str,
    now: int,
) -> Body:
    """Close an open reservation: give its amount back (or spend it) in every counter.

    How is :func:`closing`'s (``books`` may be ``None`` when
    :func:`needs_books` says it moves none). It leaves the open-reservation
    index of every budget that listed it.
    """
    op = closing(doc, status)
    spent = op == "settle"
    undo(books, txn, doc, rid, op)
    closed = {**doc, "st": status, "u": now}
    name = keys.reservation(rid)
    txn.put[name] = closed
    txn.ttl[name] = cfg.keep_closed_ms
    for level in levels_of(doc):
        txn.index.append((keys.open_index(level), rid, None))
    entry: Body = {"ev": _EVENTS[status], "rid": rid, "pv": doc["pv"]}
    if spent and status == "expired":
        entry["detail"] = SPENT_ON_EXPIRY
    if doc["apr"] is not None:
        entry["aid"] = doc["apr"]
    record(txn, cfg, doc["agent"], entry)
    return closed
