"""agentpolicy.x402 end to end on loopback: the x402 package's seller middleware, a facilitator
stand-in, a throwaway key, and the x402 httpx and requests wrappers."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from x402 import PaymentAbortedError, x402Client, x402ClientSync
from x402.http.clients.httpx import x402AsyncTransport
from x402.http.clients.requests import x402_requests
from x402.mechanisms.evm.default_assets import DEFAULT_ASSETS
from x402.mechanisms.evm.exact import ExactEvmClientScheme
from x402.schemas import PaymentRequired, PaymentRequirements, PaymentResponseContext

from agentpolicy import (
    AsyncPolicyEngine,
    ConflictError,
    ErrorCode,
    PaymentDenied,
    PolicyEngine,
    PolicyValidationError,
    ReservationStatus,
    StorageUnavailableError,
)
from agentpolicy.ledger.state import SPENT_ON_EXPIRY
from agentpolicy.testing import ManualClock
from agentpolicy.x402 import (
    KNOWN_ASSETS,
    Asset,
    X402ApprovalRequired,
    X402PaymentDenied,
    guard_x402,
)
from tests.backends import make_backend
from tests.faulty import FaultyStorage
from tests.x402_servers import (
    NETWORK,
    PAY_TO,
    PRICE,
    UNKNOWN_TOKEN,
    USDC,
    CountingSigner,
    Facilitator,
    paywall,
)

BUDGET_FOR_5 = {"limits": {"daily": {"value": str(5 * PRICE), "decimals": 6, "symbol": "USDC"}}}

logging.getLogger("werkzeug").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def seller() -> Iterator[tuple[str, Facilitator]]:
    with paywall() as found:
        yield found


@pytest.fixture
def facilitator(seller: tuple[str, Facilitator]) -> Facilitator:
    f = seller[1]
    with f.lock:
        f.verified, f.settled, f.refused, f.fail_settle = 0, [], [], False
    return f


@pytest.fixture
def url(seller: tuple[str, Facilitator]) -> str:
    return seller[0]


def spent_and_reserved(engine: PolicyEngine, agent: str = "bot") -> tuple[int, int]:
    window = engine.budget(agent).periods
    w = next(iter(window.values()))
    return w.spent.value, w.reserved.value


def sync_client(engine: PolicyEngine) -> tuple[x402ClientSync, CountingSigner]:
    signer = CountingSigner()
    client = x402ClientSync()
    client.register(NETWORK, ExactEvmClientScheme(signer))
    guard_x402(client, engine, "bot")
    return client, signer


def denial(err: BaseException) -> BaseException | None:
    while err is not None and not isinstance(err, PaymentDenied | PolicyValidationError):
        err = err.__cause__  # type: ignore[assignment]
    return err


# --- 8 concurrent paid requests against a budget for 5 ---------------------------------------


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_eight_threads_through_the_requests_wrapper_pay_exactly_five(
    store: str, url: str, facilitator: Facilitator, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    backend = make_backend(store, tmp_path, request)
    engine = PolicyEngine(storage=backend.handle(), clock=ManualClock())
    engine.set_policy("bot", BUDGET_FOR_5)
    client, signer = sync_client(engine)
    start = threading.Barrier(8)
    paid: list[str] = []
    refused: list[BaseException] = []

    def buy() -> None:
        session = x402_requests(client)
        start.wait()
        try:
            r = session.get(f"{url}/report", timeout=30)
            assert r.status_code == 200
            paid.append(r.json()["report"])
        except Exception as err:
            refused.append(err)

    threads = [threading.Thread(target=buy) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert paid == ["paid content"] * 5
    assert [type(denial(e)) for e in refused] == [X402PaymentDenied] * 3
    assert {denial(e).reason for e in refused} == {"DAILY_LIMIT"}  # type: ignore[union-attr]
    assert signer.signatures == 5  # the three denied were never signed
    assert (facilitator.verified, len(facilitator.settled)) == (5, 5)
    assert {a["to"] for a in facilitator.settled} == {PAY_TO}
    assert spent_and_reserved(engine) == (5 * PRICE, 0)
    assert [h.event for h in engine.history("bot", 100)].count("confirm") == 5
    engine.close()


def test_eight_tasks_through_the_httpx_wrapper_on_an_async_engine_pay_exactly_five(
    url: str, facilitator: Facilitator
) -> None:
    clock = ManualClock()

    async def main() -> tuple[list[httpx.Response], list[BaseException], int]:
        async with AsyncPolicyEngine(clock=clock) as aengine:
            await aengine.set_policy("bot", BUDGET_FOR_5)
            signer = CountingSigner()
            client = x402Client()
            client.register(NETWORK, ExactEvmClientScheme(signer))
            guard_x402(client, aengine, "bot")
            async with httpx.AsyncClient(transport=x402AsyncTransport(client), timeout=30) as http:
                results = await asyncio.gather(
                    *(http.get(f"{url}/report") for _ in range(8)), return_exceptions=True
                )
            budget = await aengine.budget("bot")
            w = next(iter(budget.periods.values()))
            assert (w.spent.value, w.reserved.value) == (5 * PRICE, 0)
        ok = [r for r in results if isinstance(r, httpx.Response)]
        failed = [r for r in results if isinstance(r, BaseException)]
        return ok, failed, signer.signatures

    ok, failed, signatures = asyncio.run(main())
    assert [r.status_code for r in ok] == [200] * 5
    assert [denial(e).reason for e in failed] == ["DAILY_LIMIT"] * 3  # type: ignore[union-attr]
    assert signatures == 5
    assert (facilitator.verified, len(facilitator.settled)) == (5, 5)


# --- settlement outcomes -------------------------------------------------------------------------


def test_a_failed_settlement_stays_held_and_is_spent_at_its_ttl(
    url: str, facilitator: Facilitator
) -> None:
    """The seller's word that it failed is not proof: the signed authorization could still be
    settled (tests/test_x402_lying_seller.py has a seller that does)."""
    clock = ManualClock()
    engine = PolicyEngine(clock=clock)
    engine.set_policy("bot", BUDGET_FOR_5)
    client, _ = sync_client(engine)
    facilitator.fail_settle = True
    r = x402_requests(client).get(f"{url}/report", timeout=30)
    assert r.status_code == 402
    assert facilitator.refused == ["insufficient_funds"]
    assert spent_and_reserved(engine) == (0, PRICE)  # held, not given back
    assert "release" not in [h.event for h in engine.history("bot", 10)]
    facilitator.fail_settle = False
    assert x402_requests(client).get(f"{url}/report", timeout=30).status_code == 200
    assert spent_and_reserved(engine) == (PRICE, PRICE)
    clock.advance(minutes=5)
    assert spent_and_reserved(engine) == (2 * PRICE, 0)


def test_a_paid_request_that_fails_without_a_payment_response_is_spent_at_its_ttl(
    url: str, facilitator: Facilitator
) -> None:
    """The client cannot tell a seller that failed from one that settled and said nothing."""
    clock = ManualClock()
    engine = PolicyEngine(clock=clock)
    engine.set_policy("bot", BUDGET_FOR_5)
    client, signer = sync_client(engine)
    r = x402_requests(client).get(f"{url}/broken", timeout=30)
    assert r.status_code == 500  # the seller's handler failed; it did not settle
    assert (signer.signatures, len(facilitator.settled)) == (1, 0)
    assert spent_and_reserved(engine) == (0, PRICE)  # outcome unknown to the client: held
    clock.advance(minutes=5)  # the reservation's TTL (and the authorization's validity)
    assert spent_and_reserved(engine) == (PRICE, 0)  # counted as spent, never given back
    expired = engine.history("bot", 1)[0]
    assert (expired.event, expired.detail) == ("expire", SPENT_ON_EXPIRY)


def test_a_payment_signed_but_never_answered_is_spent_at_its_ttl() -> None:
    clock = ManualClock()
    engine = PolicyEngine(clock=clock)
    engine.set_policy("bot", BUDGET_FOR_5)
    client, signer = sync_client(engine)
    client.create_payment_payload(payment_required())  # then the transport raised: no hook runs
    assert signer.signatures == 1
    assert spent_and_reserved(engine) == (0, PRICE)
    clock.advance(minutes=5)
    assert spent_and_reserved(engine) == (PRICE, 0)


def test_an_async_payment_signed_but_never_answered_is_spent_at_its_ttl() -> None:
    async def main() -> tuple[tuple[int, int], tuple[int, int], int]:
        clock = ManualClock()
        engine = AsyncPolicyEngine(clock=clock)
        await engine.set_policy("bot", BUDGET_FOR_5)
        signer = CountingSigner()
        client = x402Client()
        client.register(NETWORK, ExactEvmClientScheme(signer))
        guard_x402(client, engine, "bot")
        await client.create_payment_payload(payment_required())  # then the transport raised

        async def used() -> tuple[int, int]:
            window = (await engine.budget("bot")).periods["daily"]  # type: ignore[index]
            return window.spent.value, window.reserved.value

        held = await used()
        clock.advance(minutes=5)
        after = await used()
        await engine.close()
        return held, after, signer.signatures

    assert asyncio.run(main()) == ((0, PRICE), (PRICE, 0), 1)


def test_a_payload_whose_sending_cannot_be_recorded_is_never_sent() -> None:
    """The store fails as the guard marks the payment sent: x402 gets an error, not a payload."""
    store = FaultyStorage()
    clock = ManualClock()
    engine = PolicyEngine(storage=store, clock=clock)  # type: ignore[arg-type]
    engine.set_policy("bot", BUDGET_FOR_5)
    client, signer = sync_client(engine)
    mark_sent = engine.mark_sent

    def store_down(*args: Any, **kwargs: Any) -> Any:
        store.down = True
        try:
            return mark_sent(*args, **kwargs)
        finally:
            store.down = False

    engine.mark_sent = store_down  # type: ignore[method-assign]
    with pytest.raises(StorageUnavailableError):
        client.create_payment_payload(payment_required())
    assert signer.signatures == 1  # signed in memory, never returned to be sent
    assert spent_and_reserved(engine) == (0, 0)  # released: nothing left
    assert [h.event for h in engine.history("bot", 2)] == ["release", "decision"]


def test_a_seller_that_settles_without_saying_so_is_paid_at_most_the_budget(
    url: str, facilitator: Facilitator
) -> None:
    """A dishonest seller settles and answers 500: the budget still holds, TTL after TTL."""
    clock = ManualClock()
    engine = PolicyEngine(clock=clock)
    engine.set_policy("bot", BUDGET_FOR_5)  # five payments of PRICE a day
    client, _ = sync_client(engine)
    paid = denied = 0
    for _ in range(12):
        try:
            r = x402_requests(client).get(f"{url}/settles-silently", timeout=30)
        except Exception as err:  # the wrapper's own PaymentError
            found = denial(err)
            denied += isinstance(found, X402PaymentDenied) and found.reason == "DAILY_LIMIT"
        else:
            paid += r.status_code == 500
        clock.advance(minutes=5)  # each reservation expires before the next payment
    assert denied == 7
    assert len(facilitator.settled) == paid == 5  # never more than the daily limit allows
    assert spent_and_reserved(engine) == (5 * PRICE, 0)


def test_the_agent_cannot_release_a_payment_the_x402_guard_signed() -> None:
    """The guard's reservation is claimed as it is made; the id may be seen in history."""
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", BUDGET_FOR_5)
    client, _ = sync_client(engine)
    client.create_payment_payload(payment_required())  # signed, the request under way
    rid = engine.history("bot", 1)[0].reservation_id or ""
    for settle in (engine.release, engine.confirm):  # e.g. the agent's own MCP tools
        with pytest.raises(ConflictError) as refused:
            settle(rid)
        assert refused.value.code == ErrorCode.RESERVATION_CLAIMED
    assert spent_and_reserved(engine) == (0, PRICE)


