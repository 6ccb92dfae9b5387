"""Policy versions on every store: listed with how and what changed, diffed, rolled back."""

from __future__ import annotations

from typing import Any

import pytest

from agentpolicy import (
    AgentPolicy,
    Amount,
    Code,
    NotFoundError,
    PolicyEngine,
    PolicyError,
    PolicyValidationError,
    SpendingLimits,
)
from agentpolicy.testing import ManualClock, payment
from agentpolicy.versions import PolicyChange, diff_policies
from tests.backends import Backend

U = 1_000_000


def daily(units: int, **more: Any) -> dict[str, Any]:
    return {"limits": {"daily": {"value": str(units * U)}}, **more}


def test_versions_are_listed_newest_first_with_how_and_what_changed(backend: Backend) -> None:
    clock = ManualClock()
    engine = backend.engine(clock)
    engine.set_policy("agent-1", daily(1000))
    clock.advance(minutes=1)
    engine.set_policy("agent-1", daily(500, merchantRules={"blacklist": ["0xbad"]}))
    clock.advance(minutes=1)
    assert engine.rollback_policy("agent-1", 1) == 3
    versions = engine.policy_versions("agent-1")
    assert [(v.version, v.origin, v.from_version, v.current) for v in versions] == [
        (3, "rollback", 1, True), (2, "set", None, False), (1, "set", None, False)]  # fmt: skip
    assert versions[0].set_at == clock.now
    assert [str(c) for c in versions[1].changes] == [
        "limits.daily.value: 1000000000 -> 500000000",
        'merchantRules: (none) -> {"whitelist": [], "blacklist": ["0xbad"], '
        '"requireWhitelist": false}',
    ]
    assert [str(c) for c in versions[0].changes] == [
        "limits.daily.value: 500000000 -> 1000000000",
        'merchantRules: {"whitelist": [], "blacklist": ["0xbad"], "requireWhitelist": false} '
        "-> (none)",
    ]
    assert versions[2].changes == ()
    assert engine.get_policy("agent-1").policy == versions[2].policy  # type: ignore[union-attr]
    page = engine.policy_versions("agent-1", 1, before=3)
    assert [v.version for v in page] == [2]
    found = engine.get_policy_version("agent-1", 2)
    assert found.policy.limits.daily == Amount(500 * U)  # type: ignore[union-attr]
    diff = engine.diff_policy_versions("agent-1", 1, 2)
    assert next((c.path, c.before, c.after, c.kind) for c in diff) == (
        "limits.daily.value", "1000000000", "500000000", "changed")  # fmt: skip
    assert engine.diff_policy_versions("agent-1", 1, 3) == ()
    assert engine.authorize(payment(600 * U)).policy_version == 3
    events = [(h.event, h.policy_version, h.detail) for h in engine.history("agent-1", 2)]
    assert events[1] == ("policy_set", 3, "rolled back to version 1")


def test_asking_for_a_version_that_is_not_there(backend: Backend) -> None:
    engine = backend.engine(ManualClock())
    with pytest.raises(NotFoundError) as err:
        engine.policy_versions("agent-1")
    assert err.value.code == "NO_POLICY"
    engine.set_policy("agent-1", daily(1))
    for call in (lambda: engine.get_policy_version("agent-1", 2),
                 lambda: engine.rollback_policy("agent-1", 7),
                 lambda: engine.diff_policy_versions("agent-1", 1, 9)):  # fmt: skip
        with pytest.raises(NotFoundError) as err:
            call()
        assert err.value.code == "POLICY_VERSION_NOT_FOUND"
    for bad in (0, -1, "1", True):
        with pytest.raises(PolicyValidationError) as invalid:
            engine.get_policy_version("agent-1", bad)  # type: ignore[arg-type]
        assert invalid.value.path == "$.version"
    with pytest.raises(PolicyValidationError):
        engine.policy_versions("agent-1", 0)
    assert engine.get_policy("agent-1").version == 1  # type: ignore[union-attr]


