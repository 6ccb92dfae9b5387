"""agentpolicy.pydantic_ai: a guarded tool runs only when the policy allows it (no network)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pydantic_ai import Agent, ModelRetry
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agentpolicy import (
    AsyncPolicyEngine,
    ErrorCode,
    PaymentRequest,
    PolicyEngine,
    PolicyValidationError,
)
from agentpolicy.guard import AsyncPaymentGuard
from agentpolicy.pydantic_ai import GuardedTools, current_payment
from agentpolicy.testing import ManualClock

USDC = 1_000_000
POLICY = {
    "limits": {"daily": {"value": str(10 * USDC), "decimals": 6, "symbol": "USDC"}},
    "approvalConfig": {"thresholds": [{"amount": {"value": str(50 * USDC), "decimals": 6,
                                                  "symbol": "USDC"},
                                       "requiredApprovers": 1, "approvers": ["cfo@x.com"]}]},
}  # fmt: skip


def purchase(args: dict[str, Any]) -> PaymentRequest:
    """The agent id and network come from our code; the model picks the report and price."""
    return PaymentRequest("bot", args["price"], "0xvendor", "eip155:8453", decimals=6,
                          symbol="USDC", memo=f"report {args['report']}")  # fmt: skip


def scripted(*turns: list[ToolCallPart]) -> tuple[FunctionModel, list[list[Any]]]:
    """A model that makes the given tool calls, one turn each, then answers; it records what
    it was told after each turn."""
    seen: list[list[Any]] = []

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        last = messages[-1]
        if isinstance(last, ModelRequest) and len(messages) > 1:
            seen.append(list(last.parts))
        step = len(seen)
        if step < len(turns):
            return ModelResponse(parts=list(turns[step]))
        return ModelResponse(parts=[TextPart("done")])

    return FunctionModel(model), seen


def make_agent(
    model: FunctionModel, aengine: AsyncPolicyEngine, tool: Callable[..., Any] | None = None
) -> tuple[Agent[None, str], list[str]]:
    bought: list[str] = []
    agent: Agent[None, str] = Agent(model, capabilities=[GuardedTools(aengine, {"buy": purchase})])

    @agent.tool_plain
    def buy(report: str, price: int) -> str:
        """Buy a report for `price` USDC base units."""
        if tool is not None:
            tool()
        bought.append(report)
        return f"bought {report}"

    @agent.tool_plain
    def weather(city: str) -> str:
        """Free weather."""
        return f"sunny in {city}"

    return agent, bought


def run(policy: dict[str, Any], body: Callable[[AsyncPolicyEngine], Any]) -> PolicyEngine:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", policy)

    async def main() -> None:
        async with AsyncPolicyEngine.from_engine(engine) as aengine:
            await body(aengine)

    asyncio.run(main())
    return engine


def spent_and_reserved(engine: PolicyEngine) -> tuple[int, int]:
    w = next(iter(engine.budget("bot").periods.values()))
    return w.spent.value, w.reserved.value


def text_of(part: Any) -> str:
    return str(getattr(part, "content", "") or getattr(part, "model_response", lambda: "")())


def test_an_allowed_tool_runs_and_is_confirmed_and_a_denied_one_never_runs() -> None:
    model, seen = scripted(
        [ToolCallPart("buy", {"report": "q1", "price": 6 * USDC}, tool_call_id="1")],
        [ToolCallPart("buy", {"report": "q2", "price": 6 * USDC}, tool_call_id="2"),
         ToolCallPart("weather", {"city": "Oslo"}, tool_call_id="3")],
    )  # fmt: skip
    bought: list[str] = []

    async def body(aengine: AsyncPolicyEngine) -> None:
        agent, got = make_agent(model, aengine)
        assert (await agent.run("buy reports")).output == "done"
        bought.extend(got)

    engine = run(POLICY, body)
    assert bought == ["q1"]
    assert spent_and_reserved(engine) == (6 * USDC, 0)
    told = {getattr(p, "tool_call_id", None): text_of(p) for p in seen[1]}
    assert "payment denied (DAILY_LIMIT)" in told["2"]
    assert told["3"] == "sunny in Oslo"  # an unguarded tool runs as before
    assert [h.event for h in engine.history("bot", 10)].count("decision") == 2


def test_a_tool_that_fails_releases_its_reservation() -> None:
    model, _ = scripted([ToolCallPart("buy", {"report": "q1", "price": 6 * USDC})])

    def fail() -> None:
        raise RuntimeError("the vendor is down")

    async def body(aengine: AsyncPolicyEngine) -> None:
        agent, _ = make_agent(model, aengine, fail)
        with pytest.raises(RuntimeError, match="vendor"):
            await agent.run("buy")

    engine = run(POLICY, body)
    assert spent_and_reserved(engine) == (0, 0)
    assert [h.event for h in engine.history("bot", 2)] == ["release", "decision"]


def test_bad_arguments_from_the_model_and_approvals_never_run_the_tool() -> None:
    model, seen = scripted(
        [ToolCallPart("buy", {"report": "q1", "price": 0}, tool_call_id="bad"),
         ToolCallPart("buy", {"report": "big", "price": 60 * USDC}, tool_call_id="big")],
    )  # fmt: skip
    policy = {**POLICY, "limits": {"daily": {"value": str(100 * USDC), "decimals": 6,
                                             "symbol": "USDC"}}}  # fmt: skip
    bought: list[str] = []

    async def body(aengine: AsyncPolicyEngine) -> None:
        agent, got = make_agent(model, aengine)
        await agent.run("buy")
        bought.extend(got)

    engine = run(policy, body)
    assert bought == []
    told = {getattr(p, "tool_call_id", None): text_of(p) for p in seen[0]}
    assert "INVALID_INPUT" in told["bad"]
    assert "$.amount" in told["bad"]
    assert "needs human approval apr_" in told["big"]
    assert spent_and_reserved(engine) == (0, 60 * USDC)  # held while the approval waits
    assert all(type(p) is ToolReturnPart for p in seen[0])  # a failed result, no retry asked


def test_bad_construction_is_invalid_input() -> None:
    with pytest.raises(PolicyValidationError) as err:
        GuardedTools(PolicyEngine(), {"buy": purchase})  # type: ignore[arg-type]
    assert err.value.path == "$.engine"

    async def main() -> None:
        async with AsyncPolicyEngine() as aengine:
            with pytest.raises(PolicyValidationError) as err:
                GuardedTools(aengine, {"buy": "not a function"})  # type: ignore[dict-item]
            assert err.value.path == "$.payments"

    asyncio.run(main())


# --- current_payment(): a tool marks its payment sent -----------------------------------------


def paying_agent(
    model: FunctionModel, aengine: AsyncPolicyEngine, body: Callable[[str], Awaitable[str]]
) -> Agent[None, str]:
    """An agent whose guarded ``buy`` tool is the async ``body(report)``; ``weather`` is free."""
    agent: Agent[None, str] = Agent(model, capabilities=[GuardedTools(aengine, {"buy": purchase})])

    @agent.tool_plain(retries=100)
    async def buy(report: str, price: int) -> str:
        """Buy a report for `price` USDC base units."""
        return await body(report)

    @agent.tool_plain
    async def weather(city: str) -> str:
        """Free weather; it makes no payment."""
        try:
            current_payment()
        except PolicyValidationError as err:
            return f"{err.code}: {err}"
        return "a payment?"

    return agent


def test_current_payment_is_the_guard_of_the_running_tool_call() -> None:
    model, seen = scripted(
        [ToolCallPart("buy", {"report": "q1", "price": 6 * USDC}, tool_call_id="1"),
         ToolCallPart("weather", {"city": "Oslo"}, tool_call_id="2")],
    )  # fmt: skip
    guards: list[AsyncPaymentGuard] = []

    async def body(report: str) -> str:
        guard = current_payment()
        assert guard.decision.allowed
        guards.append(guard)
        return f"bought {report}"

    async def run_agent(aengine: AsyncPolicyEngine) -> None:
        await paying_agent(model, aengine, body).run("buy")
        reservation = await aengine.get_reservation(guards[0].reservation_id)
        assert reservation.status == "confirmed"  # the tool returned: its guard confirmed

    engine = run(POLICY, run_agent)
    [guard] = guards
    assert isinstance(guard, AsyncPaymentGuard)
    assert guard.request.memo == "report q1"
    assert guard.reservation is not None
    assert guard.reservation.status == "confirmed"
    assert spent_and_reserved(engine) == (6 * USDC, 0)
    told = {getattr(p, "tool_call_id", None): text_of(p) for p in seen[0]}
    assert told["2"].startswith("INVALID_INPUT: ")  # an unguarded tool has no payment
    assert "current_payment() is called outside a guarded tool" in told["2"]


def test_current_payment_outside_a_guarded_tool_is_invalid_input() -> None:
    with pytest.raises(PolicyValidationError) as err:
        current_payment()
    assert err.value.code == ErrorCode.INVALID_INPUT
    assert "outside a guarded tool" in str(err.value)

    async def main() -> None:  # inside a loop, but in no tool either
        with pytest.raises(PolicyValidationError):
            current_payment()

    asyncio.run(main())


@pytest.mark.parametrize("marked", [True, False])
def test_a_tool_that_pays_then_fails_counts_its_payment_once_marked_sent(marked: bool) -> None:
    """The vendor charges, then answers an error; the model is told to retry, 18 times.

    Marked sent, every failed call's reservation stays held, so the agent
    pays 10 times against a limit of 10 USDC and is then denied. Not marked,
    each failure gave its budget back: 18 payments, none counted.
    """
    calls = 0

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        nonlocal calls
        if calls == 18:
            return ModelResponse(parts=[TextPart("done")])
        calls += 1
        part = ToolCallPart("buy", {"report": f"r{calls}", "price": USDC}, tool_call_id=str(calls))
        return ModelResponse(parts=[part])

    paid: list[str] = []

    async def body(report: str) -> str:
        if marked:
            await current_payment().mark_sent()  # the transfer leaves now
        paid.append(report)  # the vendor charged us...
        raise ModelRetry("the vendor answered 500 after charging; try again")

    async def run_agent(aengine: AsyncPolicyEngine) -> None:
        assert (await paying_agent(FunctionModel(model), aengine, body).run("buy")).output == "done"

    engine = run(POLICY, run_agent)
    assert calls == 18
    if marked:
        assert len(paid) == 10  # stopped at the limit
        assert spent_and_reserved(engine) == (0, 10 * USDC)  # held: spent when they expire
        assert [h.event for h in engine.history("bot", 100)].count("release") == 0
    else:  # what current_payment() is for
        assert len(paid) == 18
        assert spent_and_reserved(engine) == (0, 0)


def test_tool_calls_running_at_once_each_see_their_own_payment() -> None:
    reports = ["a", "b", "c"]
    model, _ = scripted(
        [ToolCallPart("buy", {"report": r, "price": USDC}, tool_call_id=r) for r in reports]
    )
    inside: dict[str, AsyncPaymentGuard] = {}
    all_inside = asyncio.Event()
    after: dict[str, AsyncPaymentGuard] = {}

    async def body(report: str) -> str:
        inside[report] = current_payment()
        if len(inside) == len(reports):
            all_inside.set()
        await all_inside.wait()  # every call is inside its payment at once
        after[report] = current_payment()
        return f"bought {report}"

    async def run_agent(aengine: AsyncPolicyEngine) -> None:
        await paying_agent(model, aengine, body).run("buy")

    engine = run(POLICY, run_agent)
    assert after == inside
    assert {r: g.request.memo for r, g in inside.items()} == {r: f"report {r}" for r in reports}
    assert len({g.reservation_id for g in inside.values()}) == 3
    assert spent_and_reserved(engine) == (3 * USDC, 0)


def test_an_unguarded_tool_of_an_agent_run_inside_a_guarded_tool_has_no_payment() -> None:
    """It got the outer call's guard: it marked it sent, and the failed purchase stayed held."""
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", POLICY)
    seen: list[str] = []

    async def main() -> None:
        aengine = AsyncPolicyEngine.from_engine(engine)
        inner_model, _ = scripted([ToolCallPart("lookup", {"q": "x"})])
        inner: Agent[None, str] = Agent(inner_model, capabilities=[GuardedTools(aengine, {})])

        @inner.tool_plain
        async def lookup(q: str) -> str:
            """Look something up (free)."""
            try:
                await current_payment().mark_sent()
                seen.append("marked")
            except PolicyValidationError:
                seen.append("refused")
            return "found"

        outer_model, _ = scripted([ToolCallPart("buy", {"report": "r", "price": 3 * USDC})])
        outer: Agent[None, str] = Agent(
            outer_model, capabilities=[GuardedTools(aengine, {"buy": purchase})]
        )

        @outer.tool_plain
        async def buy(report: str, price: int) -> str:
            """Buy a report, asking a sub-agent first."""
            await inner.run("look it up")
            raise RuntimeError("the purchase failed: nothing was paid")

        with pytest.raises(RuntimeError):
            await outer.run("buy")
        await aengine.close()

    asyncio.run(main())
    assert seen == ["refused"]
    (period,) = engine.budget("bot").periods.values()
    assert period.reserved.value == 0  # released, not held as if sent
    assert engine.history("bot", 1)[0].event == "release"
    engine.close()


