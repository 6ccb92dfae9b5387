"""What-if: replay recorded payments against a candidate policy, with its own counters.

Pure: :func:`replay` takes the candidate, the recorded payments in the order
they happened (with what became of their money) and returns a
:class:`SimulationReport`; nothing here reads a clock or a store
(:meth:`agentpolicy.PolicyEngine.simulate` reads the history and calls it).

The rules of the replay (docs/rollout.md says the same in words):

- Every payment is judged by the candidate at its recorded instant, against
  the candidate's own counters: what the candidate itself let through
  before, in its own windows (its timezone, its rolling windows, its scopes).
  Counters start empty at ``since``.
- Budgets other than the candidate's keep the decision they made live: a
  payment stopped by a budget checked before the candidate's (a budget
  below it, or a revoked or expired delegation) stays stopped; one that
  passes the candidate but was stopped live by a budget above it stays
  stopped too; an approval asked by another budget is still asked.
- A payment the candidate lets through (or holds for approval) counts in
  its counters and then follows what happened live: released, expired, or
  an approval denied or expired gives the amount back when it did live
  (:class:`Freed`); a reservation marked sent that expired stays spent, as
  it did live. A payment the live policy denied cannot have a live
  fate: the candidate counts it as spent (the cautious choice), and so does
  a payment the candidate would allow whose live approval was refused.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import attrs

from agentpolicy.amounts import Amount
from agentpolicy.decisions import Code
from agentpolicy.policy import AgentPolicy
from agentpolicy.requests import PaymentRequest
from agentpolicy.rules import Tally, assess, judge
from agentpolicy.shadow import by_outcome, flip_of
from agentpolicy.storage._time import micros
from agentpolicy.windows import Period, Window

__all__ = [
    "Freed",
    "RecordedPayment",
    "SimulatedPayment",
    "SimulationReport",
    "WindowSpend",
    "replay",
]

_PASSING = (Code.ALLOWED, Code.APPROVAL_REQUIRED)


@attrs.frozen
class RecordedPayment:
    """One authorize as history recorded it, with what the other budgets of its tree decided.

    ``live_code`` is the code the live engine gave. ``before`` is the
    failure of a budget checked before the candidate's (a budget below it,
    or the candidate's own delegation having ended), ``after`` the failure
    of a budget checked after it (a budget above it); ``approval_elsewhere``
    says another budget's approval threshold was met.
    """

    at: datetime
    request: PaymentRequest
    live_code: Code
    before: Code | None = None
    after: Code | None = None
    approval_elsewhere: bool = False
    policy_version: int | None = None


@attrs.frozen
class Freed:
    """The amount of payment number ``payment`` (0 = the first) stopped counting, as it did live.

    ``approval`` is true when an approval was denied or expired (the hold
    was given back), false when a reservation was released or expired.
    """

    payment: int
    at: datetime
    approval: bool = False


@attrs.frozen
class SimulatedPayment:
    """A payment the candidate would have decided with another code than the live policy did."""

    at: datetime
    request: PaymentRequest
    live_code: Code
    candidate_code: Code

    @property
    def flip(self) -> str | None:
        """``"allowed->denied"`` and the like when the outcome changes, else None."""
        return flip_of(self.live_code, self.candidate_code)


@attrs.frozen
class WindowSpend:
    """One calendar window the candidate limits: what was counted in it, live and by the candidate.

    ``live`` is what the live decisions let through in this window (the
    candidate's window, in its timezone), ``candidate`` what the candidate
    would have; both are exact amounts (spent, plus held at the end of the
    replay), with the payments counted.
    """

    window: str
    start: datetime
    end: datetime
    live: Amount
    candidate: Amount
    live_count: int
    candidate_count: int
    limit: Amount | None = None
    max_count: int | None = None
    scope: str | None = None
    group: str | None = None


@attrs.frozen
class SimulationReport:
    """What a candidate policy would have done to the recorded payments of one budget.

    ``payments`` were replayed (decided between ``since`` and ``until``);
    ``live_codes`` and ``candidate_codes`` count them by code, ``live`` and
    ``candidate`` by outcome. ``flips`` counts the payments whose outcome
    would change (``"allowed->denied"``: the candidate would stop them);
    ``changed`` lists every payment whose code would change, oldest first.
    ``windows`` has the spend per calendar window the candidate limits.
    ``notes`` say what the history could not show (see docs/rollout.md).
    """

    agent_id: str
    since: datetime
    until: datetime
    payments: int
    live_codes: Mapping[str, int]
    candidate_codes: Mapping[str, int]
    flips: Mapping[str, int]
    changed: tuple[SimulatedPayment, ...] = ()
    windows: tuple[WindowSpend, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def live(self) -> dict[str, int]:
        """Payments by live outcome (``allowed``, ``approval``, ``denied``)."""
        return by_outcome(self.live_codes)

    @property
    def candidate(self) -> dict[str, int]:
        """Payments by the candidate's outcome."""
        return by_outcome(self.candidate_codes)


class _Sum:
    """An exact running total of amounts and payments (in the finest decimals seen)."""

    __slots__ = ("count", "decimals", "value")

    def __init__(self) -> None:
        self.decimals = 0
        self.value = 0
        self.count = 0

    def add(self, value: int, decimals: int, sign: int) -> None:
        if decimals > self.decimals:
            self.value *= 10 ** (decimals - self.decimals)
            self.decimals = decimals
        self.value += sign * value * 10 ** (self.decimals - decimals)
        self.count += sign

    def used(self) -> tuple[int, int, int]:
        return (self.value, self.decimals, self.count)


class _Rolling:
    """A trailing window: entries leave ``seconds`` after their instant (as the ledger's do)."""

    __slots__ = ("entries", "seconds", "total")

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds * 1_000_000
        self.total = _Sum()
        self.entries: collections.deque[list[int]] = collections.deque()

    def used(self, now: int) -> tuple[int, int, int]:
        edge = now - self.seconds
        entries = self.entries
        while entries and entries[0][0] <= edge:
            entry = entries.popleft()
            if entry[3]:  # still counting: it leaves now
                entry[3] = 0
                self.total.add(entry[1], entry[2], -1)
        return self.total.used()


class _Counters:
    """The counters of one world (the candidate's, or the live decisions seen in its windows)."""

    __slots__ = ("held", "rolling", "sums")

    def __init__(self) -> None:
        self.sums: dict[str, _Sum] = {}
        self.rolling: dict[str, _Rolling] = {}
        self.held: dict[int, list[tuple[str, Any]]] = {}

    def usage(self, tallies: Iterable[Tally], now: int) -> dict[str, tuple[int, int, int]]:
        found: dict[str, tuple[int, int, int]] = {}
        for t in tallies:
            if t.seconds is None:
                s = self.sums.get(t.usage_key)
                if s is not None:
                    found[t.usage_key] = s.used()
            else:
                r = self.rolling.get(t.usage_key)
                if r is not None:
                    found[t.usage_key] = r.used(now)
        return found

    def count(self, index: int, tallies: Iterable[Tally], amount: Amount, now: int) -> None:
        value, decimals = amount.value, amount.decimals
        where: list[tuple[str, Any]] = []
        for t in tallies:
            if t.seconds is None:
                s = self.sums.setdefault(t.usage_key, _Sum())
                s.add(value, decimals, 1)
                where.append((t.usage_key, s))
            else:
                r = self.rolling.get(t.usage_key)
                if r is None:
                    r = self.rolling[t.usage_key] = _Rolling(t.seconds)
                entry = [now, value, decimals, 1]
                r.entries.append(entry)
                r.total.add(value, decimals, 1)
                where.append((t.usage_key, (r, entry)))
        self.held[index] = where

    def free(self, index: int, amount: Amount) -> None:
        where = self.held.pop(index, None)
        if where is None:
            return
        for _, found in where:
            if isinstance(found, _Sum):
                found.add(amount.value, amount.decimals, -1)
                continue
            rolling, entry = found
            if entry[3]:  # not left the window yet
                entry[3] = 0
                rolling.total.add(amount.value, amount.decimals, -1)


@attrs.define
class _Spend:
    window: Window
    label: str
    scope: str | None
    group: str | None
    symbol: str
    limit: Amount | None = None
    max_count: int | None = None


def replay(
    agent_id: str,
    candidate: AgentPolicy,
    events: Sequence[RecordedPayment | Freed],
    *,
    since: datetime,
    until: datetime,
    notes: Sequence[str] = (),
) -> SimulationReport:
    """Replay ``events`` (payments and the moments their amounts were freed, in order).

    Returns the :class:`SimulationReport` of ``candidate`` as ``agent_id``'s
    policy (see the module's rules).
    """
    mine, theirs = _Counters(), _Counters()
    live_codes: dict[str, int] = {}
    candidate_codes: dict[str, int] = {}
    flips: dict[str, int] = {}
    changed: list[SimulatedPayment] = []
    spend: dict[str, _Spend] = {}
    payments: list[tuple[RecordedPayment, Code]] = []
    for event in events:
        if isinstance(event, Freed):
            if event.payment >= len(payments):
                continue
            p, code = payments[event.payment]
            amount = p.request.asset_amount
            theirs.free(event.payment, amount)
            if not (event.approval and code is Code.ALLOWED):  # it would have been paid
                mine.free(event.payment, amount)
            continue
        index = len(payments)
        now = micros(event.at)
        a = assess(candidate, event.request, event.at)
        _note_windows(a, spend)
        code = _decide(event, a, mine.usage(a.tallies, now))
        amount = event.request.asset_amount
        if code in _PASSING:
            mine.count(index, a.tallies, amount, now)
        if event.live_code in _PASSING:
            theirs.count(index, a.tallies, amount, now)
        payments.append((event, code))
        live_codes[event.live_code.value] = live_codes.get(event.live_code.value, 0) + 1
        candidate_codes[code.value] = candidate_codes.get(code.value, 0) + 1
        if code != event.live_code:
            moved = SimulatedPayment(event.at, event.request, event.live_code, code)
            changed.append(moved)
            if moved.flip is not None:
                flips[moved.flip] = flips.get(moved.flip, 0) + 1
    return SimulationReport(
        agent_id=agent_id, since=since, until=until, payments=len(payments),
        live_codes=live_codes, candidate_codes=candidate_codes, flips=flips,
        changed=tuple(changed), windows=_windows(spend, mine, theirs), notes=tuple(notes),
    )  # fmt: skip


def _decide(p: RecordedPayment, a: Any, usage: dict[str, tuple[int, int, int]]) -> Code:
    """The simulated code: the budgets before the candidate's, the candidate, those after."""
    if p.before is not None:
        return p.before
    code = judge(a, usage).code
    if code not in _PASSING:
        return code
    if p.after is not None:
        return p.after
    if code is Code.APPROVAL_REQUIRED or p.approval_elsewhere:
        return Code.APPROVAL_REQUIRED
    return Code.ALLOWED


def _note_windows(a: Any, spend: dict[str, _Spend]) -> None:
    """Remember every calendar window the candidate limits that this payment falls in."""
    if a.early is not None or not a.comparable:
        return
    symbol = a.request.symbol
    for book in a.books:
        scope = book.key[1]
        for kind, label, limit, tally in book.limits():
            if tally.window is None:
                continue
            found = spend.get(tally.usage_key)
            if found is None:
                found = spend[tally.usage_key] = _Spend(
                    tally.window, label, None if scope is None else scope[0],
                    None if scope is None else scope[1],
                    limit.symbol if isinstance(limit, Amount) else symbol,
                )  # fmt: skip
            if kind == "amount" and isinstance(limit, Amount):
                found.limit = limit
                found.symbol = limit.symbol
            elif isinstance(limit, int):
                found.max_count = limit


def _windows(
    spend: dict[str, _Spend], mine: _Counters, theirs: _Counters
) -> tuple[WindowSpend, ...]:
    rows = []
    for key, s in spend.items():
        a = mine.sums.get(key, _Sum()).used()
        b = theirs.sums.get(key, _Sum()).used()
        d = max(a[1], b[1])  # both in the same decimals
        rows.append(WindowSpend(
            window=s.label, start=s.window.start, end=s.window.end,
            live=Amount(b[0] * 10 ** (d - b[1]), d, s.symbol),
            candidate=Amount(a[0] * 10 ** (d - a[1]), d, s.symbol),
            live_count=b[2], candidate_count=a[2], limit=s.limit, max_count=s.max_count,
            scope=s.scope, group=s.group,
        ))  # fmt: skip
    order = {p: i for i, p in enumerate(Period)}
    rows.sort(key=lambda w: (w.scope or "", w.group or "", order[Period(w.window)], w.start))
    return tuple(rows)
