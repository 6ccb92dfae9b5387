"""The governed agent as attacker, through every surface it pays through: the agent-role MCP
tools, the payment guard, the x402 hooks and the pydantic-ai capability.

Each test says what was tried; the ones for a defect that was fixed say so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ToolCallPart
from x402 import x402ClientSync
from x402.mechanisms.evm.exact import ExactEvmClientScheme
from x402.schemas import (
    PaymentRequired,
    PaymentRequirements,
    PaymentResponseContext,
    SettleResponse,
)

import agentpolicy.x402
from agentpolicy import AsyncPolicyEngine, PaymentDenied, PaymentRequest, PolicyEngine
from agentpolicy.mcp import AgentPolicyMcpServer
from agentpolicy.pydantic_ai import GuardedTools
from agentpolicy.testing import ManualClock, payment
from agentpolicy.x402 import X402Guard, guard_x402
from tests.test_pydantic_ai import POLICY, USDC, scripted, spent_and_reserved, text_of
from tests.x402_servers import NETWORK, PAY_TO, PRICE, CountingSigner
from tests.x402_servers import USDC as USDC_ON_BASE_SEPOLIA

ON_BASE = {"recipient": "0xa", "network": "eip155:8453"}


def servers(
    policy: dict[str, Any], clock: ManualClock | None = None
) -> tuple[AgentPolicyMcpServer, AgentPolicyMcpServer]:
    """An admin server and an agent-role server bound to ``bot``, on one engine."""
    admin = AgentPolicyMcpServer(
        role="admin", clock=clock or ManualClock(), reservation_ttl=timedelta(minutes=5)
    )
    assert admin.call("agent_policy_set", {"agentId": "bot", "policy": policy})["success"]
    return admin, AgentPolicyMcpServer(role="agent", engine=admin.engine, agent_id="bot")


def daily(engine: PolicyEngine, agent: str = "bot") -> tuple[int, int]:
    window = engine.budget(agent, "daily").periods["daily"]
    return window.spent.value, window.reserved.value


# --- the agent-role MCP tools ----------------------------------------------------------------


@pytest.mark.parametrize(
    "amount",
    [" 100", "100 ", "1e2", "\u0661\u0660\u0660", "\u00b2", "-0", "+5", "1_0", "0", "", "0x10",
     "100\n", "10\x00", "1" * 1025, 100, -1, 1.0, True, None, [], {}],
)  # fmt: skip
def test_an_odd_amount_through_the_agent_tools_is_a_structured_refusal_that_holds_nothing(
    amount: object,
) -> None:
    admin, agent = servers({"limits": {"daily": {"value": "1000"}}})
    for tool in ("agent_policy_authorize", "agent_policy_check"):
        result = agent.call(tool, {"amount": amount, **ON_BASE})
        assert result["success"] is False
        assert result["error"]["code"] == "INVALID_INPUT"
        assert result["error"]["path"] == "$.amount"
        assert "Traceback" not in json.dumps(result)
    assert daily(admin.engine) == (0, 0)


def test_the_agent_tools_take_no_argument_that_changes_policy_votes_or_identity() -> None:
    admin, agent = servers(
        {"limits": {"daily": {"value": "1000"}},
         "approvalConfig": {"thresholds": [{"amount": {"value": "500"}, "requiredApprovers": 1,
                                            "approvers": ["boss@x"]}]}}
    )  # fmt: skip
    engine = admin.engine
    before = engine.get_policy("bot")
    tries: list[tuple[str, dict[str, Any], str]] = [
        ("agent_policy_authorize", {"amount": "1", **ON_BASE, "agentId": "other"}, "FORBIDDEN"),
        ("agent_policy_authorize", {"amount": "1", **ON_BASE, "requestedBy": "boss@x"},
         "INVALID_INPUT"),
        ("agent_policy_authorize", {"amount": "1", **ON_BASE, "holder": "x"}, "INVALID_INPUT"),
        ("agent_policy_authorize", {"amount": "1", **ON_BASE, "policy": {}}, "INVALID_INPUT"),
        ("agent_policy_set", {"agentId": "bot", "policy": {}}, "FORBIDDEN"),
        ("agent_policy_approvals_decide", {"approvalId": "apr_x", "decision": "approve",
                                           "approver": "boss@x"}, "FORBIDDEN"),
        ("agent_policy_approvers_register", {"name": "bot", "publicKey": "ed25519:x"},
         "FORBIDDEN"),
        ("agent_policy_shadow_promote", {"agentId": "bot", "force": True}, "FORBIDDEN"),
        ("agent_policy_confirm", {"reservationId": "res_x", "holder": "h"}, "INVALID_INPUT"),
        ("agent_policy_delegate", {"childId": "bot", "policy": {}}, "FORBIDDEN"),
        ("agent_policy_revoke", {"childId": "other/x", "parentId": "other"}, "FORBIDDEN"),
    ]  # fmt: skip
    for tool, arguments, code in tries:
        result = agent.call(tool, arguments)
        assert (result["success"], result["error"]["code"]) == (False, code), (tool, result)
    assert engine.get_policy("bot") == before
    assert daily(engine) == (0, 0)
    assert engine.list_approvals("bot") == []


def test_the_agent_settles_its_reservations_only_as_the_ledger_allows() -> None:
    """Confirm twice, release after confirm, confirm after release or expiry, another agent's
    reservation, a sent one, an approval's hold: each answer is the documented one."""
    clock = ManualClock()
    admin, agent = servers(
        {"limits": {"daily": {"value": "2000"}},
         "approvalConfig": {"thresholds": [{"amount": {"value": "500"}, "requiredApprovers": 1,
                                            "approvers": ["boss@x"]}]}}, clock
    )  # fmt: skip
    engine = admin.engine
    engine.set_policy("other", {"limits": {"daily": {"value": "1000"}}})
    theirs = engine.authorize(payment(5, agent_id="other")).reservation_id or ""

    def call(tool: str, rid: str) -> tuple[bool, str | None]:
        result = agent.call(tool, {"reservationId": rid})
        data = result.get("data") or {}
        return result["success"], (result.get("error") or {}).get("code") or data.get("status")

    def authorize(amount: str) -> str:
        data = agent.call("agent_policy_authorize", {"amount": amount, **ON_BASE})["data"]
        return str(data.get("reservationId") or data.get("approvalId"))

    assert call("agent_policy_confirm", theirs) == (False, "RESERVATION_NOT_FOUND")
    assert call("agent_policy_release", theirs) == (False, "RESERVATION_NOT_FOUND")
    paid = authorize("100")
    assert call("agent_policy_confirm", paid) == (True, "confirmed")
    assert call("agent_policy_confirm", paid) == (True, "confirmed")
    assert call("agent_policy_release", paid) == (False, "RESERVATION_ALREADY_CONFIRMED")
    given_back = authorize("200")
    assert call("agent_policy_release", given_back) == (True, "released")
    assert call("agent_policy_release", given_back) == (True, "released")
    assert call("agent_policy_confirm", given_back) == (False, "RESERVATION_RELEASED")
    late = authorize("200")
    sent = authorize("300")
    engine.mark_sent(sent)
    assert call("agent_policy_release", sent) == (False, "FORBIDDEN")
    held = authorize("500")
    assert held.startswith("apr_")
    assert call("agent_policy_confirm", held) == (False, "RESERVATION_NOT_FOUND")
    assert call("agent_policy_release", held) == (False, "RESERVATION_NOT_FOUND")
    assert daily(engine) == (100, 200 + 300 + 500)
    assert daily(engine, "other") == (0, 5)  # untouched by the agent's tries
    clock.advance(minutes=5)
    assert call("agent_policy_confirm", late) == (False, "RESERVATION_EXPIRED")
    assert call("agent_policy_release", late) == (True, "expired")
    assert call("agent_policy_release", sent) == (True, "expired")  # expired sent: spent
    assert daily(engine) == (100 + 300, 500)


