"""An adversarial probe of calendar counters that hold what their window used (commit 18d51ed).

A calendar counter used to keep spent and reserved apart; now it keeps their
sum (``[end, decimals, used, 0, count, ...]``), a confirm changes none, and a
budget reads what is reserved from the open reservations. Limits only read
the sum, so every decision, and every budget figure, must be what the code
before reported. The probes:

- budgets through every path (confirm, release, expiry unsent and sent,
  approval holds approved, denied, lapsed or expiring once approved, revoke
  with payments under way, a three-level tree, scopes, assets, counts,
  alerts, shadows, 6 and 18 decimals in one window, more open reservations
  than one expiry batch, windows that end or are pruned while payments are
  open);
- a model of spent and reserved against random calls (hypothesis, a fixed
  number of examples), on memory and SQLite;
- data written by the code before this change (its source, from git, in a
  subprocess): the same continuation run by both versions reports alike,
  on SQLite and on Redis; and a SQLite file of agentpolicy 0.1;
- Redis under concurrent payments (``remaining`` exact, everything exact once
  quiet), PostgreSQL read while a payment is made, and the async engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentpolicy import PolicyEngine
from agentpolicy.aio import AsyncPolicyEngine
from agentpolicy.errors import PolicyError
from agentpolicy.ledger import keys, operations
from agentpolicy.storage import MemoryStorage, open_storage
from agentpolicy.testing import ManualClock, payment
from tests.backends import Backend, serve

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
U = 1_000_000
E = 10**18
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
BEFORE = "18d51ed~1"
"""The commit before calendar counters held what their window used."""


@pytest.fixture(params=["memory", "sqlite"])
def local(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A store of one process: memory or SQLite."""
    yield from serve(request.param, tmp_path, request)


def window(engine: PolicyEngine, agent: str, period: str = "daily") -> tuple[int, int, int]:
    """Spent, reserved and remaining of one calendar window (the main token's)."""
    w = engine.budget(agent, period).periods[period]  # type: ignore[index]
    assert w.remaining is not None
    return w.spent.value, w.reserved.value, w.remaining.value


def limits(engine: PolicyEngine, agent: str) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """Every limit of the budget: amounts as (spent, reserved, remaining), counts as (count, left)."""
    found: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for lb in engine.budget(agent).limits:
        name = (lb.kind, lb.window, lb.scope, lb.group, lb.symbol)
        if lb.kind == "count":
            found[name] = (lb.count, lb.remaining_count)
        else:
            assert lb.spent is not None
            assert lb.reserved is not None
            assert lb.remaining is not None
            found[name] = (lb.spent.value, lb.reserved.value, lb.remaining.value)
    return found


def head_counters(engine: PolicyEngine, agent: str) -> dict[str, Any]:
    """The calendar counters of the agent's head as stored."""
    with engine.storage.session(agent, write=False) as session:
        _, body = session.get([keys.head(agent)])[keys.head(agent)]
    return {k: c for k, c in body["c"].items() if isinstance(c, list)}


def daily(units: int, **more: Any) -> dict[str, Any]:
    return {"limits": {"daily": {"value": str(units * U)}}, **more}


APPROVALS = {
    "thresholds": [
        {"amount": {"value": str(30 * U)}, "requiredApprovers": 1, "approvers": ["boss@x.com"]}
    ],
    "timeout": 3_600_000,
}


# -- every path, figure by figure --------------------------------------------------------------


def _pay_and_fail(engine: PolicyEngine, value: int, *, sent: bool) -> None:
    """A payment block that raises: after marking its payment sent, or before."""

    def block() -> None:
        with engine.payment(payment(value, agent_id="bot")) as p:
            if sent:
                p.mark_sent()
            raise RuntimeError("the network broke")

    with pytest.raises(RuntimeError):
        block()


def test_sent_and_unsent_expiry_and_the_payment_guard(local: Backend) -> None:
    clock = ManualClock(T0)
    engine = local.engine(clock)
    engine.set_policy("bot", daily(100))
    sent = engine.authorize(payment(10 * U, agent_id="bot")).reservation_id or ""
    unsent = engine.authorize(payment(20 * U, agent_id="bot")).reservation_id or ""
    engine.mark_sent(sent)
    assert window(engine, "bot") == (0, 30 * U, 70 * U)
    _pay_and_fail(engine, 5 * U, sent=True)  # held: spent once it expires
    with engine.payment(payment(4 * U, agent_id="bot")):
        pass  # confirmed
    _pay_and_fail(engine, 3 * U, sent=False)  # released
    assert window(engine, "bot") == (4 * U, 35 * U, 61 * U)
    clock.advance(minutes=6)
    assert engine.get_reservation(unsent).status == "expired"
    assert window(engine, "bot") == (19 * U, 0, 81 * U)  # sent ones count as spent
    assert engine.authorize(payment(81 * U, agent_id="bot")).allowed
    assert engine.authorize(payment(1, agent_id="bot")).code == "DAILY_LIMIT"