BIG = {"report": "big", "price": 60 * USDC}
ROOMY = {**POLICY, "limits": {"daily": {"value": str(200 * USDC), "decimals": 6,
                                        "symbol": "USDC"}}}  # fmt: skip


def approving(
    engine_of: list[PolicyEngine], *turns: tuple[str | None, dict[str, Any]]
) -> tuple[FunctionModel, list[str]]:
    """A model that calls buy(args) once per turn, first casting the turn's vote (if any) on the
    bot's oldest pending approval; it records what each call was told."""
    told: list[str] = []

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        last = messages[-1]
        if isinstance(last, ModelRequest) and len(messages) > 1:
            told.extend(text_of(p) for p in last.parts)
        step = len(told)
        if step >= len(turns):
            return ModelResponse(parts=[TextPart("done")])
        vote, args = turns[step]
        if vote is not None:
            pending = engine_of[0].list_approvals("bot")[0]  # the oldest
            engine_of[0].decide(pending.id, "cfo@x.com", vote)
        return ModelResponse(parts=[ToolCallPart("buy", args, tool_call_id=str(step))])

    return FunctionModel(model), told


def run_with(
    policy: dict[str, Any], model: FunctionModel, engines: list[PolicyEngine]
) -> list[str]:
    bought: list[str] = []
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", policy)
    engines.append(engine)

    async def main() -> None:
        async with AsyncPolicyEngine.from_engine(engine) as aengine:
            agent, got = make_agent(model, aengine)
            await agent.run("buy")
            bought.extend(got)

    asyncio.run(main())
    return bought


