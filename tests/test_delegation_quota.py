"""What an agent may delegate itself is bounded: children, versions, and the size of a policy.

Every version of a policy is kept for good (decisions name the version they
were made under), so an agent allowed to delegate must not be able to grow
the operator's store without bound: it may delegate at most
``delegation.maxChildren`` budgets below its own (default 100, revoked and
expired ones included), write at most ten versions per child slot there, and
each policy it delegates is at most 64 KiB of JSON. The counts live in the
ledger step that writes, so two delegations at once never both take the
last slot (real threads, on every store).
"""

from __future__ import annotations

import json
import sys
import threading
from datetime import UTC, datetime
from typing import Any

import pytest

from agentpolicy import (
    ErrorCode,
    ForbiddenError,
    PolicyEngine,
    PolicyError,
    PolicyValidationError,
    dump_policy,
    load_policy,
)
from agentpolicy.mcp import AgentPolicyMcpServer
from agentpolicy.policy import (
    DEFAULT_MAX_CHILDREN,
    DELEGATED_VERSIONS_PER_CHILD,
    MAX_CHILDREN,
    MAX_DELEGATED_POLICY_BYTES,
)
from agentpolicy.schema import policy_schema
from agentpolicy.storage import MemoryStorage
from agentpolicy.testing import ManualClock, payment
from tests.backends import Backend
from tests.snapshots import store_state as snapshot

U = 1_000_000
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def daily(units: int, **more: Any) -> dict[str, Any]:
    return {"limits": {"daily": {"value": str(units * U)}}, **more}


def delegating(units: int = 100, **rules: Any) -> dict[str, Any]:
    return daily(units, delegation={"allowed": True, **rules})


def tree(backend: Backend) -> tuple[PolicyEngine, ManualClock]:
    clock = ManualClock(T0)
    return backend.engine(clock), clock


def stored_size(policy: dict[str, Any]) -> int:
    """The policy's JSON as the stores keep it (compact, ASCII)."""
    return len(json.dumps(dump_policy(load_policy(policy)), separators=(",", ":")))


