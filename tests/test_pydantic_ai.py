"""agentpolicy.pydantic_ai: a guarded tool runs only when the policy allows it (no network)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agentpolicy import AsyncPolicyEngine, PaymentRequest, PolicyEngine, PolicyValidationError
from agentpolicy.pydantic_ai import GuardedTools
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