def test_a_payment_the_seller_refuses_with_402_again_stays_held() -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", BUDGET_FOR_5)
    client, _ = sync_client(engine)
    required = payment_required()
    payload = client.create_payment_payload(required)
    client.handle_payment_response(
        PaymentResponseContext(payment_payload=payload, requirements=payload.accepted,
                               payment_required=required)  # type: ignore[arg-type]
    )  # fmt: skip
    assert spent_and_reserved(engine) == (0, PRICE)  # it was sent: it could still be settled
    assert "release" not in [h.event for h in engine.history("bot", 10)]


# --- what is never signed ------------------------------------------------------------------------


def payment_required(
    asset: str = USDC, amount: str = str(PRICE), timeout: int = 300, network: str = NETWORK
) -> PaymentRequired:
    return PaymentRequired(
        x402_version=2,
        accepts=[
            PaymentRequirements(
                scheme="exact", network=network, asset=asset, amount=amount, pay_to=PAY_TO,
                max_timeout_seconds=timeout, extra={"name": "USDC", "version": "2"},
            )
        ],
    )  # fmt: skip


def test_an_asset_the_table_does_not_know_is_denied_and_never_signed(
    url: str, facilitator: Facilitator
) -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", {})  # a policy without amounts would allow any token
    client, signer = sync_client(engine)
    client.set_spend_controls(False)  # x402's own controls would refuse it: switch them off
    with pytest.raises(Exception) as err:  # noqa: PT011 - the wrapper's own PaymentError
        x402_requests(client).get(f"{url}/odd-token", timeout=30)
    found = denial(err.value)
    assert isinstance(found, X402PaymentDenied)
    assert isinstance(found, PaymentAbortedError)
    assert found.reason == "ASSET_MISMATCH"
    assert UNKNOWN_TOKEN in str(found)
    assert (signer.signatures, facilitator.verified) == (0, 0)
    assert engine.history("bot", 1)[0].event == "policy_set"  # the engine was never asked