def sized(target: int) -> dict[str, Any]:
    """A policy for bot's child of exactly ``target`` bytes of stored JSON (a long whitelist)."""
    names = [f"vendor-{i:05d}-" + "x" * 200 for i in range(target // 216 - 2)]  # 216 bytes each
    policy = daily(1, merchantRules={"whitelist": names}, parent="bot")  # as it is stored
    while (short := target - stored_size(policy)) >= 216 + 4:
        names.append(f"vendor-{len(names):05d}-" + "x" * 200)
    if short >= 4:  # one more name fills it: 2 bytes of quotes, 1 of comma
        names.append("y" * (short - 3))
    else:
        names[0] += "z" * short
    assert stored_size(policy) == target
    return policy


def store_state(backend: Backend) -> Any:
    """What the store holds (the memory store's shards that hold nothing left out)."""
    held = snapshot(backend)
    if backend.name == "memory":  # looking a new agent's shard up makes an empty one
        held["shards"] = {k: v for k, v in held["shards"].items() if any(v.values())}
    return held


def forbidden(engine: PolicyEngine, parent: str, child: str, policy: dict[str, Any]) -> str:
    with pytest.raises(ForbiddenError) as refused:
        engine.delegate(parent, child, policy, by_parent=True)
    assert refused.value.code == ErrorCode.FORBIDDEN
    return refused.value.message


# -- maxChildren ---------------------------------------------------------------------------------


def test_an_agent_delegates_at_most_max_children_budgets_and_a_refusal_writes_nothing(
    backend: Backend,
) -> None:
    engine, _ = tree(backend)
    engine.set_policy("bot", delegating(maxChildren=3))
    for i in range(3):
        engine.delegate("bot", f"bot/{i}", daily(1), by_parent=True)
    before = store_state(backend)
    message = forbidden(engine, "bot", "bot/3", daily(1))
    assert "3 budget(s) below bot" in message
    assert "maxChildren" in message
    assert store_state(backend) == before  # nothing placed, counted or recorded
    assert engine.get_policy("bot/3") is None
    assert engine.delegation("bot/3") is None
    assert engine.authorize(payment(1, agent_id="bot/3")).code == "NO_POLICY"

    assert engine.delegate("bot", "bot/0", daily(2), by_parent=True)  # not a new child
    assert engine.get_policy("bot/0").version == 2  # type: ignore[union-attr]
    engine.revoke("bot/1", by="bot")  # a revoked child keeps its slot: its versions stay
    forbidden(engine, "bot", "bot/3", daily(1))

    engine.delegate("bot", "bot/by-admin", daily(1))  # an administrator's is not counted
    engine.set_policy("bot", delegating(maxChildren=4))  # nor limited: it raises the cap
    engine.delegate("bot", "bot/3", daily(1), by_parent=True)
    forbidden(engine, "bot", "bot/4", daily(1))


def test_an_agent_whose_policy_sets_no_max_children_may_delegate_100(backend: Backend) -> None:
    engine, _ = tree(backend)
    engine.set_policy("bot", delegating())
    assert DEFAULT_MAX_CHILDREN == 100
    for i in range(DEFAULT_MAX_CHILDREN):
        engine.delegate("bot", f"bot/{i}", {}, by_parent=True)
    forbidden(engine, "bot", "bot/100", {})
    assert engine.get_policy("bot/100") is None


def test_budgets_delegated_below_an_agent_made_budget_count_up_to_the_administrators_budget(
    backend: Backend,
) -> None:
    """An agent chooses its sub-agents' maxChildren, so theirs cannot lift its own quota."""
    engine, _ = tree(backend)
    engine.set_policy("bot", delegating(maxDepth=2, maxChildren=3))
    kid = delegating(50, maxChildren=MAX_CHILDREN)
    engine.delegate("bot", "bot/kid", kid, by_parent=True)
    engine.delegate("bot/kid", "bot/kid/a", daily(1), by_parent=True)
    engine.delegate("bot/kid", "bot/kid/b", daily(1), by_parent=True)
    message = forbidden(engine, "bot/kid", "bot/kid/c", daily(1))
    assert "below bot " in message  # bot's quota, not bot/kid's 100,000
    assert engine.get_policy("bot/kid/c") is None

    engine.set_policy("org", delegating(maxDepth=2, maxChildren=5))
    engine.delegate("org", "org/team", delegating(50, maxChildren=1))  # an administrator's
    engine.delegate("org/team", "org/team/a", daily(1), by_parent=True)
    message = forbidden(engine, "org/team", "org/team/b", daily(1))
    assert "below org/team " in message  # the administrator set org/team's quota: it binds


# -- versions ----------------------------------------------------------------------------------


def test_an_agent_writes_at_most_ten_versions_per_child_slot_and_old_versions_stay_readable(
    backend: Backend,
) -> None:
    engine, clock = tree(backend)
    engine.set_policy("bot", delegating(maxChildren=1))
    most = DELEGATED_VERSIONS_PER_CHILD
    paid = []
    for version in range(1, most + 1):
        engine.delegate("bot", "bot/kid", daily(version % 3 + 1), by_parent=True)
        d = engine.authorize(payment(1, agent_id="bot/kid"))
        paid.append((d.reservation_id, version))
        clock.advance(minutes=1)
    before = store_state(backend)
    message = forbidden(engine, "bot", "bot/kid", daily(1))
    assert f"{most} policy versions below bot" in message
    assert store_state(backend) == before
    assert engine.get_policy("bot/kid").version == most  # type: ignore[union-attr]
    # every decision still names a version that is there to read
    versions = {r.reservation_id: r.policy_version for r in engine.history("bot/kid", 1000)
                if r.event == "decision"}  # fmt: skip
    for reservation, version in paid:
        assert versions[reservation] == version
        assert engine.get_policy_version("bot/kid", version).version == version

    engine.set_policy("bot", delegating(maxChildren=2))  # 20 in all, 10 written
    for _ in range(most):
        engine.delegate("bot", "bot/kid", daily(1), by_parent=True)
    forbidden(engine, "bot", "bot/other", daily(1))  # a slot of children left, no version
    engine.delegate("bot", "bot/kid", daily(1))  # an administrator still may
    assert engine.get_policy("bot/kid").version == 2 * most + 1  # type: ignore[union-attr]


# -- size ----------------------------------------------------------------------------------------


def test_a_policy_an_agent_delegates_is_at_most_64_kib_and_a_larger_one_writes_nothing(
    backend: Backend,
) -> None:
    engine, _ = tree(backend)
    engine.set_policy("bot", delegating(maxChildren=2))
    assert MAX_DELEGATED_POLICY_BYTES == 65_536
    engine.delegate("bot", "bot/full", sized(MAX_DELEGATED_POLICY_BYTES), by_parent=True)
    before = store_state(backend)
    too_big = sized(MAX_DELEGATED_POLICY_BYTES + 1)
    for child in ("bot/new", "bot/full"):  # a new child, and a new version of one
        with pytest.raises(PolicyValidationError) as refused:
            engine.delegate("bot", child, too_big, by_parent=True)
        assert refused.value.code == ErrorCode.INVALID_INPUT
        assert refused.value.path == "$.policy"
        assert "65,537 bytes" in refused.value.message
    assert store_state(backend) == before
    assert engine.get_policy("bot/new") is None
    assert engine.get_policy("bot/full").version == 1  # type: ignore[union-attr]
    engine.delegate("bot", "bot/new", daily(1), by_parent=True)  # its slot was not used

    engine.delegate("bot", "bot/admin", too_big)  # an administrator's may be larger


def test_the_probes_2_mb_policies_are_refused_at_once() -> None:
    """The probe's attack: 20 delegations of 2.4 MB policies used to add 84 MB to a store."""
    storage = MemoryStorage()
    engine = PolicyEngine(storage=storage, clock=ManualClock(T0))
    engine.set_policy("bot", delegating())
    huge = daily(1, merchantRules={"whitelist": [f"v{i:05d}" + "x" * 234 for i in range(10_000)]})
    assert stored_size(huge) > 2_000_000
    for i in range(20):
        with pytest.raises(PolicyValidationError):
            engine.delegate("bot", f"bot/{i}", huge, by_parent=True)
    assert engine.get_policy("bot/0") is None


# -- two at once ---------------------------------------------------------------------------------


def race(backend: Backend, clock: ManualClock, calls: list[tuple[str, str, Any]]) -> list[Any]:
    """Run each ``delegate(parent, child, policy, by_parent=True)`` on its own thread and engine."""
    engines = [backend.engine(clock) for _ in calls]
    start = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        parent, child, policy = calls[i]
        start.wait()
        try:
            results[i] = engines[i].delegate(parent, child, policy, by_parent=True)
        except PolicyError as err:
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads of one process take turns often: their steps interleave
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    return results


def test_delegations_at_once_never_both_take_the_last_child_slot(backend: Backend) -> None:
    engine, clock = tree(backend)
    engine.set_policy("bot", delegating(maxChildren=3))
    engine.delegate("bot", "bot/0", daily(1), by_parent=True)
    engine.delegate("bot", "bot/1", daily(1), by_parent=True)
    results = race(backend, clock, [("bot", f"bot/r{i}", daily(1)) for i in range(8)])
    made = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, ForbiddenError)]
    assert (len(made), len(refused)) == (1, 7), results
    children = [f"bot/r{i}" for i in range(8)]
    assert sum(engine.get_policy(c) is not None for c in children) == 1
    forbidden(engine, "bot", "bot/late", daily(1))


