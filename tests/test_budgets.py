"""Shared budgets on every store: parents, fleets, delegation, revocation, trees on one shard."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings

from agentpolicy import (
    AgentPolicy,
    Amount,
    Code,
    ConflictError,
    ErrorCode,
    ForbiddenError,
    NotFoundError,
    PaymentDenied,
    PolicyEngine,
    PolicyValidationError,
    evaluate,
)
from agentpolicy.policy import MAX_TREE_DEPTH, SpendingLimits
from agentpolicy.rules import assess, judge
from agentpolicy.testing import ManualClock, payment
from tests import strategies
from tests.backends import Backend

U = 1_000_000
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def daily(units: int, **more: Any) -> dict[str, Any]:
    return {"limits": {"daily": {"value": str(units * U)}}, **more}


def tree(backend: Backend, **kw: Any) -> tuple[PolicyEngine, ManualClock]:
    clock = ManualClock(T0)
    return backend.engine(clock, **kw), clock


def used(engine: PolicyEngine, agent: str) -> tuple[int, int]:
    w = engine.budget(agent, "daily").periods["daily"]  # type: ignore[index]
    return w.spent.value, w.reserved.value


# -- a fleet: siblings share a parent ------------------------------------------------------------


def test_siblings_draw_on_their_parent_and_the_decision_names_the_budget_that_denied(
    backend: Backend,
) -> None:
    engine, _ = tree(backend)
    engine.set_policy("fleet", daily(100))
    for bot in ("bot-1", "bot-2"):
        engine.set_policy(bot, daily(60, parent="fleet"))
    assert engine.authorize(payment(50 * U, agent_id="bot-1")).allowed
    assert engine.authorize(payment(50 * U, agent_id="bot-2")).allowed
    d = engine.authorize(payment(1 * U, agent_id="bot-2"))
    assert (d.code, d.budget_id) == (Code.DAILY_LIMIT, "fleet")
    assert d.reason.startswith("budget fleet: daily limit 100 USDT: used 100 USDT")
    failed = [e.name for e in d.evaluations if e.failed]
    assert failed == ["budget[fleet].daily_limit"]
    own = engine.authorize(payment(11 * U, agent_id="bot-1"))
    assert (own.code, own.budget_id) == (Code.DAILY_LIMIT, "bot-1")  # its own limit first
    assert used(engine, "fleet") == (0, 100 * U)


def test_a_parent_and_a_child_limit_both_bind(backend: Backend) -> None:
    engine, _ = tree(backend)
    engine.set_policy("team", daily(100))
    engine.set_policy("bot", daily(30, parent="team"))
    engine.set_policy("other", daily(1000, parent="team"))
    assert engine.authorize(payment(30 * U, agent_id="bot")).allowed
    assert engine.authorize(payment(1, agent_id="bot")).budget_id == "bot"  # the child's limit
    assert engine.authorize(payment(70 * U, agent_id="other")).allowed
    d = engine.authorize(payment(1, agent_id="other"))
    assert (d.code, d.budget_id) == (Code.DAILY_LIMIT, "team")  # the parent's limit


def test_the_parents_rules_apply_to_a_childs_payments(backend: Backend) -> None:
    engine, _ = tree(backend)
    engine.set_policy("fleet", {**daily(100), "merchantRules": {"blacklist": ["0xbad"]},
                                "networkRules": {"allowedNetworks": ["eip155:8453"]}})  # fmt: skip
    engine.set_policy("bot", daily(10, parent="fleet"))
    d = engine.authorize(payment(1, agent_id="bot", recipient="0xbad"))
    assert (d.code, d.budget_id) == (Code.RECIPIENT_BLOCKED, "fleet")
    d = engine.authorize(payment(1, agent_id="bot", network="eip155:1"))
    assert (d.code, d.budget_id) == (Code.NETWORK_NOT_ALLOWED, "fleet")
    engine.set_policy("fleet", {**daily(100), "enabled": False})
    d = engine.authorize(payment(1, agent_id="bot"))
    assert (d.code, d.budget_id) == (Code.POLICY_DISABLED, "fleet")


def test_a_three_level_tree_counts_every_payment_at_every_level_and_undoes_it_everywhere(
    backend: Backend,
) -> None:
    engine, clock = tree(backend, reservation_ttl=timedelta(minutes=5))
    engine.set_policy("org", daily(1000))
    engine.set_policy("team", daily(500, parent="org"))
    engine.set_policy("bot", daily(100, parent="team"))
    confirmed = engine.authorize(payment(10 * U, agent_id="bot"))
    released = engine.authorize(payment(20 * U, agent_id="bot"))
    expiring = engine.authorize(payment(30 * U, agent_id="bot"))
    for level in ("bot", "team", "org"):
        assert used(engine, level) == (0, 60 * U), level
    engine.confirm(confirmed.reservation_id or "")
    engine.release(released.reservation_id or "")
    for level in ("bot", "team", "org"):
        assert used(engine, level) == (10 * U, 30 * U), level
    clock.advance(minutes=5)
    for level in ("org", "team", "bot"):  # the root's budget alone frees the expired one
        assert used(engine, level) == (10 * U, 0), level
    assert engine.get_reservation(expiring.reservation_id or "").status == "expired"
    b = engine.budget("bot")
    assert [a.agent_id for a in b.ancestors] == ["team", "org"]
    assert b.ancestors[1].periods["daily"].remaining.value == 990 * U  # type: ignore[index]


def test_an_expired_reservation_of_one_sibling_frees_the_parent_for_another(
    backend: Backend,
) -> None:
    engine, clock = tree(backend, reservation_ttl=timedelta(minutes=5))
    engine.set_policy("fleet", daily(100))
    engine.set_policy("a", daily(100, parent="fleet"))
    engine.set_policy("b", daily(100, parent="fleet"))
    assert engine.authorize(payment(100 * U, agent_id="a")).allowed  # never confirmed
    assert engine.authorize(payment(1, agent_id="b")).budget_id == "fleet"
    clock.advance(minutes=5)  # a's reservation is due; nobody swept, a made no call
    assert engine.authorize(payment(100 * U, agent_id="b")).allowed


def test_a_childs_payment_needs_the_approvals_of_every_budget_whose_threshold_it_meets(
    backend: Backend,
) -> None:
    engine, _ = tree(backend)
    fleet_approvals = {"thresholds": [{"amount": {"value": str(50 * U)}, "requiredApprovers": 1,
                                       "approvers": ["cfo@acme.com"]}]}  # fmt: skip
    bot_approvals = {"thresholds": [{"amount": {"value": str(20 * U)}, "requiredApprovers": 1,
                                     "approvers": ["lead@acme.com", "ops@acme.com"]}]}  # fmt: skip
    engine.set_policy("fleet", daily(1000, approvalConfig=fleet_approvals))
    engine.set_policy("bot", daily(1000, parent="fleet", approvalConfig=bot_approvals))
    small = engine.authorize(payment(30 * U, agent_id="bot"))  # the bot's threshold only
    assert (small.code, small.budget_id) == (Code.APPROVAL_REQUIRED, "bot")
    assert engine.get_approval(small.approval_id or "").groups == ()
    big = engine.authorize(payment(60 * U, agent_id="bot"))  # both thresholds
    approval = engine.get_approval(big.approval_id or "")
    assert [(g.name, g.required) for g in approval.groups] == [("bot", 1), ("fleet", 1)]
    assert used(engine, "fleet") == (0, 90 * U)  # both held at every level
    approval = engine.decide(approval.id, "lead@acme.com", "approve")
    assert approval.status == "pending"  # the fleet's group has not approved
    with pytest.raises(ForbiddenError):
        engine.decide(approval.id, "someone@else.com", "approve")
    approval = engine.decide(approval.id, "cfo@acme.com", "approve")
    assert approval.status == "approved"
    engine.confirm(approval.reservation_id or "")
    engine.decide(small.approval_id or "", "ops@acme.com", "deny")
    assert used(engine, "fleet") == (60 * U, 0)
    assert used(engine, "bot") == (60 * U, 0)


def test_the_parents_threshold_alone_asks_the_parents_approvers(backend: Backend) -> None:
    engine, _ = tree(backend)
    engine.set_policy("fleet", daily(1000, approvalConfig={"thresholds": [
        {"amount": {"value": str(50 * U)}, "requiredApprovers": 1, "approvers": ["cfo"]}],
        "timeout": 600_000}))  # fmt: skip
    engine.set_policy("bot", daily(1000, parent="fleet"))
    d = engine.authorize(payment(60 * U, agent_id="bot"))
    assert (d.code, d.budget_id) == (Code.APPROVAL_REQUIRED, "fleet")
    approval = engine.get_approval(d.approval_id or "")
    assert approval.approvers == ("cfo",)
    assert approval.expires_at == T0 + timedelta(minutes=10)  # the fleet's timeout


def test_no_budget_above_the_payer_votes_on_its_payment(backend: Backend) -> None:
    """An agent listed as an approver cannot approve its own spending through a budget below it.

    It is refused on its own payment; a sub-budget it delegated (the
    agent-role ``delegate`` tool) must not be a way around that: the
    budgets above the payer asked for the payment too.
    """
    engine, _ = tree(backend, link_secret="q" * 40)
    approvals = {"thresholds": [{"amount": {"value": str(100 * U)}, "requiredApprovers": 1,
                                 "approvers": ["ops@acme.com", "cfo@acme.com"]}]}  # fmt: skip
    engine.set_policy("ops@acme.com", daily(1000, approvalConfig=approvals,
                                            delegation={"allowed": True}))  # fmt: skip
    engine.delegate("ops@acme.com", "ops@acme.com/x", {})
    engine.set_policy("ops@acme.com/x/y", daily(1000, parent="ops@acme.com/x"))
    for payer, above in (("ops@acme.com/x", ("ops@acme.com",)),
                         ("ops@acme.com/x/y", ("ops@acme.com/x", "ops@acme.com"))):  # fmt: skip
        d = engine.authorize(payment(500 * U, agent_id=payer))
        assert (d.code, d.budget_id) == (Code.APPROVAL_REQUIRED, "ops@acme.com")
        approval = engine.get_approval(d.approval_id or "")
        assert approval.budgets_above == above
        assert {link.approver for link in engine.approval_links(approval.id)} == {"cfo@acme.com"}
        with pytest.raises(ForbiddenError) as refused:
            engine.decide(approval.id, "OPS@acme.com", "approve")
        assert refused.value.code == ErrorCode.APPROVER_NOT_AUTHORIZED
        assert engine.get_approval(approval.id).votes == ()  # nothing changed
        assert engine.decide(approval.id, "cfo@acme.com", "approve").status == "approved"


# -- refused when set ---------------------------------------------------------------------


def test_a_missing_parent_a_cycle_and_a_tree_too_deep_are_refused_when_set(
    backend: Backend,
) -> None:
    engine, _ = tree(backend)
    with pytest.raises(PolicyValidationError) as missing:
        engine.set_policy("bot", daily(1, parent="nobody"))
    assert missing.value.problems[0].path == "$.policy.parent"
    assert engine.get_policy("bot") is None
    engine.set_policy("a", daily(1))
    engine.set_policy("b", daily(1, parent="a"))
    engine.set_policy("c", daily(1, parent="b"))
    for agent, parent in (("a", "c"), ("a", "a"), ("b", "c")):
        with pytest.raises(PolicyValidationError, match="cycle"):
            engine.set_policy(agent, daily(1, parent=parent))
    chain = ["c"]
    for i in range(MAX_TREE_DEPTH - 3):  # a, b, c and five more: eight levels
        engine.set_policy(f"d{i}", daily(1, parent=chain[-1]))
        chain.append(f"d{i}")
    assert engine.authorize(payment(1, agent_id=chain[-1])).allowed
    with pytest.raises(PolicyValidationError, match=f"more than {MAX_TREE_DEPTH} budgets"):
        engine.set_policy("too-deep", daily(1, parent=chain[-1]))
    engine.set_policy("top", daily(1, parent="a"))  # lives with a's tree ...
    engine.set_policy("top", daily(1))  # ... and no longer hangs below a
    with pytest.raises(PolicyValidationError, match="more than"):  # top above a: nine levels
        engine.set_policy("a", daily(1, parent="top"))
    assert engine.get_policy("a").version == 1  # type: ignore[union-attr]


def test_an_agent_with_a_budget_of_its_own_cannot_move_into_another_tree(
    backend: Backend,
) -> None:
    engine, _ = tree(backend)
    engine.set_policy("fleet", daily(100))
    engine.set_policy("loner", daily(10))
    with pytest.raises(ConflictError) as refused:
        engine.set_policy("loner", daily(10, parent="fleet"))
    assert refused.value.code == ErrorCode.BUDGET_CONFLICT
    engine.set_policy("bot", daily(10, parent="fleet"))
    engine.set_policy("bot", daily(10))  # leaving the parent keeps it in the tree's shard
    assert engine.authorize(payment(10 * U, agent_id="bot")).allowed
    assert used(engine, "fleet") == (0, 0)
    engine.set_policy("bot", daily(20, parent="fleet"))  # and it may come back
    engine.set_policy("team", daily(50, parent="fleet"))
    engine.set_policy("bot", daily(20, parent="team"))  # moving within the tree is fine
    assert engine.authorize(payment(5 * U, agent_id="bot")).allowed
    assert used(engine, "team") == (0, 5 * U)


def test_reparenting_with_open_reservations_undoes_them_where_they_were_counted(
    backend: Backend,
) -> None:
    engine, _ = tree(backend)
    engine.set_policy("fleet", daily(100))
    engine.set_policy("team", daily(100, parent="fleet"))
    engine.set_policy("bot", daily(100, parent="fleet"))
    d = engine.authorize(payment(40 * U, agent_id="bot"))
    engine.set_policy("bot", daily(100, parent="team"))
    engine.release(d.reservation_id or "")
    assert used(engine, "fleet") == (0, 0)
    assert used(engine, "team") == (0, 0)


# -- delegation -----------------------------------------------------------------------------


def research(engine: PolicyEngine, **delegation: Any) -> None:
    engine.set_policy("research", daily(20, delegation={"allowed": True, **delegation}))


def test_a_delegated_budget_is_capped_by_its_parent_and_ends_when_it_expires(
    backend: Backend,
) -> None:
    engine, clock = tree(backend, reservation_ttl=timedelta(minutes=30))
    research(engine)
    grant = engine.delegate("research", "browse", daily(5), expires_at=T0 + timedelta(hours=1),
                            by_parent=True)  # fmt: skip
    assert (grant.parent_id, grant.expires_at) == ("research", T0 + timedelta(hours=1))
    assert engine.get_policy("browse").policy.parent == "research"  # type: ignore[union-attr]
    for agent in ("research", "browse"):
        d = engine.authorize(payment(4 * U, agent_id=agent))
        engine.confirm(d.reservation_id or "")
    clock.advance(minutes=45)
    late = engine.authorize(payment(1, agent_id="browse"))
    assert late.allowed
    assert late.expires_at == T0 + timedelta(minutes=75)  # its whole TTL, past the grant's end
    engine.set_policy("research", daily(8, delegation={"allowed": True}))  # the parent shrinks
    d = engine.authorize(payment(1, agent_id="browse"))
    assert (d.code, d.budget_id) == (Code.DAILY_LIMIT, "research")  # capped at every payment
    clock.advance(minutes=15)
    d = engine.authorize(payment(1, agent_id="browse"))
    assert (d.code, d.budget_id) == (Code.DELEGATION_EXPIRED, "browse")
    assert engine.get_reservation(late.reservation_id or "").status == "reserved"
    assert used(engine, "research") == (8 * U, 1)  # the payment may be under way: still held
    clock.advance(minutes=15)
    assert engine.get_reservation(late.reservation_id or "").status == "expired"
    assert used(engine, "research") == (8 * U, 0)


def test_a_delegation_that_ends_at_once_gives_back_nothing_a_child_is_paying(
    backend: Backend,
) -> None:
    """A parent agent cannot make its child's payments free by ending the delegation early."""
    engine, clock = tree(backend)
    research(engine)
    engine.delegate("research", "research/shop", daily(5),
                    expires_at=T0 + timedelta(seconds=1), by_parent=True)  # fmt: skip
    with engine.payment(payment(5 * U, agent_id="research/shop")):
        clock.advance(seconds=30)  # the payment takes longer than the delegation lasts
        assert used(engine, "research") == (0, 5 * U)  # still held in the parent
        assert engine.authorize(payment(16 * U, agent_id="research")).code == Code.DAILY_LIMIT
    assert used(engine, "research") == (5 * U, 0)  # confirmed after the end: counted as spent
    assert engine.authorize(payment(16 * U, agent_id="research")).code == Code.DAILY_LIMIT
    d = engine.authorize(payment(1, agent_id="research/shop"))
    assert (d.code, d.budget_id) == (Code.DELEGATION_EXPIRED, "research/shop")