def test_an_asset_added_to_the_table_is_counted_in_its_own_symbol_and_decimals() -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", {"limits": {"perTransaction": {"value": "5", "decimals": 0,
                                                             "symbol": "ODD"}}})  # fmt: skip
    signer = CountingSigner()
    client = x402ClientSync()
    client.register(NETWORK, ExactEvmClientScheme(signer))
    client.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": False})
    guard_x402(client, engine, "bot", assets={(NETWORK, UNKNOWN_TOKEN.upper()): Asset("ODD", 0)})
    client.create_payment_payload(payment_required(UNKNOWN_TOKEN.lower(), "5"))
    with pytest.raises(X402PaymentDenied) as err:
        client.create_payment_payload(payment_required(UNKNOWN_TOKEN, "6"))
    assert err.value.decision.code == "PER_TRANSACTION_LIMIT"
    assert signer.signatures == 1


def test_the_known_asset_table_agrees_with_the_x402_packages_own() -> None:
    theirs = {(n, a["asset"].lower()): (a["symbol"], a["decimals"])
              for n, assets in DEFAULT_ASSETS.items() for a in assets}  # fmt: skip
    ours = {k: (v.symbol, v.decimals) for k, v in KNOWN_ASSETS.items() if k[0].startswith("eip155")}
    assert ours
    assert all(theirs[k] == v for k, v in ours.items())
    # the Solana constants, read without the Solana packages the svm package needs
    import importlib.util

    import x402

    path = Path(x402.__file__).parent / "mechanisms" / "svm" / "constants.py"
    spec = importlib.util.spec_from_file_location("svm_constants", path)
    assert spec is not None
    assert spec.loader is not None
    constants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(constants)
    solana = {k: v for k, v in KNOWN_ASSETS.items() if k[0].startswith("solana")}
    assert (constants.SOLANA_MAINNET_CAIP2, constants.USDC_MAINNET_ADDRESS) in solana
    assert (constants.SOLANA_DEVNET_CAIP2, constants.USDC_DEVNET_ADDRESS) in solana
    assert {v.decimals for v in solana.values()} == {constants.DEFAULT_DECIMALS}


