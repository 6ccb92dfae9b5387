"""A payment marked sent: if nobody settles it, its reservation expires as spent, on every store.

Whoever sends a payment (the x402 guard, a payment block) marks its
reservation sent just before it leaves: from then on the payee may be paid
whether or not an answer comes, so an expiry must not give the amount back,
or a seller that settles without saying so is paid again every TTL.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agentpolicy import (
    AsyncPolicyEngine,
    ConflictError,
    ErrorCode,
    NotFoundError,
    PolicyEngine,
    PolicyValidationError,
    ReservationStatus,
)
from agentpolicy.ledger import state
from agentpolicy.ledger.state import SPENT_ON_EXPIRY, SPENT_ON_EXPIRY_DETAILS
from agentpolicy.testing import ManualClock, payment
from tests.backends import Backend

U = 1_000_000
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
TTL = timedelta(minutes=5)


def daily(units: int, **more: Any) -> dict[str, Any]:
    return {"limits": {"daily": {"value": str(units * U)}}, **more}


def used(engine: PolicyEngine, agent: str = "bot") -> tuple[int, int]:
    w = engine.budget(agent, "daily").periods["daily"]  # type: ignore[index]
    return w.spent.value, w.reserved.value


def reserve(engine: PolicyEngine, units: int, agent: str = "bot", **kw: Any) -> str:
    d = engine.authorize(payment(units * U, agent_id=agent), **kw)
    assert d.allowed, d.reason
    assert d.reservation_id is not None
    return d.reservation_id


def test_a_sent_reservation_that_expires_is_spent_and_an_unsent_one_is_given_back(
    backend: Backend,
) -> None:
    clock = ManualClock(T0)
    engine = backend.engine(clock)
    engine.set_policy("bot", daily(100))
    sent, unsent = reserve(engine, 30), reserve(engine, 20)
    marked = engine.mark_sent(sent)
    assert marked.sent_at == T0
    assert marked.status is ReservationStatus.RESERVED
    assert engine.get_reservation(unsent).sent_at is None
    clock.advance(TTL)
    assert used(engine) == (30 * U, 0)
    late = engine.get_reservation(sent)
    assert (late.status, late.sent_at) == (ReservationStatus.EXPIRED, T0)
    details = {h.reservation_id: h.detail for h in engine.history("bot", 2)}
    assert details == {sent: SPENT_ON_EXPIRY, unsent: None}
    assert {h.event for h in engine.history("bot", 2)} == {"expire"}
    # what is left is 70, not 100: the sent amount is never given back
    assert engine.authorize(payment(70 * U, agent_id="bot")).allowed
    assert engine.authorize(payment(1, agent_id="bot")).code == "DAILY_LIMIT"


def test_confirm_and_release_settle_a_sent_reservation_as_they_say(backend: Backend) -> None:
    clock = ManualClock(T0)
    engine = backend.engine(clock)
    engine.set_policy("bot", daily(100))
    confirmed, released = reserve(engine, 30), reserve(engine, 20)
    engine.mark_sent(confirmed)
    engine.mark_sent(released)
    assert engine.confirm(confirmed).status is ReservationStatus.CONFIRMED
    assert engine.release(released).status is ReservationStatus.RELEASED  # the seller refused
    clock.advance(TTL)
    assert used(engine) == (30 * U, 0)  # counted once, and the released amount is back
    assert engine.get_reservation(confirmed).status is ReservationStatus.CONFIRMED


def test_marking_again_changes_nothing(backend: Backend) -> None:
    clock = ManualClock(T0)
    engine = backend.engine(clock)
    engine.set_policy("bot", daily(100))
    rid = reserve(engine, 30)
    engine.mark_sent(rid)
    clock.advance(seconds=10)
    assert engine.mark_sent(rid).sent_at == T0
    assert [h.event for h in engine.history("bot")] == ["decision", "policy_set"]


def test_a_sent_child_payment_is_spent_in_its_parent_too(backend: Backend) -> None:
    """Expired through the parent's own expiry (a parent's authorize), not the child's."""
    clock = ManualClock(T0)
    engine = backend.engine(clock)
    engine.set_policy("fleet", daily(100))
    engine.set_policy("bot", daily(60, parent="fleet"))
    rid = reserve(engine, 50)
    engine.mark_sent(rid)
    clock.advance(TTL)
    assert engine.authorize(payment(51 * U, agent_id="fleet")).code == "DAILY_LIMIT"
    assert engine.authorize(payment(50 * U, agent_id="fleet")).allowed
    assert used(engine, "fleet") == (50 * U, 50 * U)
    assert used(engine, "bot") == (50 * U, 0)


