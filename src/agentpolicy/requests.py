"""A payment an agent asks to make."""

from __future__ import annotations

import json
from typing import Any

import attrs

from agentpolicy._checks import (
    MAX_ID,
    MAX_TEXT,
    UNITS_LIMIT,
    category_form,
    check_identifier,
    check_int,
    check_payee,
    check_payment_network,
    check_text,
    network_form,
    plain_identifier,
    plain_network,
    plain_payee,
    plain_text,
    raise_if,
    units_problems,
)
from agentpolicy.amounts import (
    DEFAULT_DECIMALS,
    DEFAULT_SYMBOL,
    MAX_DECIMALS,
    Amount,
)
from agentpolicy.errors import Problem

__all__ = ["PaymentRequest"]


def _units_or_raw(raw: Any) -> Any:
    # A valid digit string becomes an int; anything else stays for
    # __attrs_post_init__ to report together with every other problem.
    if isinstance(raw, str) and not units_problems(raw, "$"):
        return int(raw)
    return raw


class _Kept:
    """What a request works out once, in a slot beside its fields (not one of them).

    A ``functools.cached_property`` on a slotted attrs class is kept through a
    ``__getattr__`` that attrs adds, and that slows every attribute read of
    the class, fields included: requests are read on every payment.
    """

    __slots__ = ("_asset",)
    _asset: Amount


@attrs.frozen
class PaymentRequest(_Kept):
    """May ``agent_id`` pay ``amount`` base units of ``symbol`` to ``recipient`` on ``network``?

    ``amount`` is an ``int`` or a string of ASCII digits, at least 1;
    ``network`` a CAIP-2 chain id (``eip155:8453``; an ``eip155`` chain id in
    decimal digits, kept without leading zeros: ``eip155:08453`` is
    ``eip155:8453``); ``category`` is kept NFKC-normalised (fullwidth
    letters are the ASCII ones), and an empty one is the same as none. So two
    spellings of one network or category are one value to every rule, scope
    group and idempotency key. Validated on construction: raises
    :class:`~agentpolicy.PolicyValidationError` listing every problem.
    ``memo`` is carried along but never decides anything (and is not part of
    the idempotency comparison).
    """

    agent_id: str
    amount: int = attrs.field(converter=_units_or_raw)
    recipient: str
    network: str = attrs.field(converter=network_form)
    category: str | None = attrs.field(default=None, converter=category_form)
    decimals: int = DEFAULT_DECIMALS
    symbol: str = DEFAULT_SYMBOL
    memo: str | None = None
    idempotency_key: str | None = None

    def __attrs_post_init__(self) -> None:
        # The common case is checked without building problem lists (requests are made for
        # every payment, and read back with every reservation); anything unusual takes the
        # full check below, with its messages and paths.
        if (
            plain_identifier(self.agent_id)
            and type(self.amount) is int
            and 0 < self.amount < UNITS_LIMIT
            and plain_payee(self.recipient, names=True)
            and plain_network(self.network)
            and (self.category is None or plain_payee(self.category))
            and type(self.decimals) is int
            and 0 <= self.decimals <= MAX_DECIMALS
            and plain_identifier(self.symbol, 32)
            and (self.memo is None or plain_text(self.memo))
            and (self.idempotency_key is None or plain_identifier(self.idempotency_key, MAX_ID))
        ):
            return
        problems: list[Problem] = check_identifier(self.agent_id, "$.agentId")
        amount = units_problems(self.amount, "$.amount")
        if not amount and self.amount == 0:
            amount = [Problem("$.amount", "must be at least 1 base unit")]
        problems += amount
        problems += check_payee(self.recipient, "$.recipient", names=True)
        problems += check_payment_network(self.network, "$.network")
        if self.category is not None:
            problems += check_payee(self.category, "$.category")
        problems += check_int(self.decimals, "$.decimals", 0, MAX_DECIMALS)
        problems += check_identifier(self.symbol, "$.symbol", 32)
        if self.memo is not None:
            problems += check_text(self.memo, "$.memo", MAX_TEXT)
        if self.idempotency_key is not None:
            problems += check_identifier(self.idempotency_key, "$.idempotencyKey", MAX_ID)
        raise_if(problems)

    @property
    def asset_amount(self) -> Amount:
        """The amount with its decimals and symbol (worked out once)."""
        try:
            return self._asset
        except AttributeError:
            found = Amount(self.amount, self.decimals, self.symbol)
            object.__setattr__(self, "_asset", found)  # a frozen instance: set once, here
            return found

    def fingerprint(self) -> str:
        """Every field that identifies the payment (all but ``memo``), for idempotency."""
        return json.dumps(
            [
                self.agent_id,
                str(self.amount),
                self.decimals,
                self.symbol,
                self.recipient,
                self.network,
                self.category,
                self.idempotency_key,
            ],
            separators=(",", ":"),
        )