def test_a_payment_that_needs_approval_is_aborted_unsigned_and_held() -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", {
        "limits": {"daily": {"value": "1000000", "decimals": 6, "symbol": "USDC"}},
        "approvalConfig": {"thresholds": [{"amount": {"value": "5000", "decimals": 6,
                                                      "symbol": "USDC"},
                                           "requiredApprovers": 1, "approvers": ["cfo@x.com"]}]},
    })  # fmt: skip
    client, signer = sync_client(engine)
    with pytest.raises(X402ApprovalRequired) as err:
        client.create_payment_payload(payment_required())
    assert err.value.reason == "APPROVAL_REQUIRED"
    assert err.value.approval_id
    assert signer.signatures == 0
    assert spent_and_reserved(engine) == (0, PRICE)  # held while the approval waits


def test_requirements_the_guard_cannot_judge_are_refused_before_signing() -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", BUDGET_FOR_5)
    client, signer = sync_client(engine)
    with pytest.raises(PolicyValidationError) as err:
        client.create_payment_payload(payment_required(timeout=600))  # outlives the 5 min TTL
    assert err.value.path == "$.maxTimeoutSeconds"
    with pytest.raises(PolicyValidationError) as err:
        client.create_payment_payload(payment_required(amount="0.01"))
    assert err.value.path == "$.paymentRequirements.amount"
    assert signer.signatures == 0
    assert spent_and_reserved(engine) == (0, 0)


