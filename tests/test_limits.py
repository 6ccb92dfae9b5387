"""Limits v2 on every store: yearly, lifetime, rolling, counts, scopes, several assets, alerts."""

from __future__ import annotations

import io
import itertools
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from agentpolicy import Code, PolicyEngine, PolicyError
from agentpolicy.testing import ManualClock, payment
from tests.backends import Backend
from tests.receiver import Receiver

U = 1_000_000
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def usdt(units: int) -> dict[str, str]:
    return {"value": str(units * U)}


def engine_for(backend: Backend, policy: dict[str, Any], **kw: Any) -> tuple[PolicyEngine, Any]:
    clock = ManualClock(kw.pop("start", T0))
    engine = backend.engine(clock, reservation_ttl=kw.pop("ttl", timedelta(days=400)), **kw)
    engine.set_policy("a", policy)
    return engine, clock


def pay(engine: PolicyEngine, amount: int, *, confirm: bool = True, **kw: Any) -> str:
    d = engine.authorize(payment(amount, agent_id="a", **kw))
    if d.allowed and confirm:
        assert d.reservation_id is not None
        engine.confirm(d.reservation_id)
    return str(d.code)


# --- yearly and lifetime -----------------------------------------------------------------


def test_a_yearly_limit_resets_on_the_first_local_day_of_january(backend: Backend) -> None:
    policy = {"limits": {"yearly": usdt(100)}, "timeRules": {"timezone": "America/New_York"}}
    engine, clock = engine_for(backend, policy, start=datetime(2026, 12, 31, 12, tzinfo=UTC))
    assert pay(engine, 100 * U) == "ALLOWED"
    clock.set(datetime(2027, 1, 1, 4, 59, tzinfo=UTC))  # still 31 December in New York
    assert pay(engine, 1) == "YEARLY_LIMIT"
    clock.set(datetime(2027, 1, 1, 5, 0, tzinfo=UTC))  # midnight in New York: a new year
    assert pay(engine, 100 * U) == "ALLOWED"


def test_a_lifetime_limit_never_resets(backend: Backend) -> None:
    engine, clock = engine_for(backend, {"limits": {"lifetime": usdt(100), "yearly": usdt(80)}})
    assert pay(engine, 80 * U) == "ALLOWED"
    assert pay(engine, 1) == "YEARLY_LIMIT"
    clock.advance(days=400)
    assert pay(engine, 20 * U) == "ALLOWED"
    clock.advance(days=4000)
    d = engine.authorize(payment(1, agent_id="a"))
    assert d.code == Code.LIFETIME_LIMIT
    assert "lifetime limit 100 USDT: used 100 USDT" in d.reason


# --- rolling windows ------------------------------------------------------------------------


def test_a_payment_counts_in_a_rolling_window_until_exactly_the_window_later(
    backend: Backend,
) -> None:
    engine, clock = engine_for(
        backend, {"limits": {"rolling": [{"window": "24h", "amount": usdt(300)}]}}
    )
    assert pay(engine, 200 * U) == "ALLOWED"
    clock.advance(hours=1)
    assert pay(engine, 100 * U) == "ALLOWED"
    assert pay(engine, 1) == "ROLLING_LIMIT"
    clock.set(T0 + timedelta(hours=24) - timedelta(microseconds=1))
    assert pay(engine, 1) == "ROLLING_LIMIT"  # the first payment still counts
    clock.set(T0 + timedelta(hours=24))  # and now it does not
    assert pay(engine, 200 * U) == "ALLOWED"
    assert pay(engine, 1) == "ROLLING_LIMIT"
    [limit] = engine.budget("a").limits
    assert (limit.window, limit.spent and limit.spent.value) == ("24h", 300 * U)
    assert limit.frees_at == T0 + timedelta(hours=25)  # when the 100 of 13:00 leaves


def test_release_and_expiry_give_a_rolling_window_back_at_once(backend: Backend) -> None:
    policy = {"limits": {"rolling": [{"window": "10m", "amount": usdt(10)}]}}
    engine, clock = engine_for(backend, policy, ttl=timedelta(minutes=2))
    first = engine.authorize(payment(10 * U, agent_id="a"))
    assert first.reservation_id is not None
    assert pay(engine, 1) == "ROLLING_LIMIT"
    engine.release(first.reservation_id)
    held = engine.authorize(payment(10 * U, agent_id="a"))
    assert held.allowed
    clock.advance(minutes=2)  # its reservation expires unconfirmed
    assert pay(engine, 10 * U) == "ALLOWED"