def test_the_same_call_again_resumes_its_approval_and_pays_once_approved() -> None:
    engines: list[PolicyEngine] = []
    model, told = approving(engines, (None, BIG), (None, BIG), (None, BIG), ("approve", BIG),
                            (None, BIG))  # fmt: skip
    bought = run_with(ROOMY, model, engines)
    engine = engines[0]
    assert "needs human approval apr_" in told[0]
    # asking again while it waits asks no one else and holds nothing more (it asked a new
    # approval each time, holding 60 more: 120 held after two calls, and never paid)
    assert "still waits for human approval" in told[1]
    assert "still waits for human approval" in told[2]
    assert told[3] == "bought big"  # approved: the same call pays with its reservation
    assert bought == ["big"]
    assert "needs human approval apr_" in told[4]  # a new purchase after it asks anew
    decisions = [h for h in engine.history("bot", 50) if h.event == "decision"]
    assert len(decisions) == 2  # two approvals asked, no more
    assert spent_and_reserved(engine) == (60 * USDC, 60 * USDC)


def test_a_denied_approval_is_told_once_and_the_call_after_asks_anew() -> None:
    engines: list[PolicyEngine] = []
    other = {**BIG, "report": "other"}
    model, told = approving(engines, (None, BIG), (None, other), ("deny", BIG), (None, BIG),
                            (None, other))  # fmt: skip
    bought = run_with(ROOMY, model, engines)
    engine = engines[0]
    assert bought == []
    assert "needs human approval" in told[0]
    assert "needs human approval" in told[1]  # another purchase (memo) is another approval
    assert told[2].startswith("payment not made: APPROVAL_DENIED")
    assert "needs human approval" in told[3]  # asked anew
    assert "still waits for human approval" in told[4]  # the other's, still pending
    assert spent_and_reserved(engine) == (0, 120 * USDC)
