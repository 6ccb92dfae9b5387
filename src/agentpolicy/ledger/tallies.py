"""Books of counters: what an agent (or one group of a scope) has spent, reserved and counted.

A **book** is a document of counters: the agent's head, or one per scope and
group (``g/AGENT/SCOPE/GROUP``). A payment counts in several counters of
several books (its :class:`~agentpolicy.rules.Tally` list); the reservation
records them, so that confirm, release and expiry undo exactly what
authorize did.

**Calendar counters** are lists ``[end, decimals, used, 0, count, fired
alerts]`` under the window's key: ``used`` is every amount reserved in the
window and not given back (spent or still open alike; a confirm changes no
calendar counter, and what is open is read from the open reservations when a
budget is shown). Counters written before kept spent and reserved apart
(``[end, decimals, spent, reserved, ...]``): the two add up to the same
``used``, and the next change writes them as one. They live until ``counter_grace``
after the window in force under that key ends (see :meth:`Book.prune` and
:mod:`agentpolicy.ledger.state`). A book keeps
the earliest end of its calendar counters as ``"pe"``, so that pruning looks
at them only when one is due.

**Rolling counters** keep every payment exactly: each is a member
``"<value>:<decimals>:<r|c>:<reservation id>"`` of the counter's live index,
scored by its authorize instant, and leaves the window exactly ``seconds``
later. Leaving entries move to a grace index for ``counter_grace`` more, so
that a request stamped a little in the past (another process, a slower
clock) is checked against everything that was still counting at its
instant, plus (conservatively) what left since: never against less. The
counter is a dict::

    {"w": seconds, "t": latest instant seen, "d": decimals, "s": spent,
     "r": reserved, "n": count, "gv": value in grace, "gn": count in grace,
     "o": oldest live score or None, "go": oldest grace score or None,
     "ev": every entry scored at or before it has left, "pr": likewise pruned,
     "fa": fired alerts}

Each entry enters and leaves once; what a step moves costs O(log n) per
entry, and a step looks at an index only when its oldest entry is due.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agentpolicy.errors import StorageUnavailableError
from agentpolicy.ledger import keys
from agentpolicy.ledger.docs import Body
from agentpolicy.ledger.runner import View
from agentpolicy.storage._time import instant, micros
from agentpolicy.storage.base import Txn
from agentpolicy.windows import Window

__all__ = ["MAX_SCORE", "Book", "ClockBehindError", "entry_member", "read_books"]

MAX_SCORE = 2**62
"""A score above every instant (microseconds) the ledger writes."""


class ClockBehindError(StorageUnavailableError):
    """A request stamped before what the ledger can still decide: the engine's clock is behind."""


def _before_1970(now: int) -> ClockBehindError | None:
    """The error for a clock before the epoch: the ledger counts instants from 1970 on."""
    if now >= 0:
        return None
    return ClockBehindError(
        f"this engine's clock reads {instant(now).isoformat()}, before 1970-01-01T00:00:00Z: "
        "the ledger keeps instants from 1970 on; nothing was allowed or changed"
    )


_SCAN_MAX = 4096


def _align(d: int, values: list[int], decimals: int, value: int) -> tuple[int, list[int], int]:
    """Bring ``values`` (in ``d``) and ``value`` (in ``decimals``) to the finer decimals."""
    if decimals > d:
        k = 10 ** (decimals - d)
        return decimals, [v * k for v in values], value
    if decimals < d:
        value *= 10 ** (d - decimals)
    return d, values, value


def entry_member(value: int, decimals: int, status: str, reservation_id: str) -> str:
    """The member of a rolling entry: amount, status (``r``/``c``), reservation."""
    return f"{value}:{decimals}:{status}:{reservation_id}"


def _parse_member(member: str) -> tuple[int, int, str]:
    value, decimals, status, _ = member.split(":", 3)
    return int(value), int(decimals), status