def test_approval_holds_approved_denied_lapsed_and_expired_after_approval(local: Backend) -> None:
    clock = ManualClock(T0)
    engine = local.engine(clock)
    engine.set_policy("bot", daily(200, approvalConfig=APPROVALS))
    approved = engine.authorize(payment(40 * U, agent_id="bot"))
    denied = engine.authorize(payment(50 * U, agent_id="bot"))
    lapsing = engine.authorize(payment(35 * U, agent_id="bot"))
    idle = engine.authorize(payment(31 * U, agent_id="bot"))
    assert {d.code for d in (approved, denied, lapsing, idle)} == {"APPROVAL_REQUIRED"}
    assert window(engine, "bot") == (0, 156 * U, 44 * U)  # holds are reserved
    assert engine.authorize(payment(45 * U, agent_id="bot")).code == "DAILY_LIMIT"
    engine.decide(denied.approval_id or "", "boss@x.com", "deny")
    assert window(engine, "bot") == (0, 106 * U, 94 * U)
    clock.advance(minutes=10)
    one = engine.decide(approved.approval_id or "", "boss@x.com", "approve").reservation_id
    two = engine.decide(idle.approval_id or "", "boss@x.com", "approve").reservation_id
    assert window(engine, "bot") == (0, 106 * U, 94 * U)
    engine.confirm(one or "")
    assert window(engine, "bot") == (40 * U, 66 * U, 94 * U)
    clock.advance(minutes=6)  # the approved one of 31 was neither confirmed nor released
    assert engine.get_reservation(two or "").status == "expired"
    assert window(engine, "bot") == (40 * U, 35 * U, 125 * U)
    clock.advance(hours=1)  # the last approval lapses, its hold is given back
    assert engine.get_approval(lapsing.approval_id or "").status == "expired"
    assert window(engine, "bot") == (40 * U, 0, 160 * U)
    assert engine.authorize(payment(29 * U, agent_id="bot")).allowed
    assert window(engine, "bot") == (40 * U, 29 * U, 131 * U)


def test_a_three_level_tree_and_a_revoke_with_a_payment_under_way(local: Backend) -> None:
    clock = ManualClock(T0)
    engine = local.engine(clock)
    engine.set_policy("team", daily(300))
    engine.delegate("team", "bot", daily(100))
    engine.delegate("bot", "sub", daily(50))
    under_way = engine.authorize(payment(7 * U, agent_id="sub")).reservation_id or ""
    engine.claim(under_way, "payer-1")
    held = engine.authorize(payment(5 * U, agent_id="sub")).reservation_id or ""
    done = engine.authorize(payment(11 * U, agent_id="bot")).reservation_id or ""
    engine.confirm(done)
    own = engine.authorize(payment(13 * U, agent_id="team")).reservation_id or ""
    assert window(engine, "sub") == (0, 12 * U, 38 * U)
    assert window(engine, "bot") == (11 * U, 12 * U, 77 * U)
    assert window(engine, "team") == (11 * U, 25 * U, 264 * U)
    budget = engine.budget("sub", "daily")
    assert [(a.agent_id, a.periods["daily"].spent.value, a.periods["daily"].reserved.value)  # type: ignore[index]
            for a in budget.ancestors] == [("bot", 11 * U, 12 * U), ("team", 11 * U, 25 * U)]  # fmt: skip
    engine.revoke("bot")  # the claimed one stays open; the other one stays too (no approval)
    assert engine.get_reservation(held).status == "reserved"
    assert window(engine, "team") == (11 * U, 25 * U, 264 * U)
    engine.confirm(under_way, holder="payer-1")
    engine.release(held)
    engine.confirm(own)
    assert window(engine, "sub") == (7 * U, 0, 43 * U)
    assert window(engine, "bot") == (18 * U, 0, 82 * U)
    assert window(engine, "team") == (31 * U, 0, 269 * U)