def test_the_parent_agent_cannot_change_or_extend_a_delegation_an_administrator_made(
    backend: Backend,
) -> None:
    engine, clock = tree(backend)
    research(engine)
    whitelisted = daily(5, merchantRules={"whitelist": ["0xgood"]})
    engine.delegate("research", "browse", whitelisted, expires_at=T0 + timedelta(hours=1))
    with pytest.raises(ForbiddenError) as refused:  # the agent-role `delegate` tool
        engine.delegate("research", "browse", daily(20), by_parent=True)
    assert refused.value.code == ErrorCode.FORBIDDEN
    assert engine.get_policy("browse").version == 1  # type: ignore[union-attr]
    d = engine.authorize(payment(U, agent_id="browse", recipient="0xevil"))
    assert d.code == Code.RECIPIENT_NOT_WHITELISTED
    clock.advance(hours=1)
    with pytest.raises(ForbiddenError):  # nor revive it once it ended
        engine.delegate("research", "browse", whitelisted, by_parent=True)
    assert engine.authorize(payment(1, agent_id="browse")).code == Code.DELEGATION_EXPIRED
    # an administrator still changes it; the parent agent may still end it
    engine.delegate("research", "browse", whitelisted, expires_at=T0 + timedelta(hours=2))
    assert engine.authorize(payment(1, agent_id="browse", recipient="0xgood")).allowed
    assert engine.revoke("browse", by="research").revoked_at is not None
    # a delegation the agent made itself stays the agent's to change
    engine.delegate("research", "fetch", daily(2), by_parent=True)
    engine.delegate("research", "fetch", daily(3), by_parent=True)
    assert engine.get_policy("fetch").version == 2  # type: ignore[union-attr]


