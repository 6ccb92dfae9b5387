"""The policy: immutable classes for every part of an ``AgentPolicy`` (the policy file).

Every class validates itself on construction and raises one
:class:`~agentpolicy.PolicyValidationError` listing every problem, with JSON
paths in the policy file's camelCase (``$.startHour``). Collections are tuples (order
kept, for exact JSON round trips) or frozensets (``days``). Lookup sets that
evaluation needs are computed once per policy and cached.
"""

from __future__ import annotations

import functools
import zoneinfo
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, tzinfo
from typing import Any, cast

import attrs

from agentpolicy._checks import (
    MAX_LIST,
    Check,
    array_of,
    check_bool,
    check_identifier,
    check_int,
    check_network,
    check_text,
    checked,
    describe,
    identifier,
    identifier_schema,
    instance_of,
    int_between,
    optional,
    type_name,
    validate,
)
from agentpolicy.amounts import Amount
from agentpolicy.errors import Problem
from agentpolicy.windows import Period

__all__ = [
    "DEFAULT_APPROVAL_TIMEOUT_MS",
    "AgentPolicy",
    "ApprovalConfig",
    "ApprovalThreshold",
    "BlockedPeriod",
    "CategoryRules",
    "MerchantRules",
    "NetworkRules",
    "SpendingLimits",
    "TimeRules",
    "TimeWindow",
    "normalize_recipient",
]

DEFAULT_APPROVAL_TIMEOUT_MS = 3_600_000
"""An approval expires one hour after it was created unless the policy says otherwise."""

MAX_APPROVAL_TIMEOUT_MS = 366 * 24 * 3_600_000


def _tuple(value: Any) -> Any:
    """Accept any list-like for a tuple field; leave other values for validation to refuse."""
    return tuple(value) if isinstance(value, list | tuple) else value


def _frozenset(value: Any) -> Any:
    return frozenset(value) if isinstance(value, list | tuple | set | frozenset) else value


def _utc(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC)
    return value


def normalize_recipient(address: str) -> str:
    """The form recipients are compared in: ``0x`` addresses case-insensitively, others exactly.

    Hex (EVM) addresses are case-insensitive; base58 and other forms are not,
    so they are left as they are.
    """
    return address.lower() if address[:2] in ("0x", "0X") else address


def _days(value: Any, path: str) -> list[Problem]:
    if not isinstance(value, frozenset):
        return [Problem(path, f"must be an array, not {type_name(value)}")]
    if not value:
        return [Problem(path, "must list at least one day (0 = Sunday to 6 = Saturday)")]
    return [p for day in sorted(value, key=repr) for p in check_int(day, path, 0, 6)]


def _instant(value: Any, path: str) -> list[Problem]:
    if isinstance(value, datetime) and value.tzinfo is not None:
        return []
    return [Problem(path, "must be an instant with a UTC offset")]


# Files of the time zone database that are not zones: the host's own zone (which
# would make a policy mean different things on different machines), the POSIX
# default rules, and the placeholder zone of unconfigured systems.
_NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})


@functools.cache
def _zone_names() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) - _NOT_ZONES


def _zone(name: Any, path: str) -> list[Problem]:
    problems = check_identifier(name, path, 64)
    if problems:
        return problems
    if name not in _zone_names():
        return [
            Problem(path, f"unknown IANA timezone {name!r} (use a zone such as 'Europe/Berlin')")
        ]
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # pragma: no cover - listed
        return [Problem(path, f"unknown IANA timezone {name!r}")]
    return []


describe(
    _days,
    {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": 6},
     "description": "0 = Sunday to 6 = Saturday"},
)  # fmt: skip
describe(
    _instant,
    {"type": "string", "format": "date-time", "maxLength": 64,
     "description": "an ISO 8601 instant with a UTC offset or Z"},
)  # fmt: skip
describe(
    _zone,
    {**identifier_schema(64), "description": "an IANA timezone key such as Europe/Berlin"},
)

_names: Check = array_of(identifier())
_networks: Check = array_of(check_network)
_amount: Check = optional(instance_of(Amount))


def _folded(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v.casefold() for v in values)


@attrs.frozen
class SpendingLimits:
    """Per-transaction and calendar-window limits; an absent limit does not apply."""

    per_transaction: Amount | None = checked(_amount, default=None)
    hourly: Amount | None = checked(_amount, default=None)
    daily: Amount | None = checked(_amount, default=None)
    weekly: Amount | None = checked(_amount, default=None)
    monthly: Amount | None = checked(_amount, default=None)

    def __attrs_post_init__(self) -> None:
        validate(self)

    def _named(self) -> Iterator[tuple[str, Amount | None]]:
        yield "perTransaction", self.per_transaction
        for period in Period:
            yield period.value, self.for_period(period)

    def for_period(self, period: Period) -> Amount | None:
        """The limit of a calendar window, or ``None`` when the policy sets none."""
        return self._by_period[period]

    @functools.cached_property
    def _by_period(self) -> dict[Period, Amount | None]:
        return {p: cast(Amount | None, getattr(self, p.value)) for p in Period}

    @functools.cached_property
    def windowed(self) -> tuple[tuple[Period, Amount], ...]:
        """The window limits that are set, in checking order (hourly to monthly)."""
        return tuple((p, a) for p in Period if (a := self.for_period(p)) is not None)