def test_scopes_assets_counts_and_decimals_in_one_window(local: Backend) -> None:
    clock = ManualClock(T0)
    engine = local.engine(clock)
    engine.set_policy(
        "bot",
        {
            "limits": {"counts": [{"window": "daily", "max": 9}]},  # every token's
            "assets": [
                {"symbol": "USDT", "limits": {"daily": {"value": str(100 * U)}}},
                {
                    "symbol": "ETH",
                    "limits": {
                        "daily": {"value": str(2 * E), "decimals": 18, "symbol": "ETH"},
                        "counts": [{"window": "daily", "max": 3}],
                    },
                },
            ],
            "scopedLimits": [
                {
                    "name": "vendors",
                    "match": {"categories": ["data"]},
                    "groupBy": "recipient",
                    "limits": {"daily": {"value": str(40 * U)}},
                }
            ],
        },
    )
    a = engine.authorize(payment(10 * U, agent_id="bot", category="data", recipient="0xa"))
    b = engine.authorize(
        payment(2_500_000_000_000_000_001, agent_id="bot", decimals=18, category="data",
                recipient="0xa")
    )  # fmt: skip
    c = engine.authorize(payment(E // 2, agent_id="bot", symbol="ETH", decimals=18))
    d = engine.authorize(payment(E // 4, agent_id="bot", symbol="ETH", decimals=18))
    assert all(x.allowed for x in (a, b, c, d))
    engine.confirm(a.reservation_id or "")
    engine.confirm(c.reservation_id or "")
    found = limits(engine, "bot")
    usdt = ("amount", "daily", None, None, "USDT")
    scope = ("amount", "daily", "vendors", "0xa", "USDT")
    eth = ("amount", "daily", None, None, "ETH")
    # 2.500000000000000001 rounds up in 6 decimals, and remaining rounds down
    assert found[usdt] == (10 * U, 2_500_001, 87_499_999)
    assert found[scope] == (10 * U, 2_500_001, 27_499_999)
    assert found[eth] == (E // 2, E // 4, 2 * E - 3 * E // 4)
    assert found[("count", "daily", None, None, None)] == (4, 5)
    assert found[("count", "daily", None, None, "ETH")] == (2, 1)
    engine.release(b.reservation_id or "")
    engine.confirm(d.reservation_id or "")
    found = limits(engine, "bot")
    assert found[usdt] == (10 * U, 0, 90 * U)
    assert found[scope] == (10 * U, 0, 30 * U)
    assert found[eth] == (3 * E // 4, 0, 2 * E - 3 * E // 4)
    assert found[("count", "daily", None, None, None)] == (3, 6)
    for c18 in head_counters(engine, "bot").values():
        assert c18[3] == 0  # held as one sum
    assert engine.authorize(
        payment(30 * U, agent_id="bot", category="data", recipient="0xa")
    ).allowed
    assert engine.authorize(
        payment(1, agent_id="bot", category="data", recipient="0xa", decimals=18)
    ).code == "SCOPED_LIMIT"  # fmt: skip


def test_alerts_fire_once_and_keep_their_field(local: Backend) -> None:
    clock = ManualClock(T0)
    engine = local.engine(clock)
    engine.set_policy("bot", daily(100, alerts=[{"percent": 50}]))
    first = engine.authorize(payment(60 * U, agent_id="bot")).reservation_id or ""
    engine.confirm(first)
    stored = next(c for k, c in head_counters(engine, "bot").items() if "daily" in k)
    assert stored[2:] == [60 * U, 0, 1, [50]]
    engine.release(engine.authorize(payment(5 * U, agent_id="bot")).reservation_id or "")
    stored = next(c for k, c in head_counters(engine, "bot").items() if "daily" in k)
    assert stored[2:] == [60 * U, 0, 1, [50]]
    assert window(engine, "bot") == (60 * U, 0, 40 * U)


def test_a_shadow_decides_on_the_same_sums(local: Backend) -> None:
    clock = ManualClock(T0)
    engine = local.engine(clock)
    engine.set_policy("bot", daily(100))
    engine.set_shadow_policy("bot", {"limits": {"weekly": {"value": str(30 * U)}}})
    ok = engine.authorize(payment(20 * U, agent_id="bot")).reservation_id or ""
    engine.confirm(ok)
    kept = engine.authorize(payment(9 * U, agent_id="bot")).reservation_id or ""
    engine.release(engine.authorize(payment(5 * U, agent_id="bot")).reservation_id or "")
    engine.authorize(payment(2 * U, agent_id="bot"))  # the shadow would deny it (and the 5 before)
    report = engine.shadow_report("bot")
    assert (report.payments, dict(report.flips)) == (4, {"allowed->denied": 2})
    assert dict(report.shadow_codes) == {"ALLOWED": 2, "WEEKLY_LIMIT": 2}
    engine.release(kept)
    engine.promote_shadow_policy("bot")
    assert window(engine, "bot", "weekly") == (20 * U, 2 * U, 8 * U)
    assert engine.authorize(payment(8 * U, agent_id="bot")).allowed
    assert engine.authorize(payment(1, agent_id="bot")).code == "WEEKLY_LIMIT"


def test_more_open_reservations_than_one_expiry_batch(local: Backend) -> None:
    clock = ManualClock(T0)
    engine = local.engine(clock)
    engine.set_policy("bot", daily(10_000))
    rids = [engine.authorize(payment(U, agent_id="bot")).reservation_id or "" for _ in range(230)]
    for rid in rids[:10]:
        engine.confirm(rid)
    for rid in rids[10:15]:
        engine.mark_sent(rid)
    assert window(engine, "bot") == (10 * U, 220 * U, 9_770 * U)
    clock.advance(minutes=6)  # 220 expire: two batches, 5 of them spent
    assert window(engine, "bot") == (15 * U, 0, 9_985 * U)


def test_a_window_that_ends_while_payments_are_open(local: Backend) -> None:
    clock = ManualClock(datetime(2026, 3, 10, 23, 58, tzinfo=UTC))
    engine = local.engine(clock)
    engine.set_policy(
        "bot",
        {"limits": {"daily": {"value": str(100 * U)}, "monthly": {"value": str(500 * U)}},
         "approvalConfig": {**APPROVALS, "timeout": 3 * 86_400_000}},
    )  # fmt: skip
    late = engine.authorize(payment(10 * U, agent_id="bot")).reservation_id or ""
    gone = engine.authorize(payment(20 * U, agent_id="bot")).reservation_id or ""
    hold = engine.authorize(payment(40 * U, agent_id="bot")).approval_id or ""
    clock.advance(minutes=3)  # past midnight
    engine.confirm(late)
    engine.release(gone)
    assert window(engine, "bot") == (0, 0, 100 * U)
    assert window(engine, "bot", "monthly") == (10 * U, 40 * U, 450 * U)
    clock.advance(hours=2)  # yesterday's counters are pruned; the hold stays open
    assert window(engine, "bot", "monthly") == (10 * U, 40 * U, 450 * U)
    assert not [k for k in head_counters(engine, "bot") if "daily:2026-03-10" in k]
    rid = engine.decide(hold, "boss@x.com", "approve").reservation_id or ""
    engine.confirm(rid)  # its daily counter was dropped: only the month counts it
    assert window(engine, "bot") == (0, 0, 100 * U)
    assert window(engine, "bot", "monthly") == (50 * U, 0, 450 * U)
    assert engine.authorize(payment(29 * U, agent_id="bot")).allowed
    assert window(engine, "bot") == (0, 29 * U, 71 * U)


def test_every_store_reports_alike(backend: Backend) -> None:
    """The whole split on each store (Redis, Cluster, PostgreSQL too), when nothing else runs."""
    clock = ManualClock(T0)
    engine = backend.engine(clock)
    engine.set_policy("team", daily(300))
    engine.delegate("team", "bot", daily(100, approvalConfig=APPROVALS))
    rids = [engine.authorize(payment(n * U, agent_id="bot")).reservation_id for n in (5, 6, 7)]
    hold = engine.authorize(payment(31 * U, agent_id="bot")).approval_id or ""
    engine.confirm(rids[0] or "")
    engine.mark_sent(rids[1] or "")
    assert window(engine, "bot") == (5 * U, 44 * U, 51 * U)
    clock.advance(minutes=6)
    assert window(engine, "bot") == (11 * U, 31 * U, 58 * U)
    engine.decide(hold, "boss@x.com", "deny")
    assert window(engine, "team") == (11 * U, 0, 289 * U)
    fresh = backend.engine(clock)
    assert window(fresh, "bot") == (11 * U, 0, 89 * U)
    for units in (29, 29, 29, 2):  # below the approval threshold
        assert fresh.authorize(payment(units * U, agent_id="bot")).allowed
    assert fresh.authorize(payment(1, agent_id="bot")).code == "DAILY_LIMIT"


# -- a model of spent and reserved, against random calls ---------------------------------------

MODEL_START = datetime(2026, 3, 31, 23, 50, tzinfo=UTC)  # a day and a month end soon
_LIMITS = {"daily": 100 * U * 10**12, "monthly": 400 * U * 10**12}  # in 18 decimals
_TTL = timedelta(minutes=5)

_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("auth"),
            st.integers(1, 45),
            st.sampled_from([6, 18]),
            st.integers(0, 10**12 - 1),
        ),
        st.tuples(st.sampled_from(["confirm", "release", "sent"]), st.integers(0, 11)),
        st.tuples(st.just("advance"), st.sampled_from([20, 130, 301, 3_600, 86_400])),
    ),
    min_size=1,
    max_size=14,
)


_SUCCEEDS_ON = {
    "confirm": ("open", "confirmed"),
    "release": ("open", "released", "expired"),
    "sent": ("open",),
}
"""The states a reservation's call succeeds in (confirming again, or releasing again, is a no-op)."""


class _Model:
    """Reservations as plain records; spent and reserved of a window summed from them."""

    def __init__(self) -> None:
        self.now = MODEL_START
        self.held: list[dict[str, Any]] = []

    def keys_at(self, at: datetime) -> dict[str, tuple[int, ...]]:
        return {"daily": (at.year, at.month, at.day), "monthly": (at.year, at.month)}

    def expire(self) -> None:
        for r in self.held:
            if r["st"] == "open" and self.now >= r["x"]:
                r["st"] = "expired"

    def used(self, period: str) -> tuple[int, int]:
        key = self.keys_at(self.now)[period]
        spent = sum(r["v"] for r in self.held
                    if (r["st"] == "confirmed" or (r["st"] == "expired" and r["sent"]))
                    and r["w"][period] == key)  # fmt: skip
        open_ = sum(r["v"] for r in self.held if r["st"] == "open" and r["w"][period] == key)
        return spent, open_

    def figures(self, period: str) -> tuple[int, int, int]:
        """As a budget reports them in 6 decimals: used rounds up, what is left down."""
        spent, open_ = self.used(period)
        left = max(0, _LIMITS[period] - spent - open_)
        k = 10**12
        return -(-spent // k), -(-open_ // k), left // k


@settings(max_examples=30, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(ops=_ops)
def test_budgets_follow_a_plain_model(local: Backend, ops: list[tuple[Any, ...]]) -> None:
    clock = ManualClock(MODEL_START)
    engine = PolicyEngine(storage=local.open(), clock=clock, reservation_ttl=_TTL)
    agent = f"m{uuid.uuid4().hex[:10]}"  # examples share the store
    engine.set_policy(
        agent, {"limits": {"daily": {"value": str(100 * U)}, "monthly": {"value": str(400 * U)}}}
    )
    model = _Model()
    rids: list[str] = []
    for op in ops:
        if op[0] == "advance":
            clock.advance(timedelta(seconds=op[1]))
            model.now = clock()
            model.expire()
        elif op[0] == "auth":
            _, units, decimals, extra = op
            value = units * U if decimals == 6 else units * U * 10**12 + extra
            v18 = value * 10 ** (18 - decimals)
            fits = all(sum(model.used(p)) + v18 <= _LIMITS[p] for p in _LIMITS)
            d = engine.authorize(payment(value, agent_id=agent, decimals=decimals))
            assert d.allowed is fits, (op, model.used("daily"), model.used("monthly"))
            if d.allowed:
                rids.append(d.reservation_id or "")
                model.held.append({"v": v18, "st": "open", "sent": False, "x": model.now + _TTL,
                                   "w": model.keys_at(model.now)})  # fmt: skip
        elif op[1] < len(rids):
            r, rid = model.held[op[1]], rids[op[1]]
            try:
                getattr(engine, {"sent": "mark_sent"}.get(op[0], op[0]))(rid)
                done = True
            except PolicyError:
                done = False
            assert done is (r["st"] in _SUCCEEDS_ON[op[0]]), (op, r)
            if r["st"] == "open":
                r.update({"confirm": {"st": "confirmed"}, "release": {"st": "released"},
                          "sent": {"sent": True}}[op[0]])  # fmt: skip
        for period in _LIMITS:
            assert window(engine, agent, period) == model.figures(period), (period, op)


# -- data written by the code before, continued by both versions -------------------------------

_DRIVER = r'''
import json, sys
from datetime import UTC, datetime, timedelta
from agentpolicy import PaymentRequest, PolicyEngine
from agentpolicy.errors import PolicyError
from agentpolicy.storage import open_storage
from agentpolicy.testing import ManualClock

U, E = 10**6, 10**18
START = datetime(2026, 3, 10, 23, 40, tzinfo=UTC)
APPROVALS = {"thresholds": [{"amount": {"value": str(30 * U)}, "requiredApprovers": 1,
                             "approvers": ["boss@x.com"]}], "timeout": 3_600_000}
BOT = {
    "limits": {"daily": {"value": str(150 * U)}, "monthly": {"value": str(1000 * U)},
               "rolling": [{"window": "2h", "amount": {"value": str(400 * U)}}]},
    "assets": [{"symbol": "ETH", "limits": {
        "daily": {"value": str(5 * E), "decimals": 18, "symbol": "ETH"},
        "counts": [{"window": "daily", "max": 4}]}}],
    "scopedLimits": [{"name": "vendors", "match": {"categories": ["data"]}, "groupBy": "recipient",
                      "limits": {"daily": {"value": str(40 * U)}}, "alerts": [{"percent": 50}]}],
    "alerts": [{"percent": 50}],
    "approvalConfig": APPROVALS,
}


def pay(agent, value, **more):
    return PaymentRequest(agent_id=agent, amount=value, recipient=more.pop("to", "0xv"),
                          network="eip155:8453", **more)


def amount(a):
    return None if a is None else [a.value, a.decimals]


def view(b):
    periods = sorted([str(p), amount(w.spent), amount(w.reserved), amount(w.remaining)]
                     for p, w in b.periods.items())
    lims = [[x.kind, x.window, x.scope, x.group, x.symbol, amount(x.spent), amount(x.reserved),
             amount(x.remaining), x.count, x.remaining_count] for x in b.limits]
    return [b.agent_id, periods, lims, [view(a) for a in b.ancestors]]


def engine_on(url, prefix, clock):
    return PolicyEngine(storage=open_storage(url, key_prefix=prefix), clock=clock)


def create(url, prefix):
    """The data: confirmed, open, sent and held payments, in a tree of three, in two decimals."""
    clock = ManualClock(START)
    e = engine_on(url, prefix, clock)
    e.set_policy("team", {"limits": {"daily": {"value": str(300 * U)}}, "assets": [
        {"symbol": "ETH", "limits": {"daily": {"value": str(10 * E), "decimals": 18, "symbol": "ETH"}}}]})
    e.delegate("team", "bot", BOT)
    e.delegate("bot", "sub", {"limits": {"daily": {"value": str(60 * U)}}})
    ids = {}
    def rid(name, agent, value, **more):
        d = e.authorize(pay(agent, value, **more))
        ids[name] = d.reservation_id or d.approval_id
        return ids[name]
    e.confirm(rid("done", "bot", 10 * U))
    rid("open", "bot", 7 * U)
    rid("held", "bot", 35 * U)
    rid("denied", "bot", 31 * U)
    rid("lapsing", "bot", 32 * U)
    rid("sub", "sub", 4 * U, category="data", to="0xw")
    rid("fine", "sub", 2_500_000_000_000_000_001, decimals=18)
    e.confirm(rid("eth", "bot", E // 2, symbol="ETH", decimals=18))
    rid("eth_open", "bot", E // 4, symbol="ETH", decimals=18)
    e.mark_sent(rid("sent", "bot", 3 * U))
    e.confirm(rid("vendor", "bot", 5 * U, category="data", to="0xw"))
    e.release(rid("given", "bot", U))
    e.close()
    return ids


def proceed(url, prefix, ids):
    """What happens next, every figure seen on the way."""
    clock = ManualClock(START + timedelta(minutes=1))
    e = engine_on(url, prefix, clock)
    seen = []
    def look():
        seen.append([view(e.budget(a)) for a in ("team", "bot", "sub")])
    def act(name, *args):
        try:
            seen.append([name, str(getattr(e, name)(*args).status)])
        except PolicyError as err:
            seen.append([name, str(err.code)])
    def fill(agent, **more):  # the most a budget lets through, then one unit more
        b = e.budget(agent)
        left = min(x.remaining.value for x in (b, *b.ancestors) for x in x.limits
                   if x.kind == "amount" and x.window == "daily" and x.symbol in (None, "USDT")
                   and (x.scope is None or more))
        for value in (left, 1) if left else (1,):
            step = min(value, 29 * U)  # below the approval threshold
            while value > 0:
                d = e.authorize(pay(agent, min(step, value), **more))
                seen.append(["fill", agent, str(d.code), d.budget_id])
                value -= min(step, value)
                if not d.allowed:
                    break
    look()
    act("confirm", ids["open"])
    act("release", ids["sub"])
    approved = e.decide(ids["held"], "boss@x.com", "approve")
    e.decide(ids["denied"], "boss@x.com", "deny")
    look()
    act("confirm", approved.reservation_id)
    fill("sub", category="data", to="0xw")
    look()
    clock.advance(minutes=10)  # the open ones expire: the sent one counts as spent
    look()
    clock.advance(minutes=20)  # past midnight
    fill("bot")
    look()
    clock.advance(hours=2)  # yesterday's counters pruned; the lapsing approval expired
    look()
    e.close()
    return seen


def proceed_v01(url, info):
    """A SQLite file of agentpolicy 0.1 (converted on open), continued."""
    clock = ManualClock(datetime(2026, 3, 10, 12, 30, tzinfo=UTC))
    e = PolicyEngine(storage=open_storage(url), clock=clock)
    seen = []
    def look():
        seen.append([view(e.budget(a)) for a in ("agent-1", "org:agent 2")])
    look()
    seen.append(["release", str(e.release(info["open_reservation"]).status)])
    look()
    seen.append(["deny", str(e.decide(info["pending_approval"], "boss@example.com", "deny").status)])
    look()
    kept = e.authorize(pay("agent-1", 20 * U))
    for value in (29 * U, 29 * U, 12 * U, 1):  # 10 spent, 20 open: 70 left, then none
        d = e.authorize(pay("agent-1", value))
        seen.append(["fill", str(d.code)])
    look()
    e.confirm(kept.reservation_id)
    clock.advance(minutes=6)
    look()
    e.close()
    return seen


if __name__ == "__main__":
    todo = json.loads(sys.argv[1])
    out = {}
    for name, fresh, twin in todo["stores"]:
        out[name] = create(*fresh)  # continued by the code under test
        out[name + ":before"] = proceed(*twin, create(*twin))  # and by this code
    if "v01" in todo:
        out["v01:before"] = proceed_v01(*todo["v01"])
    print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def before_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The source of the code before this change (from git), or skip without git history."""
    folder = tmp_path_factory.mktemp("before")
    try:
        tree = subprocess.run(
            ["git", "-C", str(ROOT), "archive", BEFORE, "src"],
            capture_output=True, check=True, timeout=60,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        pytest.skip(f"no git history with {BEFORE} here")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=tree, check=True, timeout=60)
    return folder / "src"


def _run_before(src: Path, stores: dict[str, Any]) -> dict[str, Any]:
    """Run the driver on the code before: create in each fresh store, create and continue in its twin."""
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(stores)],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(src)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def _driver() -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "driver"}
    exec(_DRIVER, namespace)
    return namespace


def _drop_prefix(url: str, *prefixes: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        for prefix in prefixes:
            names = list(client.scan_iter(match=prefix + "*", count=1000))
            if names:
                client.delete(*names)
    finally:
        client.close()


def test_data_of_the_code_before_reads_and_settles_alike(
    before_src: Path, tmp_path: Path, redis_url: str
) -> None:
    sqlite = [f"sqlite:///{tmp_path / 'fresh.db'}", ""], [f"sqlite:///{tmp_path / 'twin.db'}", ""]
    tag = uuid.uuid4().hex[:10]
    redis = [redis_url, f"probe-{tag}-a:"], [redis_url, f"probe-{tag}-b:"]
    try:
        v01 = tmp_path / "v01-twin.db"
        shutil.copy(FIXTURES / "v01.db", v01)
        converted = tmp_path / "v01.db"
        shutil.copy(FIXTURES / "v01.db", converted)
        info = json.loads((FIXTURES / "v01-sqlite.json").read_text())
        before = _run_before(before_src, {"stores": [["sqlite", *sqlite], ["redis", *redis]],
                                          "v01": [f"sqlite:///{v01}", info]})  # fmt: skip
        driver = _driver()
        for name, (fresh, _) in (("sqlite", sqlite), ("redis", redis)):
            now = driver["proceed"](*fresh, before[name])
            for step, (mine, theirs) in enumerate(zip(now, before[name + ":before"], strict=True)):
                assert mine == theirs, (name, step)
        assert driver["proceed_v01"](f"sqlite:///{converted}", info) == before["v01:before"]
    finally:
        _drop_prefix(redis_url, redis[0][1], redis[1][1])


# -- budgets read while others pay -------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def busy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from serve(request.param, tmp_path, request)


def test_a_budget_read_while_others_pay(busy: Backend) -> None:
    """``remaining`` always lies between what was used before and after the read; once quiet,
    every figure is exact. Memory and SQLite read one snapshot: their split is exact too.

    (A confirm is counted here once it returned: up to one per worker may be in
    the store and not counted yet.)
    """
    clock = ManualClock(T0)
    engine = busy.engine(clock)
    limit, workers, rounds = 1_000 * U, 3, 12
    engine.set_policy("bot", daily(1_000))
    confirmed = [0]
    lock = threading.Lock()
    problems: list[str] = []

    def pay(worker: int) -> None:
        mine = busy.engine(clock)
        for n in range(rounds):
            rid = mine.authorize(payment(U, agent_id="bot")).reservation_id or ""
            if (n + worker) % 3:
                mine.confirm(rid)
                with lock:
                    confirmed[0] += 1
            else:
                mine.release(rid)

    threads = [threading.Thread(target=pay, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    reader = busy.engine(clock)
    while any(t.is_alive() for t in threads):
        with lock:
            low = confirmed[0]
        spent, reserved, remaining = window(reader, "bot")
        with lock:
            high = confirmed[0]
        if spent + reserved + remaining != limit:
            problems.append(f"{spent} + {reserved} + {remaining} is not the limit")
        if not limit - (high + workers) * U <= remaining <= limit - low * U:
            problems.append(f"remaining {remaining} outside {low}..{high} confirmed")
        if busy.name in ("memory", "sqlite") and not (
            low * U <= spent <= (high + workers) * U and reserved <= workers * U
        ):
            problems.append(f"split {spent}/{reserved} outside {low}..{high} confirmed")
    for t in threads:
        t.join()
    assert not problems, problems[:5]
    assert window(reader, "bot") == (confirmed[0] * U, 0, limit - confirmed[0] * U)


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def two_readers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A store another connection may write to while a budget reads (not memory: one lock)."""
    yield from serve(request.param, tmp_path, request)


def test_a_payment_made_between_the_reads_of_one_budget(
    two_readers: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A payment authorized after the budget read the head, before it read the open ones.

    ``remaining`` is exact everywhere (90 before the payment, 85 after), and
    the split is one moment's (10 spent: 0 or 5 reserved): SQLite reads one
    snapshot; on Redis and PostgreSQL, whose reading sessions do not, the
    head read again after the step has changed, so the budget is read again.
    """
    clock = ManualClock(T0)
    engine, other = two_readers.engine(clock), two_readers.engine(clock)
    engine.set_policy("bot", daily(100))
    engine.confirm(engine.authorize(payment(10 * U, agent_id="bot")).reservation_id or "")
    window(engine, "bot")  # nothing is left to write: the next read only reads
    held = operations._held
    paid: list[bool] = []

    def meanwhile(*args: Any) -> Any:
        if not paid:
            one = threading.Thread(
                target=lambda: paid.append(other.authorize(payment(5 * U, agent_id="bot")).allowed)
            )
            one.start()
            one.join(10)
        return held(*args)

    monkeypatch.setattr(operations, "_held", meanwhile)
    spent, reserved, remaining = window(engine, "bot")
    assert paid == [True]
    assert remaining in (90 * U, 85 * U)
    assert spent + reserved + remaining == 100 * U
    assert (spent, reserved) == (10 * U, 100 * U - spent - remaining)
    monkeypatch.setattr(operations, "_held", held)
    assert window(engine, "bot") == (10 * U, 5 * U, 85 * U)


# -- the async engine --------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_the_async_engine_reports_alike(store: str, request: pytest.FixtureRequest) -> None:
    """Through threads (memory) and natively (a Redis URL: an async client)."""
    prefix = f"probe-{uuid.uuid4().hex[:10]}:"
    url = request.getfixturevalue("redis_url") if store == "redis" else None
    clock = ManualClock(T0)

    async def scenario() -> tuple[Any, ...]:
        storage = MemoryStorage() if url is None else open_storage(url, key_prefix=prefix)
        async_storage = None
        if url is not None:
            from agentpolicy.storage import open_async_storage

            async_storage = open_async_storage(url, key_prefix=prefix)
        async with AsyncPolicyEngine(storage, clock=clock, async_storage=async_storage) as a:
            await a.set_policy("team", daily(300))
            await a.delegate("team", "bot", daily(100, approvalConfig=APPROVALS))
            one = await a.authorize(payment(10 * U, agent_id="bot"))
            two = await a.authorize(payment(20 * U, agent_id="bot"))
            hold = await a.authorize(payment(40 * U, agent_id="bot"))
            await a.confirm(one.reservation_id or "")
            await a.mark_sent(two.reservation_id or "")
            first = await a.budget("bot", "daily")
            clock.advance(minutes=6)
            await a.decide(hold.approval_id or "", "boss@x.com", "deny")
            second = await a.budget("bot", "daily")
        storage.close()
        return first, second

    try:
        first, second = asyncio.run(scenario())
    finally:
        if url is not None:
            _drop_prefix(url, prefix)
    figures = [
        (w.spent.value, w.reserved.value, w.remaining.value)
        for b in (first, second)
        for w in (b.periods["daily"], b.ancestors[0].periods["daily"])
    ]
    assert figures == [
        (10 * U, 60 * U, 30 * U), (10 * U, 60 * U, 230 * U),
        (30 * U, 0, 70 * U), (30 * U, 0, 270 * U),
    ]  # fmt: skip