def test_an_idempotency_key_answers_again_only_the_same_payment() -> None:
    admin, agent = servers({"limits": {"daily": {"value": "1000"}}})
    first = agent.call("agent_policy_authorize", {"amount": "100", **ON_BASE,
                                                  "idempotencyKey": "k"})["data"]  # fmt: skip
    for change in ({"amount": "101"}, {"recipient": "0xb"}, {"network": "eip155:1"},
                   {"decimals": 7}, {"category": "ads"}, {"symbol": "USDC"}):  # fmt: skip
        result = agent.call(
            "agent_policy_authorize", {"amount": "100", **ON_BASE, "idempotencyKey": "k", **change}
        )
        assert result["error"]["code"] == "IDEMPOTENCY_CONFLICT", change
    for same in ({"amount": "0100"}, {"memo": "again"}):
        result = agent.call(
            "agent_policy_authorize", {"amount": "100", **ON_BASE, "idempotencyKey": "k", **same}
        )
        assert result["data"]["reservationId"] == first["reservationId"], same
    assert daily(admin.engine) == (0, 100)


def test_agent_tool_calls_from_many_threads_never_overspend_one_budget() -> None:
    admin, agent = servers({"limits": {"daily": {"value": "1000"}}})
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def pay() -> None:
        for _ in range(10):
            result = agent.call("agent_policy_authorize", {"amount": "30", **ON_BASE})
            if result["data"]["allowed"]:
                agent.call(
                    "agent_policy_confirm", {"reservationId": result["data"]["reservationId"]}
                )
            with lock:
                answers.append(result)

    threads = [threading.Thread(target=pay) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    allowed = [a for a in answers if a["data"]["allowed"]]
    assert len(answers) == 60
    assert len(allowed) == 33  # 33 * 30 = 990 <= 1000 < 34 * 30
    assert {a["data"]["code"] for a in answers if not a["data"]["allowed"]} == {"DAILY_LIMIT"}
    assert daily(admin.engine) == (990, 0)


# --- the pydantic-ai capability --------------------------------------------------------------


def test_a_retried_guarded_tool_call_is_told_it_was_paid_already_not_denied_as_allowed() -> None:
    """Defect (fixed): a guarded tool whose builder sets an idempotency key (an order id), called
    again by the model after it paid, was refused with ``payment denied (ALLOWED): every check
    passed``: the refusal named the first decision, which allowed it, and not why nothing ran
    (RESERVATION_ALREADY_CONFIRMED). The model read a denial that said it was allowed."""

    def order(args: dict[str, Any]) -> PaymentRequest:
        return PaymentRequest("bot", args["price"], "0xvendor", "eip155:8453", decimals=6,
                              symbol="USDC", idempotency_key=f"order-{args['order']}")  # fmt: skip

    call = {"order": "7", "price": 2 * USDC}
    model, seen = scripted(
        [ToolCallPart("buy", call, tool_call_id="1")], [ToolCallPart("buy", call, tool_call_id="2")]
    )
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", POLICY)
    bought: list[str] = []

    async def main() -> None:
        async with AsyncPolicyEngine.from_engine(engine) as aengine:
            agent: Agent[None, str] = Agent(
                model, capabilities=[GuardedTools(aengine, {"buy": order})]
            )

            @agent.tool_plain
            def buy(order: str, price: int) -> str:
                bought.append(order)
                return "bought"

            await agent.run("buy order 7")

    asyncio.run(main())
    assert bought == ["7"]
    assert spent_and_reserved(engine) == (2 * USDC, 0)
    told = text_of(seen[1][0])
    assert "RESERVATION_ALREADY_CONFIRMED" in told
    assert "ALLOWED" not in told.replace("ALREADY_CONFIRMED", "")
    assert "denied" not in told


# --- the payment guard -----------------------------------------------------------------------


def test_a_guarded_block_that_raises_gives_back_exactly_what_it_held() -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("agent-1", {"limits": {"daily": {"value": "1000"}}})
    for exc in (ValueError("boom"), KeyboardInterrupt(), SystemExit(3)):
        with pytest.raises(type(exc)), engine.payment(payment(400)):
            raise exc
    with engine.payment(payment(400)) as p:
        pass
    with pytest.raises(PaymentDenied) as denied, engine.payment(payment(601)):
        pytest.fail("a denied block ran")
    assert denied.value.decision.code == "DAILY_LIMIT"
    assert p.reservation is not None
    assert p.reservation.status == "confirmed"
    assert daily(engine, "agent-1") == (400, 0)


# --- the x402 hooks --------------------------------------------------------------------------


class FarLapsingScheme(ExactEvmClientScheme):
    """Signs as x402's exact EVM scheme, with an authorization valid until a 12-digit instant
    past year 9999 (a wallet's "never lapses")."""

    def create_payment_payload(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        inner: dict[str, Any] = super().create_payment_payload(*args, **kwargs)
        inner["authorization"]["validBefore"] = "999999999999"
        return inner


def x402_client(
    engine: PolicyEngine, scheme: type[ExactEvmClientScheme] = ExactEvmClientScheme
) -> tuple[x402ClientSync, X402Guard]:
    engine.set_policy(
        "bot", {"limits": {"daily": {"value": str(10 * PRICE), "decimals": 6, "symbol": "USDC"}}}
    )
    client = x402ClientSync()
    client.register(NETWORK, scheme(CountingSigner()))
    return client, guard_x402(client, engine, "bot")


REQUIREMENTS = PaymentRequirements(
    scheme="exact", network=NETWORK, asset=USDC_ON_BASE_SEPOLIA, amount=str(PRICE),
    pay_to=PAY_TO, max_timeout_seconds=300, extra={"name": "USDC", "version": "2"},
)  # fmt: skip


def pay_and_settle(client: x402ClientSync, before_answer: Callable[[], object] = list) -> None:
    """Sign a payment of the offer, then answer it as a seller that settled it."""
    payload = client.create_payment_payload(PaymentRequired(x402_version=2, accepts=[REQUIREMENTS]))
    before_answer()
    settled = SettleResponse(success=True, transaction="0x01", network=NETWORK)
    client.handle_payment_response(
        PaymentResponseContext(
            payment_payload=payload, requirements=REQUIREMENTS, settle_response=settled
        )
    )


def test_a_payload_valid_past_year_9999_is_sent_and_settled_not_held_unsent() -> None:
    """Defect (fixed): a signed EIP-3009 authorization whose ``validBefore`` is a 12-digit
    instant past year 9999 made the guard's after hook raise ``ValueError`` (year out of range)
    after it had marked the payment sent: x402 never sent it, yet its reservation stayed held
    and would have counted as spent at its TTL; and the payload could never be confirmed."""
    engine = PolicyEngine(clock=ManualClock())
    client, guard = x402_client(engine, FarLapsingScheme)
    pay_and_settle(client)
    assert guard.unconfirmed == []
    assert guard.unsettled == []
    assert daily(engine) == (PRICE, 0)


def test_settled_payments_whose_confirm_failed_are_kept_to_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defect (fixed): ``X402Guard.unconfirmed`` was documented to keep its last 10,000 entries,
    as ``unsettled`` does, but grew without bound: a store down for a long while (or a seller
    that answers after every reservation expired) filled the agent process's memory, one
    entry per payment."""
    monkeypatch.setattr(agentpolicy.x402, "_MAX_OPEN", 3)
    clock = ManualClock()
    engine = PolicyEngine(clock=clock, reservation_ttl=timedelta(minutes=5))
    client, guard = x402_client(engine)
    for _ in range(5):  # the seller answers once the reservation has expired: confirm fails
        pay_and_settle(client, lambda: clock.advance(minutes=5))
    assert len(guard.unconfirmed) == 3
    assert {u.error.split()[-1] for u in guard.unconfirmed} == {"expired"}
    assert daily(engine) == (5 * PRICE, 0)  # each was marked sent: spent when it expired


def test_an_entry_cancelled_on_a_repeated_key_leaves_the_other_blocks_payment_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Defect (fixed): a guarded block cancelled while its authorize ran, on an idempotency key
    another block was paying with right now, then tried to release that block's reservation:
    the claim refused it, and the operator read an ERROR with a traceback ("releasing a
    reservation after a cancelled entry failed") for a payment that was never this entry's.
    Now a repeated key's reservation is released only if this entry could claim it."""
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("agent-1", {"limits": {"daily": {"value": "1000"}}})
    request = payment(400, idempotency_key="order-1")

    async def main() -> None:
        aengine = AsyncPolicyEngine.from_engine(engine)
        async with aengine.payment(request) as first:
            gate, asked = asyncio.Event(), asyncio.Event()
            authorize = aengine.authorize

            async def slow(*args: Any, **kwargs: Any) -> Any:
                asked.set()
                await gate.wait()
                return await authorize(*args, **kwargs)

            aengine.authorize = slow  # type: ignore[method-assign]

            async def retry() -> None:
                async with aengine.payment(request):
                    pytest.fail("a second block ran on the same key")

            task = asyncio.create_task(retry())
            await asyncio.wait_for(asked.wait(), 5)
            task.cancel()
            gate.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert engine.get_reservation(first.reservation_id).status == "reserved"
        await aengine.close()  # waits for the background give-back of the cancelled entry
        assert first.reservation is not None
        assert first.reservation.status == "confirmed"

    with caplog.at_level(logging.WARNING, logger="agentpolicy"):
        asyncio.run(main())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert daily(engine, "agent-1") == (400, 0)


@pytest.mark.parametrize("key", [None, "order-2"])
def test_an_entry_cancelled_during_its_authorize_gives_back_what_it_reserved(
    key: str | None,
) -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("agent-1", {"limits": {"daily": {"value": "1000"}}})

    async def main() -> None:
        aengine = AsyncPolicyEngine.from_engine(engine)
        gate, asked = asyncio.Event(), asyncio.Event()
        authorize = aengine.authorize

        async def slow(*args: Any, **kwargs: Any) -> Any:
            asked.set()
            await gate.wait()
            return await authorize(*args, **kwargs)

        aengine.authorize = slow  # type: ignore[method-assign]

        async def pay() -> None:
            async with aengine.payment(payment(400, idempotency_key=key)):
                pytest.fail("a cancelled entry ran its block")

        task = asyncio.create_task(pay())
        await asyncio.wait_for(asked.wait(), 5)
        task.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await aengine.close()

    asyncio.run(main())
    assert daily(engine, "agent-1") == (0, 0)


def test_guarded_blocks_of_four_engines_on_one_sqlite_file_never_overspend(tmp_path: Path) -> None:
    """Four engines (as four processes would) share one budget through one SQLite file, each
    running guarded blocks in its own thread: first ten each, every other one raising after it
    was allowed (far below the limit), then as many as the budget allows."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    clock = ManualClock()
    PolicyEngine(storage=url, clock=clock).set_policy(
        "agent-1", {"limits": {"daily": {"value": "1000"}}}
    )
    outcomes: list[str] = []
    lock = threading.Lock()
    together = threading.Barrier(4)

    def block(fails: bool) -> None:
        if fails:
            raise RuntimeError("the payment failed")

    def attempt(engine: PolicyEngine, fails: bool) -> str:
        try:
            with engine.payment(payment(30)):
                block(fails)
        except PaymentDenied as err:
            return str(err.decision.code)
        except RuntimeError:
            return "failed"
        return "paid"

    def pay() -> None:
        engine = PolicyEngine(storage=url, clock=clock)
        together.wait()
        mine = [attempt(engine, i % 2 == 1) for i in range(10)]
        together.wait()
        while (outcome := attempt(engine, False)) == "paid":
            mine.append(outcome)
        mine.append(outcome)
        with lock:
            outcomes.extend(mine)

    threads = [threading.Thread(target=pay) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("failed") == 4 * 5
    assert outcomes.count("DAILY_LIMIT") == 4
    assert outcomes.count("paid") == 33  # 33 * 30 = 990; failed blocks gave theirs back
    assert len(outcomes) == 20 + 33 + 4
    assert daily(PolicyEngine(storage=url, clock=clock), "agent-1") == (990, 0)