@attrs.frozen
class TimeWindow:
    """Payments are allowed on ``days`` (0 = Sunday) when ``start_hour <= hour < end_hour``."""

    days: frozenset[int] = checked(_days, converter=_frozenset)
    start_hour: int = checked(int_between(0, 23))
    end_hour: int = checked(int_between(1, 24))

    def __attrs_post_init__(self) -> None:
        validate(self, self._order)

    def _order(self) -> list[Problem]:
        if self.start_hour >= self.end_hour:
            return [Problem("$.endHour", "must be greater than startHour")]
        return []

    def matches(self, weekday_sunday0: int, hour: int) -> bool:
        """Whether a local day (0 = Sunday) and hour fall inside this window."""
        return weekday_sunday0 in self.days and self.start_hour <= hour < self.end_hour


@attrs.frozen
class BlockedPeriod:
    """No payment from ``start`` to ``end``, both instants included."""

    start: datetime = checked(_instant, converter=_utc)
    end: datetime = checked(_instant, converter=_utc)
    reason: str | None = checked(optional(check_text), default=None)

    def __attrs_post_init__(self) -> None:
        validate(self, self._order)

    def _order(self) -> list[Problem]:
        if self.end < self.start:
            return [Problem("$.end", "must not be before start")]
        return []

    def contains(self, instant: datetime) -> bool:
        """Whether ``instant`` falls in this period (inclusive at both ends)."""
        return self.start <= instant <= self.end


@attrs.frozen
class TimeRules:
    """When payments may happen, in the IANA ``timezone`` (default ``UTC``)."""

    allowed_windows: tuple[TimeWindow, ...] = checked(
        array_of(instance_of(TimeWindow)), default=(), converter=_tuple
    )
    blocked_periods: tuple[BlockedPeriod, ...] = checked(
        array_of(instance_of(BlockedPeriod)), default=(), converter=_tuple
    )
    timezone: str = checked(_zone, default="UTC")

    def __attrs_post_init__(self) -> None:
        validate(self)

    @functools.cached_property
    def zone(self) -> tzinfo:
        """The timezone as a :class:`zoneinfo.ZoneInfo`."""
        return zoneinfo.ZoneInfo(self.timezone)


@attrs.frozen
class MerchantRules:
    """Which recipients may be paid: blacklist first, then the whitelist."""

    whitelist: tuple[str, ...] = checked(_names, default=(), converter=_tuple)
    blacklist: tuple[str, ...] = checked(_names, default=(), converter=_tuple)
    require_whitelist: bool = checked(check_bool, default=False)

    def __attrs_post_init__(self) -> None:
        validate(self)

    @functools.cached_property
    def whitelisted(self) -> frozenset[str]:
        """The whitelist in comparison form (see :func:`normalize_recipient`)."""
        return frozenset(map(normalize_recipient, self.whitelist))

    @functools.cached_property
    def blacklisted(self) -> frozenset[str]:
        """The blacklist in comparison form (see :func:`normalize_recipient`)."""
        return frozenset(map(normalize_recipient, self.blacklist))

    @property
    def whitelist_applies(self) -> bool:
        """The whitelist is enforced when required or non-empty."""
        return self.require_whitelist or bool(self.whitelist)


@attrs.frozen
class NetworkRules:
    """Which CAIP-2 networks may be used: blocked first; empty ``allowed`` means any."""

    allowed_networks: tuple[str, ...] = checked(_networks, default=(), converter=_tuple)
    blocked_networks: tuple[str, ...] = checked(_networks, default=(), converter=_tuple)

    def __attrs_post_init__(self) -> None:
        validate(self)

    @functools.cached_property
    def allowed(self) -> frozenset[str]:
        """Allowed networks, case-folded."""
        return _folded(self.allowed_networks)

    @functools.cached_property
    def blocked(self) -> frozenset[str]:
        """Blocked networks, case-folded."""
        return _folded(self.blocked_networks)