def test_a_late_request_is_checked_against_everything_still_counting_at_its_instant(
    backend: Backend,
) -> None:
    """A slower clock's request must never see less than was counting at its own instant."""
    policy = {"limits": {"rolling": [{"window": "1h", "amount": usdt(100)}]}}
    engine, _ = engine_for(backend, policy)
    assert pay(engine, 100 * U) == "ALLOWED"  # at 12:00
    ahead = backend.engine(ManualClock(T0 + timedelta(hours=1, seconds=5)))
    assert ahead.authorize(payment(1, agent_id="a")).allowed  # 13:00:05: the first one left
    behind = backend.engine(ManualClock(T0 + timedelta(minutes=59)))  # 12:59, 66 s behind
    assert behind.authorize(payment(1, agent_id="a")).code == Code.ROLLING_LIMIT


# --- counts -------------------------------------------------------------------------------


def test_counts_in_calendar_and_trailing_windows(backend: Backend) -> None:
    policy = {"limits": {"counts": [{"window": "daily", "max": 3}, {"window": "10m", "max": 2}]}}
    engine, clock = engine_for(backend, policy, ttl=timedelta(minutes=1))
    assert pay(engine, 1) == "ALLOWED"
    held = engine.authorize(payment(1, agent_id="a"))
    assert held.reservation_id is not None
    d = engine.authorize(payment(1, agent_id="a"))
    assert d.code == Code.COUNT_LIMIT
    assert "10m count limit of 2 payments: 2 so far" in d.reason
    engine.release(held.reservation_id)  # a released payment gives its count back
    held = engine.authorize(payment(1, agent_id="a"))
    assert held.allowed
    clock.advance(minutes=1)  # and so does an expired one
    assert pay(engine, 1) == "ALLOWED"
    clock.advance(minutes=10)
    assert pay(engine, 1) == "ALLOWED"  # the third today
    assert pay(engine, 1) == "COUNT_LIMIT"  # a fourth would exceed the daily count
    counts = [x for x in engine.budget("a").limits if x.kind == "count"]
    assert [(x.window, x.count, x.remaining_count) for x in counts] == [
        ("daily", 3, 0), ("10m", 1, 1),
    ]  # fmt: skip


# --- scopes --------------------------------------------------------------------------------


DATA_VENDORS = {
    "name": "data vendors",
    "match": {"categories": ["data"], "networks": ["eip155:8453"]},
    "groupBy": "recipient",
    "limits": {"perTransaction": usdt(5), "daily": usdt(10), "counts": [{"window": "daily", "max": 3}]},
}  # fmt: skip


def test_a_grouped_scope_keeps_counters_per_recipient(backend: Backend) -> None:
    engine, _ = engine_for(backend, {"scopedLimits": [DATA_VENDORS]})
    data = {"category": "data"}
    assert pay(engine, 6 * U, recipient="0xv1", **data) == "SCOPED_LIMIT"  # over per-transaction
    assert pay(engine, 5 * U, recipient="0xv1", **data) == "ALLOWED"
    assert pay(engine, 5 * U, recipient="0xV1", **data) == "ALLOWED"  # 0x compares any case
    d = engine.authorize(payment(1, agent_id="a", recipient="0xv1", **data))
    assert d.code == Code.SCOPED_LIMIT
    assert "scope data vendors (0xv1): daily limit 10 USDT" in d.reason
    assert any(e.name == "scope[data vendors].daily_limit" and e.code == Code.SCOPED_LIMIT
               for e in d.evaluations)  # fmt: skip
    assert pay(engine, 5 * U, recipient="0xv2", **data) == "ALLOWED"  # its own group
    assert pay(engine, 50 * U, recipient="0xv1", category="news") == "ALLOWED"  # not matched
    other_network = {"network": "eip155:1", **data}
    assert pay(engine, 50 * U, recipient="0xv1", **other_network) == "ALLOWED"
    groups = {(x.group, x.window, x.kind): x for x in engine.budget("a").limits}
    assert groups[("0xv1", "daily", "amount")].spent.value == 10 * U  # type: ignore[union-attr]
    assert groups[("0xv2", "daily", "count")].count == 1