@pytest.mark.parametrize("timeout", [0, -5, None, "300", 1.5, True])
def test_a_max_timeout_that_is_not_a_positive_whole_number_is_refused_unsigned(
    timeout: Any,
) -> None:
    # x402 signs an authorization valid for an hour when maxTimeoutSeconds is 0: refused
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", BUDGET_FOR_5)
    client, signer = sync_client(engine)
    required = payment_required()
    required.accepts[0] = PaymentRequirements.model_construct(
        **{**required.accepts[0].__dict__, "max_timeout_seconds": timeout}
    )
    with pytest.raises(PolicyValidationError) as err:
        client.create_payment_payload(required)
    assert err.value.path == "$.maxTimeoutSeconds"
    assert signer.signatures == 0
    assert spent_and_reserved(engine) == (0, 0)


def _raise_the_amount(ctx: Any) -> None:
    """A hook registered after the guard that changes what is about to be signed."""
    ctx.selected_requirements.amount = str(1000 * PRICE)


def test_requirements_changed_after_they_were_authorized_are_never_signed_away() -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", BUDGET_FOR_5)
    client, signer = sync_client(engine)
    client.on_before_payment_creation(_raise_the_amount)
    with pytest.raises(PolicyValidationError) as err:
        client.create_payment_payload(payment_required())
    assert err.value.path == "$.paymentRequirements"
    assert "changed after they were authorized" in err.value.message
    assert signer.signatures == 1  # signed in memory, never returned to be sent
    assert spent_and_reserved(engine) == (0, 0)
    assert [h.event for h in engine.history("bot", 2)] == ["release", "decision"]


