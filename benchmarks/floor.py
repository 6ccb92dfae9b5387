"""A floor for the memory cycle: its work written out by hand on plain dicts (not the product).

Issue 10 asks the memory authorize+confirm to cost at most 6x a ``limits``
hit. To tell what the work itself costs from what the ledger's layers cost,
this module does the benchmark cycle's work for the benchmark's policy
(``run.full_policy``: every rule kind, four calendar limits, two approval
thresholds), hand-inlined, under one lock, and returns the same public
results as the engine:

- every check of that policy, against the request's own fields: the
  per-transaction limit, the allowed hours and days, the blocked period, the
  merchant, network and category lists, the approval thresholds;
- the twelve calendar counters (six windows, the payment's token and every
  token) read, checked against the four limits with what is reserved, and
  moved twice (reserved on authorize, spent on confirm);
- a reservation with an id made as the ledger makes it, an expiry index entry, one history record
  and one operation id per call, the request's idempotency key looked up;
- the :class:`~agentpolicy.Decision` and the :class:`~agentpolicy.Reservation`,
  made by position as the ledger makes them.

It is generous to itself where the engine cannot be: the window keys and the
decision's windows are worked out once an hour, the policy is constants, and
nothing is written for a store to replay, expire, prune or audit beyond the
above. It is a lower bound on what a cycle can cost in Python, and it
answers one question: is the 6x target within reach of the work, or only of
less work? ``run.py`` prints it beside the engine and the anchor.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from agentpolicy import Code, Decision, PaymentRequest, Reservation, load_policy
from agentpolicy.ledger.keys import new_id, new_token
from agentpolicy.records import ReservationStatus
from agentpolicy.rules import assess
from agentpolicy.storage._time import micros
from agentpolicy.storage.base import serial_random
from run import NOW, REQUEST, full_policy

_BIG = 10**30  # run.full_policy's limits: nothing reaches them
_LIMITS = (_BIG, _BIG, _BIG, _BIG)  # hourly, daily, weekly, monthly
_THRESHOLD = _BIG  # the first approval threshold
_DAYS = frozenset({1, 2, 3, 4, 5})
_BLOCKED = ((datetime(2026, 1, 20, tzinfo=UTC), datetime(2026, 1, 21, tzinfo=UTC)),)
_ALLOWED_RECIPIENTS = frozenset({"0xaddr1", "0xaddr2", "0xaddr3"})
_BLOCKED_RECIPIENTS = frozenset({"0xbadaddr1"})
_ALLOWED_NETWORKS = frozenset({"eip155:8453", "eip155:1"})
_BLOCKED_NETWORKS = frozenset({"eip155:56"})
_ALLOWED_CATEGORIES = frozenset({"api_usage", "subscription", "data_storage"})
_BLOCKED_CATEGORIES = frozenset({"gambling", "adult_content"})
_TTL = timedelta(minutes=5)


class Floor:
    """The benchmark cycle's work on plain dicts, for ``run.full_policy()`` only."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._counters: dict[tuple[str, str], list[int]] = {}  # -> [spent, reserved]
        self._reservations: dict[str, dict[str, Any]] = {}
        self._history: list[tuple[int, datetime, dict[str, Any]]] = []
        self._ops: dict[str, str] = {}
        self._expiry: list[tuple[datetime, str]] = []
        self._seq = itertools.count(1)
        self._hour: tuple[int, ...] = ()
        self._keys: tuple[str, ...] = ()
        # the decision's windows, as the rules give them (worked out once: generous)
        self._windows = assess(load_policy(full_policy()), REQUEST, NOW).windows
        self._window_names = tuple(w.key for w in self._windows)

    def _window_keys(self, now: datetime) -> tuple[str, ...]:
        hour = (now.year, now.month, now.day, now.hour)
        if hour != self._hour:
            week = now.isocalendar()
            self._hour = hour
            y, m, d, h = hour
            self._keys = (f"h{y}-{m}-{d}-{h}", f"d{y}-{m}-{d}", f"w{week[0]}-{week[1]}",
                          f"m{y}-{m}", f"y{y}", "l")  # fmt: skip
        return self._keys

    def authorize(self, req: PaymentRequest, now: datetime) -> Decision | None:
        """The decision on ``req`` (``None`` where the engine would deny: not measured)."""
        with self._lock:
            units = req.asset_amount.value
            if units > _BIG or units >= _THRESHOLD:
                return None
            if not (now.isoweekday() in _DAYS and 9 <= now.hour < 17):
                return None
            if any(start <= now < end for start, end in _BLOCKED):
                return None
            if req.recipient in _BLOCKED_RECIPIENTS or req.recipient not in _ALLOWED_RECIPIENTS:
                return None
            if req.network in _BLOCKED_NETWORKS or req.network not in _ALLOWED_NETWORKS:
                return None
            if req.category in _BLOCKED_CATEGORIES or req.category not in _ALLOWED_CATEGORIES:
                return None
            if req.idempotency_key is not None and req.idempotency_key in self._ops:
                return None
            counters, token = self._counters, req.asset_amount.symbol
            rows = []
            for key in self._window_keys(now):
                for book in (token, "*"):
                    row = counters.get((book, key))
                    if row is None:
                        row = counters[(book, key)] = [0, 0]
                    rows.append(row)
            for i, limit in enumerate(_LIMITS):
                row = rows[2 * i]
                if row[0] + row[1] + units > limit:
                    return None
            for row in rows:
                row[1] += units
            rid = new_id("res", req.agent_id, new_token(micros(now)))
            expires = now + _TTL
            self._reservations[rid] = {
                "st": "reserved", "agent": req.agent_id, "req": req, "rows": rows,
                "units": units, "c": now, "x": expires,
            }  # fmt: skip
            self._history.append((next(self._seq), now, {"t": "authorize", "rid": rid}))
            self._ops[serial_random()] = rid
            heapq.heappush(self._expiry, (expires, rid))
            return Decision(
                True, Code.ALLOWED, "every check passed", False, None, (), self._windows,  # noqa: FBT003
                rid, None, expires, 1, now,
            )  # fmt: skip

    def confirm(self, rid: str, now: datetime) -> Reservation | None:
        """Confirm a reservation ``authorize`` made (``None`` where the engine would refuse)."""
        with self._lock:
            doc = self._reservations[rid]
            if doc["st"] != "reserved" or doc["x"] <= now:
                return None
            units = doc["units"]
            for row in doc["rows"]:
                row[1] -= units
                row[0] += units
            doc["st"] = "confirmed"
            self._history.append((next(self._seq), now, {"t": "confirm", "rid": rid}))
            self._ops[serial_random()] = rid
            req = doc["req"]
            return Reservation(
                rid, doc["agent"], ReservationStatus.CONFIRMED, req.asset_amount, self._window_names,
                doc["c"], doc["x"], now, req, 1, None, None,
            )  # fmt: skip


def floor_cycle() -> Callable[[], None]:
    """One authorize and one confirm of ``run.REQUEST`` on a new :class:`Floor`."""
    floor = Floor()

    def run() -> None:
        decision = floor.authorize(REQUEST, NOW)
        assert decision is not None
        assert decision.reservation_id is not None
        assert floor.confirm(decision.reservation_id, NOW) is not None

    return run
