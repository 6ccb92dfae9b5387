"""The policy: immutable classes for every part of an ``AgentPolicy`` (the policy file).

Every class validates itself on construction and raises one
:class:`~agentpolicy.PolicyValidationError` listing every problem, with JSON
paths in the policy file's camelCase (``$.startHour``). Collections are tuples (order
kept, for exact JSON round trips) or frozensets (``days``). Lookup sets that
evaluation needs are computed once per policy and cached.
"""

from __future__ import annotations

import functools
import re
import unicodedata
import zoneinfo
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, tzinfo
from typing import Any, Generic, TypeVar, cast, overload

import attrs

from agentpolicy._checks import (
    DEFAULT_IGNORABLE,
    MAX_LIST,
    Check,
    array_of,
    category_key,
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
    network_key,
    optional,
    person,
    type_name,
    validate,
)
from agentpolicy.amounts import Amount
from agentpolicy.errors import Problem
from agentpolicy.windows import Period

_T = TypeVar("_T")


class _Once(Generic[_T]):
    """A value a policy part works out on first read, kept in its slot of :class:`_Kept`.

    Not ``functools.cached_property``: for that attrs gives a slotted class a
    ``__getattr__``, which slows every attribute read of the class (fields
    included), and the rules read policies on every payment.
    """

    def __init__(self, compute: Callable[[Any], _T]) -> None:
        self.compute = compute
        self.slot = "_once_" + compute.__name__
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        """Refuse a class without the value's slot: it would work the value out, never keep it."""
        if not any(self.slot in getattr(k, "__slots__", ()) for k in owner.__mro__):
            raise TypeError(f"{owner.__name__}.{name}: add {self.slot!r} to _Kept.__slots__")

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _Once[_T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> _T: ...

    def __get__(self, obj: object, owner: type | None = None) -> _Once[_T] | _T:
        if obj is None:
            return self
        try:
            found: _T = getattr(obj, self.slot)
        except AttributeError:
            found = self.compute(obj)
            object.__setattr__(obj, self.slot, found)  # a frozen instance: set once, here
        return found


class _Kept:
    """The slots of the values policy parts work out once (:class:`_Once`), beside their fields."""

    __slots__ = (
        "_once__blocks",
        "_once__sets",
        "_once_allowed",
        "_once_approver_keys",
        "_once_blacklisted",
        "_once_blocked",
        "_once_by_period",
        "_once_every_approver",
        "_once_period",
        "_once_rolling_seconds",
        "_once_seconds",
        "_once_symbol",
        "_once_symbols",
        "_once_token",
        "_once_whitelisted",
        "_once_windowed",
        "_once_zone",
    )


__all__ = [
    "DEFAULT_APPROVAL_TIMEOUT_MS",
    "DEFAULT_MAX_CHILDREN",
    "DELEGATED_VERSIONS_PER_CHILD",
    "AgentPolicy",
    "ApprovalConfig",
    "ApprovalThreshold",
    "ApproverGroup",
    "AssetLimits",
    "Alert",
    "BlockedPeriod",
    "CategoryRules",
    "CountLimit",
    "DelegationRules",
    "GROUP_BY",
    "MAX_APPROVER_GROUPS",
    "MAX_CHILDREN",
    "MAX_DELEGATED_POLICY_BYTES",
    "MAX_TREE_DEPTH",
    "MerchantRules",
    "NetworkRules",
    "RollingLimit",
    "ScopeMatch",
    "ScopedLimit",
    "SpendingLimits",
    "TimeRules",
    "TimeWindow",
    "normalize_recipient",
    "whitelist_form",
    "span_seconds",
]

DEFAULT_APPROVAL_TIMEOUT_MS = 3_600_000
"""An approval expires one hour after it was created unless the policy says otherwise."""

MAX_APPROVAL_TIMEOUT_MS = 366 * 24 * 3_600_000

MAX_TREE_DEPTH = 8
"""The most budgets one payment passes through: an agent and up to seven ancestors."""

DEFAULT_MAX_CHILDREN = 100
"""How many budgets agents may delegate below a budget whose policy sets no ``maxChildren``."""

MAX_CHILDREN = 100_000
"""The largest ``delegation.maxChildren`` a policy may set."""

DELEGATED_VERSIONS_PER_CHILD = 10
"""Policy versions agents may write by delegating below a budget, per ``maxChildren``.

Every agent-made delegation writes a version (a new budget's first, or a
later one), and versions are kept for good (decisions name them), so agents
may write at most ``maxChildren * DELEGATED_VERSIONS_PER_CHILD`` of them
below a budget (1,000 by default).
"""

MAX_DELEGATED_POLICY_BYTES = 64 * 1024
"""The largest policy an agent may delegate: 64 KiB of its compact JSON, as stored."""


def _tuple(value: Any) -> Any:
    """Accept any list-like for a tuple field; leave other values for validation to refuse."""
    return tuple(value) if isinstance(value, list | tuple) else value


def _frozenset(value: Any) -> Any:
    return frozenset(value) if isinstance(value, list | tuple | set | frozenset) else value


def _utc(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC)
    return value


_HEX40 = re.compile(r"[0-9a-fA-F]{40}", re.ASCII)
_BECH32 = re.compile(r"[a-z]{1,83}1[qpzry9x8gf2tvdw0s3jn54khce6mua7l]{6,}", re.ASCII)
# Printable code points that resolvers ignore are dropped when names are folded (the
# unprintable ones are refused in every identifier), and so is the blank Braille pattern,
# which shows nothing either: for a blacklist or a scope, folding only ever covers more.
_IGNORABLE = dict.fromkeys(DEFAULT_IGNORABLE | {0x2800})
_FULL_STOP = str.maketrans({"\u3002": "."})  # the ideographic full stop (NFKC keeps it)


def _fold(text: str) -> str:
    """Compatibility forms mapped, case folded (final sigma as sigma), ignorables dropped."""
    mapped = unicodedata.normalize("NFKC", text.translate(_IGNORABLE)).translate(_FULL_STOP)
    return unicodedata.normalize("NFKC", mapped.casefold())


def _domain_form(name: str) -> str:
    """A folded domain name without its final dot, ``xn--`` labels read as what they encode."""
    if name.endswith(".") and len(name) > 1:
        name = name[:-1]
    if "xn--" not in name:
        return name
    labels = name.split(".")
    for i, label in enumerate(labels):
        if label.startswith("xn--"):
            try:
                labels[i] = _fold(label[4:].encode("ascii").decode("punycode"))
            except (UnicodeError, ValueError):
                continue  # not punycode: compared as written
    return ".".join(labels)


def normalize_recipient(address: str) -> str:
    """The form recipients are compared in by blacklists, scoped limits and their groups.

    Case-insensitive forms are lower-cased: hex (EVM) addresses (``0x``; 40
    hex digits without the prefix are the same address, which signers such
    as x402's accept, so they read as ``0x`` and those digits) and
    bech32 addresses (``bc1q...``, ``cosmos1...``; one case throughout, as
    BIP-173 requires, so ``BC1Q...`` is ``bc1q...``). A name with a dot (ENS
    ``vendor.eth``, a DNS name) is folded so that every spelling a resolver
    reads as the same name compares equal: compatibility forms mapped
    (NFKC: fullwidth letters and stops), case folded in any script,
    invisible variation selectors dropped, the ideographic full stop read as
    a dot, a final dot dropped and ``xn--`` labels decoded. Folding may also
    join a few names that resolvers keep apart (``ß`` and ``ss``): for a
    blacklist, a scope or a group that only ever means more is covered.
    Whitelists compare stricter (see :func:`whitelist_form`). Base58 and
    other forms, whose case is significant, are left as they are.
    """
    if address.isascii():
        lower = address.lower()
        if "." in address:  # a name, even one that begins like an address (0xvendor.eth)
            return _domain_form(lower)
        if address[:2] in ("0x", "0X"):
            return lower
        if len(address) == 40 and _HEX40.fullmatch(address):
            return "0x" + lower  # an EVM address without its prefix: the same 20 bytes
        if lower == address or (address.upper() == address and _BECH32.fullmatch(lower)):
            return lower
        return address
    folded = _fold(address)
    return _domain_form(folded) if "." in folded else address


def whitelist_form(address: str) -> str:
    """The form a whitelist compares recipients in: only spellings that reach the same payee.

    An ASCII recipient compares as :func:`normalize_recipient` has it (ASCII
    case is never significant in names and hex addresses, where it is
    folded), unless it has an ``xn--`` label; any other recipient compares
    exactly as written. Folding other scripts can join names that resolve
    apart (in ENS a capital sigma is a small sigma, never a final one), so
    a whitelist admits such a name only as it lists it.
    """
    if address.isascii() and "xn--" not in address.lower():
        return normalize_recipient(address)
    return address


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


def _folded(values: Iterable[str], key: Callable[[str], str] = category_key) -> frozenset[str]:
    # categories and networks in the form requests are compared in (see agentpolicy._checks)
    return frozenset(map(key, values))


MIN_ROLLING_SECONDS = 60
"""The shortest rolling window: one minute."""
MAX_ROLLING_SECONDS = 366 * 86_400
"""The longest rolling window: 366 days."""

_SPAN = re.compile(r"([1-9][0-9]{0,8})(s|m|h|d)")
_SPAN_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def span_seconds(text: str) -> int | None:
    """The seconds of a rolling window such as ``"90s"``, ``"15m"``, ``"24h"``, ``"30d"``.

    ``None`` when ``text`` is not of that form.
    """
    match = _SPAN.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return None
    return int(match.group(1)) * _SPAN_SECONDS[match.group(2)]


def _rolling(value: Any, path: str) -> list[Problem]:
    seconds = span_seconds(value)
    if seconds is None:
        return [
            Problem(path, f"must be a duration such as '90s', '15m', '24h' or '30d', got {value!r}")
        ]
    if not MIN_ROLLING_SECONDS <= seconds <= MAX_ROLLING_SECONDS:
        return [Problem(path, f"must be from 1 minute to 366 days, got {value!r}")]
    return []


def _count_window(value: Any, path: str) -> list[Problem]:
    if isinstance(value, str) and value in _PERIOD_NAMES:
        return []
    problems = _rolling(value, path)
    if problems:
        names = ", ".join(_PERIOD_NAMES)
        return [Problem(path, f"must be a calendar window ({names}) or a duration such as "
                              f"'10m' (1 minute to 366 days), got {value!r}")]  # fmt: skip
    return []


_PERIOD_NAMES = tuple(p.value for p in Period)
_SPAN_PATTERN = "^[1-9][0-9]{0,8}(s|m|h|d)$"
describe(
    _rolling,
    {"type": "string", "pattern": _SPAN_PATTERN,
     "description": "a trailing duration: 90s, 15m, 24h, 30d (1 minute to 366 days)"},
)  # fmt: skip
describe(
    _count_window,
    {"anyOf": [{"enum": list(_PERIOD_NAMES)}, {"type": "string", "pattern": _SPAN_PATTERN}],
     "description": "a calendar window, or a trailing duration such as 10m"},
)  # fmt: skip


@attrs.frozen
class RollingLimit(_Kept):
    """At most ``amount`` in any trailing ``window`` (``"90s"``, ``"15m"``, ``"24h"``, ``"30d"``).

    A payment counts from its authorize instant until exactly ``window`` later.
    """

    window: str = checked(_rolling)
    amount: Amount = checked(instance_of(Amount))

    def __attrs_post_init__(self) -> None:
        validate(self)

    @_Once
    def seconds(self) -> int:
        """The window's length in seconds."""
        seconds = span_seconds(self.window)
        assert seconds is not None  # noqa: S101 - validated
        return seconds


@attrs.frozen
class CountLimit(_Kept):
    """At most ``max`` payments in a calendar window (``"daily"``) or a trailing one (``"10m"``).

    Reserved, held and confirmed payments count; released and expired ones do not.
    """

    window: str = checked(_count_window)
    max: int = checked(int_between(1, 10**12))

    def __attrs_post_init__(self) -> None:
        validate(self)

    @_Once
    def period(self) -> Period | None:
        """The calendar window counted in, or ``None`` for a trailing duration."""
        return Period(self.window) if self.window in _PERIOD_NAMES else None

    @_Once
    def seconds(self) -> int | None:
        """The trailing duration in seconds, or ``None`` for a calendar window."""
        return None if self.period is not None else span_seconds(self.window)


def _distinct_windows(items: tuple[Any, ...], path: str) -> list[Problem]:
    seen: dict[Any, int] = {}
    problems = []
    for i, item in enumerate(items):
        key = item.window if isinstance(item, CountLimit) and item.period else item.seconds
        j = seen.setdefault(key, i)
        if j != i:
            problems.append(Problem(f"{path}[{i}].window", f"repeats {path[2:]}[{j}].window"))
    return problems


@attrs.frozen
class SpendingLimits(_Kept):
    """Per-transaction, calendar, rolling and count limits; an absent limit does not apply."""

    per_transaction: Amount | None = checked(_amount, default=None)
    hourly: Amount | None = checked(_amount, default=None)
    daily: Amount | None = checked(_amount, default=None)
    weekly: Amount | None = checked(_amount, default=None)
    monthly: Amount | None = checked(_amount, default=None)
    yearly: Amount | None = checked(_amount, default=None)
    lifetime: Amount | None = checked(_amount, default=None)
    rolling: tuple[RollingLimit, ...] = checked(
        array_of(instance_of(RollingLimit), 16), default=(), converter=_tuple, omit_empty=True
    )
    counts: tuple[CountLimit, ...] = checked(
        array_of(instance_of(CountLimit), 16), default=(), converter=_tuple, omit_empty=True
    )

    def __attrs_post_init__(self) -> None:
        validate(self, self._distinct)

    def _distinct(self) -> list[Problem]:
        return _distinct_windows(self.rolling, "$.rolling") + _distinct_windows(
            self.counts, "$.counts"
        )

    def _named(self) -> Iterator[tuple[str, Amount | None]]:
        yield "perTransaction", self.per_transaction
        for period in Period:
            yield period.value, self.for_period(period)
        for i, r in enumerate(self.rolling):
            yield f"rolling[{i}].amount", r.amount

    @_Once
    def token(self) -> str:
        """The key its counters are kept under: its token (case-folded), ``*`` for counts alone."""
        return "*" if self.symbol is None else self.symbol.casefold()

    @_Once
    def rolling_seconds(self) -> tuple[int, ...]:
        """Every trailing duration these limits count in (amounts and counts), in order."""
        found: dict[int, None] = {r.seconds: None for r in self.rolling}
        for c in self.counts:
            if c.seconds is not None:
                found.setdefault(c.seconds, None)
        return tuple(found)

    @_Once
    def symbol(self) -> str | None:
        """The token of these limits' amounts, if they name any."""
        return next((a.symbol for _, a in self._named() if a is not None), None)

    def for_period(self, period: Period) -> Amount | None:
        """The limit of a calendar window, or ``None`` when the policy sets none."""
        return self.by_period[period]

    @_Once
    def by_period(self) -> dict[Period, Amount | None]:
        """Every calendar window with its limit (``None`` where the policy sets none)."""
        return {p: cast(Amount | None, getattr(self, p.value)) for p in Period}

    @_Once
    def windowed(self) -> tuple[tuple[Period, Amount], ...]:
        """The window limits that are set, in checking order (hourly to lifetime)."""
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
class TimeRules(_Kept):
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

    @_Once
    def zone(self) -> tzinfo:
        """The timezone as a :class:`zoneinfo.ZoneInfo`."""
        return zoneinfo.ZoneInfo(self.timezone)


@attrs.frozen
class MerchantRules(_Kept):
    """Which recipients may be paid: blacklist first, then the whitelist."""

    whitelist: tuple[str, ...] = checked(_names, default=(), converter=_tuple)
    blacklist: tuple[str, ...] = checked(_names, default=(), converter=_tuple)
    require_whitelist: bool = checked(check_bool, default=False)

    def __attrs_post_init__(self) -> None:
        validate(self)

    @_Once
    def whitelisted(self) -> frozenset[str]:
        """The whitelist in comparison form (see :func:`whitelist_form`)."""
        return frozenset(map(whitelist_form, self.whitelist))

    @_Once
    def blacklisted(self) -> frozenset[str]:
        """The blacklist in comparison form (see :func:`normalize_recipient`)."""
        return frozenset(map(normalize_recipient, self.blacklist))

    @property
    def whitelist_applies(self) -> bool:
        """The whitelist is enforced when required or non-empty."""
        return self.require_whitelist or bool(self.whitelist)


@attrs.frozen
class NetworkRules(_Kept):
    """Which CAIP-2 networks may be used: blocked first; empty ``allowed`` means any."""

    allowed_networks: tuple[str, ...] = checked(_networks, default=(), converter=_tuple)
    blocked_networks: tuple[str, ...] = checked(_networks, default=(), converter=_tuple)

    def __attrs_post_init__(self) -> None:
        validate(self)

    @_Once
    def allowed(self) -> frozenset[str]:
        """Allowed networks, case-folded (``eip155`` chain ids without leading zeros)."""
        return _folded(self.allowed_networks, network_key)

    @_Once
    def blocked(self) -> frozenset[str]:
        """Blocked networks, case-folded (``eip155`` chain ids without leading zeros)."""
        return _folded(self.blocked_networks, network_key)


@attrs.frozen
class CategoryRules(_Kept):
    """Which payment categories are allowed: blocked first; empty ``allowed`` means any."""

    allowed_categories: tuple[str, ...] = checked(_names, default=(), converter=_tuple)
    blocked_categories: tuple[str, ...] = checked(_names, default=(), converter=_tuple)

    def __attrs_post_init__(self) -> None:
        validate(self)

    @_Once
    def allowed(self) -> frozenset[str]:
        """Allowed categories, NFKC-normalised and case-folded."""
        return _folded(self.allowed_categories)

    @_Once
    def blocked(self) -> frozenset[str]:
        """Blocked categories, NFKC-normalised and case-folded."""
        return _folded(self.blocked_categories)


MAX_APPROVER_GROUPS = 16
"""The most approver groups one threshold may have."""


def _distinct_names(names: tuple[str, ...], path: str) -> list[Problem]:
    blank = [i for i, n in enumerate(names) if not person(n)]
    if blank:  # made only of characters that show nothing: every such name is one person
        return [Problem(f"{path}[{blank[0]}]", "must show at least one character")]
    if len({person(n) for n in names}) != len(names):
        return [
            Problem(
                path, "must not repeat an approver (compared ignoring case and Unicode normal form)"
            )
        ]
    return []


@attrs.frozen
class ApproverGroup:
    """One group of a threshold's approvers: ``required`` of ``approvers`` must approve.

    Every group of a threshold must reach its own count; any deny still
    denies. Names and approvers compare ignoring case.
    """

    name: str = checked(identifier(64))
    approvers: tuple[str, ...] = checked(_names, converter=_tuple)
    required: int = checked(int_between(1, MAX_LIST))

    def __attrs_post_init__(self) -> None:
        validate(self, self._quorum)

    def _quorum(self) -> list[Problem]:
        if not self.approvers:
            return [Problem("$.approvers", "must name at least one approver")]
        problems = _distinct_names(self.approvers, "$.approvers")
        if not problems and self.required > len(self.approvers):
            problems.append(Problem(
                "$.required", f"must not exceed the number of approvers ({len(self.approvers)})"
            ))  # fmt: skip
        return problems


@attrs.frozen
class ApprovalThreshold(_Kept):
    """Payments of at least ``amount`` need ``required_approvers`` of ``approvers``, or ``groups``.

    A threshold names either ``approvers`` with ``required_approvers``, or
    ``groups`` (:class:`ApproverGroup`): then every group must reach its own
    count, and an approver may belong to one group of the threshold only (so
    one person never fills two groups).
    """

    amount: Amount = checked(instance_of(Amount))
    required_approvers: int | None = checked(optional(int_between(1, MAX_LIST)), default=None)
    approvers: tuple[str, ...] = checked(_names, default=(), converter=_tuple, omit_empty=True)
    groups: tuple[ApproverGroup, ...] = checked(
        array_of(instance_of(ApproverGroup), MAX_APPROVER_GROUPS),
        default=(),
        converter=_tuple,
        omit_empty=True,
    )

    def __attrs_post_init__(self) -> None:
        validate(self, self._quorum)

    def _quorum(self) -> list[Problem]:
        if self.groups:
            return self._group_problems()
        if not self.approvers:
            return [Problem("$.approvers", "must name at least one approver (or give groups)")]
        problems = _distinct_names(self.approvers, "$.approvers")
        if self.required_approvers is None:
            problems.append(Problem("$.requiredApprovers", "is required with approvers"))
        elif not problems and self.required_approvers > len(self.approvers):
            problems.append(Problem(
                "$.requiredApprovers",
                f"must not exceed the number of approvers ({len(self.approvers)})",
            ))  # fmt: skip
        return problems

    def _group_problems(self) -> list[Problem]:
        problems: list[Problem] = []
        either = "give approvers with requiredApprovers, or groups, not both"
        if self.approvers:
            problems.append(Problem("$.approvers", either))
        if self.required_approvers is not None:
            problems.append(Problem("$.requiredApprovers", either))
        names: dict[str, int] = {}
        members: dict[str, int] = {}
        for i, group in enumerate(self.groups):
            j = names.setdefault(group.name.casefold(), i)
            if j != i:
                problems.append(Problem(f"$.groups[{i}].name", f"repeats groups[{j}].name"))
            for who in group.approvers:
                k = members.setdefault(person(who), i)
                if k != i:
                    problems.append(Problem(
                        f"$.groups[{i}].approvers",
                        f"{who!r} is in groups[{k}] too: an approver belongs to one group "
                        "of a threshold",
                    ))  # fmt: skip
        return problems

    @_Once
    def every_approver(self) -> tuple[str, ...]:
        """Everyone who may approve: ``approvers``, or every group's, in order."""
        if not self.groups:
            return self.approvers
        return tuple(a for g in self.groups for a in g.approvers)

    @_Once
    def approver_keys(self) -> frozenset[str]:
        """Approvers (of every group), folded as votes are matched (``person``)."""
        return frozenset(person(a) for a in self.every_approver)


@attrs.frozen
class ApprovalConfig:
    """Approval thresholds and how long an approval waits (``timeout`` in milliseconds).

    ``require_signed_votes``: every vote on this policy's approvals must be
    signed with the approver's registered key (see ``docs/approvals.md``);
    an unsigned vote is ``APPROVER_NOT_AUTHORIZED``.
    """

    thresholds: tuple[ApprovalThreshold, ...] = checked(
        array_of(instance_of(ApprovalThreshold)), default=(), converter=_tuple
    )
    timeout: int = checked(
        int_between(1, MAX_APPROVAL_TIMEOUT_MS), default=DEFAULT_APPROVAL_TIMEOUT_MS
    )
    require_signed_votes: bool = checked(check_bool, default=False, omit_empty=True)

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
class Alert:
    """A webhook event when usage of a limit crosses ``percent`` of it (once per window).

    The event is ``budget.threshold_reached``, written with the change that crossed it.
    """

    percent: int = checked(int_between(1, 100))

    def __attrs_post_init__(self) -> None:
        validate(self)


GROUP_BY = ("recipient", "network", "category")
"""What a scope's counters may be kept per: each distinct value gets its own."""


def _group_by(value: Any, path: str) -> list[Problem]:
    if value is None or value in GROUP_BY:
        return []
    return [Problem(path, f"must be one of {', '.join(GROUP_BY)} (or absent), got {value!r}")]


describe(_group_by, {"anyOf": [{"enum": list(GROUP_BY)}, {"type": "null"}]})


@attrs.frozen
class ScopeMatch(_Kept):
    """Which payments a scope covers: one that matches every non-empty list (empty matches all)."""

    categories: tuple[str, ...] = checked(_names, default=(), converter=_tuple)
    recipients: tuple[str, ...] = checked(_names, default=(), converter=_tuple)
    networks: tuple[str, ...] = checked(_networks, default=(), converter=_tuple)

    def __attrs_post_init__(self) -> None:
        validate(self)

    @_Once
    def _sets(self) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
        return (
            _folded(self.categories),
            frozenset(map(normalize_recipient, self.recipients)),
            _folded(self.networks, network_key),
        )

    def matches(self, category: str | None, recipient: str, network: str) -> bool:
        """Whether a payment with these fields is covered (compared as the rules compare)."""
        categories, recipients, networks = self._sets
        if categories and (category is None or category_key(category) not in categories):
            return False
        if recipients and normalize_recipient(recipient) not in recipients:
            return False
        return not networks or network_key(network) in networks


@attrs.frozen
class ScopedLimit(_Kept):
    """Limits on the payments a scope matches, in addition to the policy's own.

    With ``group_by`` (``recipient``, ``network`` or ``category``) each distinct
    value has its own counters; otherwise the scope sums across its matches.
    Its amounts name one token, and then it covers payments in that token
    only; a scope of counts alone covers payments in every token.
    """

    name: str = checked(identifier(64))
    limits: SpendingLimits = checked(instance_of(SpendingLimits))
    match: ScopeMatch = checked(instance_of(ScopeMatch), factory=ScopeMatch)
    group_by: str | None = checked(_group_by, default=None)
    alerts: tuple[Alert, ...] = checked(
        array_of(instance_of(Alert), 16), default=(), converter=_tuple, omit_empty=True
    )

    def __attrs_post_init__(self) -> None:
        validate(self, self._one_token)

    def _one_token(self) -> list[Problem]:
        return _one_token(
            (f"$.limits.{name}", a) for name, a in self.limits._named() if a is not None
        )

    @_Once
    def token(self) -> str:
        """The token its counters are kept in: its amounts' (case-folded), or ``*`` (counts)."""
        symbol = self.limits.symbol
        return "*" if symbol is None else symbol.casefold()

    def covers(self, request: Any) -> bool:
        """Whether a payment request is one of this scope's (its token too, when it names one)."""
        if self.token != "*" and request.symbol.casefold() != self.token:  # noqa: S105
            return False
        return self.match.matches(request.category, request.recipient, request.network)

    def group(self, category: str | None, recipient: str, network: str) -> str:
        """The group a payment counts in (``"*"`` when the scope is not grouped)."""
        if self.group_by == "recipient":
            return normalize_recipient(recipient)
        if self.group_by == "network":
            return network_key(network)
        if self.group_by == "category":
            return "" if category is None else category_key(category)
        return "*"


@attrs.frozen
class AssetLimits:
    """The limits of one more token, for a policy that limits several."""

    symbol: str = checked(identifier(32))
    limits: SpendingLimits = checked(instance_of(SpendingLimits))

    def __attrs_post_init__(self) -> None:
        validate(self, self._same_token)

    def _same_token(self) -> list[Problem]:
        return [
            Problem(f"$.limits.{name}.symbol",
                    f"is {a.symbol!r}: the limits of asset {self.symbol!r} must all be in it")
            for name, a in self.limits._named()
            if a is not None and a.symbol.casefold() != self.symbol.casefold()
        ]  # fmt: skip


def _one_token(amounts: Iterable[tuple[str, Amount]]) -> list[Problem]:
    first: tuple[str, Amount] | None = None
    problems: list[Problem] = []
    for path, amount in amounts:
        if first is None:
            first = (path, amount)
        elif amount.symbol.casefold() != first[1].symbol.casefold():
            problems.append(
                Problem(
                    f"{path}.symbol",
                    f"is {amount.symbol!r} but {first[0]} is {first[1].symbol!r}: "
                    "one block of limits is in one token (see assets for more tokens)",
                )
            )
    return problems


@attrs.frozen
class DelegationRules:
    """Whether the agent itself may hand parts of its budget to sub-agents (``delegation``).

    Off unless ``allowed``; ``max_depth`` bounds how many levels of delegated
    budgets may hang below this one (1: children only); ``max_children``
    bounds how many budgets agents may delegate below it in all, over its
    life (revoked and expired ones count: their versions are kept), and with
    it how many policy versions they may write there
    (:data:`DELEGATED_VERSIONS_PER_CHILD` per child). An administrator can
    always delegate; this switch governs the agent (an agent-role MCP server
    bound to it).
    """

    allowed: bool = checked(check_bool, default=False)
    max_depth: int = checked(int_between(1, MAX_TREE_DEPTH - 1), default=1)
    max_children: int = checked(int_between(1, MAX_CHILDREN), default=DEFAULT_MAX_CHILDREN)

    def __attrs_post_init__(self) -> None:
        validate(self)


@attrs.frozen
class AgentPolicy(_Kept):
    """What one agent may spend, when, where and to whom; absent sections do not restrict.

    ``enabled=False`` denies everything. ``limits`` are in one token; a policy
    that limits several tokens lists the others in ``assets``, each with its
    own limits. Approval thresholds and scoped limits name tokens the policy
    limits. A payment in a token the policy names nowhere is denied
    (``ASSET_MISMATCH``).

    ``parent`` names the budget this one belongs to: a payment must also pass
    the parent's rules and limits (and its parent's, up to
    :data:`MAX_TREE_DEPTH` budgets) and counts in all of them.
    ``delegation`` lets the agent create delegated sub-budgets itself.
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
    assets: tuple[AssetLimits, ...] = checked(
        array_of(instance_of(AssetLimits), 64), default=(), converter=_tuple, omit_empty=True
    )
    scoped_limits: tuple[ScopedLimit, ...] = checked(
        array_of(instance_of(ScopedLimit), 64), default=(), converter=_tuple, omit_empty=True
    )
    alerts: tuple[Alert, ...] = checked(
        array_of(instance_of(Alert), 16), default=(), converter=_tuple, omit_empty=True
    )
    parent: str | None = checked(optional(identifier()), default=None)
    delegation: DelegationRules | None = checked(
        optional(instance_of(DelegationRules)), default=None
    )

    def __attrs_post_init__(self) -> None:
        validate(self, self._symbol_problems)

    def amounts(self) -> Iterator[tuple[str, Amount]]:
        """Every limit and threshold amount with its JSON path."""
        if self.limits is not None:
            for name, amount in self.limits._named():
                if amount is not None:
                    yield f"$.limits.{name}", amount
        for i, block in enumerate(self.assets):
            for name, amount in block.limits._named():
                if amount is not None:
                    yield f"$.assets[{i}].limits.{name}", amount
        if self.approval_config is not None:
            for i, t in enumerate(self.approval_config.thresholds):
                yield f"$.approvalConfig.thresholds[{i}].amount", t.amount
        for i, scope in enumerate(self.scoped_limits):
            for name, amount in scope.limits._named():
                if amount is not None:
                    yield f"$.scopedLimits[{i}].limits.{name}", amount

    def _symbol_problems(self) -> list[Problem]:
        if self.limits is not None:
            problems = _one_token(
                (f"$.limits.{n}", a) for n, a in self.limits._named() if a is not None
            )
        else:
            problems = []
        problems += self._scope_name_problems()
        declared = self._declared()
        if not declared:  # no blocks of limits: thresholds and scopes share one token
            return problems + _one_token(
                (path, a) for path, a in self.amounts() if not path.startswith("$.limits")
            )
        seen: dict[str, str] = {}
        primary = self.limits.symbol if self.limits is not None else None
        if primary is not None:
            seen[primary.casefold()] = "$.limits"
        for i, block in enumerate(self.assets):
            key = block.symbol.casefold()
            if key in seen:
                problems.append(
                    Problem(f"$.assets[{i}].symbol", f"{block.symbol!r} is limited by {seen[key]}")
                )
            seen.setdefault(key, f"$.assets[{i}]")
        for path, amount in self.amounts():
            on_block = path.startswith(("$.limits", "$.assets"))
            if not on_block and amount.symbol.casefold() not in declared:
                problems.append(Problem(
                    f"{path}.symbol",
                    f"{amount.symbol!r} is not a token this policy limits "
                    f"({', '.join(sorted(declared))}): add its limits under assets",
                ))  # fmt: skip
        return problems

    def _scope_name_problems(self) -> list[Problem]:
        """A scope's name repeated (case-folded): counters follow the name, so two would share."""
        problems: list[Problem] = []
        names: dict[str, int] = {}
        for i, scope in enumerate(self.scoped_limits):
            j = names.setdefault(scope.name.casefold(), i)
            if j != i:
                problems.append(Problem(f"$.scopedLimits[{i}].name",
                                        f"repeats scopedLimits[{j}].name"))  # fmt: skip
        return problems

    def _declared(self) -> frozenset[str]:
        found = {b.symbol.casefold() for b in self.assets}
        if self.limits is not None and self.limits.symbol is not None:
            found.add(self.limits.symbol.casefold())
        return frozenset(found)

    @_Once
    def symbol(self) -> str | None:
        """The token of the policy's ``limits`` (else of its first amount), if it names any."""
        if self.limits is not None and self.limits.symbol is not None:
            return self.limits.symbol
        return next((a.symbol for _, a in self.amounts()), None)

    @_Once
    def symbols(self) -> frozenset[str]:
        """Every token the policy names (case-folded): a payment in another one is denied."""
        return frozenset(a.symbol.casefold() for _, a in self.amounts())

    def limits_for(self, symbol: str) -> SpendingLimits | None:
        """The block of limits of a token: the policy's ``limits``, or one of ``assets``.

        A ``limits`` block that names no token (counts alone) applies to every token.
        """
        found = self._blocks.get(symbol.casefold())
        if found is None and self.limits is not None and self.limits.symbol is None:
            return self.limits
        return found

    @_Once
    def _blocks(self) -> dict[str, SpendingLimits]:
        blocks: dict[str, SpendingLimits] = {}
        if self.limits is not None:
            blocks[(self.limits.symbol or "").casefold()] = self.limits
        for block in self.assets:
            blocks.setdefault(block.symbol.casefold(), block.limits)
        return blocks
