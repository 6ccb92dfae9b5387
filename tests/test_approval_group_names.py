"""Approver groups whose names collide across the budgets of a tree stay distinct groups.

A threshold without groups is one group named after its budget; a threshold
with groups names each group itself. So a sub-budget's group may carry the id
of a budget above it, and two levels may each have a group of one name. Each
such group must still need its own votes: a vote counts for a group only when
its approver is in that group, and no group's count is lost. Approvals stored
before groups had a budget (``[name, required, approvers]``, the name being the
budget) still read and tally the same way. Runs on every store.
"""

from __future__ import annotations

from typing import Any

import pytest

from agentpolicy import PolicyEngine
from agentpolicy.ledger import keys
from agentpolicy.storage.base import Txn
from agentpolicy.testing import ManualClock, payment
from tests.backends import Backend

U = 1_000_000


def threshold(amount: int, **rule: Any) -> dict[str, Any]:
    return {"approvalConfig": {"thresholds": [{"amount": {"value": str(amount * U)}, **rule}]}}


def limits(daily: int) -> dict[str, Any]:
    return {"limits": {"daily": {"value": str(daily * U)}}}


def group(name: str, approvers: list[str], required: int) -> dict[str, Any]:
    return {"name": name, "approvers": approvers, "required": required}


@pytest.fixture
def engine(backend: Backend) -> PolicyEngine:
    return backend.engine(ManualClock())


def held(engine: PolicyEngine, agent: str = "bot") -> str:
    d = engine.authorize(payment(500 * U, agent_id=agent))
    assert d.requires_approval, d
    assert d.approval_id is not None
    return d.approval_id


def groups_of(
    engine: PolicyEngine, approval_id: str
) -> list[tuple[str, int, tuple[str, ...], Any]]:
    return [
        (g.name, g.required, g.approvers, g.budget) for g in engine.get_approval(approval_id).groups
    ]


def votes(engine: PolicyEngine, approval_id: str, *approvers: str) -> list[str]:
    """The approval's status after each approver approves, in turn."""
    return [engine.decide(approval_id, a, "approve").status for a in approvers]


def test_a_child_group_named_after_the_budget_above_needs_its_own_votes(
    engine: PolicyEngine,
) -> None:
    # the fleet's threshold has no groups: one group named "fleet"; the bot names its group
    # "fleet" too. Two groups, each of 1: neither approver alone approves, in either order
    fleet = threshold(50, requiredApprovers=1, approvers=["cfo"])
    engine.set_policy("fleet", {**limits(10_000), **fleet})
    bot = threshold(100, groups=[group("fleet", ["alice"], 1)])
    engine.delegate("fleet", "bot", {**limits(5_000), **bot})
    first = held(engine)
    assert groups_of(engine, first) == [("fleet", 1, ("alice",), "bot"),
                                        ("fleet", 1, ("cfo",), "fleet")]  # fmt: skip
    assert engine.get_approval(first).required_approvers == 2
    assert votes(engine, first, "alice", "cfo") == ["pending", "approved"]
    second = held(engine)
    assert votes(engine, second, "cfo", "alice") == ["pending", "approved"]
    third = held(engine)
    assert votes(engine, third, "cfo") == ["pending"]
    assert engine.decide(third, "alice", "deny").status == "denied"  # the child's group denies


def test_groups_of_one_name_at_two_levels_each_need_their_own_count(
    engine: PolicyEngine,
) -> None:
    # the fleet's finance needs 2 of cfo, ctl, dan; the bot's Finance 1 of alice, cfo
    fleet = threshold(50, groups=[group("finance", ["cfo", "ctl", "dan"], 2)])
    engine.set_policy("fleet", {**limits(10_000), **fleet})
    bot = threshold(100, groups=[group("Finance", ["alice", "cfo"], 1)])
    engine.delegate("fleet", "bot", {**limits(5_000), **bot})
    first = held(engine)
    assert groups_of(engine, first) == [("Finance", 1, ("alice", "cfo"), "bot"),
                                        ("finance", 2, ("cfo", "ctl", "dan"), "fleet")]  # fmt: skip
    assert engine.get_approval(first).required_approvers == 3
    # alice's vote is the bot's only: with cfo's it fills the bot's group and 1 of the fleet's 2
    assert votes(engine, first, "alice", "cfo") == ["pending", "pending"]
    assert votes(engine, first, "ctl") == ["approved"]
    # the fleet's group filled by its own approvers leaves the bot's waiting
    second = held(engine)
    assert votes(engine, second, "ctl", "dan", "alice") == ["pending", "pending", "approved"]
    # an approver in both budgets' groups counts in both (docs/approvals.md)
    third = held(engine)
    assert votes(engine, third, "cfo", "ctl") == ["pending", "approved"]