class Book:
    """One document of counters, copied on first change so the document read stays as it was."""

    __slots__ = ("body", "changed", "name", "old_due")

    def __init__(self, name: str, body: Body | None, empty: Body) -> None:
        self.name = name
        self.body: Body = empty if body is None else body
        self.changed = False
        self.old_due: Any = self.body.get("due")

    def own(self) -> Body:
        """The body, copied first if it is still the one read."""
        if not self.changed:
            self.body = {**self.body, "c": dict(self.body["c"])}
            self.changed = True
        return self.body

    @property
    def counters(self) -> dict[str, Any]:
        """Counters by key (do not change them in place)."""
        counters: dict[str, Any] = self.body["c"]
        return counters

    def set(self, field: str, value: Any) -> None:
        """Change a top-level field."""
        if self.body.get(field) != value:
            self.own()[field] = value

    # -- calendar counters ------------------------------------------------------------------

    def calendar(self, key: str, window: Window | None, value: int, decimals: int, op: str) -> None:
        """``reserve`` or ``unreserve`` an amount (and a payment) in a calendar counter.

        A counter begins with its window (``window`` gives its end); a window
        whose counter was already dropped gets nothing back. ``settle``
        changes nothing: a spent amount was used from its reserve on.
        """
        self.calendars(((key, window),), value, decimals, op)

    def calendars(
        self,
        items: Iterable[tuple[str, Window | None]],
        value: int,
        decimals: int,
        op: str,
    ) -> None:
        """:meth:`calendar` for several counters of this book at once: ``(key, window)`` pairs."""
        if op == "settle":
            return
        counters = self.body["c"]
        reserve = op == "reserve"
        for key, window in items:
            c = counters.get(key)
            # the body is copied before its first change (the document read stays as read), and
            # every write goes to the copy's counters
            if c is None:
                if not reserve or window is None:
                    continue
                counters = self.own()["c"]
                end = micros(window.end)
                c = [end, decimals, 0, 0, 0]
                earliest = self.body.get("pe")
                if earliest is not None and end < earliest:
                    self.body["pe"] = end
            elif not self.changed:
                counters = self.own()["c"]
            if len(c) == 5:  # [end, decimals, spent, reserved, count]: no alert fired yet
                end, d, spent, reserved, count = c
                fired = None
            else:  # with fired alerts; or written before counts were kept
                end, d, spent, reserved = c[0], c[1], c[2], c[3]
                count = c[4] if len(c) > 4 else 0
                fired = c[5] if len(c) > 5 else None
            used, amount = spent + reserved, value  # apart only in counters written before
            if decimals != d:
                d, (used,), amount = _align(d, [used], decimals, value)
            if reserve:
                used += amount
                count += 1
            else:  # never below zero (a counter dropped and begun again holds less)
                used = used - amount if used > amount else 0
                count = count - 1 if count > 0 else 0
            counters[key] = (
                [end, d, used, 0, count] if fired is None else [end, d, used, 0, count, fired]
            )

    def prune(self, now: int, grace: int, in_force: Iterable[Window] = ()) -> None:
        """Drop calendar counters of windows that ended ``grace`` or more ago; move the horizon.

        The book keeps the earliest end of its calendar counters (``pe``), so
        a step looks at its counters only when one of them is due.

        A counter is kept until the window in force under its key ends:
        ``in_force`` are the windows of the policies that apply now. A
        counter begun in another timezone (a version changed it) under the
        same key, the same local start with the same offset, may have been
        given an earlier end than the window of that key in force now (a
        day with a clock change in one zone and not in the other): it takes
        the later end, and counts until then.
        """
        earliest = self.body.get("pe")
        if earliest is not None and now < earliest + grace:
            return
        horizon = self.body.get("hz", 0)
        ends = {k: c[0] for k, c in self.counters.items() if isinstance(c, list)}
        if not ends and earliest is None:
            return  # nothing to prune, and nothing worth writing down
        stale = [k for k, end in ends.items() if end + grace <= now]
        body = self.own()
        if stale:
            counters = body["c"]
            later = {w.key: micros(w.end) for w in in_force}
            for key in stale:
                end = later.get(key.rpartition("|")[2], 0)  # window keys hold no "|"
                if end + grace > now:  # its window is in force, ending later than it had
                    counters[key] = [end, *counters[key][1:]]
                    ends[key] = end
                    continue
                horizon = max(horizon, counters.pop(key)[0])
                del ends[key]
            body["hz"] = horizon
        body["pe"] = min(ends.values(), default=MAX_SCORE)

    def check_horizon(self, now: int, agent: str) -> None:
        """Refuse a request stamped before what this book can still decide."""
        if now < self.body.get("hz", 0):
            raise _before_1970(now) or ClockBehindError(
                f"this engine's clock is behind what agent {agent}'s ledger has already seen "
                "by more than the counter grace period; nothing was allowed or changed"
            )

    # -- rolling counters -------------------------------------------------------------------

    def _rolling(self, key: str, seconds: int) -> dict[str, Any]:
        found = self.counters.get(key)
        if found is None:
            return {"w": seconds, "t": 0, "d": 0, "s": 0, "r": 0, "n": 0, "gv": 0, "gn": 0,
                    "o": None, "go": None, "ev": -MAX_SCORE, "pr": -MAX_SCORE}  # fmt: skip
        counter: dict[str, Any] = found
        return counter

    def advance(
        self, view: View, txn: Txn, key: str, seconds: int, now: int, grace: int, agent: str
    ) -> bool:
        """Move the rolling counter to ``now``: entries that left the window go to grace.

        At most :data:`_SCAN_MAX` entries leave (and as many leave grace) in
        one call; returns whether more are due, in which case the counter
        still holds them: the step should commit and run again before it
        judges by this counter (``more``, as for expiries).
        """
        found = self._rolling(key, seconds)
        c = dict(found)
        if now < c["t"]:
            if now < c["t"] - grace:
                raise ClockBehindError(
                    f"this engine's clock is behind the latest payment of agent {agent} by "
                    "more than the counter grace period; nothing was allowed or changed"
                )
            return False  # a late request: nothing leaves before the latest instant already seen
        edge = now - seconds * 1_000_000
        more = False
        c["t"] = now
        live, held = keys.rolling_live(self.name, key), keys.rolling_grace(self.name, key)
        if c["o"] is not None and c["o"] <= edge:
            due, moved = _leaving(view, txn, live, edge)
            for member, score in moved:
                value, decimals, status = _parse_member(member)
                _take(c, value, decimals, "s" if status == "c" else "r")
                added = _scaled(c, value, decimals)
                c["gv"], c["gn"] = c["gv"] + added, c["gn"] + 1
                txn.index.append((live, member, None))
                txn.index.append((held, member, score))
                c["go"] = score if c["go"] is None else min(c["go"], score)
            c["ev"] = edge if len(due) < _SCAN_MAX else due[-1][1] - 1
            c["o"] = _earliest_after(view, txn, live, due, edge)
            more = c["o"] is not None and c["o"] <= edge
        cutoff = edge - grace
        if c["go"] is not None and c["go"] <= cutoff:
            pruned_due, pruned = _leaving(view, txn, held, cutoff)
            for member, _ in pruned:
                value, decimals, _ = _parse_member(member)
                c["gv"] = max(0, c["gv"] - _scaled(c, value, decimals))
                c["gn"] = max(0, c["gn"] - 1)
                txn.index.append((held, member, None))
            c["pr"] = cutoff if len(pruned_due) < _SCAN_MAX else pruned_due[-1][1] - 1
            c["go"] = _earliest_after(view, txn, held, pruned_due, cutoff)
            more = more or (c["go"] is not None and c["go"] <= cutoff)
        # written whenever anything moved: a second step at one instant (a batch past
        # _SCAN_MAX, a re-run) moved entries out of the indexes, and a counter written only when
        # its instant changed kept them counted for good
        if c != found or key not in self.counters:
            self.own()["c"][key] = c
        return more

    def rolling_used(self, key: str, now: int) -> tuple[int, int, int]:
        """``(value, decimals, count)`` of a rolling counter for a request at ``now``."""
        c = self.counters.get(key)
        if c is None:
            return (0, 0, 0)
        if now >= c["t"]:
            return (c["s"] + c["r"], c["d"], c["n"])
        return (c["s"] + c["r"] + c["gv"], c["d"], c["n"] + c["gn"])

    def rolling(
        self,
        txn: Txn,
        key: str,
        seconds: int,
        value: int,
        decimals: int,
        op: str,
        score: int,
        reservation_id: str,
    ) -> None:
        """``reserve``, ``unreserve`` or ``settle`` one payment's entry in a rolling counter."""
        c = dict(self._rolling(key, seconds))
        live, held = keys.rolling_live(self.name, key), keys.rolling_grace(self.name, key)
        reserved = entry_member(value, decimals, "r", reservation_id)
        if op == "reserve":
            d, (s, r, gv), scaled = _align(c["d"], [c["s"], c["r"], c["gv"]], decimals, value)
            c.update(d=d, s=s, r=r + scaled, gv=gv, n=c["n"] + 1)
            c["o"] = score if c["o"] is None else min(c["o"], score)
            c["t"] = max(c["t"], score)
            txn.index.append((live, reserved, score))
        elif score > c["ev"]:  # still in the window
            if op == "unreserve":
                _take(c, value, decimals, "r")
                txn.index.append((live, reserved, None))
            else:
                d, (s, r), scaled = _align(c["d"], [c["s"], c["r"]], decimals, value)
                c.update(d=d, s=s + scaled, r=max(0, r - scaled))
                txn.index.append((live, reserved, None))
                txn.index.append((live, entry_member(value, decimals, "c", reservation_id), score))
        elif score > c["pr"] and op == "unreserve":  # in grace: it no longer counts there
            c["gv"] = max(0, c["gv"] - _scaled(c, value, decimals))
            c["gn"] = max(0, c["gn"] - 1)
            txn.index.append((held, reserved, None))
        else:
            return
        self.own()["c"][key] = c