def test_requirements_changed_while_an_async_authorize_waits_are_never_signed_away() -> None:
    async def main() -> tuple[BaseException | None, tuple[int, int], int]:
        engine = AsyncPolicyEngine(clock=ManualClock())
        await engine.set_policy("bot", BUDGET_FOR_5)
        signer = CountingSigner()
        client = x402Client()
        client.register(NETWORK, ExactEvmClientScheme(signer))
        guard_x402(client, engine, "bot")
        required = payment_required()
        authorize = engine.authorize

        async def authorize_then_change(*args: Any, **kwargs: Any) -> Any:
            decision = await authorize(*args, **kwargs)
            required.accepts[0].amount = str(1000 * PRICE)  # while the guard awaits
            return decision

        engine.authorize = authorize_then_change  # type: ignore[method-assign]
        try:
            await client.create_payment_payload(required)
        except PolicyValidationError as err:
            error: BaseException | None = err
        else:
            error = None
        window = (await engine.budget("bot")).periods["daily"]  # type: ignore[index]
        await engine.close()
        return error, (window.spent.value, window.reserved.value), signer.signatures

    error, used, signatures = asyncio.run(main())
    assert isinstance(error, PolicyValidationError)
    assert error.path == "$.paymentRequirements"
    assert (used, signatures) == ((0, 0), 1)


def test_a_signed_authorization_for_other_terms_than_accepted_is_refused() -> None:
    from agentpolicy.x402 import _altered, _terms

    terms = _terms(payment_required().accepts[0])
    good = type("Payload", (), {})()
    good.accepted = payment_required().accepts[0]
    good.payload = {
        "authorization": {"value": str(PRICE), "to": PAY_TO.upper().replace("0X", "0x")}
    }
    assert _altered(terms, good) is None
    for authorization in ({"value": str(2 * PRICE), "to": PAY_TO},
                          {"value": str(PRICE), "to": "0x" + "11" * 20},
                          {"value": "1e4", "to": PAY_TO}):  # fmt: skip
        good.payload = {"authorization": authorization}
        assert "signed authorization moves" in (_altered(terms, good) or "")


def test_a_signing_failure_releases_the_reservation() -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", BUDGET_FOR_5)
    client, signer = sync_client(engine)
    signer.fail = True
    with pytest.raises(RuntimeError, match="locked"):
        client.create_payment_payload(payment_required())
    assert spent_and_reserved(engine) == (0, 0)
    assert [h.event for h in engine.history("bot", 2)] == ["release", "decision"]


def test_a_settlement_whose_confirm_fails_is_kept_for_reconciliation(
    url: str, facilitator: Facilitator
) -> None:
    clock = ManualClock()
    engine = PolicyEngine(clock=clock)
    engine.set_policy("bot", BUDGET_FOR_5)
    signer = CountingSigner()
    client = x402ClientSync()
    client.register(NETWORK, ExactEvmClientScheme(signer))
    guard = guard_x402(client, engine, "bot")
    original = engine.confirm

    def late_confirm(rid: str, **kw: Any) -> Any:
        clock.advance(minutes=5)  # the settlement took longer than the reservation lived
        return original(rid, **kw)

    engine.confirm = late_confirm  # type: ignore[method-assign]
    r = x402_requests(client).get(f"{url}/report", timeout=30)
    assert r.status_code == 200  # the content that was paid for is returned
    assert len(facilitator.settled) == 1
    (lost,) = guard.unconfirmed
    assert "RESERVATION" in lost.error or "expired" in lost.error
    assert lost.transaction.startswith("0x")
    assert lost.request.amount == PRICE
    late = engine.get_reservation(lost.reservation_id)
    assert late.status is ReservationStatus.EXPIRED
    assert late.sent_at is not None  # marked before the payment left: so it counts as spent
    assert spent_and_reserved(engine) == (PRICE, 0)