def test_only_the_holder_of_a_claimed_reservation_marks_it_sent(backend: Backend) -> None:
    clock = ManualClock(T0)
    engine = backend.engine(clock)
    engine.set_policy("bot", daily(100))
    rid = reserve(engine, 30, holder="payer")
    with pytest.raises(ConflictError) as refused:  # the governed agent, say
        engine.mark_sent(rid, holder="someone-else")
    assert refused.value.code == ErrorCode.RESERVATION_CLAIMED
    with pytest.raises(ConflictError):
        engine.mark_sent(rid)
    assert engine.get_reservation(rid).sent_at is None
    assert engine.mark_sent(rid, holder="payer").sent_at == T0


@pytest.mark.parametrize(
    ("close", "code"),
    [
        ("confirm", ErrorCode.RESERVATION_ALREADY_CONFIRMED),
        ("release", ErrorCode.RESERVATION_RELEASED),
        ("expire", ErrorCode.RESERVATION_EXPIRED),
    ],
)
def test_a_closed_reservation_cannot_be_marked_and_is_not_changed(
    close: str, code: ErrorCode
) -> None:
    clock = ManualClock(T0)
    engine = PolicyEngine(clock=clock)
    engine.set_policy("bot", daily(100))
    rid = reserve(engine, 30)
    if close == "expire":
        clock.advance(TTL)
    else:
        getattr(engine, close)(rid)
    before = used(engine)
    with pytest.raises(ConflictError) as refused:
        engine.mark_sent(rid)
    assert refused.value.code == code
    assert used(engine) == before
    assert engine.get_reservation(rid).sent_at is None


def test_a_hold_for_a_pending_approval_or_a_bad_id_is_refused() -> None:
    engine = PolicyEngine(clock=ManualClock(T0))
    engine.set_policy("bot", {"approvalConfig": {"thresholds": [
        {"amount": {"value": "1"}, "requiredApprovers": 1, "approvers": ["alice"]}]}})  # fmt: skip
    d = engine.authorize(payment(5 * U, agent_id="bot"))
    assert d.code == "APPROVAL_REQUIRED"
    hold = engine.get_approval(d.approval_id or "").hold_id
    with pytest.raises(NotFoundError) as missing:  # not the agent's to pay with yet
        engine.mark_sent(hold)
    assert missing.value.code == ErrorCode.RESERVATION_NOT_FOUND
    with pytest.raises(PolicyValidationError) as bad:
        engine.mark_sent("res_\n")
    assert bad.value.path == "$.reservationId"
    with pytest.raises(PolicyValidationError) as bad:
        engine.mark_sent("res_648bac10968000000237f9d970d81f4e_bot", holder=" x")
    assert bad.value.path == "$.holder"


def test_a_replay_counts_a_sent_reservation_that_expired_as_spent() -> None:
    """simulate() of the live policy over the history changes no decision."""
    clock = ManualClock(T0)
    engine = PolicyEngine(clock=clock)
    policy = {"limits": {"counts": [{"window": "daily", "max": 2}]}}
    engine.set_policy("bot", policy)
    engine.mark_sent(reserve(engine, 1))
    clock.advance(TTL + timedelta(seconds=1))  # expires as spent: it still counts
    reserve(engine, 1)
    assert engine.authorize(payment(1, agent_id="bot")).code == "COUNT_LIMIT"
    report = engine.simulate("bot", policy, since=T0)
    assert not report.flips, report.changed