def test_many_budgets_below_an_agent_never_lock_its_administrator_out(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budgets an agent delegates cannot stop an administrator changing the tree above."""
    from agentpolicy.ledger import trees

    monkeypatch.setattr(trees, "_MAX_SUBTREE", 5)  # 100,000 in earnest: 16 s to delegate
    engine, _ = tree(backend)
    engine.set_policy("acme", daily(1000))
    engine.set_policy("fleet", daily(500, parent="acme"))
    engine.set_policy("bot", daily(100, parent="fleet", delegation={"allowed": True,
                                                                    "maxDepth": 2}))  # fmt: skip
    for i in range(6):
        engine.delegate("bot", f"bot/{i}", daily(1, delegation={"allowed": True}),
                        by_parent=True)  # fmt: skip
    engine.delegate("bot/0", "bot/0/a", daily(1), by_parent=True)
    assert engine.set_policy("bot", daily(50, parent="fleet", enabled=False)) == 2
    assert engine.set_policy("fleet", daily(400, parent="acme")) == 2
    assert engine.authorize(payment(1, agent_id="bot")).code == Code.POLICY_DISABLED
    engine.set_policy("elsewhere", daily(1000, parent="acme"))
    with pytest.raises(PolicyValidationError) as moved:  # moving it would need the count
        engine.set_policy("bot", daily(50, parent="elsewhere"))
    assert "cannot be moved" in moved.value.problems[0].message


def test_a_delegation_that_promises_more_than_the_parent_has_is_refused(
    backend: Backend,
) -> None:
    engine, _ = tree(backend)
    research(engine)
    with pytest.raises(PolicyValidationError) as refused:
        engine.delegate("research", "browse", {"limits": {
            "daily": {"value": str(50 * U)}, "perTransaction": {"value": "1"}}})  # fmt: skip
    assert [p.path for p in refused.value.problems] == ["$.policy.limits.daily"]
    assert engine.get_policy("browse") is None
    with pytest.raises(PolicyValidationError, match="expiresAt"):
        engine.delegate("research", "browse", daily(1), expires_at=T0)


@pytest.mark.parametrize("window", ["60m", "1h", "3600s"])
def test_a_delegated_count_is_capped_whatever_its_window_is_called(window: str) -> None:
    engine = PolicyEngine(clock=ManualClock(T0))
    engine.set_policy("research", {"limits": {"counts": [{"window": "60m", "max": 3}]},
                                   "delegation": {"allowed": True}})  # fmt: skip
    with pytest.raises(PolicyValidationError) as refused:
        engine.delegate("research", "browse",
                        {"limits": {"counts": [{"window": window, "max": 9}]}})  # fmt: skip
    assert [p.path for p in refused.value.problems] == ["$.policy.limits.counts[0]"]
    engine.delegate("research", "browse", {"limits": {"counts": [{"window": window, "max": 3}]}})


def test_a_delegated_budget_cannot_be_raised_past_its_parent_by_set_policy_or_promotion(
    backend: Backend,
) -> None:
    engine, _ = tree(backend)
    research(engine)
    engine.delegate("research", "browse", daily(5))
    raised = daily(50, parent="research")
    with pytest.raises(PolicyValidationError) as refused:
        engine.set_policy("browse", raised)
    assert [p.path for p in refused.value.problems] == ["$.policy.limits.daily"]
    engine.set_shadow_policy("browse", raised)  # a shadow only judges: it may
    with pytest.raises(PolicyValidationError):
        engine.promote_shadow_policy("browse")  # but it is not promoted past the parent
    assert engine.get_policy("browse").version == 1  # type: ignore[union-attr]
    assert engine.set_policy("browse", daily(20, parent="research")) == 2  # up to the parent's


APPROVE_ABOVE_1 = {"thresholds": [{"amount": {"value": str(U)}, "requiredApprovers": 1,
                                   "approvers": ["lead@x"]}]}  # fmt: skip


def test_an_approval_is_not_approved_after_its_delegation_was_shortened_and_ended(
    backend: Backend,
) -> None:
    engine, clock = tree(backend)
    research(engine)
    shop = daily(5, approvalConfig=APPROVE_ABOVE_1)
    engine.delegate("research", "shop", shop, expires_at=T0 + timedelta(hours=10))
    d = engine.authorize(payment(3 * U, agent_id="shop"))
    assert d.requires_approval
    engine.delegate("research", "shop", shop, expires_at=T0 + timedelta(minutes=5))  # shortened
    clock.advance(minutes=10)
    assert engine.authorize(payment(1, agent_id="shop")).code == Code.DELEGATION_EXPIRED
    with pytest.raises(ConflictError) as refused:
        engine.decide(d.approval_id or "", "lead@x", "approve")
    assert refused.value.code == ErrorCode.BUDGET_CONFLICT
    approval = engine.get_approval(d.approval_id or "")
    assert (approval.status, approval.votes) == ("pending", ())  # nothing changed
    assert engine.decide(d.approval_id or "", "lead@x", "deny").status == "denied"
    assert used(engine, "research") == (0, 0)


def test_an_approved_reservation_ends_when_the_shortened_delegation_ends(
    backend: Backend,
) -> None:
    engine, clock = tree(backend, reservation_ttl=timedelta(hours=1))
    research(engine)
    shop = daily(5, approvalConfig=APPROVE_ABOVE_1)
    engine.delegate("research", "shop", shop, expires_at=T0 + timedelta(hours=10))
    d = engine.authorize(payment(3 * U, agent_id="shop"))
    engine.delegate("research", "shop", shop, expires_at=T0 + timedelta(minutes=30))
    clock.advance(minutes=10)
    approved = engine.decide(d.approval_id or "", "lead@x", "approve")
    reservation = engine.get_reservation(approved.reservation_id or "")
    assert reservation.expires_at == T0 + timedelta(minutes=30)  # nobody pays with it yet
    clock.advance(minutes=20)  # a block resuming the approved payment after the end
    late_payment = engine.payment(payment(3 * U, agent_id="shop"), approval_id=d.approval_id)
    with pytest.raises(PaymentDenied) as late, late_payment:
        pytest.fail("the block ran after the delegation ended")  # pragma: no cover
    assert late.value.code == ErrorCode.RESERVATION_EXPIRED
    assert used(engine, "research") == (0, 0)  # given back: nothing was paid with it


def test_an_approved_payment_a_block_began_keeps_its_whole_ttl_past_the_delegations_end(
    backend: Backend,
) -> None:
    """Claimed (or marked sent) before the end, its payment may be under way: it keeps counting."""
    engine, clock = tree(backend, reservation_ttl=timedelta(hours=1))
    research(engine)
    shop = daily(5, approvalConfig=APPROVE_ABOVE_1)
    engine.delegate("research", "shop", shop, expires_at=T0 + timedelta(minutes=30))
    resumed = engine.authorize(payment(3 * U, agent_id="shop"))
    sent = engine.authorize(payment(2 * U, agent_id="shop"))
    for d in (resumed, sent):
        engine.decide(d.approval_id or "", "lead@x", "approve")
    rid = engine.get_approval(sent.approval_id or "").reservation_id or ""
    assert engine.mark_sent(rid).expires_at == T0 + timedelta(hours=1)
    with engine.payment(payment(3 * U, agent_id="shop"), approval_id=resumed.approval_id) as p:
        assert engine.get_reservation(p.reservation_id).expires_at == T0 + timedelta(hours=1)
        clock.advance(minutes=45)  # past the delegation's end, within the TTL
        assert used(engine, "research") == (0, 5 * U)  # both still held in the parent
        assert engine.authorize(payment(16 * U, agent_id="research")).code == Code.DAILY_LIMIT
    assert used(engine, "research") == (3 * U, 2 * U)  # confirmed; the sent one still counts
    clock.advance(minutes=20)
    assert used(engine, "research") == (5 * U, 0)  # expired unsettled after it was sent: spent


def test_an_approved_payment_cannot_begin_after_a_delegation_end_moved_earlier(
    backend: Backend,
) -> None:
    engine, clock = tree(backend, reservation_ttl=timedelta(hours=1))
    research(engine)
    shop = daily(5, approvalConfig=APPROVE_ABOVE_1)
    engine.delegate("research", "shop", shop, expires_at=T0 + timedelta(minutes=30),
                    by_parent=True)  # fmt: skip
    d = engine.authorize(payment(3 * U, agent_id="shop"))
    engine.decide(d.approval_id or "", "lead@x", "approve")
    engine.delegate("research", "shop", shop, expires_at=T0 + timedelta(minutes=5),
                    by_parent=True)  # fmt: skip
    clock.advance(minutes=10)
    assert engine.authorize(payment(1, agent_id="shop")).code == Code.DELEGATION_EXPIRED
    resumed = engine.payment(payment(3 * U, agent_id="shop"), approval_id=d.approval_id)
    with pytest.raises(PaymentDenied) as late, resumed:
        pytest.fail("the block ran after the delegation ended")  # pragma: no cover
    assert late.value.code == ErrorCode.RESERVATION_EXPIRED
    rid = engine.get_approval(d.approval_id or "").reservation_id or ""
    with pytest.raises(ConflictError) as refused:
        engine.mark_sent(rid)
    assert refused.value.code == ErrorCode.RESERVATION_EXPIRED
    assert used(engine, "research") == (0, 3 * U)  # nothing changed: held until its end
    clock.advance(minutes=20)
    assert used(engine, "research") == (0, 0)


@pytest.mark.parametrize("backend", ["redis", "redis-cluster", "postgres"], indirect=True)
def test_a_claim_between_a_sweeps_scan_and_its_read_keeps_the_whole_ttl(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a store without one lock, a block's claim can land inside another process's sweep."""
    from agentpolicy.ledger import runner
    from agentpolicy.ledger.tallies import MAX_SCORE

    engine, clock = tree(backend, reservation_ttl=timedelta(hours=1))
    research(engine)
    engine.delegate("research", "shop", daily(5, approvalConfig=APPROVE_ABOVE_1),
                    expires_at=T0 + timedelta(minutes=30))  # fmt: skip
    d = engine.authorize(payment(3 * U, agent_id="shop"))
    engine.decide(d.approval_id or "", "lead@x", "approve")
    rid = engine.get_approval(d.approval_id or "").reservation_id or ""
    # the block's process reads its clock 1 ms before the delegation's end; the sweeper's at it
    other = backend.engine(ManualClock(T0 + timedelta(minutes=30, milliseconds=-1)),
                           reservation_ttl=timedelta(hours=1))  # fmt: skip
    clock.advance(minutes=30)
    scan, claimed = runner.View.scan, []

    def claim_inside(view: runner.View, index: str, upto: int, limit: int) -> Any:
        found = scan(view, index, upto, limit)
        if index.startswith("o/") and upto < MAX_SCORE and found and not claimed:
            claimed.append(other.claim(rid, "block"))  # commits between the scan and the read
        return found

    monkeypatch.setattr(runner.View, "scan", claim_inside)
    swept = engine.sweep()
    monkeypatch.setattr(runner.View, "scan", scan)
    assert claimed[0].expires_at == T0 + timedelta(hours=1)
    assert rid not in [r.id for r in swept.reservations]
    assert engine.get_reservation(rid).status == "reserved"
    assert used(engine, "research") == (0, 3 * U)  # the block pays with it: still held
    clock.advance(minutes=30)
    assert engine.get_reservation(rid).status == "expired"  # at its whole TTL, and only then
    assert used(engine, "research") == (0, 0)


def test_revoking_keeps_an_approved_payment_that_was_marked_sent(backend: Backend) -> None:
    engine, _ = tree(backend)
    research(engine)
    engine.delegate("research", "shop", daily(5, approvalConfig=APPROVE_ABOVE_1))
    d = engine.authorize(payment(3 * U, agent_id="shop"))
    approved = engine.decide(d.approval_id or "", "lead@x", "approve")
    engine.mark_sent(approved.reservation_id or "")  # its payment left
    engine.revoke("shop", by="research")
    kept = engine.get_reservation(approved.reservation_id or "")
    assert kept.status == "reserved"
    assert used(engine, "research") == (0, 3 * U)  # still counted: the parent cannot spend it


def test_the_agent_may_delegate_only_when_its_policy_allows_and_only_so_deep(
    backend: Backend,
) -> None:
    engine, _ = tree(backend)
    engine.set_policy("plain", daily(20))
    with pytest.raises(ForbiddenError, match="does not let it delegate"):
        engine.delegate("plain", "sub", daily(1), by_parent=True)
    engine.delegate("plain", "sub", daily(1))  # an administrator may
    research(engine, maxDepth=2)
    engine.delegate("research", "child", daily(5, delegation={"allowed": True, "maxDepth": 5}),
                    by_parent=True)  # fmt: skip
    engine.delegate("child", "grandchild", daily(2, delegation={"allowed": True}), by_parent=True)
    with pytest.raises(ForbiddenError, match="at most 2 level"):
        engine.delegate("grandchild", "great", daily(1), by_parent=True)
    with pytest.raises(ConflictError) as taken:  # not a budget research delegated
        engine.delegate("research", "plain", daily(1), by_parent=True)
    assert taken.value.code == ErrorCode.BUDGET_CONFLICT
    with pytest.raises(ConflictError):
        engine.set_policy("child", daily(1))  # a delegated budget keeps its parent


def test_revoking_stops_every_payment_below_and_keeps_payments_under_way_counted(
    backend: Backend,
) -> None:
    engine, clock = tree(backend)
    research(engine)
    engine.set_policy("research", daily(20, delegation={"allowed": True, "maxDepth": 3},
                                        approvalConfig={"thresholds": [
        {"amount": {"value": str(4 * U)}, "requiredApprovers": 1, "approvers": ["boss"]}]}))  # fmt: skip
    engine.delegate("research", "browse", daily(10, delegation={"allowed": True}))
    engine.delegate("browse", "tab", daily(10))
    open_child = engine.authorize(payment(3 * U, agent_id="browse"))
    open_grandchild = engine.authorize(payment(2 * U, agent_id="tab"))
    held = engine.authorize(payment(4 * U, agent_id="tab"))
    assert held.code == Code.APPROVAL_REQUIRED
    assert used(engine, "research") == (0, 9 * U)
    with pytest.raises(ForbiddenError):
        engine.revoke("browse", by="tab")  # only a budget above may revoke
    revoked = engine.revoke("browse", by="research")
    assert revoked.revoked_at == T0
    for d in (open_child, open_grandchild):  # told to pay before the revocation: still counted
        assert engine.get_reservation(d.reservation_id or "").status == "reserved"
    assert engine.get_approval(held.approval_id or "").status == "expired"
    assert used(engine, "research") == (0, 5 * U)
    engine.confirm(open_child.reservation_id or "")  # the payment made counts
    assert used(engine, "research") == (3 * U, 2 * U)
    clock.advance(timedelta(minutes=6))  # the other was never paid: it expires, as any other
    assert used(engine, "research") == (3 * U, 0)
    for agent in ("browse", "tab"):
        d = engine.authorize(payment(1, agent_id=agent))
        assert (d.code, d.budget_id) == (Code.DELEGATION_REVOKED, "browse")
    assert engine.revoke("browse") == revoked  # again: nothing changes
    with pytest.raises(ConflictError, match="revoked"):
        engine.delegate("research", "browse", daily(1))
    with pytest.raises(NotFoundError) as not_delegated:
        engine.revoke("research")
    assert not_delegated.value.code == ErrorCode.DELEGATION_NOT_FOUND
    assert {"revoke", "confirm"} <= {h.event for h in engine.history("browse", 10)}


def test_revoking_releases_an_approved_payment_no_block_has_claimed(backend: Backend) -> None:
    """Approved before the revocation but not yet under way: the approval no longer pays."""
    engine, _ = tree(backend)
    research(engine)
    engine.set_policy("research", daily(20, delegation={"allowed": True},
                                        approvalConfig={"thresholds": [
        {"amount": {"value": str(4 * U)}, "requiredApprovers": 1, "approvers": ["boss"]}]}))  # fmt: skip
    engine.delegate("research", "browse", daily(10))
    unclaimed = engine.authorize(payment(4 * U, agent_id="browse"))
    claimed = engine.authorize(payment(5 * U, agent_id="browse"))
    for d in (unclaimed, claimed):
        engine.decide(d.approval_id or "", "boss", "approve")
    claimed_rid = engine.get_approval(claimed.approval_id or "").reservation_id or ""
    engine.claim(claimed_rid, "block-1")  # a block resumed it: under way
    engine.revoke("browse", by="research")
    unclaimed_rid = engine.get_approval(unclaimed.approval_id or "").reservation_id or ""
    assert engine.get_reservation(unclaimed_rid).status == "released"
    assert engine.get_reservation(claimed_rid).status == "reserved"
    assert used(engine, "research") == (0, 5 * U)
    with pytest.raises(ConflictError):
        engine.claim(unclaimed_rid, "block-2")


def test_an_idempotent_retry_after_a_revocation_answers_the_first_decision(
    backend: Backend,
) -> None:
    engine, _ = tree(backend)
    research(engine)
    engine.delegate("research", "browse", daily(5))
    first = engine.authorize(payment(1 * U, agent_id="browse", idempotency_key="k1"))
    engine.revoke("browse")
    again = engine.authorize(payment(1 * U, agent_id="browse", idempotency_key="k1"))
    assert (again.code, again.reservation_id) == (Code.ALLOWED, first.reservation_id)


# -- Redis Cluster: one tree, one hash tag --------------------------------------------------


def test_every_key_of_a_tree_shares_its_roots_hash_tag_on_redis(
    request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    import redis as redis_client

    from tests.backends import make_backend

    backend = make_backend("redis-cluster", tmp_path, request)
    engine, _ = tree(backend)
    engine.set_policy("fleet", daily(100))
    engine.set_policy("bot", daily(10, parent="fleet"))
    engine.delegate("bot", "sub", daily(5))
    for agent in ("bot", "sub"):
        assert engine.authorize(payment(1, agent_id=agent)).allowed
    prefix = backend.spec[1]  # type: ignore[index]
    client = redis_client.RedisCluster.from_url(backend.spec[0].replace("+cluster", ""))  # type: ignore[index]
    found = sorted(k.decode() for k in client.scan_iter(match=prefix + "*"))
    client.close()
    outside = [k for k in found if k.startswith(prefix + "{") and not k.startswith(prefix + "{fleet}:")
               and not k.startswith(prefix + "{@")]  # fmt: skip
    documents = [k for k in outside if ":#op:" not in k]  # (the pointers' own operation ids)
    assert documents == [prefix + "{bot}:t/bot", prefix + "{sub}:t/sub"]  # where each lives
    assert any(k.startswith(prefix + "{fleet}:h/sub") for k in found)
    engine.close()


# -- the pure core ------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    own=strategies.policies(),
    parent=strategies.policies(),
    request=strategies.requests(),
    used_own=strategies.usage_amounts(),
    used_parent=strategies.usage_amounts(),
)
def test_a_payment_passes_a_chain_only_if_it_passes_each_budget_alone(
    own: AgentPolicy,
    parent: AgentPolicy,
    request: Any,
    used_own: Amount,
    used_parent: Amount,
) -> None:
    now = T0
    a = assess(own, request, now, ancestors=[("fleet", parent, None)])
    windows = a.windows
    usage: dict[str, Any] = {}
    for book in a.every_book:
        for t in book.calendar.values():
            usage[t.usage_key] = used_own if t.owner is None else used_parent
    usage = {k: (v.value, v.decimals, 0) for k, v in usage.items()}
    together = judge(a, usage).decision()
    alone = evaluate(own, request, {w.key: used_own for w in windows}, now)
    parent_windows = assess(parent, request, now).windows
    above = evaluate(parent, request, {w.key: used_parent for w in parent_windows}, now)
    if together.allowed:
        assert alone.allowed
        assert above.allowed
    if alone.allowed and above.allowed:
        assert together.allowed
    if not alone.allowed and alone.code != Code.APPROVAL_REQUIRED:
        assert (together.code, together.budget_id) == (alone.code, request.agent_id)
    elif not above.allowed and above.code != Code.APPROVAL_REQUIRED and not alone.allowed:
        assert together.code in (Code.APPROVAL_REQUIRED, above.code)
    assert together.requires_approval == (
        not _denied(alone) and not _denied(above)
        and (alone.requires_approval or above.requires_approval)
    )  # fmt: skip


def _denied(d: Any) -> bool:
    return not d.allowed and d.code != Code.APPROVAL_REQUIRED


def test_limits_of_a_delegation_compare_kind_by_kind() -> None:
    from agentpolicy.ledger.trees import cap_problems

    parent = AgentPolicy(limits=SpendingLimits(daily=Amount(10 * U)))
    within = AgentPolicy(limits=SpendingLimits(daily=Amount(10 * U), hourly=Amount(50 * U)))
    assert cap_problems(within, parent) == []  # no hourly limit above: nothing to compare
    over = AgentPolicy(limits=SpendingLimits(daily=Amount(10_000_001, 6)))
    assert [p.path for p in cap_problems(over, parent)] == ["$.policy.limits.daily"]
    finer = AgentPolicy(limits=SpendingLimits(daily=Amount(10 * 10**18 // 10**6 * U, 18)))
    assert cap_problems(finer, parent) == []  # the same amount in finer units


# -- placing an agent in a tree -------------------------------------------------------------


def test_a_policy_refused_for_its_parent_leaves_the_agent_free_to_join_another_tree(
    backend: Backend,
) -> None:
    engine, _ = tree(backend)
    with pytest.raises(PolicyValidationError):
        engine.set_policy("bot", daily(1, parent="team"))  # no such budget yet
    engine.set_policy("fleet", daily(100))
    engine.set_policy("team", daily(50, parent="fleet"))  # team lives in fleet's tree
    engine.set_policy("bot", daily(10, parent="team"))
    assert engine.authorize(payment(1 * U, agent_id="bot")).allowed
    assert used(engine, "fleet") == (0, 1 * U)


def test_a_policy_written_to_a_stale_shard_goes_to_the_tree_the_agent_was_placed_in(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, clock = tree(backend)
    second = backend.engine(clock)
    first.set_policy("fleet", daily(100))
    stale = first._shard_now("bot")  # read before another engine places bot in fleet's tree
    second.set_policy("bot", daily(10, parent="fleet"))

    def shard(agent: str) -> Any:
        return stale if agent == "bot" else "fleet"
        yield  # a flow that asks the store nothing

    monkeypatch.setattr(first, "_shard", shard)
    first.set_policy("bot", daily(20))  # no parent: it stays in the tree it was placed in
    monkeypatch.undo()
    assert second.get_policy("bot").version == 2  # type: ignore[union-attr]
    d = second.authorize(payment(15 * U, agent_id="bot"))
    assert d.allowed


def test_a_parents_counts_rolling_window_and_scopes_count_every_childs_payment(
    backend: Backend,
) -> None:
    engine, _ = tree(backend)
    engine.set_policy("fleet", {
        "limits": {"counts": [{"window": "daily", "max": 3}],
                   "rolling": [{"window": "1h", "amount": {"value": str(100 * U)}}]},
        "scopedLimits": [{"name": "data", "match": {"categories": ["data"]}, "groupBy": "recipient",
                          "limits": {"daily": {"value": str(10 * U)}}}],
    })  # fmt: skip
    for bot in ("a", "b"):
        engine.set_policy(bot, daily(1000, parent="fleet"))
    assert engine.authorize(payment(6 * U, agent_id="a", category="data", recipient="0xv")).allowed
    d = engine.authorize(payment(5 * U, agent_id="b", category="data", recipient="0xv"))
    assert (d.code, d.budget_id) == (Code.SCOPED_LIMIT, "fleet")  # the fleet's vendor cap
    assert engine.authorize(payment(5 * U, agent_id="b", category="data", recipient="0xw")).allowed
    d = engine.authorize(payment(90 * U, agent_id="b"))
    assert (d.code, d.budget_id) == (Code.ROLLING_LIMIT, "fleet")  # 11 + 90 > 100 in the hour
    assert engine.authorize(payment(1 * U, agent_id="a")).allowed  # the third payment
    d = engine.authorize(payment(1 * U, agent_id="b"))
    assert (d.code, d.budget_id) == (Code.COUNT_LIMIT, "fleet")
    limits = {(x.kind, x.window, x.group): x for x in engine.budget("b").ancestors[0].limits}
    assert limits[("count", "daily", None)].count == 3
    assert (
        limits[("amount", "daily", "0xv")].spent.value
        + limits[("amount", "daily", "0xv")].reserved.value
        == 6 * U
    )


def test_open_reservations_counts_each_open_reservation_once_across_a_tree(
    backend: Backend,
) -> None:
    engine, _ = tree(backend)
    engine.set_policy("fleet", daily(100))
    engine.set_policy("bot", daily(50, parent="fleet"))
    engine.set_policy("loner", daily(50))
    assert engine.open_reservations() == 0
    kept = engine.authorize(payment(1 * U, agent_id="bot"))  # listed under bot and fleet
    engine.authorize(payment(1 * U, agent_id="bot"))
    engine.authorize(payment(1 * U, agent_id="loner"))
    assert engine.open_reservations() == 3
    engine.confirm(kept.reservation_id or "")
    assert engine.open_reservations() == 2