async def cancel_during_the_authorize(
    aengine: AsyncPolicyEngine, store: FaultyStorage, signer: CountingSigner
) -> None:
    """Start an x402 payment of ``bot`` and cancel it once its authorize is in the store."""
    client = x402Client()
    client.register(NETWORK, ExactEvmClientScheme(signer))
    guard_x402(client, aengine, "bot")
    store.stall()
    task = asyncio.create_task(client.create_payment_payload(payment_required()))
    await asyncio.get_running_loop().run_in_executor(None, store.stalled.wait, 10)
    task.cancel()  # the authorize is in the store: it will still commit
    store.resume()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_an_x402_call_cancelled_during_its_authorize_releases_what_it_reserved() -> None:
    store = FaultyStorage()
    engine = PolicyEngine(storage=store, clock=ManualClock())  # type: ignore[arg-type]
    engine.set_policy("bot", BUDGET_FOR_5)
    signer = CountingSigner()

    async def main() -> None:
        async with AsyncPolicyEngine.from_engine(engine) as aengine:
            await cancel_during_the_authorize(aengine, store, signer)
            deadline = time.monotonic() + 30  # the release runs in the background: wait for it
            while [h.event for h in await aengine.history("bot", 1)] != ["release"]:
                assert time.monotonic() < deadline, "the background release never ran"
                await asyncio.sleep(0.001)

    asyncio.run(main())
    assert signer.signatures == 0
    assert spent_and_reserved(engine) == (0, 0)


def test_an_engine_closed_right_after_a_cancelled_x402_call_has_released_what_it_reserved() -> None:
    store = FaultyStorage()
    engine = PolicyEngine(storage=store, clock=ManualClock())  # type: ignore[arg-type]
    engine.set_policy("bot", BUDGET_FOR_5)
    signer = CountingSigner()

    async def main() -> None:
        aengine = AsyncPolicyEngine.from_engine(engine)
        await cancel_during_the_authorize(aengine, store, signer)
        await aengine.close()  # at once: it waits for the release under way

    asyncio.run(main())
    assert signer.signatures == 0
    assert spent_and_reserved(engine) == (0, 0)
    assert [h.event for h in engine.history("bot", 1)] == ["release"]


@pytest.mark.parametrize("ended_first", [False, True])
def test_a_cancelled_x402_call_on_a_sync_engine_releases_even_as_the_loop_ends(
    ended_first: bool,
) -> None:
    """With a sync engine, the release after a cancelled authorize was a task of its own:
    asyncio.run ending cancelled it before it began, and the amount stayed held until its TTL.
    Cancelled while the authorize runs (its thread releases), or after it ended but before the
    task took its answer (a thread of its own releases)."""
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", BUDGET_FOR_5)
    signer = CountingSigner()
    inside, finished, go = threading.Event(), threading.Event(), threading.Event()
    original = engine.authorize

    def held(request: Any, **kw: Any) -> Any:  # in a thread of the default executor
        inside.set()
        go.wait(10)
        try:
            return original(request, **kw)
        finally:
            finished.set()

    engine.authorize = held  # type: ignore[method-assign]
    released_in: list[str] = []
    release = engine.release

    def watched(*args: Any, **kw: Any) -> Any:
        released_in.append(threading.current_thread().name)
        return release(*args, **kw)

    engine.release = watched  # type: ignore[method-assign]

    async def main() -> None:
        client = x402Client()
        client.register(NETWORK, ExactEvmClientScheme(signer))
        guard_x402(client, engine, "bot")
        task = asyncio.ensure_future(client.create_payment_payload(payment_required()))
        await asyncio.get_running_loop().run_in_executor(None, inside.wait, 10)
        if ended_first:
            go.set()
            assert finished.wait(10)  # the loop is blocked here: the task cannot take it yet
            time.sleep(0.5)  # the thread hands its answer over (a few lines of Python)
        task.cancel()
        if not ended_first:  # the task takes the cancel while the authorize still waits
            with pytest.raises(asyncio.CancelledError):
                await task
        go.set()  # returning ends asyncio.run, which cancels every task left

    asyncio.run(main())  # waits for the default executor's threads
    for thread in threading.enumerate():
        if thread.name == "agentpolicy-x402-release":
            thread.join(10)
    assert signer.signatures == 0
    assert spent_and_reserved(engine) == (0, 0)
    assert [h.event for h in engine.history("bot", 2)] == ["release", "decision"]
    assert len(released_in) == 1
    assert (released_in[0] == "agentpolicy-x402-release") is ended_first, released_in


# --- wiring ----------------------------------------------------------------------------------------


