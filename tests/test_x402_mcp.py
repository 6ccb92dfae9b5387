"""agentpolicy.x402 and x402's MCP clients: X402Guard.watch_mcp, end to end in memory.

x402's own MCP client classes (``x402MCPClient``, ``x402MCPClientSync``) pay
a tool served by x402's own MCP payment wrapper (``x402.mcp.server_async``)
on an ``mcp`` server, over the mcp SDK's in-memory transport (JSON-RPC on
``mcp.shared.memory`` streams, the legacy initialize handshake); the seller
verifies and settles through the loopback facilitator stand-in of
tests/x402_servers.py.

Two small adapters sit between x402's MCP clients and the mcp SDK's
``Client``: x402's clients call ``call_tool(params)`` with the request params
(name, arguments, ``_meta``) and read the result's wire fields (``content``,
``isError``, ``_meta``, ``structuredContent``), while this mcp SDK's
``Client.call_tool`` takes them as arguments and answers with a model whose
attributes are snake_case; x402's FastMCP helpers do not import with mcp 2,
so the seller's tool handler hands the request ``_meta`` to x402's payment
wrapper itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import mcp_types as types
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from mcp import Client
from mcp.server import Server
from x402 import x402Client, x402ClientSync, x402ResourceServer
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.mcp.client import x402MCPClientSync
from x402.mcp.client_async import x402MCPClient
from x402.mcp.server_async import PaymentWrapperConfig, create_payment_wrapper
from x402.mcp.types import PaymentWrapperHooks
from x402.mechanisms.evm.exact import ExactEvmClientScheme, ExactEvmServerScheme
from x402.schemas import PaymentRequirements

from agentpolicy import AsyncPolicyEngine, ErrorCode, PolicyEngine, PolicyValidationError
from agentpolicy.ledger.state import SPENT_ON_EXPIRY
from agentpolicy.testing import ManualClock
from agentpolicy.x402 import X402Guard, X402PaymentDenied, guard_x402
from tests.x402_servers import (
    NETWORK,
    PAY_TO,
    PRICE,
    USDC,
    CountingSigner,
    Facilitator,
    serving,
)

KINDS = ["async", "async-on-a-sync-engine", "sync"]


def budget_for(payments: int) -> dict[str, Any]:
    return {"limits": {"daily": {"value": str(payments * PRICE), "decimals": 6, "symbol": "USDC"}}}


@pytest.fixture(scope="module")
def facilitator_server() -> Iterator[Facilitator]:
    f = Facilitator()
    with serving(f.server):
        yield f


@pytest.fixture
def facilitator(facilitator_server: Facilitator) -> Facilitator:
    f = facilitator_server
    with f.lock:
        f.verified, f.settled, f.refused, f.fail_settle = 0, [], [], False
    return f


# --- the seller: x402's MCP payment wrapper on an mcp server ------------------------------


def seller(facilitator_url: str) -> Server[Any]:
    """Tools that cost $0.01: ``report`` (settles), ``broken`` (the tool fails, nothing is
    settled) and ``blocked`` (verified, then refused by the seller's before-execution hook)."""
    resource_server = x402ResourceServer(
        HTTPFacilitatorClient(FacilitatorConfig(url=facilitator_url))
    )
    resource_server.register(NETWORK, ExactEvmServerScheme())
    resource_server.initialize()
    accepts = [
        PaymentRequirements(
            scheme="exact",
            network=NETWORK,
            asset=USDC,
            amount=str(PRICE),
            pay_to=PAY_TO,
            max_timeout_seconds=300,
            extra={"name": "USDC", "version": "2"},
        )
    ]

    async def report(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {"content": [{"type": "text", "text": "paid content"}]}

    async def broken(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {"content": [{"type": "text", "text": "the tool failed"}], "isError": True}

    paid = create_payment_wrapper(resource_server, PaymentWrapperConfig(accepts=accepts))
    refusing = create_payment_wrapper(
        resource_server,
        PaymentWrapperConfig(
            accepts=accepts, hooks=PaymentWrapperHooks(on_before_execution=lambda ctx: False)
        ),
    )
    tools = {"report": paid(report), "broken": paid(broken), "blocked": refusing(report)}

    async def on_call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        extra = {"_meta": params.meta or {}, "toolName": params.name}
        result = await tools[params.name](params.arguments or {}, extra)
        return types.CallToolResult.model_validate(
            {
                "content": result.content,
                "isError": result.is_error,
                "structuredContent": result.structured_content,
                "_meta": result.meta or None,
            }
        )

    async def on_list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        schema = {"type": "object"}
        return types.ListToolsResult(
            tools=[types.Tool(name=name, input_schema=schema) for name in tools]
        )

    return Server("seller", on_call_tool=on_call_tool, on_list_tools=on_list_tools)


# --- the buyer: x402's MCP clients over the mcp SDK's client --------------------------------


class WireClient:
    """The MCP client x402MCPClient expects: ``call_tool(params)``, answered in wire fields."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.paid_calls = 0

    async def call_tool(self, params: dict[str, Any], **kwargs: Any) -> SimpleNamespace:
        meta = params.get("_meta")
        self.paid_calls += meta is not None and "x402/payment" in meta
        result = await self.client.call_tool(params["name"], params["arguments"], meta=meta)
        return SimpleNamespace(**result.model_dump(by_alias=True, mode="json", exclude_none=True))


class SyncWireClient:
    """The same for x402MCPClientSync: a blocking ``call_tool`` (the client runs in a portal)."""

    def __init__(self, portal: BlockingPortal, wire: WireClient) -> None:
        self.portal = portal
        self.wire = wire

    def call_tool(self, params: dict[str, Any], **kwargs: Any) -> SimpleNamespace:
        return self.portal.call(self.wire.call_tool, params)


class Market:
    """One buyer (a guarded x402 client inside an x402 MCP client) and the seller, in memory."""

    def __init__(
        self,
        portal: BlockingPortal,
        engine: PolicyEngine | AsyncPolicyEngine,
        guard: X402Guard,
        mcp: x402MCPClient | x402MCPClientSync,
        wire: WireClient,
        signer: CountingSigner,
        clock: ManualClock,
    ) -> None:
        self.portal, self.engine, self.guard, self.mcp = portal, engine, guard, mcp
        self.wire, self.signer, self.clock = wire, signer, clock

    def call(self, tool: str) -> Any:
        if isinstance(self.mcp, x402MCPClientSync):
            return self.mcp.call_tool(tool, {})
        return self.portal.call(self.mcp.call_tool, tool, {})

    def engine_call(self, method: Callable[..., Any], *args: Any) -> Any:
        if isinstance(self.engine, AsyncPolicyEngine):
            return self.portal.call(method, *args)
        return method(*args)

    def used(self) -> tuple[int, int]:
        """(spent, reserved) of the daily budget, in base units."""
        window = self.engine_call(self.engine.budget, "bot").periods["daily"]
        return window.spent.value, window.reserved.value

    def events(self) -> list[str]:
        return [h.event for h in self.engine_call(self.engine.history, "bot", 100)]


@contextmanager
def market(kind: str, facilitator: Facilitator, payments: int = 5) -> Iterator[Market]:
    clock = ManualClock()
    server = seller(facilitator.url)
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(Client(server, mode="legacy")) as client,
    ):
        wire = WireClient(client)
        signer = CountingSigner()
        engine: PolicyEngine | AsyncPolicyEngine
        mcp: x402MCPClient | x402MCPClientSync
        if kind == "async":
            engine = AsyncPolicyEngine(storage="memory://", clock=clock)
            portal.call(engine.set_policy, "bot", budget_for(payments))
        else:
            engine = PolicyEngine(storage="memory://", clock=clock)
            engine.set_policy("bot", budget_for(payments))
        if kind == "sync":
            sync_payer = x402ClientSync()
            sync_payer.register(NETWORK, ExactEvmClientScheme(signer))
            guard = guard_x402(sync_payer, engine, "bot")
            mcp = x402MCPClientSync(SyncWireClient(portal, wire), sync_payer)
        else:
            payer = x402Client()
            payer.register(NETWORK, ExactEvmClientScheme(signer))
            guard = guard_x402(payer, engine, "bot")
            mcp = x402MCPClient(wire, payer)
        assert guard.watch_mcp(mcp) is mcp
        try:
            yield Market(portal, engine, guard, mcp, wire, signer, clock)
        finally:
            if isinstance(engine, AsyncPolicyEngine):
                portal.call(engine.close)
            else:
                engine.close()


# --- what the seller reports decides what the budget counts ---------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_settled_tool_call_is_confirmed(kind: str, facilitator: Facilitator) -> None:
    with market(kind, facilitator) as m:
        result = m.call("report")
        assert result.payment_made
        assert result.payment_response.success
        assert (m.signer.signatures, len(facilitator.settled)) == (1, 1)
        assert m.used() == (PRICE, 0)  # spent, nothing held
        assert m.events()[0] == "confirm"
        assert m.guard.unconfirmed == []
        m.clock.advance(minutes=10)
        assert m.used() == (PRICE, 0)  # and counted once


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_settlement_stays_held(kind: str, facilitator: Facilitator) -> None:
    with market(kind, facilitator) as m:
        facilitator.fail_settle = True  # the payer's wallet is empty, say
        result = m.call("report")
        assert result.is_error
        assert result.payment_response is None  # it is reported in the content
        assert (m.signer.signatures, facilitator.refused) == (1, ["insufficient_funds"])
        assert m.used() == (0, PRICE)  # the seller's word is not proof: held
        assert "release" not in m.events()
        [unsettled] = m.guard.unsettled
        assert unsettled.reason == "settlement failed: insufficient_funds"
        m.clock.advance(minutes=5)
        assert m.used() == (PRICE, 0)  # spent at the TTL


@pytest.mark.parametrize("kind", KINDS)
def test_a_payment_the_seller_refused_stays_held(kind: str, facilitator: Facilitator) -> None:
    with market(kind, facilitator) as m:
        result = m.call("blocked")  # verified, then refused: the result asks for payment again
        assert result.is_error
        assert (m.signer.signatures, facilitator.verified, facilitator.settled) == (1, 1, [])
        assert m.used() == (0, PRICE)  # the signed payload left: it could still be settled
        assert "release" not in m.events()
        assert [u.reason for u in m.guard.unsettled] == [
            "refused: the seller asked for payment again"
        ]


@pytest.mark.parametrize("kind", KINDS)
def test_a_result_without_a_settlement_stays_held_then_is_spent_at_the_ttl(
    kind: str, facilitator: Facilitator
) -> None:
    with market(kind, facilitator) as m:
        result = m.call("broken")  # the tool failed; x402 did not settle, and says nothing
        assert result.is_error
        assert result.payment_response is None
        assert (m.signer.signatures, facilitator.settled) == (1, [])
        assert m.used() == (0, PRICE)  # outcome unknown to the buyer: held
        assert m.guard._open == 0  # and forgotten by the guard: no answer will come
        m.clock.advance(minutes=5)  # the reservation's TTL (and the authorization's validity)
        assert m.used() == (PRICE, 0)  # counted as spent, never given back
        expired = m.engine_call(m.engine.history, "bot", 1)[0]
        assert (expired.event, expired.detail) == ("expire", SPENT_ON_EXPIRY)


@pytest.mark.parametrize("kind", KINDS)
def test_a_denied_payment_signs_nothing(kind: str, facilitator: Facilitator) -> None:
    """A budget for two: a failed settlement stays held, so one more is paid."""
    with market(kind, facilitator, payments=2) as m:
        facilitator.fail_settle = True
        m.call("report")
        facilitator.fail_settle = False
        m.call("report")
        assert m.used() == (PRICE, PRICE)
        with pytest.raises(X402PaymentDenied) as denied:
            m.call("report")
        assert denied.value.reason == "DAILY_LIMIT"
        assert m.signer.signatures == 2  # the third was never signed
        assert m.wire.paid_calls == 2  # nor sent
        assert (facilitator.verified, len(facilitator.settled)) == (2, 1)
        assert m.used() == (PRICE, PRICE)


def test_an_unsettled_outcome_is_logged(
    facilitator: Facilitator, caplog: pytest.LogCaptureFixture
) -> None:
    with market("sync", facilitator) as m, caplog.at_level(logging.WARNING, "agentpolicy.x402"):
        m.call("broken")
    assert any("no settlement was reported" in r.getMessage() for r in caplog.records)


def test_a_settled_payment_whose_confirm_fails_is_unconfirmed(facilitator: Facilitator) -> None:
    with market("sync", facilitator) as m:
        engine = m.engine
        assert isinstance(engine, PolicyEngine)

        def down(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("the store is down")

        engine.confirm = down  # type: ignore[method-assign]
        result = m.call("report")  # the call still returns what was paid for
        assert result.content[0]["text"] == "paid content"
        (lost,) = m.guard.unconfirmed
        assert (lost.request.amount, lost.transaction) == (
            PRICE,
            result.payment_response.transaction,
        )
        assert "the store is down" in lost.error
        assert m.used() == (0, PRICE)  # marked sent: spent when it expires, if not confirmed


# --- what watch_mcp refuses -----------------------------------------------------------------


def test_watch_mcp_refuses_what_it_cannot_watch() -> None:
    engine = PolicyEngine(storage="memory://")
    payer = x402ClientSync()
    guard = guard_x402(payer, engine, "bot")
    other = x402ClientSync()
    guard_x402(other, engine, "bot")

    def refused(target: object) -> str:
        with pytest.raises(PolicyValidationError) as err:
            guard.watch_mcp(target)
        (problem,) = err.value.problems
        assert (err.value.code, problem.path) == (ErrorCode.INVALID_INPUT, "$.mcpClient")
        return problem.message

    assert "x402MCPClient" in refused(object())
    assert "x402MCPClient" in refused(payer)  # the x402 client itself is not an MCP client
    assert "not guarded by this guard" in refused(x402MCPClientSync(object(), x402ClientSync()))
    assert "not guarded by this guard" in refused(x402MCPClientSync(object(), other))
    mcp = guard.watch_mcp(x402MCPClientSync(object(), payer))
    assert "already watched" in refused(mcp)
    async_payer = x402Client()
    async_guard = guard_x402(async_payer, engine, "bot")
    with pytest.raises(PolicyValidationError, match="signs with an x402ClientSync"):
        async_guard.watch_mcp(x402MCPClientSync(object(), async_payer))  # type: ignore[arg-type]
    async_mcp = x402MCPClient(object(), async_payer)
    assert async_guard.watch_mcp(async_mcp) is async_mcp
    engine.close()