@attrs.frozen
class CategoryRules:
    """Which payment categories are allowed: blocked first; empty ``allowed`` means any."""

    allowed_categories: tuple[str, ...] = checked(_names, default=(), converter=_tuple)
    blocked_categories: tuple[str, ...] = checked(_names, default=(), converter=_tuple)

    def __attrs_post_init__(self) -> None:
        validate(self)

    @functools.cached_property
    def allowed(self) -> frozenset[str]:
        """Allowed categories, case-folded."""
        return _folded(self.allowed_categories)

    @functools.cached_property
    def blocked(self) -> frozenset[str]:
        """Blocked categories, case-folded."""
        return _folded(self.blocked_categories)


@attrs.frozen
class ApprovalThreshold:
    """Payments of at least ``amount`` need ``required_approvers`` of ``approvers``."""

    amount: Amount = checked(instance_of(Amount))
    required_approvers: int = checked(int_between(1, MAX_LIST))
    approvers: tuple[str, ...] = checked(_names, converter=_tuple)

    def __attrs_post_init__(self) -> None:
        validate(self, self._quorum)

    def _quorum(self) -> list[Problem]:
        if not self.approvers:
            return [Problem("$.approvers", "must name at least one approver")]
        if len(self.approver_keys) != len(self.approvers):
            return [Problem("$.approvers", "must not repeat an approver (compared ignoring case)")]
        if self.required_approvers > len(self.approvers):
            return [
                Problem(
                    "$.requiredApprovers",
                    f"must not exceed the number of approvers ({len(self.approvers)})",
                )
            ]
        return []

    @functools.cached_property
    def approver_keys(self) -> frozenset[str]:
        """Approvers, case-folded, as votes are matched."""
        return _folded(self.approvers)


@attrs.frozen
class ApprovalConfig:
    """Approval thresholds and how long an approval waits (``timeout`` in milliseconds)."""

    thresholds: tuple[ApprovalThreshold, ...] = checked(
        array_of(instance_of(ApprovalThreshold)), default=(), converter=_tuple
    )
    timeout: int = checked(
        int_between(1, MAX_APPROVAL_TIMEOUT_MS), default=DEFAULT_APPROVAL_TIMEOUT_MS
    )

    def __attrs_post_init__(self) -> None:
        validate(self, self._distinct)

    def _distinct(self) -> list[Problem]:
        if not self.thresholds:
            return []
        scale = max(t.amount.decimals for t in self.thresholds)
        first_at: dict[int, int] = {}
        problems: list[Problem] = []
        for i, t in enumerate(self.thresholds):
            j = first_at.setdefault(t.amount.scaled_to(scale), i)
            if j != i:
                problems.append(
                    Problem(f"$.thresholds[{i}].amount", f"repeats thresholds[{j}].amount")
                )
        return problems


@attrs.frozen
class AgentPolicy:
    """What one agent may spend, when, where and to whom; absent sections do not restrict.

    ``enabled=False`` denies everything. All limits and thresholds must name
    the same token symbol (a policy mixing symbols could never allow a
    payment, so it is refused rather than silently denying everything).
    """

    enabled: bool = checked(check_bool, default=True)
    limits: SpendingLimits | None = checked(optional(instance_of(SpendingLimits)), default=None)
    time_rules: TimeRules | None = checked(optional(instance_of(TimeRules)), default=None)
    merchant_rules: MerchantRules | None = checked(
        optional(instance_of(MerchantRules)), default=None
    )
    network_rules: NetworkRules | None = checked(optional(instance_of(NetworkRules)), default=None)
    category_rules: CategoryRules | None = checked(
        optional(instance_of(CategoryRules)), default=None
    )
    approval_config: ApprovalConfig | None = checked(
        optional(instance_of(ApprovalConfig)), default=None
    )

    def __attrs_post_init__(self) -> None:
        validate(self, self._symbol_problems)

    def amounts(self) -> Iterator[tuple[str, Amount]]:
        """Every limit and threshold amount with its JSON path."""
        if self.limits is not None:
            for name, amount in self.limits._named():
                if amount is not None:
                    yield f"$.limits.{name}", amount
        if self.approval_config is not None:
            for i, t in enumerate(self.approval_config.thresholds):
                yield f"$.approvalConfig.thresholds[{i}].amount", t.amount

    def _symbol_problems(self) -> list[Problem]:
        first: tuple[str, Amount] | None = None
        problems: list[Problem] = []
        for path, amount in self.amounts():
            if first is None:
                first = (path, amount)
            elif amount.symbol.casefold() != first[1].symbol.casefold():
                problems.append(
                    Problem(
                        f"{path}.symbol",
                        f"is {amount.symbol!r} but {first[0]} is {first[1].symbol!r}: "
                        "all limits and thresholds of a policy must use one token",
                    )
                )
        return problems

    @functools.cached_property
    def symbol(self) -> str | None:
        """The token symbol of the policy's limits and thresholds, if it has any."""
        return next((a.symbol for _, a in self.amounts()), None)