def test_three_levels_each_named_after_the_level_above_keep_three_groups(
    engine: PolicyEngine,
) -> None:
    org = threshold(10, requiredApprovers=1, approvers=["ceo"])
    engine.set_policy("org", {**limits(10_000), **org})
    fleet = threshold(20, groups=[group("org", ["x"], 1)])
    engine.delegate("org", "fleet", {**limits(9_000), **fleet})
    bot = threshold(30, groups=[group("fleet", ["y"], 1)])
    engine.delegate("fleet", "bot", {**limits(5_000), **bot})
    aid = held(engine)
    assert groups_of(engine, aid) == [("fleet", 1, ("y",), "bot"), ("org", 1, ("x",), "fleet"),
                                      ("org", 1, ("ceo",), "org")]  # fmt: skip
    assert engine.get_approval(aid).budgets_above == ("fleet", "org")
    assert votes(engine, aid, "x", "y", "ceo") == ["pending", "pending", "approved"]
    again = held(engine)
    assert votes(engine, again, "ceo", "y", "x") == ["pending", "pending", "approved"]


def _rewrite(engine: PolicyEngine, approval_id: str, change: Any) -> None:
    """Replace a stored approval document by ``change(document)`` (an earlier version's)."""
    shard = engine._drive(engine._shard_of_id(approval_id))
    name = keys.approval(approval_id)
    with engine.storage.session(shard) as session:
        version, doc = session.get([name])[name]
        txn = Txn(f"rewrite-{approval_id}", 1)
        txn.expect[name] = version
        txn.put[name] = change(doc)
        assert session.commit(txn).applied


def test_an_approval_stored_with_groups_of_three_fields_reads_and_tallies_as_before(
    engine: PolicyEngine,
) -> None:
    # before approver groups (shared budgets, cd81d93), a tree's approval kept one group per
    # budget as [budget, required, approvers], and no budgets above ("up")
    fleet = threshold(50, requiredApprovers=1, approvers=["cfo"])
    engine.set_policy("fleet", {**limits(10_000), **fleet})
    bot = threshold(100, requiredApprovers=1, approvers=["alice"])
    engine.delegate("fleet", "bot", {**limits(5_000), **bot})

    def old(doc: dict[str, Any]) -> dict[str, Any]:
        assert doc["grp"] == [["bot", 1, ["alice"], "bot"], ["fleet", 1, ["cfo"], "fleet"]]
        kept = {k: v for k, v in doc.items() if k != "up"}
        return {**kept, "grp": [g[:3] for g in doc["grp"]]}

    first, second = held(engine), held(engine)
    for aid in (first, second):
        _rewrite(engine, aid, old)
        assert groups_of(engine, aid) == [("bot", 1, ("alice",), "bot"),
                                          ("fleet", 1, ("cfo",), "fleet")]  # fmt: skip
    assert votes(engine, first, "alice", "cfo") == ["pending", "approved"]
    assert votes(engine, second, "cfo", "alice") == ["pending", "approved"]
    assert engine.get_approval(first).reservation_id is not None


def test_the_command_line_names_the_budget_of_groups_named_alike(engine: PolicyEngine) -> None:
    """Two groups named "fleet" printed alike: the text output hid which budget each was."""
    import io

    from agentpolicy.cli_output import print_approval
    from agentpolicy.views import approval_data

    engine.set_policy("fleet", {**limits(10_000), **threshold(50, requiredApprovers=1,
                                                                approvers=["cfo"])})  # fmt: skip
    engine.delegate("fleet", "bot", {**limits(5_000),
                                     **threshold(100, groups=[group("fleet", ["alice"], 1)])})  # fmt: skip
    out = io.StringIO()
    print_approval(approval_data(engine.get_approval(held(engine))), out)
    assert "group fleet (budget bot): 1 of alice\n" in out.getvalue()
    assert "group fleet (budget fleet): 1 of cfo\n" in out.getvalue()