def test_an_async_client_with_a_sync_engine_runs_the_engine_off_the_loop() -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", BUDGET_FOR_5)
    client = x402Client()
    client.register(NETWORK, ExactEvmClientScheme(CountingSigner()))
    guard_x402(client, engine, "bot")
    loop_thread: list[int] = []
    engine_threads: list[int] = []
    original = engine.authorize

    def spy(request: Any, **kw: Any) -> Any:
        engine_threads.append(threading.get_ident())
        return original(request, **kw)

    engine.authorize = spy  # type: ignore[method-assign]

    async def main() -> None:
        loop_thread.append(threading.get_ident())
        required = payment_required()
        payload = await client.create_payment_payload(required)
        settle = {"success": True, "transaction": "0xabc", "network": NETWORK}
        from x402.schemas import SettleResponse

        await client.handle_payment_response(
            PaymentResponseContext(payment_payload=payload, requirements=payload.accepted,  # type: ignore[arg-type]
                                   settle_response=SettleResponse.model_validate(settle))
        )  # fmt: skip

    asyncio.run(main())
    assert engine_threads
    assert loop_thread[0] not in engine_threads
    assert spent_and_reserved(engine) == (PRICE, 0)


def test_wiring_mistakes_are_clear_errors() -> None:
    engine = PolicyEngine(clock=ManualClock())

    async def sync_client_with_async_engine() -> None:
        async with AsyncPolicyEngine.from_engine(engine) as aengine:
            with pytest.raises(PolicyValidationError) as err:
                guard_x402(x402ClientSync(), aengine, "bot")
            assert err.value.path == "$.engine"

    asyncio.run(sync_client_with_async_engine())
    client = x402ClientSync()
    guard_x402(client, engine, "bot")
    with pytest.raises(PolicyValidationError) as err:
        guard_x402(client, engine, "bot")
    assert "already guarded" in str(err.value)
    for kwargs, path in [
        ({"agent_id": ""}, "$.agentId"),
        ({"assets": {("eip155:1", "0x1"): Asset("", 256)}}, "$.assets[0].decimals"),
        ({"assets": {"0x1": Asset("X", 6)}}, "$.assets[0]"),
        ({"category": " "}, "$.category"),
    ]:
        args: dict[str, Any] = {"agent_id": "bot", **kwargs}
        with pytest.raises(PolicyValidationError) as err:
            guard_x402(x402ClientSync(), engine, **args)
        assert path in [p.path for p in err.value.problems]
    with pytest.raises(PolicyValidationError) as err:
        guard_x402(object(), engine, "bot")  # type: ignore[arg-type]
    assert err.value.path == "$.client"
    assert err.value.code == ErrorCode.INVALID_INPUT


def test_payments_a_later_hook_aborts_are_forgotten_past_a_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # x402 runs neither the after nor the failure hook of a payment that a before hook
    # registered after the guard's aborts: its entry (with the seller's whole offer) stayed
    # for ever, one per payment
    from x402 import AbortResult

    from agentpolicy import x402 as guarded

    monkeypatch.setattr(guarded, "_MAX_OPEN", 3)
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", {"limits": {"daily": {"value": str(100 * PRICE), "decimals": 6,
                                                   "symbol": "USDC"}}})  # fmt: skip
    signer = CountingSigner()
    client = x402ClientSync()
    client.register(NETWORK, ExactEvmClientScheme(signer))
    guard = guard_x402(client, engine, "bot")
    client.on_before_payment_creation(lambda ctx: AbortResult(reason="not today"))
    with caplog.at_level("WARNING", logger="agentpolicy.x402"):
        for _ in range(5):
            with pytest.raises(PaymentAbortedError):
                client.create_payment_payload(payment_required())
    assert len(guard._creating) == 3
    assert caplog.text.count("was never created") == 2
    assert signer.signatures == 0
    assert spent_and_reserved(engine) == (0, 5 * PRICE)  # held until their TTL, as documented
