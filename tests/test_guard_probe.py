"""An adversarial probe of the guards where agents pay: a hostile x402 seller, and the governed
agent's own tools. Each test states what was tried; the ones for a fixed defect say so."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ToolCallPart
from x402 import x402Client, x402ClientSync
from x402.extensions.builder_code import BuilderCodeClientExtension
from x402.http import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    decode_payment_signature_header,
    encode_payment_required_header,
    encode_payment_response_header,
)
from x402.http.clients.requests import x402_requests
from x402.mechanisms.evm.exact import ExactEvmClientScheme
from x402.schemas import (
    PaymentPayload,
    PaymentRequired,
    PaymentRequirements,
    PaymentResponseContext,
    SettleResponse,
)

from agentpolicy import (
    AsyncPolicyEngine,
    PolicyEngine,
    PolicyValidationError,
    StorageUnavailableError,
)
from agentpolicy.ledger.state import SPENT_ON_EXPIRY
from agentpolicy.pydantic_ai import GuardedTools, current_payment
from agentpolicy.testing import ManualClock
from agentpolicy.x402 import X402Guard, X402PaymentDenied, guard_x402
from tests.test_pydantic_ai import POLICY, USDC, purchase, scripted
from tests.x402_servers import NETWORK, PAY_TO, PRICE, CountingSigner, Facilitator, paywall, serving
from tests.x402_servers import USDC as USDC_ON_BASE_SEPOLIA

BUDGET_FOR_5 = {"limits": {"daily": {"value": str(5 * PRICE), "decimals": 6, "symbol": "USDC"}}}

logging.getLogger("werkzeug").setLevel(logging.ERROR)


def requirements(amount: str = str(PRICE), pay_to: str = PAY_TO) -> PaymentRequirements:
    return PaymentRequirements(
        scheme="exact", network=NETWORK, asset=USDC_ON_BASE_SEPOLIA, amount=amount,
        pay_to=pay_to, max_timeout_seconds=300, extra={"name": "USDC", "version": "2"},
    )  # fmt: skip


def offer(*accepts: PaymentRequirements) -> PaymentRequired:
    return PaymentRequired(x402_version=2, accepts=list(accepts or [requirements()]))


def used(engine: PolicyEngine) -> tuple[int, int]:
    w = engine.budget("bot").periods["daily"]
    return w.spent.value, w.reserved.value


def guarded(engine: PolicyEngine) -> tuple[x402ClientSync, CountingSigner]:
    client, signer, _ = guarded_with(engine)
    return client, signer


def guarded_with(engine: PolicyEngine) -> tuple[x402ClientSync, CountingSigner, X402Guard]:
    signer = CountingSigner()
    client = x402ClientSync()
    client.register(NETWORK, ExactEvmClientScheme(signer))
    return client, signer, guard_x402(client, engine, "bot")


def cause(err: BaseException) -> BaseException:
    """The guard's own error inside the x402 wrapper's PaymentError."""
    found: BaseException | None = err
    while found is not None and not isinstance(found, PolicyValidationError | X402PaymentDenied):
        found = found.__cause__
    assert found is not None, f"no structured error in {err!r}"
    return found


# --- a hostile seller ------------------------------------------------------------------------

Behaviour = Callable[[BaseHTTPRequestHandler, PaymentPayload], None]


class HostileSeller:
    """Answers every unpaid request with ``offer``; a paid one as ``on_paid`` says."""

    def __init__(self) -> None:
        self.offer = offer()
        self.on_paid: Behaviour = settle
        self.payments: list[tuple[str, PaymentPayload]] = []
        seller = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                header = self.headers.get(PAYMENT_SIGNATURE_HEADER)
                if header is None:
                    answer(self, 402, {PAYMENT_REQUIRED_HEADER:
                                       encode_payment_required_header(seller.offer)})  # fmt: skip
                    return
                payload = decode_payment_signature_header(header)
                assert isinstance(payload, PaymentPayload)
                seller.payments.append((self.path, payload))
                if self.path == "/elsewhere":
                    answer(self, 200)
                    return
                seller.on_paid(self, payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def answer(
    handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str] | None = None
) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", "0")
    handler.end_headers()


def settle(handler: BaseHTTPRequestHandler, payload: PaymentPayload, **claims: Any) -> None:
    response = SettleResponse(success=True, transaction="0x01", network=NETWORK, **claims)
    answer(handler, 200, {PAYMENT_RESPONSE_HEADER: encode_payment_response_header(response)})


@pytest.fixture(scope="module")
def hostile_server() -> Iterator[HostileSeller]:
    seller = HostileSeller()
    with serving(seller.server):
        yield seller


@pytest.fixture
def hostile(hostile_server: HostileSeller) -> HostileSeller:
    hostile_server.offer, hostile_server.on_paid = offer(), settle
    hostile_server.payments = []
    return hostile_server


# --- what a seller asks for is what is counted (sound) -----------------------------------------


def test_several_accepts_count_the_one_selected_never_the_cheapest_shown(
    hostile: HostileSeller,
) -> None:
    """The seller lists a dear option first and a cheap one after: x402 selects the first."""
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", BUDGET_FOR_5)
    client, signer = guarded(engine)
    hostile.offer = offer(requirements(str(6 * PRICE)), requirements(str(PRICE)))
    with pytest.raises(Exception) as err:  # noqa: PT011 - the wrapper's own PaymentError
        x402_requests(client).get(f"{hostile.url}/report", timeout=30)
    denied = cause(err.value)
    assert isinstance(denied, X402PaymentDenied)
    assert denied.reason == "DAILY_LIMIT"  # 0.06 USDC judged, not the 0.01 also shown
    assert (signer.signatures, hostile.payments) == (0, [])
    hostile.offer = offer(requirements(str(3 * PRICE)), requirements(str(PRICE)))
    assert x402_requests(client).get(f"{hostile.url}/report", timeout=30).status_code == 200
    ((_, paid),) = hostile.payments
    assert paid.payload["authorization"]["value"] == str(3 * PRICE)
    assert used(engine) == (3 * PRICE, 0)  # what was signed is what was counted


@pytest.mark.parametrize(
    "amount",
    [
        "-1",
        "0",
        "1e4",
        "10000.0",
        " 10000",
        "+10000",
        "0x2710",
        "\u0661\u0660\u0660\u0660\u0660",
        "",
        "9" * 97,
    ],
)
def test_amounts_that_are_not_whole_base_units_are_refused_unsigned(amount: str) -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", BUDGET_FOR_5)
    client, signer = guarded(engine)
    client.set_spend_controls(False)  # x402's own controls refuse most of these first
    with pytest.raises(PolicyValidationError) as err:
        client.create_payment_payload(offer(requirements(amount)))
    assert err.value.path == "$.paymentRequirements.amount"
    assert signer.signatures == 0
    assert used(engine) == (0, 0)


def test_an_amount_with_leading_zeros_is_counted_as_the_number_signed() -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", BUDGET_FOR_5)
    client, _ = guarded(engine)
    payload = client.create_payment_payload(offer(requirements("000" + str(4 * PRICE))))
    assert int(payload.payload["authorization"]["value"]) == 4 * PRICE
    assert used(engine) == (0, 4 * PRICE)
    with pytest.raises(X402PaymentDenied):  # 0.04 held + 0.02 > 0.05
        client.create_payment_payload(offer(requirements("0000" + str(2 * PRICE))))


# --- the paid request's answer (sound) ---------------------------------------------------------


def test_a_second_402_asking_for_more_holds_and_pays_nothing_more(
    hostile: HostileSeller,
) -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", BUDGET_FOR_5)
    client, signer, guard = guarded_with(engine)

    def ask_for_more(handler: BaseHTTPRequestHandler, payload: PaymentPayload) -> None:
        dearer = offer(requirements(str(50 * PRICE), pay_to="0x" + "66" * 20))
        answer(handler, 402, {PAYMENT_REQUIRED_HEADER: encode_payment_required_header(dearer)})

    hostile.on_paid = ask_for_more
    r = x402_requests(client).get(f"{hostile.url}/report", timeout=30)
    assert r.status_code == 402  # the wrapper never pays a second time
    assert (signer.signatures, len(hostile.payments)) == (1, 1)
    # the payload had left: the seller's word that it was refused is no proof (docs: Trust)
    assert used(engine) == (0, PRICE)
    [unsettled] = guard.unsettled
    assert unsettled.request.amount == PRICE
    engine.release(unsettled.reservation_id, holder=unsettled.holder)  # the chain was checked
    assert used(engine) == (0, 0)


def test_a_seller_that_claims_to_have_settled_more_is_counted_what_was_authorized(
    hostile: HostileSeller,
) -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", BUDGET_FOR_5)
    client, _ = guarded(engine)
    hostile.on_paid = lambda h, p: settle(h, p, amount=str(1000 * PRICE))
    assert x402_requests(client).get(f"{hostile.url}/report", timeout=30).status_code == 200
    assert used(engine) == (PRICE, 0)  # the signature moves PRICE, whatever it says


def drop_the_connection(handler: BaseHTTPRequestHandler, payload: PaymentPayload) -> None:
    handler.close_connection = True  # it has the signed payment; it answers nothing


def redirect(handler: BaseHTTPRequestHandler, payload: PaymentPayload) -> None:
    answer(handler, 302, {"Location": "/elsewhere"})


@pytest.mark.parametrize("on_paid", [drop_the_connection, redirect])
def test_a_paid_request_with_no_answer_about_the_payment_is_held_then_spent(
    hostile: HostileSeller, on_paid: Behaviour
) -> None:
    clock = ManualClock()
    engine = PolicyEngine(clock=clock)
    engine.set_policy("bot", BUDGET_FOR_5)
    client, _ = guarded(engine)
    hostile.on_paid = on_paid
    if on_paid is drop_the_connection:
        with pytest.raises(Exception, match="Failed to handle payment"):  # the wrapper's own
            x402_requests(client).get(f"{hostile.url}/report", timeout=30)
    else:
        assert x402_requests(client).get(f"{hostile.url}/report", timeout=30).status_code == 200
    # a redirect is followed without the payment, so the target asks anew and is paid anew
    paid = len(hostile.payments)
    assert paid == (1 if on_paid is drop_the_connection else 2)
    assert used(engine) == (0, paid * PRICE)  # each may have been settled: held, never released
    clock.advance(minutes=5)
    assert used(engine) == (paid * PRICE, 0)
    assert engine.history("bot", 1)[0].detail == SPENT_ON_EXPIRY


# --- defect: a payload enriched by a client extension was never settled -----------------------


@pytest.fixture(scope="module")
def seller() -> Iterator[tuple[str, Facilitator]]:
    with paywall() as found:
        yield found


def test_a_payment_enriched_by_a_client_extension_is_confirmed_or_released(
    seller: tuple[str, Facilitator],
) -> None:
    """Defect: x402 sends and reports a copy of the payload when an extension enriches it.

    With a client extension registered (x402's own builder-code one here),
    the guard looked the answered payload up by identity and never found it:
    a settlement reported failed was not listed for a check of the chain
    (``unsettled``) and one that succeeded was not confirmed.
    """
    url, facilitator = seller
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", BUDGET_FOR_5)
    client, _, guard = guarded_with(engine)
    client.register_extension(BuilderCodeClientExtension("bc_probe"))
    with facilitator.lock:
        facilitator.fail_settle = True
    try:
        assert x402_requests(client).get(f"{url}/report", timeout=30).status_code == 402
    finally:
        with facilitator.lock:
            facilitator.fail_settle = False
    assert used(engine) == (0, PRICE)  # reported refused: held until checked
    [unsettled] = guard.unsettled  # the copy was found
    assert unsettled.reason.startswith("settlement failed")
    engine.release(unsettled.reservation_id, holder=unsettled.holder)
    assert used(engine) == (0, 0)
    assert x402_requests(client).get(f"{url}/report", timeout=30).status_code == 200
    assert used(engine) == (PRICE, 0)  # settled: confirmed
    assert [h.event for h in engine.history("bot", 4)] == [
        "confirm", "decision", "release", "decision",
    ]  # fmt: skip


def test_an_async_payment_enriched_by_a_client_extension_is_confirmed() -> None:
    async def main() -> tuple[int, int]:
        async with AsyncPolicyEngine(clock=ManualClock()) as aengine:
            await aengine.set_policy("bot", BUDGET_FOR_5)
            client = x402Client()
            client.register(NETWORK, ExactEvmClientScheme(CountingSigner()))
            client.register_extension(BuilderCodeClientExtension("bc_probe"))
            guard_x402(client, aengine, "bot")
            payload = await client.create_payment_payload(offer())
            settled = SettleResponse(success=True, transaction="0x01", network=NETWORK)
            await client.handle_payment_response(
                PaymentResponseContext(payment_payload=payload, requirements=payload.accepted,  # type: ignore[arg-type]
                                       settle_response=settled)
            )  # fmt: skip
            w = (await aengine.budget("bot")).periods["daily"]
            return w.spent.value, w.reserved.value

    assert asyncio.run(main()) == (PRICE, 0)


# --- defect: a payment failing at once with another of the same offer freed that one's budget --


def test_a_failure_of_one_payment_never_releases_another_of_the_same_offer() -> None:
    """Defect: two payments of one offer at once; the store fails as the first is marked sent.

    The guard found a payment's reservation by the offer (payment_required)
    it was made for. The first payment's failure hook, running after its own
    reservation had been taken, took the second payment's and released it;
    the second payment's after hook then found nothing and let its signed
    payload go: 0.01 USDC paid with nothing reserved (budget 0 spent, 0
    held). Each payment now finds its own reservation only, and a payload
    with none left is refused.
    """
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", BUDGET_FOR_5)
    signer = CountingSigner()
    client = x402Client()
    client.register(NETWORK, ExactEvmClientScheme(signer))
    guard_x402(client, engine, "bot")
    mark_sent = engine.mark_sent
    first_failed = asyncio.Event()

    def store_blinks_for_the_first(rid: str, **kwargs: Any) -> Any:
        if not first_failed.is_set():
            raise StorageUnavailableError("the store did not answer")
        return mark_sent(rid, **kwargs)

    engine.mark_sent = store_blinks_for_the_first  # type: ignore[method-assign]

    async def second_waits(ctx: Any) -> None:  # registered after the guard's: authorized
        if asyncio.current_task().get_name() == "second":  # type: ignore[union-attr]
            await first_failed.wait()

    async def first_failed_now(ctx: Any) -> None:
        first_failed.set()

    client.on_before_payment_creation(second_waits)
    client.on_payment_creation_failure(first_failed_now)

    async def main() -> list[Any]:
        same = offer()  # one offer, paid twice at once
        first = asyncio.create_task(client.create_payment_payload(same), name="first")
        second = asyncio.create_task(client.create_payment_payload(same), name="second")
        return await asyncio.gather(first, second, return_exceptions=True)

    first, second = asyncio.run(main())
    assert isinstance(first, StorageUnavailableError)  # never sent: released
    assert isinstance(second, PaymentPayload)  # signed, to be sent: must be counted
    assert signer.signatures == 2
    assert used(engine) == (0, PRICE)
    assert [h.event for h in engine.history("bot", 3)] == ["release", "decision", "decision"]


def test_a_payload_signed_with_no_reservation_left_for_it_is_refused() -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", BUDGET_FOR_5)
    client, _ = guarded(engine)
    guard = client._agentpolicy_guard  # type: ignore[attr-defined]

    def forget(ctx: Any) -> None:  # as if another payment had taken this one's reservation
        guard._creating.clear()

    client.on_before_payment_creation(forget)
    with pytest.raises(PolicyValidationError) as err:
        client.create_payment_payload(offer())
    assert err.value.path == "$.paymentRequirements"
    assert "without a reservation" in err.value.message


# --- defect: a tool of a plain agent run inside a guarded tool got its payment -----------------


def test_a_tool_of_a_plain_agent_inside_a_guarded_tool_gets_no_payment_to_spend() -> None:
    """Defect: current_payment() answered the outer payment inside a nested agent's tool.

    The outer tool reserved 1 USDC; a helper agent it runs (no GuardedTools)
    has a tool that pays only when it is guarded. current_payment() gave it
    the outer call's guard, so it marked that sent and paid 8 USDC, and the
    budget counted 1. It is refused now, as docs say for any unguarded tool.
    """
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", POLICY)
    paid: list[int] = []

    async def main() -> str:
        async with AsyncPolicyEngine.from_engine(engine) as aengine:
            inner_model, _ = scripted([ToolCallPart("pay_vendor", {"amount": 8 * USDC})])
            helper: Agent[None, str] = Agent(inner_model)

            @helper.tool_plain
            async def pay_vendor(amount: int) -> str:
                """Pay a vendor, only under a payment guard."""
                try:
                    payment = current_payment()
                except PolicyValidationError:
                    return "refused: no payment"
                await payment.mark_sent()
                paid.append(amount)
                return "paid"

            outer_model, seen = scripted(
                [ToolCallPart("buy", {"report": "r", "price": USDC}, tool_call_id="1")]
            )
            outer: Agent[None, str] = Agent(
                outer_model, capabilities=[GuardedTools(aengine, {"buy": purchase})]
            )

            @outer.tool_plain
            async def buy(report: str, price: int) -> str:
                """Buy a report; a helper agent pays the vendor."""
                inner = await helper.run("pay the vendor")
                assert current_payment().request.amount == price  # its own call: still its own
                return inner.output

            await outer.run("buy")
            return str(seen[0][0].content)

    told = asyncio.run(main())
    assert paid == []
    assert "done" in told
    assert used(engine) == (USDC, 0)  # the guarded tool returned: its own payment confirmed