def test_delegations_at_once_never_both_write_the_last_version(backend: Backend) -> None:
    engine, clock = tree(backend)
    engine.set_policy("bot", delegating(maxChildren=1))
    for _ in range(DELEGATED_VERSIONS_PER_CHILD - 1):
        engine.delegate("bot", "bot/kid", daily(1), by_parent=True)
    results = race(backend, clock, [("bot", "bot/kid", daily(2)) for _ in range(8)])
    made = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, ForbiddenError)]
    assert (len(made), len(refused)) == (1, 7), results
    current = engine.get_policy("bot/kid")
    assert current is not None
    assert current.version == DELEGATED_VERSIONS_PER_CHILD
    assert len(engine.policy_versions("bot/kid")) == DELEGATED_VERSIONS_PER_CHILD


# -- the policy field and the agent-role MCP tool -----------------------------------------------


def test_max_children_is_a_checked_field_of_the_policy_and_its_schema() -> None:
    rules = load_policy({"delegation": {"allowed": True}}).delegation
    assert rules is not None
    assert rules.max_children == DEFAULT_MAX_CHILDREN
    loaded = load_policy({"delegation": {"allowed": True, "maxChildren": 7}})
    assert dump_policy(loaded)["delegation"] == {"allowed": True, "maxDepth": 1, "maxChildren": 7}
    for bad in (0, MAX_CHILDREN + 1, True, "5", 2.0, None):
        with pytest.raises(PolicyValidationError) as refused:
            load_policy({"delegation": {"maxChildren": bad}})
        assert refused.value.path == "$.delegation.maxChildren"
    field = policy_schema()["$defs"]["DelegationRules"]["properties"]["maxChildren"]
    assert field == {"type": "integer", "minimum": 1, "maximum": MAX_CHILDREN, "default": 100}


def test_the_agent_role_delegate_tool_is_refused_past_the_quota() -> None:
    storage = MemoryStorage()
    clock = ManualClock(T0)
    admin = AgentPolicyMcpServer(storage=storage, clock=clock, role="admin")
    admin.engine.set_policy("bot", delegating(maxChildren=1))
    bot = AgentPolicyMcpServer(storage=storage, clock=clock, agent_id="bot")

    def call(args: dict[str, Any]) -> dict[str, Any]:
        import asyncio

        result: dict[str, Any] = asyncio.run(bot.handle_tool_call("agent_policy_delegate", args))
        return result

    assert call({"childId": "bot/a", "policy": daily(1)})["success"] is True
    refused = call({"childId": "bot/b", "policy": daily(1)})
    assert refused["success"] is False
    assert refused["error"]["code"] == "FORBIDDEN"
    assert "maxChildren" in refused["error"]["message"]
    big = call({"childId": "bot/a", "policy": sized(MAX_DELEGATED_POLICY_BYTES + 1)})
    assert big["error"]["code"] == "INVALID_INPUT"
    assert big["error"]["path"] == "$.policy"
    admin.close()
    bot.close()