def test_a_budget_lists_a_bounded_number_of_groups_and_names_the_scopes_cut_short(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every group of every scope was listed: the governed agent grew its budget's answer with
    # each payment to a new recipient (400 payments under 30 scopes of 32 limits: 74 MB)
    from agentpolicy.cli_output import print_budget
    from agentpolicy.ledger import operations
    from agentpolicy.serve.pages import budget_views
    from agentpolicy.views import budget_data

    monkeypatch.setattr(operations, "MAX_GROUPS_LISTED", 3)
    networks = {**DATA_VENDORS, "name": "networks", "groupBy": "network",
                "limits": {"daily": usdt(100)}}  # fmt: skip
    engine, _ = engine_for(backend, {"scopedLimits": [DATA_VENDORS, networks]})
    assert pay(engine, U, recipient="0xv1", category="data") == "ALLOWED"
    assert pay(engine, U, recipient="0xv2", category="data") == "ALLOWED"
    b = engine.budget("a")
    listed = {(x.scope, x.group) for x in b.limits if x.scope is not None}
    assert listed == {("data vendors", "0xv1"), ("data vendors", "0xv2"),
                      ("networks", "eip155:8453")}  # fmt: skip
    assert b.more_groups == ()
    assert "moreGroups" not in budget_data(b)
    for n in range(3, 7):  # more recipients than fit: the first in key order are listed
        assert pay(engine, U, recipient=f"0xv{n}", category="data") == "ALLOWED"
    b = engine.budget("a")
    listed = {(x.scope, x.group) for x in b.limits if x.scope is not None}
    assert listed == {("data vendors", "0xv1"), ("data vendors", "0xv2"),
                      ("data vendors", "0xv3")}  # fmt: skip
    assert b.more_groups == ("data vendors", "networks")
    assert budget_data(b)["moreGroups"] == ["data vendors", "networks"]
    out = io.StringIO()
    print_budget(budget_data(b), out)
    assert "  data vendors: more groups than listed\n  networks: more groups than listed\n" in (
        out.getvalue()
    )
    (view,) = budget_views(b, b.at)
    assert view["note"] == "more groups than shown in data vendors, networks"
    # a group left out of the listing still limits its payments: 0xv6 holds 1 of its daily 10
    assert pay(engine, 5 * U, recipient="0xv6", category="data") == "ALLOWED"
    assert pay(engine, 5 * U, recipient="0xv6", category="data") == "SCOPED_LIMIT"


def test_a_siblings_payment_drops_no_counter_a_budget_keeps_after_its_timezone_changed(
    backend: Backend,
) -> None:
    # S's daily counter began in New York (8 March: a 23-hour day, ending 04:00Z); S then moved
    # to Etc/GMT+5, where the same day's key ends at 05:00Z, so the counter is kept until then.
    # T's payment loaded S's head (expiring S's reservation held in P) and pruned it with T's
    # chain's windows: S's day began again at zero, and S spent its limit twice
    clock = ManualClock(datetime(2026, 3, 8, 20, 0, tzinfo=UTC))
    engine = backend.engine(clock, counter_grace=timedelta(minutes=10),
                            reservation_ttl=timedelta(minutes=5))  # fmt: skip
    daily = {"daily": usdt(100)}
    engine.set_policy("P", {"timeRules": {"timezone": "Asia/Tokyo"}})
    engine.set_policy("S", {"parent": "P", "limits": daily,
                            "timeRules": {"timezone": "America/New_York"}})  # fmt: skip
    engine.set_policy("T", {"parent": "P", "timeRules": {"timezone": "Asia/Tokyo"}})

    def pays(agent: str, amount: int, confirm: bool = True) -> str:
        d = engine.authorize(payment(amount, agent_id=agent))
        if d.allowed and confirm:
            assert d.reservation_id is not None
            engine.confirm(d.reservation_id)
        return str(d.code)

    assert pays("S", 90 * U) == "ALLOWED"
    engine.set_policy("S", {"parent": "P", "limits": daily,
                            "timeRules": {"timezone": "Etc/GMT+5"}})  # fmt: skip
    clock.set(datetime(2026, 3, 9, 4, 8, tzinfo=UTC))
    assert pays("S", 5 * U, confirm=False) == "ALLOWED"  # held in P too; expires at 04:13Z
    clock.set(datetime(2026, 3, 9, 4, 14, tzinfo=UTC))
    assert pays("T", U) == "ALLOWED"  # expires S's reservation, so loads S's head
    clock.set(datetime(2026, 3, 9, 4, 20, tzinfo=UTC))  # still 8 March in Etc/GMT+5
    assert pays("S", 100 * U) == "DAILY_LIMIT"  # 90 spent today
    assert pays("S", 10 * U) == "ALLOWED"


def test_every_spelling_of_a_domain_name_counts_in_its_one_group(backend: Backend) -> None:
    # a per-recipient limit cannot be multiplied by writing the name another way
    engine, _ = engine_for(backend, {"scopedLimits": [DATA_VENDORS]})
    data = {"category": "data"}
    assert pay(engine, 4 * U, recipient="vendor.eth", **data) == "ALLOWED"
    assert (
        pay(engine, 4 * U, recipient="\uff36\uff25\uff2e\uff24\uff2f\uff32\uff0eeth", **data)
        == "ALLOWED"
    )
    assert pay(engine, 4 * U, recipient="vendor\u3002eth.", **data) == "SCOPED_LIMIT"
    assert pay(engine, 2 * U, recipient="Vendor.ETH.", **data) == "ALLOWED"
    groups = {(x.group, x.window, x.kind): x for x in engine.budget("a").limits}
    assert groups[("vendor.eth", "daily", "amount")].spent.value == 10 * U  # type: ignore[union-attr]
    assert groups[("vendor.eth", "daily", "count")].count == 3


def test_an_ungrouped_scope_sums_across_its_matches(backend: Backend) -> None:
    scope = {**DATA_VENDORS, "groupBy": None, "limits": {"daily": usdt(10)}}
    engine, _ = engine_for(backend, {"scopedLimits": [scope]})
    assert pay(engine, 6 * U, recipient="0xv1", category="data") == "ALLOWED"
    assert pay(engine, 5 * U, recipient="0xv2", category="data") == "SCOPED_LIMIT"
    assert pay(engine, 4 * U, recipient="0xv2", category="data") == "ALLOWED"


def test_a_scope_of_counts_alone_covers_every_token(backend: Backend) -> None:
    scope = {"name": "few", "limits": {"counts": [{"window": "daily", "max": 2}]}}
    eth = {"symbol": "ETH", "limits": {"daily": {"value": str(10**18), "decimals": 18,
                                                 "symbol": "ETH"}}}  # fmt: skip
    engine, _ = engine_for(backend, {"assets": [eth], "scopedLimits": [scope],
                                     "limits": {"daily": usdt(100)}})  # fmt: skip
    assert pay(engine, U) == "ALLOWED"
    assert pay(engine, 10**15, symbol="ETH", decimals=18) == "ALLOWED"
    assert pay(engine, U) == "SCOPED_LIMIT"


def test_counts_alone_in_limits_count_every_token_beside_the_assets_own_blocks(
    backend: Backend,
) -> None:
    eth = {"symbol": "ETH", "limits": {"daily": {"value": str(10**18), "decimals": 18,
                                                 "symbol": "ETH"},
                                       "counts": [{"window": "daily", "max": 9}]}}  # fmt: skip
    usdc = {"symbol": "USDC", "limits": {"daily": {"value": str(100 * U), "symbol": "USDC"}}}
    limits = {"counts": [{"window": "daily", "max": 3}, {"window": "10m", "max": 2}]}
    engine, clock = engine_for(backend, {"limits": limits, "assets": [eth, usdc]})
    assert pay(engine, 10**15, symbol="ETH", decimals=18) == "ALLOWED"
    assert pay(engine, U, symbol="USDC") == "ALLOWED"
    d = engine.authorize(payment(U, agent_id="a", symbol="USDC"))
    assert d.code == Code.COUNT_LIMIT  # the third payment in 10 minutes, whatever the token
    failed = [e for e in d.evaluations if e.outcome.value == "fail"]
    assert [e.name for e in failed] == ["every_token.count_limit[10m]"]
    assert "every token's 10m count limit of 2 payments" in failed[0].detail
    clock.advance(minutes=10)
    assert pay(engine, 10**15, symbol="ETH", decimals=18) == "ALLOWED"
    assert pay(engine, U, symbol="USDC") == "COUNT_LIMIT"  # the daily count of every token: 3
    counted = {(b.window, b.kind): b.count for b in engine.budget("a").limits if b.max_count == 3}
    assert counted == {("daily", "count"): 3}
    assert pay(engine, U, symbol="BTC", decimals=8) == "ASSET_MISMATCH"  # not an asset


@pytest.mark.parametrize("trailing", [False, True])
def test_counts_survive_a_version_that_adds_or_takes_away_the_amount_limits(
    backend: Backend, trailing: bool
) -> None:
    """A count limit left as it was keeps what it counted when the amounts beside it change.

    Counts alone count every token together, and counts beside an amount
    limit its token's payments: every payment counts in both, so that
    neither version starts its windows afresh (6 payments against a
    daily count of 3 before).
    """
    counts = [{"window": "10m" if trailing else "daily", "max": 3}]
    engine, clock = engine_for(backend, {"limits": {"daily": usdt(1000), "counts": counts}})
    assert [pay(engine, U) for _ in range(4)] == ["ALLOWED"] * 3 + ["COUNT_LIMIT"]
    engine.set_policy("a", {"limits": {"counts": counts}})  # the same count, no amounts
    assert pay(engine, U) == "COUNT_LIMIT"
    clock.advance(minutes=10 if trailing else 24 * 60)  # the next window
    assert [pay(engine, 2 * U) for _ in range(2)] == ["ALLOWED"] * 2
    # and back: an amount limit added to counts alone sees what was paid in its window
    paid = 7 if trailing else 4  # today: the three of the first window too when it was 10m
    engine.set_policy("a", {"limits": {"daily": usdt(paid + 1), "counts": counts}})
    assert pay(engine, 2 * U) == "DAILY_LIMIT"
    assert pay(engine, U) == "ALLOWED"  # the limit reached, and the third payment of the count
    spent = engine.budget("a", "daily").periods["daily"].spent  # type: ignore[index]
    assert spent.value == (paid + 1) * U
    engine.set_policy("a", {"limits": {"daily": usdt(1000), "counts": counts}})
    assert pay(engine, U) == "COUNT_LIMIT"


def test_a_trailing_count_moved_from_an_asset_to_counts_alone_keeps_its_payments(
    backend: Backend,
) -> None:
    usdt_asset = {"symbol": "USDT", "limits": {"daily": usdt(1000),
                                               "counts": [{"window": "10m", "max": 2}]}}  # fmt: skip
    engine, clock = engine_for(backend, {"limits": {"counts": [{"window": "daily", "max": 50}]},
                                         "assets": [usdt_asset]})  # fmt: skip
    assert [pay(engine, U) for _ in range(3)] == ["ALLOWED", "ALLOWED", "COUNT_LIMIT"]
    clock.advance(minutes=1)
    engine.set_policy("a", {"limits": {"counts": [{"window": "10m", "max": 2}]}})
    assert pay(engine, U) == "COUNT_LIMIT"  # the same 10 minutes, now of every token
    clock.advance(minutes=9)
    assert pay(engine, U) == "ALLOWED"


def test_a_trailing_count_moved_from_counts_alone_to_an_asset_keeps_its_payments(
    backend: Backend,
) -> None:
    """A token's own counters keep the durations of counts alone beside its block too.

    Before, the asset's own ``roll:600`` counter was not kept while the 10m
    count was of every token: moved onto the asset's block it started from
    zero, and 4 payments passed in 10 minutes against a count of 2.
    """
    ten_minutes = [{"window": "10m", "max": 2}]
    engine, clock = engine_for(backend, {"limits": {"counts": ten_minutes},
                                         "assets": [{"symbol": "USDT", "limits": {
                                             "daily": usdt(1000)}}]})  # fmt: skip
    assert [pay(engine, U) for _ in range(3)] == ["ALLOWED", "ALLOWED", "COUNT_LIMIT"]
    clock.advance(minutes=1)
    engine.set_policy("a", {"limits": {"counts": [{"window": "daily", "max": 50}]},
                            "assets": [{"symbol": "USDT", "limits": {
                                "daily": usdt(1000), "counts": ten_minutes}}]})  # fmt: skip
    # the same 10 minutes, now the asset's own count: still 2 in them, not 4
    assert [pay(engine, U) for _ in range(2)] == ["COUNT_LIMIT", "COUNT_LIMIT"]
    clock.advance(minutes=9)
    assert [pay(engine, U) for _ in range(3)] == ["ALLOWED", "ALLOWED", "COUNT_LIMIT"]


def test_a_scope_keeps_its_counts_when_its_amounts_go(backend: Backend) -> None:
    scope = {"name": "vendors", "limits": {"daily": usdt(100),
                                           "counts": [{"window": "daily", "max": 2}]}}  # fmt: skip
    engine, _ = engine_for(backend, {"scopedLimits": [scope]})
    assert [pay(engine, U) for _ in range(3)] == ["ALLOWED", "ALLOWED", "SCOPED_LIMIT"]
    engine.set_policy("a", {"scopedLimits": [{**scope, "limits": {"counts": scope["limits"][
        "counts"]}}]})  # fmt: skip
    assert pay(engine, U) == "SCOPED_LIMIT"


def test_the_budget_of_counts_alone_reports_what_was_spent(backend: Backend) -> None:
    engine, _ = engine_for(backend, {"limits": {"counts": [{"window": "daily", "max": 5}]}})
    assert pay(engine, 7 * U) == "ALLOWED"
    daily = engine.budget("a", "daily").periods["daily"]  # type: ignore[index]
    assert (daily.spent.value, daily.spent.symbol) == (7 * U, "USDT")
    (count,) = [b for b in engine.budget("a").limits if b.kind == "count"]
    assert (count.count, count.remaining_count) == (1, 4)


def test_a_count_limit_in_the_budget_names_the_token_whose_payments_it_counts(
    backend: Backend,
) -> None:
    from agentpolicy.cli_output import print_budget
    from agentpolicy.serve.pages import _limit_name
    from agentpolicy.views import budget_data, limit_data

    daily = [{"window": "daily", "max": 5}]
    engine, _ = engine_for(backend, {"limits": {"counts": daily}, "assets": [
        {"symbol": "USDC", "limits": {"daily": {**usdt(100), "symbol": "USDC"},
                                       "counts": [{"window": "daily", "max": 3}]}},
    ]})  # fmt: skip
    assert pay(engine, U, symbol="USDC") == "ALLOWED"
    counts = [x for x in engine.budget("a").limits if x.kind == "count"]
    # two daily counts, told apart: every token's and USDC's own
    assert [(x.symbol, x.max_count, x.count) for x in counts] == [(None, 5, 1), ("USDC", 3, 1)]
    assert [limit_data(x).get("symbol") for x in counts] == [None, "USDC"]
    assert [_limit_name(x) for x in counts] == ["daily, count", "daily, count of USDC payments"]
    out = io.StringIO()
    print_budget(budget_data(engine.budget("a")), out)
    assert "1 of 5 payments; 4 left" in out.getvalue()
    assert "1 of 3 USDC payments; 2 left" in out.getvalue()
    (amount,) = [x for x in engine.budget("a").limits if x.kind == "amount"]
    assert amount.symbol == "USDC"


# --- several assets --------------------------------------------------------------------------


def test_each_asset_has_its_own_limits_and_an_unknown_one_is_denied(backend: Backend) -> None:
    policy = {
        "limits": {"daily": {"value": str(100 * U), "symbol": "USDC"}},
        "assets": [{"symbol": "ETH", "limits": {
            "daily": {"value": str(10**18), "decimals": 18, "symbol": "ETH"},
            "rolling": [{"window": "1h", "amount": {"value": str(5 * 10**17), "decimals": 18,
                                                   "symbol": "ETH"}}]}}],
        "approvalConfig": {"thresholds": [{"amount": {"value": str(9 * 10**17), "decimals": 18,
                                                      "symbol": "ETH"},
                                           "requiredApprovers": 1, "approvers": ["boss"]}]},
    }  # fmt: skip
    engine, _ = engine_for(backend, policy)
    assert pay(engine, 100 * U, symbol="USDC") == "ALLOWED"
    assert pay(engine, 1, symbol="USDC") == "DAILY_LIMIT"
    eth = {"symbol": "ETH", "decimals": 18}
    assert pay(engine, 5 * 10**17, **eth) == "ALLOWED"  # USDC spent nothing of ETH's budget
    assert pay(engine, 1, **eth) == "ROLLING_LIMIT"
    assert pay(engine, 1, symbol="DAI") == "ASSET_MISMATCH"
    assert pay(engine, 100 * U, symbol="USDC", recipient="0xother") == "DAILY_LIMIT"
    budgets = {(x.limit.symbol if x.limit else None, x.window) for x in engine.budget("a").limits}
    assert budgets == {("USDC", "daily"), ("ETH", "daily"), ("ETH", "1h")}


def test_a_threshold_applies_to_payments_in_its_own_token(backend: Backend) -> None:
    policy = {
        "limits": {"daily": {"value": str(10**30), "symbol": "USDC"}},
        "assets": [{"symbol": "ETH", "limits": {"daily": {"value": str(10**30), "decimals": 18,
                                                          "symbol": "ETH"}}}],
        "approvalConfig": {"thresholds": [{"amount": {"value": "5", "decimals": 18,
                                                      "symbol": "ETH"},
                                           "requiredApprovers": 1, "approvers": ["boss"]}]},
    }  # fmt: skip
    engine, _ = engine_for(backend, policy)
    assert pay(engine, 10**12, symbol="USDC") == "ALLOWED"
    assert pay(engine, 5, symbol="ETH", decimals=18) == "APPROVAL_REQUIRED"


# --- alerts -----------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Any:
    r = Receiver().start()
    yield r
    r.stop()


def test_alerts_fire_once_per_window_with_the_change_that_crossed_them(
    backend: Backend, receiver: Receiver
) -> None:
    policy = {"limits": {"daily": usdt(100)}, "alerts": [{"percent": 80}, {"percent": 100}],
              "scopedLimits": [{"name": "data", "match": {"categories": ["data"]},
                                "limits": {"daily": usdt(10)}, "alerts": [{"percent": 50}]}]}  # fmt: skip
    engine, clock = engine_for(
        backend,
        policy,
        webhook_endpoints=[{"url": receiver.url, "secret": "s"}],
        webhook_backoff=0.01,
    )
    assert pay(engine, 70 * U) == "ALLOWED"  # 70%: nothing
    held = engine.authorize(payment(15 * U, agent_id="a"))  # 85%: 80 crossed
    assert held.reservation_id is not None
    engine.release(held.reservation_id)  # back to 70%
    assert pay(engine, 15 * U) == "ALLOWED"  # 85% again: 80 already fired today
    assert pay(engine, 15 * U) == "ALLOWED"  # 100%
    assert pay(engine, 5 * U, category="data") == "DAILY_LIMIT"
    clock.advance(days=1)
    assert pay(engine, 6 * U, category="data") == "ALLOWED"  # scope 60%: 50 crossed
    assert pay(engine, 90 * U) == "ALLOWED"  # a new day: 96%, 80 again
    assert engine.flush_webhooks(10)
    events = [json.loads(r.body) for r in receiver.received]
    crossed = [(e["budget"].get("scope"), e["budget"]["limit"], e["budget"]["percent"])
               for e in events if e["event"] == "budget.threshold_reached"]  # fmt: skip
    assert crossed == [(None, "daily", 80), (None, "daily", 100), ("data", "daily", 50),
                       (None, "daily", 80)]  # fmt: skip
    first = next(e for e in events if e["event"] == "budget.threshold_reached")
    assert first["budget"]["used"] == str(85 * U)
    assert first["budget"]["windowEnd"] == "2026-03-11T00:00:00Z"
    engine.close()


# --- a brute-force model over random sequences, on every store ----------------------------------

MODEL_POLICY = {
    "limits": {
        "daily": usdt(60),
        "rolling": [{"window": "1h", "amount": usdt(40)}],
        "counts": [{"window": "10m", "max": 3}],
    },
    "scopedLimits": [
        {"name": "vendors", "match": {"categories": ["data"]}, "groupBy": "recipient",
         "limits": {"daily": usdt(25), "counts": [{"window": "1h", "max": 2}]}},
    ],
}  # fmt: skip
TTL = timedelta(minutes=20)


CALENDAR_POLICY = {
    "limits": {"daily": usdt(40), "yearly": usdt(30), "lifetime": usdt(35)},
}  # the year binds before the day does, then resets at New Year; the lifetime never resets


class Model:
    """What the policy allows, computed from scratch over every payment (no counters)."""

    def __init__(self, calendar: bool = False) -> None:
        self.payments: list[dict[str, Any]] = []  # t, amount, recipient, data, status
        self.calendar = calendar

    def live(self, now: datetime) -> list[dict[str, Any]]:
        return [p for p in self.payments if p["status"] == "confirmed"
                or (p["status"] == "open" and now < p["t"] + TTL)]  # fmt: skip

    def decide(self, now: datetime, amount: int, recipient: str, data: bool) -> str:
        live = self.live(now)
        day = [p for p in live if p["t"].date() == now.date()]
        hour = [p for p in live if now - timedelta(hours=1) < p["t"] <= now]
        ten = [p for p in live if now - timedelta(minutes=10) < p["t"] <= now]
        if self.calendar:
            year = [p for p in live if p["t"].year == now.year]
            if sum(p["amount"] for p in day) + amount > 40 * U:
                return "DAILY_LIMIT"
            if sum(p["amount"] for p in year) + amount > 30 * U:
                return "YEARLY_LIMIT"
            if sum(p["amount"] for p in live) + amount > 35 * U:
                return "LIFETIME_LIMIT"
            return "ALLOWED"
        if sum(p["amount"] for p in day) + amount > 60 * U:
            return "DAILY_LIMIT"
        if sum(p["amount"] for p in hour) + amount > 40 * U:
            return "ROLLING_LIMIT"
        if len(ten) + 1 > 3:
            return "COUNT_LIMIT"
        if data:
            group = [p for p in live if p["data"] and p["recipient"] == recipient]
            if sum(p["amount"] for p in group if p["t"].date() == now.date()) + amount > 25 * U:
                return "SCOPED_LIMIT"
            if len([p for p in group if now - timedelta(hours=1) < p["t"] <= now]) + 1 > 2:
                return "SCOPED_LIMIT"
        return "ALLOWED"


_pay = st.tuples(st.just("pay"), st.integers(1, 30), st.sampled_from(["0xa", "0xb"]), st.booleans())


def _operations(longest_wait: int) -> st.SearchStrategy[list[Any]]:
    return st.lists(
        st.one_of(
            _pay,
            _pay,  # payments twice as often: usage reaches every limit in a short sequence
            st.tuples(st.just("confirm"), st.integers(0, 50)),
            st.tuples(st.just("confirm"), st.just(-1)),  # the newest payment
            st.tuples(st.just("release"), st.integers(0, 50)),
            st.tuples(st.just("wait"), st.integers(1, longest_wait)),  # seconds
        ),
        min_size=5,
        max_size=40,
    )


operations = st.one_of(
    st.tuples(st.just(False), _operations(5400)),  # crosses hours and days
    st.tuples(st.just(True), _operations(5400)),  # crosses New Year
)
_agents = itertools.count()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(case=operations)
@example(
    case=(
        True,
        [
            ("pay", 20, "0xa", False),
            ("confirm", -1),
            ("pay", 15, "0xa", False),
            ("wait", 3600),
            ("pay", 10, "0xa", False),
            ("pay", 10, "0xb", False),
        ],
    )
)
@example(case=(False, [("pay", 30, "0xa", False), ("wait", 3600), ("pay", 35, "0xa", True),
                       ("confirm", -1), ("wait", 3600), ("pay", 30, "0xb", False)]))  # fmt: skip
def test_every_limit_kind_matches_a_brute_force_model(
    backend: Backend, case: tuple[bool, list[Any]]
) -> None:
    calendar, ops = case
    agent = f"model-{next(_agents)}"
    start = datetime(2026, 12, 31, 23, 0) if calendar else datetime(2026, 3, 10, 22, 30)
    clock = ManualClock(start.replace(tzinfo=UTC))  # hours before midnight (and New Year)
    engine = backend.engine(clock, reservation_ttl=TTL)
    engine.set_policy(agent, CALENDAR_POLICY if calendar else MODEL_POLICY)
    model = Model(calendar)
    ids: list[tuple[str, dict[str, Any]]] = []
    try:
        for op in ops:
            now = clock.now
            if op[0] == "pay":
                _, units, recipient, data = op
                expected = model.decide(now, units * U, recipient, data)
                d = engine.authorize(payment(units * U, agent_id=agent, recipient=recipient,
                                             category="data" if data else None))  # fmt: skip
                assert d.code == expected, (ops, d.reason)
                event(str(d.code))
                if d.allowed:
                    assert d.reservation_id is not None
                    entry = {"t": now, "amount": units * U, "recipient": recipient, "data": data,
                             "status": "open"}  # fmt: skip
                    model.payments.append(entry)
                    ids.append((d.reservation_id, entry))
            elif op[0] in ("confirm", "release") and ids:
                rid, entry = ids[op[1] % len(ids)]  # (-1: the newest)
                expired = entry["status"] == "open" and now >= entry["t"] + TTL
                try:
                    getattr(engine, op[0])(rid)
                except PolicyError:
                    continue
                if entry["status"] == "open" and not expired:
                    entry["status"] = "confirmed" if op[0] == "confirm" else "released"
            elif op[0] == "wait":
                clock.advance(seconds=op[1])
    finally:
        engine.close()  # a connection per example would exhaust the server