def test_a_rollback_is_checked_like_set_policy(backend: Backend) -> None:
    engine = backend.engine(ManualClock())
    engine.set_policy("team", daily(100))
    engine.set_policy("bot", daily(50, parent="team"))  # v1: below team
    engine.set_policy("bot", daily(50))  # v2: on its own (in team's tree)
    engine.set_policy("team", daily(100, parent="bot"))  # team now below bot
    with pytest.raises(PolicyValidationError) as err:
        engine.rollback_policy("bot", 1)  # back below team: a cycle
    assert err.value.path == "$.policy.parent"
    assert engine.get_policy("bot").version == 2  # type: ignore[union-attr]
    engine.set_policy("team", daily(100))
    assert engine.rollback_policy("bot", 1) == 3  # no cycle any more
    d = engine.authorize(payment(60 * U, agent_id="bot"))
    assert (d.code, d.budget_id) == (Code.DAILY_LIMIT, "bot")
    engine.delegate("bot", "sub", daily(10))
    engine.delegate("bot", "sub", daily(20))
    assert engine.rollback_policy("sub", 1) == 3
    assert engine.get_policy("sub").policy.parent == "bot"  # type: ignore[union-attr]
    assert engine.get_policy_version("sub", 1).origin == "delegate"


def test_history_can_be_filtered_by_policy_version(backend: Backend) -> None:
    engine = backend.engine(ManualClock(), max_denials=5)
    engine.set_policy("agent-1", daily(100))
    first = engine.authorize(payment(10 * U))
    engine.confirm(first.reservation_id or "")
    engine.set_policy("agent-1", daily(15))
    for _ in range(20):
        engine.authorize(payment(10 * U))  # denied under version 2
    engine.release(engine.authorize(payment(U)).reservation_id or "")
    v1 = [(h.event, h.policy_version) for h in engine.history("agent-1", version=1)]
    assert v1 == [("confirm", 1), ("decision", 1), ("policy_set", 1)]
    v2 = engine.history("agent-1", 3, version=2)
    assert [(h.event, h.code) for h in v2] == [("release", None), ("decision", "ALLOWED"),
                                               ("decision", "DAILY_LIMIT")]  # fmt: skip
    assert len(engine.history("agent-1", 100, version=2)) <= 1 + 1 + 1 + 5 + 64
    assert engine.history("agent-1", version=3) == []
    with pytest.raises(PolicyError) as err:
        engine.history("agent-1", version=0)
    assert err.value.path == "$.version"


def test_history_by_version_reads_past_a_long_log() -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("agent-1", daily(1_000_000))
    engine.confirm(engine.authorize(payment(1)).reservation_id or "")
    engine.set_policy("agent-1", daily(1_000_000))
    for _ in range(300):
        engine.confirm(engine.authorize(payment(1)).reservation_id or "")
    old = engine.history("agent-1", 2, version=1)
    assert [h.event for h in old] == ["confirm", "decision"]  # 600 newer records read past


def test_the_diff_of_two_policies_names_every_field_that_differs() -> None:
    a = {"limits": {"daily": {"value": "10"}, "rolling": [{"window": "1h", "amount": {"value": "5"}},
                                                          {"window": "24h", "amount": {"value": "9"}}]},
         "scopedLimits": [{"name": "v", "limits": {"daily": {"value": "1"}}}],
         "approvalConfig": {"thresholds": [{"amount": {"value": "7"}, "requiredApprovers": 1,
                                            "approvers": ["a@x.io"]}]}}  # fmt: skip
    b = {"limits": {"daily": {"value": "10"}, "rolling": [{"window": "24h", "amount": {"value": "8"}}]},
         "scopedLimits": [{"name": "v", "limits": {"daily": {"value": "2"}}},
                          {"name": "w", "limits": {"hourly": {"value": "3"}}}],
         "approvalConfig": {"thresholds": [{"amount": {"value": "7"}, "requiredApprovers": 1,
                                            "approvers": ["a@x.io", "b@x.io"]}]}}  # fmt: skip
    changes = diff_policies(a, b)
    assert [str(c) for c in changes] == [
        'limits.rolling[1h]: {"window": "1h", "amount": {"value": "5"}} -> (none)',
        "limits.rolling[24h].amount.value: 9 -> 8",
        "scopedLimits[v].limits.daily.value: 1 -> 2",
        'scopedLimits[w]: (none) -> {"name": "w", "limits": {"hourly": {"value": "3"}}}',
        'approvalConfig.thresholds[0].approvers: ["a@x.io"] -> ["a@x.io", "b@x.io"]',
    ]
    assert [c.kind for c in changes] == ["removed", "changed", "changed", "added", "changed"]
    policy = AgentPolicy(limits=SpendingLimits(daily=Amount(10)))
    assert diff_policies(policy, policy) == ()
    assert diff_policies(policy, AgentPolicy()) == (
        PolicyChange("limits", {"daily": {"value": "10", "decimals": 6, "symbol": "USDT"}}, None),
    )