@pytest.mark.parametrize("detail", sorted(SPENT_ON_EXPIRY_DETAILS))
def test_a_replay_reads_every_wording_a_sent_expiry_was_recorded_with(
    detail: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """History written with the earlier wording of the detail replays as spent too."""
    monkeypatch.setattr(state, "SPENT_ON_EXPIRY", detail)  # what that version wrote
    clock = ManualClock(T0)
    engine = PolicyEngine(clock=clock)
    policy = {"limits": {"counts": [{"window": "daily", "max": 2}]}}
    engine.set_policy("bot", policy)
    engine.mark_sent(reserve(engine, 1))
    clock.advance(TTL + timedelta(seconds=1))
    reserve(engine, 1)
    assert [h.detail for h in engine.history("bot", 10) if h.event == "expire"] == [detail]
    assert engine.authorize(payment(1, agent_id="bot")).code == "COUNT_LIMIT"
    report = engine.simulate("bot", policy, since=T0)
    assert not report.flips, report.changed  # read as freed, the third payment would flip


# -- the payment block ---------------------------------------------------------------------------


class LostAnswerError(Exception):
    """The payee's answer never came: it may have been paid."""


def _pay_and_lose_the_answer(engine: PolicyEngine, mark: bool) -> None:
    with engine.payment(payment(30 * U, agent_id="bot")) as p:
        if mark:
            assert p.mark_sent().sent_at == T0
        raise LostAnswerError


def test_a_payment_block_that_raises_after_marking_holds_and_then_spends() -> None:
    clock = ManualClock(T0)
    engine = PolicyEngine(clock=clock)
    engine.set_policy("bot", daily(100))
    with pytest.raises(LostAnswerError) as raised:
        _pay_and_lose_the_answer(engine, mark=True)
    assert any("marked sent" in note for note in raised.value.__notes__)
    assert used(engine) == (0, 30 * U)  # held, not released
    clock.advance(TTL)
    assert used(engine) == (30 * U, 0)


def test_a_payment_block_that_raises_before_marking_still_releases() -> None:
    engine = PolicyEngine(clock=ManualClock(T0))
    engine.set_policy("bot", daily(100))
    with pytest.raises(LostAnswerError):
        _pay_and_lose_the_answer(engine, mark=False)
    assert used(engine) == (0, 0)


def test_an_async_payment_block_that_raises_after_marking_holds_and_then_spends() -> None:
    async def main() -> tuple[tuple[int, int], tuple[int, int]]:
        clock = ManualClock(T0)
        engine = AsyncPolicyEngine(clock=clock)
        await engine.set_policy("bot", daily(100))

        async def spent_reserved() -> tuple[int, int]:
            w = (await engine.budget("bot", "daily")).periods["daily"]  # type: ignore[index]
            return w.spent.value, w.reserved.value

        async def pay() -> None:
            async with engine.payment(payment(30 * U, agent_id="bot")) as p:
                await p.mark_sent()
                raise LostAnswerError

        with pytest.raises(LostAnswerError):
            await pay()
        held = await spent_reserved()
        clock.advance(TTL)
        after = await spent_reserved()
        await engine.close()
        return held, after

    assert asyncio.run(main()) == ((0, 30 * U), (30 * U, 0))


def test_an_engine_whose_clock_runs_ahead_cannot_make_a_payer_that_marks_sent_overspend(
    backend: Backend,
) -> None:
    """Each engine judges a TTL by its own clock: one running ahead by more than a reservation
    has left expires it early. A payer that marks sent before its payment leaves is safe both
    ways: marked first, the early expiry counts it as spent; expired first, marking is refused
    and nothing is sent."""
    clock = ManualClock(T0)
    payer = backend.engine(clock)
    payer.set_policy("bot", daily(100))
    ahead = backend.engine(ManualClock(T0 + timedelta(minutes=10)))  # past every TTL here
    marked_first = reserve(payer, 100)
    payer.mark_sent(marked_first)  # the payment leaves
    denied = ahead.authorize(payment(100 * U, agent_id="bot"))  # expires it early, as spent
    assert denied.code == "DAILY_LIMIT"
    assert used(payer) == (100 * U, 0)
    payer.set_policy("bot", daily(200))
    expired_first = reserve(payer, 100)
    assert ahead.authorize(payment(100 * U, agent_id="bot")).allowed  # it was given back early
    with pytest.raises(ConflictError) as refused:
        payer.mark_sent(expired_first)  # so the payer learns it before sending
    assert refused.value.code == ErrorCode.RESERVATION_EXPIRED
    assert used(payer) == (100 * U, 100 * U)  # 200 counted: what was sent, and the other's hold