def _scaled(c: dict[str, Any], value: int, decimals: int) -> int:
    """``value`` in the counter's decimals (a counter keeps the finest it has seen)."""
    d: int = c["d"]
    if decimals <= d:
        scaled: int = value * 10 ** (d - decimals)
        return scaled
    # finer than the counter: bring the counter up first
    k = 10 ** (decimals - d)
    for field in ("s", "r", "gv"):
        c[field] *= k
    c["d"] = decimals
    return value


def _take(c: dict[str, Any], value: int, decimals: int, field: str) -> None:
    scaled = _scaled(c, value, decimals)
    c[field] = max(0, c[field] - scaled)
    c["n"] = max(0, c["n"] - 1)


def _written(txn: Txn, index: str) -> dict[str, int | None]:
    """What this step wrote so far to ``index``: member -> its score, or ``None`` (removed)."""
    return {member: score for name, member, score in txn.index if name == index}


def _leaving(
    view: View, txn: Txn, index: str, edge: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``(due, leaving)``: stored members up to ``edge``, and those to leave now.

    ``due`` are the members of ``index`` in the store scored at or before
    ``edge`` (a bounded batch); ``leaving`` those of the index as this step
    left it so far.

    One step can expire a reservation (taking its entry out of a rolling
    window) or confirm one (replacing its entry) before the window moves on:
    an entry this step removed must not be taken out a second time, and
    one it added must move on with the others.
    """
    due = view.scan(index, edge, _SCAN_MAX)
    written = _written(txn, index)
    if not written:
        return due, due
    leaving = [(m, score) for m, score in due if m not in written]
    leaving += [(m, score) for m, score in written.items() if score is not None and score <= edge]
    leaving.sort(key=lambda item: item[1])
    return due, leaving


def _earliest_after(
    view: View, txn: Txn, index: str, due: list[tuple[str, int]], edge: int
) -> int | None:
    """A lower bound of the earliest score left in ``index`` after its ``due`` members left."""
    following = view.scan(index, MAX_SCORE, len(due) + 1)[len(due) :]
    scores = [score for _, score in following]  # even one this step removed: a lower bound
    scores += [s for s in _written(txn, index).values() if s is not None and s > edge]
    return min(scores) if scores else None


EMPTY_SCOPE_BOOK: Body = {"c": {}, "hz": 0}


def read_books(view: View, names: Iterable[str], empty: Body) -> dict[str, Book]:
    """Read several books at once (``empty`` for those that do not exist yet)."""
    wanted = list(names)
    view.read(wanted, guess=wanted)
    return {name: Book(name, view.doc(name), empty) for name in wanted}
