"""x402: the payments an ``x402Client`` signs are authorized first (``agentpolicy[x402]``).

``guard_x402(client, engine, agent_id)`` registers four hooks on an x402
client (``x402Client`` with :class:`~agentpolicy.AsyncPolicyEngine` or
:class:`~agentpolicy.PolicyEngine`; ``x402ClientSync`` with
:class:`~agentpolicy.PolicyEngine`), so every payment it makes, through the
x402 httpx or requests wrappers or directly, goes through the policy:

- **before the payment is signed** (``on_before_payment_creation``): the
  selected payment requirements become a :class:`~agentpolicy.PaymentRequest`
  (amount, asset, network and payee from the requirements; symbol and
  decimals from the asset table) and are authorized. A payment that is not
  allowed is aborted, and nothing is signed: the hook raises
  :class:`X402PaymentDenied` (a :class:`~agentpolicy.PaymentDenied` and an
  x402 ``PaymentAbortedError`` whose ``reason`` is the decision's code) or
  :class:`X402ApprovalRequired`.
- **when the payload is signed** (``on_after_payment_creation``): it is
  checked against what was authorized, and its reservation is marked sent
  (:meth:`~agentpolicy.PolicyEngine.mark_sent`) before x402 can send it.
- **when signing fails** (``on_payment_creation_failure``): the reservation
  is released.
- **when the seller answers the paid request** (``on_payment_response``):
  a settlement that succeeded confirms the reservation. A failed settlement
  or a payment the seller refused (402 again) releases nothing: the signed
  authorization left, and whoever holds it can settle it until it lapses,
  whatever the seller says, so the reservation stays held and counts as
  spent at its TTL (:attr:`X402Guard.unsettled` lists them).
- **where the outcome is unknown** (the paid request raised, or its answer
  carries no payment response), the reservation stays held, and when its
  TTL passes it is counted as spent, since the seller may have settled
  (docs/x402.md lists the cases).

x402's MCP clients (``x402MCPClient``, ``x402MCPClientSync``) sign with a
guarded client but never call its ``on_payment_response``: they read the
settlement from the tool result instead.
:meth:`X402Guard.watch_mcp` reads it there too, so that the payments they
make are confirmed or released as above.

An asset the table does not know is denied, never guessed: x402 payment
requirements name an asset by its contract address and carry no decimals.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TypeVar

import attrs

try:
    from x402 import PaymentAbortedError, x402Client, x402ClientSync
    from x402.mcp.client import x402MCPClientSync
    from x402.mcp.client_async import x402MCPClient
    from x402.mcp.constants import MCP_PAYMENT_RESPONSE_META_KEY
    from x402.mcp.utils import extract_payment_required_from_result
    from x402.schemas import (
        PaymentCreatedContext,
        PaymentCreationContext,
        PaymentCreationFailureContext,
        PaymentRequirements,
        PaymentResponseContext,
    )
except ImportError:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "agentpolicy.x402 needs the x402 extra: pip install 'agentpolicy[x402]'"
    ) from None

from agentpolicy._checks import MAX_TEXT, check_identifier, check_int, raise_if
from agentpolicy.aio import AsyncPolicyEngine
from agentpolicy.amounts import MAX_DECIMALS
from agentpolicy.decisions import Code, Decision
from agentpolicy.engine import PolicyEngine
from agentpolicy.errors import PolicyValidationError, Problem
from agentpolicy.guard import (
    ApprovalRequired,
    PaymentDenied,
    authorize_shielded,
    settle_shielded,
)
from agentpolicy.policy import normalize_recipient
from agentpolicy.records import Reservation
from agentpolicy.requests import PaymentRequest

__all__ = [
    "KNOWN_ASSETS",
    "Asset",
    "UnconfirmedPayment",
    "UnsettledPayment",
    "X402ApprovalRequired",
    "X402Guard",
    "X402PaymentDenied",
    "guard_x402",
]

_log = logging.getLogger("agentpolicy.x402")
_T = TypeVar("_T")
_MAX_OPEN = 10_000


@attrs.frozen
class Asset:
    """A token as policies count it: the ``symbol`` limits name and its ``decimals``."""

    symbol: str
    decimals: int


def _asset_key(network: str, address: str) -> tuple[str, str]:
    """EVM addresses compare ignoring case (checksums); others (Solana's base58) exactly."""
    return (network, address.lower() if network.startswith("eip155:") else address)


_USDC = Asset("USDC", 6)

KNOWN_ASSETS: Mapping[tuple[str, str], Asset] = MappingProxyType({
    _asset_key(network, address): asset
    for network, address, asset in [
        ("eip155:1", "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48", _USDC),  # Ethereum
        ("eip155:8453", "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", _USDC),  # Base
        ("eip155:84532", "0x036CbD53842c5426634e7929541eC2318f3dCF7e", _USDC),  # Base Sepolia
        ("eip155:137", "0x3c499c542cEF5E3811e1192ce70d8cC03d5c3359", _USDC),  # Polygon
        ("eip155:42161", "0xaf88d065e77c8cC2239327C5EDb3A432268e5831", _USDC),  # Arbitrum One
        ("eip155:421614", "0x75faf114eafb1BDbe2F0316DF893fd58CE46AA4d", _USDC),  # Arb. Sepolia
        ("eip155:43114", "0xB97EF9Ef8734C71904D8002F8b6Bc66Dd9c48a6E", _USDC),  # Avalanche
        ("solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp", "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v",
         _USDC),  # Solana
        ("solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1", "4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU",
         _USDC),  # Solana devnet
    ]
})  # fmt: skip
"""Assets the guard knows without being told: (network, contract address) -> symbol, decimals.

USDC on the networks x402 sellers use most. Pass ``assets=`` to
:func:`guard_x402` to add tokens (or correct one); anything else is denied.
"""


class X402PaymentDenied(PaymentDenied, PaymentAbortedError):  # noqa: N818 - as PaymentDenied
    """The policy denied an x402 payment before it was signed.

    A :class:`~agentpolicy.PaymentDenied` (``decision`` says why) and an x402
    ``PaymentAbortedError`` whose ``reason`` is the decision's code (such as
    ``DAILY_LIMIT``). The x402 httpx and requests wrappers raise their own
    ``PaymentError`` with this as its ``__cause__``.
    """

    def __init__(self, decision: Decision) -> None:
        PaymentDenied.__init__(self, decision)
        self.reason = str(decision.code)


class X402ApprovalRequired(ApprovalRequired, PaymentAbortedError):  # noqa: N818 - as ApprovalRequired
    """An x402 payment needs human approval; nothing was signed (``reason`` ``APPROVAL_REQUIRED``).

    The amount is held while the approval waits, as for any approval. The
    guard does not wait for humans: the x402 call fails, and a later call
    after the approval asks anew (see docs/x402.md).
    """

    def __init__(self, decision: Decision) -> None:
        ApprovalRequired.__init__(self, decision)
        self.reason = str(decision.code)


@attrs.frozen
class UnconfirmedPayment:
    """A settlement that succeeded but whose reservation could not be confirmed.

    The seller was paid (``transaction``); the confirm failed (``error``
    says why). Confirm ``reservation_id`` while it is open (as ``holder``,
    the guard's claim on it: ``engine.confirm(reservation_id,
    holder=holder)``), or leave it: the guard marked it sent before the
    payment left, so if it expires it is counted as spent all the same.
    Never count the payment again.
    """

    reservation_id: str
    request: PaymentRequest
    transaction: str
    error: str
    holder: str | None = None


@attrs.frozen
class UnsettledPayment:
    """A sent payment the seller reported not settled; its reservation stays held.

    The seller said the settlement failed (``reason``), or asked for
    payment again, after the signed authorization had left. Anyone holding
    that authorization (the seller, its facilitator) can still settle it
    until ``valid_before`` (its EIP-3009 ``validBefore`` or Permit2
    ``deadline``, ``None`` when the payload carries neither), so the guard
    does not take the seller's word for it: the reservation stays held, and
    counts as spent when it expires. If you check the chain after
    ``valid_before`` and the authorization was never used (for EIP-3009,
    ``authorizationState(from, nonce)`` is false), release it while it is
    open: ``engine.release(reservation_id, holder=holder)``.
    """

    reservation_id: str
    request: PaymentRequest
    reason: str
    holder: str
    valid_before: datetime | None = None


class X402Guard:
    """The hooks :func:`guard_x402` registers, and what they know.

    :meth:`watch_mcp` has it settle the payments of an x402 MCP client too.

    ``unconfirmed`` lists settled payments whose confirm failed (the store
    was down, or the reservation had expired): reconcile them.
    ``unsettled`` lists sent payments the seller reported not settled: they
    stay held and count as spent at their TTL, since a seller can report a
    failure and settle all the same (:class:`UnsettledPayment` says how to
    give one back after checking the chain). Each keeps its last 10,000.
    """

    def __init__(
        self,
        engine: PolicyEngine | AsyncPolicyEngine,
        agent_id: str,
        assets: Mapping[tuple[str, str], Asset],
        category: str | None,
    ) -> None:
        self.engine = engine
        self.agent_id = agent_id
        self.category = category
        self._assets = assets
        self._ttl = int(engine.reservation_ttl.total_seconds())
        self._lock = threading.Lock()
        # the reservation of each payment being made, by a token of its own: x402 runs the
        # hooks of one payment in one task (or thread), so the token its before hook sets in
        # _making is what its after or failure hook reads; the payment_required an offer shares
        # with every other payment of it (made at once, say) could be taken for another's
        self._creating: dict[object, tuple[object, _Authorized]] = {}
        # signed payloads waiting for the seller's answer, by what was signed (_payload_key): the
        # payload x402 sends and reports on is a copy of the one signed when client extensions
        # enrich it (builder codes, say), so its identity would not find it
        self._signed: dict[str, list[_Sent]] = {}
        self._open = 0
        self.unconfirmed: list[UnconfirmedPayment] = []
        self.unsettled: list[UnsettledPayment] = []
        # every reservation of this guard is claimed by it as it is made: nobody else (the
        # governed agent's own tools included) can release a payment it is making
        self._holder = "x402_" + os.urandom(12).hex()
        self._making: ContextVar[object | None] = ContextVar(
            f"agentpolicy_x402_{self._holder}", default=None
        )
        # the payloads signed during one call_tool of a watched x402MCPClientSync, by key
        self._mcp_signing: ContextVar[list[str] | None] = ContextVar(
            f"agentpolicy_x402_mcp_{self._holder}", default=None
        )

    # -- what a payment is -------------------------------------------------------------------

    def payment_request(self, requirements: Any, memo: str | None = None) -> PaymentRequest:
        """The :class:`~agentpolicy.PaymentRequest` that x402 payment requirements ask for.

        Raises :class:`X402PaymentDenied` (``ASSET_MISMATCH``) for an asset
        the table does not know, and
        :class:`~agentpolicy.PolicyValidationError` for requirements the
        guard cannot judge: x402 version 1, a scheme other than ``exact``
        (``upto``, ``batch-settlement``: what they sign is not the amount
        counted), an amount that is not a whole number of base units, or a
        signed authorization that would outlive the reservation
        (``maxTimeoutSeconds`` above the engine's ``reservation_ttl``, or not
        a whole number of seconds of at least 1).
        """
        if not isinstance(requirements, PaymentRequirements):
            raise PolicyValidationError.single(
                "$.x402Version",
                "only x402 version 2 payments are guarded: version 1 reports no "
                "settlement to client hooks, so a payment could never be confirmed",
            )
        if requirements.scheme not in _SCHEMES:
            raise PolicyValidationError.single(
                "$.scheme",
                f"the guard counts only the 'exact' scheme (one payment of the amount to the "
                f"payee), not {str(requirements.scheme)[:64]!r}: a scheme that signs a deposit "
                "or an amount settled later could pay what the guard does not count",
            )
        network, address = str(requirements.network), str(requirements.asset)
        asset = self._assets.get(_asset_key(network, address))
        if asset is None:
            raise X402PaymentDenied(
                Decision(
                    allowed=False,
                    code=Code.ASSET_MISMATCH,
                    reason=f"the asset {address} on {network} is not in the guard's asset "
                    "table, so its symbol and decimals are unknown: add it with "
                    "guard_x402(..., assets={(network, address): Asset(symbol, decimals)})",
                )
            )
        timeout = requirements.max_timeout_seconds
        if type(timeout) is not int or timeout < 1:
            raise PolicyValidationError.single(
                "$.maxTimeoutSeconds",
                f"must be a whole number of seconds from 1 to {self._ttl}, not {timeout!r}: "
                "x402 signs an authorization valid for an hour when it is 0",
            )
        if timeout > self._ttl:
            raise PolicyValidationError.single(
                "$.maxTimeoutSeconds",
                f"the seller's authorization would stay valid for "
                f"{requirements.max_timeout_seconds} s, longer than a reservation is held "
                f"({self._ttl} s): a payment whose outcome is unknown could be settled after "
                "its reservation expired; raise the engine's reservation_ttl",
            )
        try:
            return PaymentRequest(
                agent_id=self.agent_id,
                amount=requirements.amount,
                recipient=requirements.pay_to,
                network=network,
                category=self.category,
                decimals=asset.decimals,
                symbol=asset.symbol,
                memo=memo,
            )
        except PolicyValidationError as err:
            raise err.under("$.paymentRequirements") from None

    def _request(self, ctx: PaymentCreationContext) -> PaymentRequest:
        resource = getattr(ctx.payment_required, "resource", None)
        url = getattr(resource, "url", None)
        memo = f"x402 {url}"[:MAX_TEXT] if url else None
        return self.payment_request(ctx.selected_requirements, memo)

    # -- bookkeeping (no I/O; the lock is never held across a call or an await) --------------

    def _admit(
        self,
        ctx: PaymentCreationContext,
        request: PaymentRequest,
        terms: _Terms,
        decision: Decision,
    ) -> None:
        if decision.allowed and decision.reservation_id:
            token = object()
            with self._lock:
                if len(self._creating) >= _MAX_OPEN:  # a later before hook aborted or raised:
                    # x402 ran neither the after nor the failure hook of those, and never will
                    lost = self._creating.pop(next(iter(self._creating)))[1][0]
                    _log.warning("agentpolicy: forgot payment %s (it was never created)", lost)
                self._creating[token] = (
                    ctx.payment_required,
                    (decision.reservation_id, request, terms),
                )
            self._making.set(token)
            return
        if decision.requires_approval and decision.approval_id:
            raise X402ApprovalRequired(decision)
        raise X402PaymentDenied(decision)

    def _take_creating(self, ctx: PaymentCreationContext) -> _Authorized | None:
        """The reservation this payment's before hook made, once; ``None`` if none is left."""
        token = self._making.get()
        with self._lock:
            found = self._creating.get(token)
            if found is None or found[0] is not ctx.payment_required:
                return None
            del self._creating[token]
            return found[1]

    def _signed_now(
        self, signed: tuple[str, datetime | None], rid: str, request: PaymentRequest
    ) -> None:
        """Remember a payment just marked sent: ``signed`` is :func:`_signed_of` its payload.

        Nothing here can fail: what could (reading the payload) was done
        before the payment was marked sent, so it could still be refused.
        """
        key, valid_before = signed
        with self._lock:
            if self._open >= _MAX_OPEN:  # long past their TTL: nobody will answer
                oldest = next(iter(self._signed))
                entries = self._signed[oldest]
                lost = entries.pop(0)[0]
                if not entries:
                    del self._signed[oldest]
                self._open -= 1
                _log.warning("agentpolicy: forgot payment %s (no answer came)", lost)
            self._signed.setdefault(key, []).append((rid, request, valid_before))
            self._open += 1
        signing = self._mcp_signing.get()
        if signing is not None:  # a watched x402MCPClientSync is sending it: it reports on it
            signing.append(key)

    def _take_signed(self, payload: Any) -> _Sent | None:
        return self._take_key(_payload_key(payload))

    def _take_key(self, key: str) -> _Sent | None:
        with self._lock:
            entries = self._signed.get(key)
            if not entries:
                return None
            found = entries.pop(0)
            if not entries:
                del self._signed[key]
            self._open -= 1
            return found

    def _confirm_failed(
        self, rid: str, request: PaymentRequest, transaction: str, err: Exception
    ) -> None:
        with self._lock:  # the last 10,000, as unsettled: a long outage must not fill memory
            if len(self.unconfirmed) >= _MAX_OPEN:
                del self.unconfirmed[0]
            self.unconfirmed.append(
                UnconfirmedPayment(rid, request, transaction, str(err), holder=self._holder)
            )
        _log.error(
            "agentpolicy: x402 payment %s was settled (%s) but reservation %s was not "
            "confirmed: %s",
            request.amount,
            transaction,
            rid,
            err,
        )

    def _reported_unsettled(
        self, rid: str, request: PaymentRequest, valid_before: datetime | None, reason: str
    ) -> None:
        """The seller said it did not settle a sent payment: its reservation stays held.

        Nothing is released: the signed authorization can still be settled by
        whoever holds it until ``valid_before``, the seller included, so a
        seller's word that it failed would otherwise give the budget back for
        a payment it may have taken. Held and marked sent, it counts as spent
        when it expires, unless someone who checked the chain releases it.
        """
        with self._lock:
            if len(self.unsettled) >= _MAX_OPEN:
                del self.unsettled[0]
            self.unsettled.append(
                UnsettledPayment(rid, request, reason, self._holder, valid_before)
            )
        _log.warning(
            "agentpolicy: the seller reported x402 payment %s (reservation %s) unsettled (%s); "
            "the signed authorization can still be settled until %s, so it stays held and "
            "counts as spent when it expires, unless released after a check of the chain",
            request.amount,
            rid,
            reason,
            "its validBefore" if valid_before is None else valid_before.isoformat(),
        )

    # -- the hooks of x402ClientSync ---------------------------------------------------------

    def _sync(self) -> PolicyEngine:
        assert isinstance(self.engine, PolicyEngine)  # noqa: S101 - checked by guard_x402
        return self.engine

    def before_sync(self, ctx: PaymentCreationContext) -> None:
        """Authorize the selected requirements before anything is signed."""
        terms = _terms(ctx.selected_requirements)  # before anything can change them
        request = self._request(ctx)
        self._admit(ctx, request, terms, self._sync().authorize(request, holder=self._holder))

    def after_sync(self, ctx: PaymentCreatedContext) -> None:
        """Check that what was signed is what was authorized; remember its reservation.

        A payload signed for other terms (the requirements were changed
        after they were authorized: by a later hook, or by code holding
        them) is refused: its reservation is released and the hook raises,
        so x402 never returns or sends it.
        """
        taken = self._take_creating(ctx)
        if taken is None:
            raise _unauthorized()
        rid, request, terms = taken
        try:
            altered = _altered(terms, ctx.payment_payload)
            signed = _signed_of(ctx.payment_payload)
        except Exception:  # a payload the guard cannot read is never sent
            self._quietly(lambda: self._sync().release(rid, holder=self._holder), rid)
            raise
        if altered is not None:
            self._quietly(lambda: self._sync().release(rid, holder=self._holder), rid)
            raise PolicyValidationError.single("$.paymentRequirements", altered)
        try:  # from here the payee may be paid whatever answer comes, or none
            self._sync().mark_sent(rid, holder=self._holder)
        except Exception:
            self._quietly(lambda: self._sync().release(rid, holder=self._holder), rid)
            raise  # so x402 never sends it
        self._signed_now(signed, rid, request)

    def failure_sync(self, ctx: PaymentCreationFailureContext) -> None:
        """Signing failed: give the budget back."""
        taken = self._take_creating(ctx)
        if taken is not None:
            rid = taken[0]
            self._quietly(lambda: self._sync().release(rid, holder=self._holder), rid)

    def response_sync(self, ctx: PaymentResponseContext) -> None:
        """Confirm a settled payment; release one the seller did not settle."""
        taken = self._take_signed(ctx.payment_payload)
        if taken is not None:
            self._conclude_sync(taken, _http_outcome(ctx.settle_response))

    def _conclude_sync(self, taken: _Sent, outcome: _Outcome) -> None:
        rid, request, valid_before = taken
        settled, said = outcome
        if settled is None:
            _unknown(rid, request)
        elif settled:
            try:
                self._sync().confirm(rid, holder=self._holder)
            except Exception as err:
                self._confirm_failed(rid, request, said, err)
        else:
            self._reported_unsettled(rid, request, valid_before, said)

    def _quietly(self, release: Callable[[], Reservation], rid: str) -> None:
        try:
            release()
        except Exception as err:  # the reservation then expires by its TTL
            _log.warning("agentpolicy: could not release %s (%s); it expires by TTL", rid, err)

    # -- the hooks of x402Client -------------------------------------------------------------

    def _async_engine(self) -> AsyncPolicyEngine | None:
        """The engine if async: its ``close()`` waits for the work shielded from a cancel."""
        return self.engine if isinstance(self.engine, AsyncPolicyEngine) else None

    async def _call(self, name: str, arg: Any) -> Any:
        """``authorize``, ``mark_sent``, ``confirm`` or ``release``, as this guard's holder."""
        engine = self.engine
        if isinstance(engine, AsyncPolicyEngine):
            method: Callable[..., Awaitable[Any]] = getattr(engine, name)
            return await method(arg, holder=self._holder)
        return await asyncio.to_thread(getattr(engine, name), arg, holder=self._holder)

    async def before_async(self, ctx: PaymentCreationContext) -> None:
        """Authorize the selected requirements before anything is signed."""
        terms = _terms(ctx.selected_requirements)  # before anything can change them
        request = self._request(ctx)
        if not isinstance(self.engine, AsyncPolicyEngine):
            self._admit(ctx, request, terms, await self._authorize_in_thread(request))
            return
        authorize = self._call("authorize", request)
        self._admit(
            ctx,
            request,
            terms,
            await authorize_shielded(
                authorize,
                lambda rid: self._call("release", rid),
                engine=self._async_engine(),
            ),
        )

    async def _authorize_in_thread(self, request: PaymentRequest) -> Decision:
        """Authorize on a sync engine in a thread; if the task is cancelled, release after it.

        The release is started by a thread, not by a task: a task cancelled
        meanwhile (``asyncio.run`` ending cancels every task) would never
        start it, and the reservation would be held until its TTL. The
        authorize's own thread releases when the cancel came first; when the
        authorize ended first, a thread of its own does (a thread the
        interpreter waits for at exit).
        """
        engine, holder = self._sync(), self._holder
        lock = threading.Lock()
        ended: list[Decision] = []
        abandoned = False

        def give_back(decision: Decision) -> None:
            rid = decision.reservation_id
            if decision.allowed and rid is not None:
                self._quietly(lambda: engine.release(rid, holder=holder), rid)

        def run() -> Decision:
            decision = engine.authorize(request, holder=holder)
            with lock:
                ended.append(decision)
                undo = abandoned
            if undo:
                give_back(decision)
            return decision

        try:
            return await asyncio.to_thread(run)
        except asyncio.CancelledError:
            with lock:
                abandoned = not ended  # the authorize's thread gives it back as it ends
            if ended:  # it ended, its answer not taken: given back by a thread of its own
                threading.Thread(
                    target=give_back, args=(ended[0],), name="agentpolicy-x402-release"
                ).start()
            raise

    async def after_async(self, ctx: PaymentCreatedContext) -> None:
        """Check that what was signed is what was authorized (see :meth:`after_sync`)."""
        taken = self._take_creating(ctx)
        if taken is None:
            raise _unauthorized()
        rid, request, terms = taken
        try:
            altered = _altered(terms, ctx.payment_payload)
            signed = _signed_of(ctx.payment_payload)
        except Exception:  # a payload the guard cannot read is never sent
            await self._quietly_async(rid)
            raise
        if altered is not None:
            await self._quietly_async(rid)
            raise PolicyValidationError.single("$.paymentRequirements", altered)
        try:  # from here the payee may be paid whatever answer comes, or none
            await settle_shielded(self._call("mark_sent", rid), engine=self._async_engine())
        except BaseException:
            await self._quietly_async(rid)
            raise  # so x402 never sends it
        self._signed_now(signed, rid, request)

    async def failure_async(self, ctx: PaymentCreationFailureContext) -> None:
        """Signing failed: give the budget back."""
        taken = self._take_creating(ctx)
        if taken is not None:
            await self._quietly_async(taken[0])

    async def response_async(self, ctx: PaymentResponseContext) -> None:
        """Confirm a settled payment; release one the seller did not settle."""
        taken = self._take_signed(ctx.payment_payload)
        if taken is not None:
            await self._conclude_async(taken, _http_outcome(ctx.settle_response))

    async def _conclude_async(self, taken: _Sent, outcome: _Outcome) -> None:
        rid, request, valid_before = taken
        settled, said = outcome
        if settled is None:
            _unknown(rid, request)
        elif settled:
            try:
                await settle_shielded(self._call("confirm", rid), engine=self._async_engine())
            except Exception as err:
                self._confirm_failed(rid, request, said, err)
        else:
            self._reported_unsettled(rid, request, valid_before, said)

    async def _quietly_async(self, rid: str) -> None:
        try:
            await settle_shielded(self._call("release", rid), engine=self._async_engine())
        except Exception as err:
            _log.warning("agentpolicy: could not release %s (%s); it expires by TTL", rid, err)

    # -- x402's MCP clients ------------------------------------------------------------------

    def watch_mcp(self, mcp_client: _M) -> _M:
        """Confirm or release the payments an x402 MCP client makes, from its tool results.

        ``mcp_client`` is an ``x402MCPClient`` or an ``x402MCPClientSync``
        (``x402.mcp``) whose x402 client (``payment_client``) this guard
        guards: x402's MCP clients sign with it, then read the settlement
        from the paid tool call's result and never call its
        ``on_payment_response``, so without this every payment they make
        stays held and counts as spent when its reservation expires.

        After each paid tool call: a settlement that succeeded confirms the
        reservation (if the confirm fails, the payment goes to
        :attr:`unconfirmed`); a failed settlement, or the payment refused
        (the result asks for payment again), releases it; a result that
        reports neither (the tool failed, say) leaves it held, to count as
        spent when it expires, since the server may have settled. On an
        ``x402MCPClient`` this is an ``on_after_payment`` hook; an
        ``x402MCPClientSync`` has no hooks, so its ``call_tool`` is wrapped
        (a paid call that raises leaves its reservation held, too).

        Raises :class:`~agentpolicy.PolicyValidationError` (``$.mcpClient``)
        for anything else, an MCP client whose x402 client is not guarded by
        this guard, or one already watched. Returns ``mcp_client``.
        """
        if isinstance(mcp_client, x402MCPClient):
            inner: Any = mcp_client.payment_client
        elif isinstance(mcp_client, x402MCPClientSync):
            inner = mcp_client.payment_client
        else:
            raise PolicyValidationError.single(
                "$.mcpClient", "must be an x402MCPClient or x402MCPClientSync (x402.mcp)"
            )
        if getattr(inner, "_agentpolicy_guard", None) is not self:
            raise PolicyValidationError.single(
                "$.mcpClient",
                "its x402 client (payment_client) is not guarded by this guard: pass it to "
                "guard_x402, and watch the MCP client with the guard that returns",
            )
        if getattr(mcp_client, "_agentpolicy_guard", None) is not None:
            raise PolicyValidationError.single("$.mcpClient", "this MCP client is already watched")
        target: Any = mcp_client
        if isinstance(target, x402MCPClient):
            target.on_after_payment(self.mcp_after_async)
        else:
            if not isinstance(inner, x402ClientSync):
                raise PolicyValidationError.single(
                    "$.mcpClient", "an x402MCPClientSync signs with an x402ClientSync"
                )
            target.call_tool = self._wrap_call_tool(target.call_tool)
        target._agentpolicy_guard = self
        return mcp_client

    async def mcp_after_async(self, ctx: Any) -> None:
        """An ``x402MCPClient`` made a paid tool call: settle its reservation by the result.

        ``ctx`` is x402's ``AfterPaymentContext`` (``payment_payload``,
        ``result``, ``settle_response``); see :meth:`watch_mcp`.
        """
        taken = self._take_signed(ctx.payment_payload)
        if taken is not None:
            await self._conclude_async(taken, _mcp_outcome(ctx.settle_response, ctx.result))

    def _wrap_call_tool(self, call_tool: Callable[..., Any]) -> Callable[..., Any]:
        """``x402MCPClientSync.call_tool``, then what its result says of what it signed."""

        @functools.wraps(call_tool)
        def guarded_call_tool(name: str, args: Any = None, **kwargs: Any) -> Any:
            signing: list[str] = []
            token = self._mcp_signing.set(signing)
            try:
                result = call_tool(name, args, **kwargs)
            except BaseException:
                for key in signing:  # sent, or maybe sent, and no answer will come
                    taken = self._take_key(key)
                    if taken is not None:
                        _unknown(taken[0], taken[1])
                raise
            finally:
                self._mcp_signing.reset(token)
            outcome = _mcp_outcome(
                getattr(result, "payment_response", None), getattr(result, "raw_result", None)
            )
            for key in signing:
                taken = self._take_key(key)
                if taken is not None:
                    self._conclude_sync(taken, outcome)
            return result

        return guarded_call_tool


def _unauthorized() -> PolicyValidationError:
    """The refusal of a payload signed with no reservation of the guard left for it."""
    return PolicyValidationError.single(
        "$.paymentRequirements",
        "this payment was signed without a reservation of the guard for it (it was settled "
        "already, or the guard was added while the payment was being made): it was refused, "
        "and nothing was sent",
    )


_M = TypeVar("_M")

_Outcome = tuple[bool | None, str]
"""What the seller said of a payment: settled (``True``), not (``False``), or nothing
(``None``: outcome unknown); and the settlement's transaction (settled) or the reason the
seller gave (not settled)."""

_REFUSED = "refused: the seller asked for payment again"

_Sent = tuple[str, PaymentRequest, datetime | None]
"""A payment signed and sent: its reservation, its request, when its authorization lapses."""


def _http_outcome(settle: Any) -> _Outcome:
    """An HTTP answer: its ``PAYMENT-RESPONSE``, or none (402 again): settled or not."""
    if settle is not None and settle.success:
        return True, str(settle.transaction)
    if settle is not None:
        return False, f"settlement failed: {getattr(settle, 'error_reason', None) or 'no reason'}"
    return False, _REFUSED


def _mcp_outcome(settle: Any, result: Any) -> _Outcome:
    """A paid MCP tool call's result, as x402's MCP server reports on a payment.

    A settlement in the result's ``_meta`` (x402's MCP client hands it over
    as ``settle_response``) says settled or not. A failed settlement is
    reported elsewhere: an error result whose structured content (the
    payment requirements again) carries a payment response with
    ``success`` false. An error result asking for payment again (the
    payment was refused: verification failed) is not settled either.
    Anything else (a tool that failed before settling, a result with no
    report) is unknown.
    """
    if settle is not None:
        success = settle.get("success") if isinstance(settle, dict) else settle.success
        if success is True:
            transaction = (
                settle.get("transaction") if isinstance(settle, dict) else settle.transaction
            )
            return True, str(transaction or "")
        reason = settle.get("errorReason") if isinstance(settle, dict) else settle.error_reason
        return False, f"settlement failed: {reason or 'no reason'}"
    if result is None or not getattr(result, "is_error", False):
        return None, ""
    reported = getattr(result, "structured_content", None)
    if isinstance(reported, dict):
        failure = reported.get(MCP_PAYMENT_RESPONSE_META_KEY)
        if isinstance(failure, dict) and failure.get("success") is False:
            return False, f"settlement failed: {failure.get('errorReason') or 'no reason'}"
    try:
        refused = extract_payment_required_from_result(result) is not None
    except Exception:  # an odd result: nothing can be read from it
        refused = False
    return (False, _REFUSED) if refused else (None, "")


def _unknown(rid: str, request: PaymentRequest) -> None:
    """No outcome was reported for a sent payment: its reservation stays held."""
    _log.warning(
        "agentpolicy: no settlement was reported for x402 payment %s (reservation %s): it "
        "stays held, and counts as spent when it expires",
        request.amount,
        rid,
    )


_Terms = tuple[str, str, str, str, str]
_Authorized = tuple[str, PaymentRequest, _Terms]
"""A reservation made for a payment being signed: its id, its request, the terms authorized."""


def _terms(requirements: Any) -> _Terms:
    """What a signature commits to, as authorized: scheme, network, asset, amount, payee."""
    return (
        str(requirements.scheme),
        str(requirements.network),
        str(requirements.asset),
        str(requirements.amount),
        str(requirements.pay_to),
    )


def _payload_key(payload: Any) -> str:
    """What a signed payload is, in whichever copy of it: the terms it accepted and what was signed.

    The signed part (an EIP-3009 authorization with its nonce and signature,
    say) is unique to one signing, and x402 copies it unchanged into the
    payload it sends and reports on.
    """
    accepted = getattr(payload, "accepted", None)
    terms = None if accepted is None else _terms(accepted)
    inner = getattr(payload, "payload", None)
    try:
        signed = json.dumps(inner, sort_keys=True, default=str)
    except (TypeError, ValueError):  # keys of mixed types: still the same text for a copy
        signed = repr(inner)
    return json.dumps([terms, signed])


_SCHEMES = frozenset({"exact"})
"""The x402 schemes the guard counts: ``exact`` moves the requirements' ``amount`` to ``payTo``,
once. Others sign for what the guard does not count (``upto``: up to an amount the seller
settles later; ``batch-settlement``: a deposit into a channel, sized by the client, then
vouchers), so they are refused before anything is signed."""


def _same_units(signed: object, amount: str) -> bool:
    text = str(signed)
    return text.isdigit() and amount.isdigit() and int(text) == int(amount)


def _evm_authorizations(inner: object) -> list[tuple[str, object, object, object]] | None:
    """What an EVM ``exact`` payload signs, or ``None`` when it is malformed.

    ``(kind, value, payee, token)`` for each authorization in it (EIP-3009
    ``authorization``, Permit2 ``permit2Authorization``); ``token`` is
    ``None`` where the signature names none.
    """
    if not isinstance(inner, dict):
        return None
    found: list[tuple[str, object, object, object]] = []
    eip3009 = inner.get("authorization")
    if eip3009 is not None:
        if not isinstance(eip3009, dict):
            return None
        found.append(("EIP-3009", eip3009.get("value"), eip3009.get("to"), None))
    permit2 = inner.get("permit2Authorization")
    if permit2 is not None:
        permitted = permit2.get("permitted") if isinstance(permit2, dict) else None
        witness = permit2.get("witness") if isinstance(permit2, dict) else None
        if not (isinstance(permitted, dict) and isinstance(witness, dict)):
            return None
        found.append(
            ("Permit2", permitted.get("amount"), witness.get("to"), permitted.get("token"))
        )
    return found


def _altered(terms: _Terms, payload: Any) -> str | None:
    """Why a signed ``payload`` is not for the authorized ``terms``; ``None`` when it is.

    The payload's ``accepted`` requirements must be those terms. On an EVM
    network what is signed must be an authorization the guard can read (the
    ``exact`` scheme's EIP-3009 or Permit2 authorization: anything else may
    move what the guard does not count) that moves that amount of that token
    to that payee.
    """
    accepted = getattr(payload, "accepted", None)
    if accepted is None or _terms(accepted) != terms:
        return (
            "the payment requirements changed after they were authorized, before they were "
            "signed; the payment was refused and its reservation released"
        )
    scheme, network, asset, amount, pay_to = terms
    if scheme not in _SCHEMES:  # pragma: no cover - refused before the authorize
        return f"the scheme {scheme!r} is not counted by the guard; the payment was refused"
    if not network.startswith("eip155:"):
        return None  # x402's exact scheme there signs one transfer of the accepted terms
    signed = _evm_authorizations(getattr(payload, "payload", None))
    if not signed:
        return (
            "the signed payload carries no EIP-3009 or Permit2 authorization the guard can "
            "read, so what it pays is unknown; the payment was refused and its reservation "
            "released"
        )
    for kind, value, to, token in signed:
        same_token = token is None or str(token).lower() == asset.lower()
        if (
            not _same_units(value, amount)
            or normalize_recipient(str(to)) != normalize_recipient(pay_to)
            or not same_token
        ):
            return (
                f"the signed authorization moves {value} to {to} ({kind}), not the {amount} to "
                f"{pay_to} that was authorized; the payment was refused and its reservation "
                "released"
            )
    return None


def _signed_of(payload: Any) -> tuple[str, datetime | None]:
    """What :meth:`X402Guard._signed_now` remembers of a signed payload: its key, its lapse."""
    return _payload_key(payload), _valid_before(payload)


_LAST_INSTANT = 253_402_300_799
"""The last second a datetime holds: 9999-12-31T23:59:59Z, in seconds since the epoch."""


def _valid_before(payload: Any) -> datetime | None:
    """Until when a signed payload can be settled: EIP-3009 ``validBefore``, Permit2 ``deadline``.

    The later of the two when both are there; ``None`` when neither can be read.
    """
    inner = getattr(payload, "payload", None)
    if not isinstance(inner, dict):
        return None
    found: list[int] = []
    for name, field in (("authorization", "validBefore"), ("permit2Authorization", "deadline")):
        part = inner.get(name)
        value = str(part.get(field)) if isinstance(part, dict) else ""
        if value.isdigit() and len(value) <= 12:  # seconds; later than year 33658 is no instant
            found.append(int(value))
    if not found:
        return None
    # a later instant than a datetime holds (up to year 33658 in 12 digits) never lapses either
    return datetime.fromtimestamp(min(max(found), _LAST_INSTANT), UTC)


def _check_assets(assets: object) -> dict[tuple[str, str], Asset]:
    if not isinstance(assets, Mapping):
        raise PolicyValidationError.single(
            "$.assets", "must map (network, address) to Asset(symbol, decimals)"
        )
    found: dict[tuple[str, str], Asset] = {}
    problems: list[Problem] = []
    for i, (key, asset) in enumerate(assets.items()):
        path = f"$.assets[{i}]"
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
            problems.append(Problem(path, "the key must be a (network, address) pair of strings"))
            continue
        if not isinstance(asset, Asset):
            problems.append(Problem(path, "must be an Asset(symbol, decimals)"))
            continue
        problems += check_identifier(asset.symbol, f"{path}.symbol", 32)
        problems += check_int(asset.decimals, f"{path}.decimals", 0, MAX_DECIMALS)
        found[_asset_key(*key)] = asset
    raise_if(problems)
    return found


def guard_x402(
    client: x402Client | x402ClientSync,
    engine: PolicyEngine | AsyncPolicyEngine,
    agent_id: str,
    *,
    assets: Mapping[tuple[str, str], Asset] | None = None,
    category: str | None = None,
) -> X402Guard:
    """Make every payment ``client`` signs go through ``engine``'s policy for ``agent_id``.

    ``client`` is an ``x402Client`` (with an :class:`~agentpolicy.AsyncPolicyEngine`,
    or a :class:`~agentpolicy.PolicyEngine` whose calls then run in a
    thread) or an ``x402ClientSync`` (with a ``PolicyEngine``). ``assets``
    adds to :data:`KNOWN_ASSETS`; ``category`` is given to every payment
    request (for category rules and scopes). Register other
    ``on_before_payment_creation`` hooks before this one: a hook after it
    that aborts leaves its reservation to expire by TTL. A client is
    guarded once. Returns the :class:`X402Guard`.
    """
    problems = check_identifier(agent_id, "$.agentId")
    if category is not None:
        problems += check_identifier(category, "$.category")
    raise_if(problems)
    table = dict(KNOWN_ASSETS)
    table.update(_check_assets({} if assets is None else assets))
    if isinstance(client, x402ClientSync):
        if not isinstance(engine, PolicyEngine):
            raise PolicyValidationError.single(
                "$.engine",
                "an x402ClientSync needs a PolicyEngine "
                "(an AsyncPolicyEngine goes with x402Client)",
            )
    elif not isinstance(client, x402Client):
        raise PolicyValidationError.single("$.client", "must be an x402Client or x402ClientSync")
    elif not isinstance(engine, PolicyEngine | AsyncPolicyEngine):
        raise PolicyValidationError.single(
            "$.engine", "must be a PolicyEngine or AsyncPolicyEngine"
        )
    if getattr(client, "_agentpolicy_guard", None) is not None:
        raise PolicyValidationError.single("$.client", "this x402 client is already guarded")
    guard = X402Guard(engine, agent_id, MappingProxyType(table), category)
    if isinstance(client, x402ClientSync):
        client.on_before_payment_creation(guard.before_sync)
        client.on_after_payment_creation(guard.after_sync)
        client.on_payment_creation_failure(guard.failure_sync)
        client.on_payment_response(guard.response_sync)
    else:
        client.on_before_payment_creation(guard.before_async)
        client.on_after_payment_creation(guard.after_async)
        client.on_payment_creation_failure(guard.failure_async)
        client.on_payment_response(guard.response_async)
    client._agentpolicy_guard = guard  # type: ignore[union-attr]
    return guard
