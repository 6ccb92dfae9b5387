"""The pure decision function: (policy, request, usage, now) -> Decision.

Every check runs, in the order of docs/semantics.md section 2, and is listed
in the decision's ``evaluations``; the first failure decides the code. Nothing
here reads a clock, a storage or the environment.

Each check is written once: it decides its outcome and code, and carries a
function that words its detail. The words are only written when someone
reads them (``decision.evaluations`` or ``decision.reason``), so an engine
deciding thousands of payments a second never formats a sentence it does not
show.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, tzinfo
from typing import Any, cast

import attrs

from agentpolicy.amounts import Amount, format_units, over_limit_units
from agentpolicy.decisions import Code, Decision, Evaluation, Headroom, Outcome
from agentpolicy.errors import PolicyValidationError, Problem
from agentpolicy.policy import (
    AgentPolicy,
    ApprovalThreshold,
    BlockedPeriod,
    ScopedLimit,
    SpendingLimits,
    TimeRules,
    normalize_recipient,
    whitelist_form,
)
from agentpolicy.records import Delegation
from agentpolicy.requests import PaymentRequest
from agentpolicy.windows import WINDOW_PERIODS, Period, Window, window_at

__all__ = [
    "Assessment",
    "Tally",
    "Verdict",
    "assess",
    "conclude",
    "evaluate",
    "headroom",
    "judge",
    "matching_threshold",
    "policy_zone",
    "windows_for",
]

Usage = Mapping[str, Amount]
"""Amount already used (spent plus reserved), keyed by :attr:`Window.key`."""

UsedUnits = Mapping[str, Sequence[int]]
"""Usage as ``(base units, decimals[, payments])`` by tally key: what the engine's ledger keeps."""

Words = Callable[[], str]


_Check = tuple[str, Outcome, Code | None, Words]
"""One check: its name, outcome and code, and its detail still unwritten (plain tuples: fast)."""

_PASS, _FAIL, _SKIP, _APPROVAL = Outcome.PASS, Outcome.FAIL, Outcome.SKIP, Outcome.APPROVAL


def _evaluation(check: _Check) -> Evaluation:
    return Evaluation(check[0], check[1], check[2], check[3]())


def _ok(name: str, words: Words) -> _Check:
    return (name, _PASS, None, words)


def _fail(name: str, code: Code, words: Words) -> _Check:
    return (name, _FAIL, code, words)


def _skip(name: str, text: str) -> _Check:
    found = _SKIPS.get((name, text))
    if found is None:
        if len(_SKIPS) > 4096:
            _SKIPS.clear()
        found = _SKIPS[(name, text)] = (name, _SKIP, None, lambda: text)
    return found


_SKIPS: dict[tuple[str, str], _Check] = {}
"""Skipped checks by name and text: a check is a tuple, so one serves every decision."""


def _said(name: str, text: str) -> _Check:
    """A passing check whose words never change (one tuple serves every decision)."""
    return (name, _PASS, None, lambda: text)


_ENABLED = _said("policy", "the policy is enabled")
_NOT_BLOCKED = _said("blocked_periods", "not in a blocked period")
_WHITELISTED = _said("merchant_rules", "recipient is whitelisted")
_NOT_BLACKLISTED = _said("merchant_rules", "recipient is not blacklisted")
_NO_CATEGORY = _said("category_rules", "no category given and none required")


def policy_zone(policy: AgentPolicy | None) -> tzinfo:
    """The timezone in which ``policy`` reads the clock (``UTC`` when it names none)."""
    if policy is None or policy.time_rules is None:
        return UTC
    return policy.time_rules.zone


def windows_for(policy: AgentPolicy | None, now: datetime) -> tuple[Window, ...]:
    """The spending windows that contain ``now``, hourly to lifetime, in the policy's timezone.

    A payment counts in all six, whether or not the policy limits them, so a
    limit added later already sees what was spent in its current window.
    Raises :class:`~agentpolicy.PolicyValidationError` for a naive ``now``.
    """
    _check_now(now)
    zone = policy_zone(policy)
    # Windows nest (every day boundary is an hour boundary, and so on up), so all six
    # are the same throughout one hourly window: compute the longer ones once per hour.
    found = _current_hour.get(zone)
    if found is not None and found[0].contains(now):
        return found[1]
    hour = window_at(Period.HOURLY, now, zone)
    windows = _windows(zone, hour)
    if len(_current_hour) > 4096:
        _current_hour.clear()
    _current_hour[zone] = (hour, windows)
    return windows


# The hourly window last seen per zone, with the windows it lies in: windows tile time, so
# containing `now` identifies it.
_current_hour: dict[tzinfo, tuple[Window, tuple[Window, ...]]] = {}


@functools.lru_cache(maxsize=4096)
def _windows(zone: tzinfo, hour: Window) -> tuple[Window, ...]:
    return (hour, *(window_at(period, hour.start, zone) for period in WINDOW_PERIODS[1:]))


def _check_now(now: datetime) -> None:
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise PolicyValidationError.single("$.now", "must be a timezone-aware datetime")


def _blocked_periods(policy: AgentPolicy, now: datetime, near: tuple[BlockedPeriod, ...]) -> _Check:
    """The blocked-periods check; ``near``: the periods that can contain ``now``."""
    name = "blocked_periods"
    rules = policy.time_rules
    if rules is None or not rules.blocked_periods:
        return _skip(name, "no blocked periods")
    for period in near:
        if period.contains(now):
            return _fail(name, Code.BLOCKED_PERIOD, functools.partial(_blocked_words, period))
    return _NOT_BLOCKED


def _blocked_words(period: BlockedPeriod) -> str:
    why = f" ({period.reason})" if period.reason else ""
    return f"payments are blocked from {period.start.isoformat()} to {period.end.isoformat()}{why}"


_DAY_NAMES = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")


def _allowed_windows(policy: AgentPolicy, now: datetime, inside: bool) -> _Check:
    """The allowed-windows check; ``inside``: whether ``now`` is (:func:`_inside`, per hour)."""
    name = "allowed_windows"
    rules = policy.time_rules
    if rules is None or not rules.allowed_windows:
        return _skip(name, "no time windows: any time is allowed")
    if inside:
        return _ok(name, functools.partial(_where, rules, now, "is inside an allowed window"))
    words = functools.partial(_where, rules, now, "is outside every allowed window")
    return _fail(name, Code.OUTSIDE_ALLOWED_WINDOW, words)


def _inside(policy: AgentPolicy, now: datetime) -> bool:
    """Whether ``now`` is inside an allowed window (true when there are none).

    The answer is the same throughout the hourly window of ``now`` in the
    rules' zone (the local day and hour are), so a plan works it out once.
    """
    rules = policy.time_rules
    if rules is None or not rules.allowed_windows:
        return True
    local = now.astimezone(rules.zone)
    day = local.isoweekday() % 7
    return any(w.matches(day, local.hour) for w in rules.allowed_windows)


def _where(rules: TimeRules, now: datetime, verdict: str) -> str:
    local = now.astimezone(rules.zone)
    return f"{_DAY_NAMES[local.isoweekday() % 7]} {local:%H:%M} {rules.timezone} {verdict}"


def _merchant(policy: AgentPolicy, request: PaymentRequest) -> _Check:
    name = "merchant_rules"
    rules = policy.merchant_rules
    if rules is None:
        return _skip(name, "no merchant rules")
    if normalize_recipient(request.recipient) in rules.blacklisted:
        return _fail(
            name,
            Code.RECIPIENT_BLOCKED,
            lambda: f"recipient {request.recipient} is blacklisted",
        )
    if rules.whitelist_applies:
        if whitelist_form(request.recipient) not in rules.whitelisted:
            return _fail(
                name,
                Code.RECIPIENT_NOT_WHITELISTED,
                lambda: f"recipient {request.recipient} is not on the whitelist",
            )
        return _WHITELISTED
    return _NOT_BLACKLISTED


def _network(policy: AgentPolicy, request: PaymentRequest) -> _Check:
    name = "network_rules"
    rules = policy.network_rules
    if rules is None:
        return _skip(name, "no network rules")
    network = request.network.casefold()
    if network in rules.blocked:
        return _fail(name, Code.NETWORK_BLOCKED, lambda: f"network {request.network} is blocked")
    if rules.allowed and network not in rules.allowed:
        return _fail(
            name, Code.NETWORK_NOT_ALLOWED, lambda: f"network {request.network} is not allowed"
        )
    return _ok(name, lambda: f"network {request.network} is allowed")


def _category(policy: AgentPolicy, request: PaymentRequest) -> _Check:
    name = "category_rules"
    rules = policy.category_rules
    if rules is None:
        return _skip(name, "no category rules")
    if request.category is None:
        if rules.allowed:
            return _fail(name, Code.CATEGORY_REQUIRED, lambda: "a category is required")
        return _NO_CATEGORY
    category = request.category.casefold()
    if category in rules.blocked:
        return _fail(name, Code.CATEGORY_BLOCKED, lambda: f"category {request.category} is blocked")
    if rules.allowed and category not in rules.allowed:
        return _fail(
            name,
            Code.CATEGORY_NOT_ALLOWED,
            lambda: f"category {request.category} is not allowed",
        )
    return _ok(name, lambda: f"category {request.category} is allowed")


def _asset(policy: AgentPolicy, symbol: str) -> _Check:
    name = "asset"
    symbols = policy.symbols
    if not symbols:
        return _skip(name, "the policy sets no amounts")
    folded = symbol.casefold()
    # a token listed under assets is named, though its block may limit counts alone
    if folded not in symbols and all(a.symbol.casefold() != folded for a in policy.assets):
        return _fail(
            name,
            Code.ASSET_MISMATCH,
            lambda: (
                f"the policy's limits are in {', '.join(_names(policy))}, "
                f"the payment is in {symbol}"
            ),
        )
    return _ok(name, lambda: f"the payment is in {symbol}, a token the policy limits")


def _names(policy: AgentPolicy) -> list[str]:
    seen: dict[str, str] = {}
    for _, amount in policy.amounts():
        seen.setdefault(amount.symbol.casefold(), amount.symbol)
    return list(seen.values())


def _per_transaction(block: SpendingLimits | None, amount: Amount, comparable: bool) -> _Check:
    name = "per_transaction_limit"
    limit = block.per_transaction if block else None
    if limit is None:
        return _skip(name, "no per-transaction limit")
    if not comparable:
        return _skip(name, "not checked: asset mismatch")
    if amount.compare(limit) > 0:
        return _fail(
            name,
            Code.PER_TRANSACTION_LIMIT,
            lambda: f"{amount} exceeds the per-transaction limit {limit}",
        )
    return _ok(name, lambda: f"{amount} is within the per-transaction limit {limit}")


class Tally:
    """A counter a payment counts in: its amount and its count, in one window of one book.

    ``owner`` is ``None`` for the paying agent's own books and an ancestor
    budget's id for that budget's. ``book`` is ``None`` for the owner's own
    counters and ``(scope name, group)`` for a scope's. ``key`` names the
    counter within its book: the token, then the calendar window's key or
    ``roll:<seconds>``. ``usage_key`` names it among everything the payment
    counts in (the keys of :func:`judge`'s usage).
    """

    __slots__ = ("book", "key", "owner", "seconds", "usage_key", "window")

    def __init__(
        self,
        book: tuple[str, str] | None,
        key: str,
        window: Window | None = None,
        seconds: int | None = None,
        owner: str | None = None,
    ) -> None:
        self.book = book
        self.key = key
        self.window = window
        self.seconds = seconds
        self.owner = owner
        usage_key = key if book is None else f"scope:{book[0]}|{book[1]}|{key}"
        self.usage_key = usage_key if owner is None else f"@{len(owner)}:{owner}|{usage_key}"

    def __repr__(self) -> str:
        return f"Tally({self.usage_key!r})"


BookKey = tuple[str | None, tuple[str, str] | None]
"""Which book a tally is in: ``(owner, scope book)`` (see :class:`Tally`)."""


def _tallies(
    book: tuple[str, str] | None,
    symbol: str,
    windows: tuple[Window, ...],
    block: SpendingLimits | None,
    owner: str | None = None,
    also: SpendingLimits | None = None,
) -> tuple[dict[Period, Tally], dict[int, Tally], _Items]:
    # The same tallies serve every payment of the hour: kept by the identity of the
    # (cached) windows and the (cached, per policy version) block of limits. Trailing
    # tallies are kept for the durations of ``block`` and of ``also``.
    key = (owner, book, symbol, id(windows), id(block), id(also))
    found = _TALLIES.get(key)
    if found is not None and found[0] is windows and found[1] is block and found[2] is also:
        return found[3], found[4], found[5]
    calendar = {w.period: Tally(book, f"{symbol}|{w.key}", w, None, owner) for w in windows}
    durations = dict.fromkeys(block.rolling_seconds if block is not None else ())
    durations.update(dict.fromkeys(also.rolling_seconds if also is not None else ()))
    rolling = {
        seconds: Tally(book, f"{symbol}|roll:{seconds}", None, seconds, owner)
        for seconds in durations
    }
    if len(_TALLIES) > 4096:
        _TALLIES.clear()
    items = tuple((t.key, w) for w, t in zip(windows, calendar.values(), strict=True))
    _TALLIES[key] = (windows, block, also, calendar, rolling, items)
    return calendar, rolling, items


_Items = tuple[tuple[str, Window], ...]
"""``(key, window)`` of each calendar tally of a book: what the ledger moves."""

_TALLIES: dict[
    tuple[Any, ...], tuple[Any, Any, Any, dict[Period, Tally], dict[int, Tally], _Items]
] = {}


Used = tuple[int, int, int]
"""What a tally has used: ``(base units, decimals, number of payments)``."""


def _used(usage: UsedUnits, tally: Tally) -> Used:
    found = usage.get(tally.usage_key)
    if found is None and tally.book is None and tally.window is not None:
        found = usage.get(tally.window.key)  # usage keyed as windows_for() names windows
    if found is None:
        return (0, 0, 0)
    if type(found) is tuple and len(found) == 3:  # as the ledger reads it: taken as it is
        return found
    return (found[0], found[1], found[2] if len(found) > 2 else 0)


def _amount_limit(
    name: str,
    code: Code,
    label: str,
    limit: Amount,
    amount: Amount,
    used: Used,
) -> _Check:
    value, decimals, _ = used
    d = limit.decimals
    if amount.decimals == d and (decimals == d or not value):
        over = value + amount.value > limit.value  # the common case: nothing to scale
    else:
        over = over_limit_units(value, decimals, amount, limit)
    words = functools.partial(_limit_words, label, limit, value, decimals, amount, over)
    return (name, _FAIL, code, words) if over else (name, _PASS, None, words)


def _limit_words(
    label: str, limit: Amount, value: int, decimals: int, amount: Amount, over: bool
) -> str:
    used_text = format_units(value, decimals) if value else "0"
    verdict = "would exceed it" if over else "is within it"
    return f"{label} {limit}: used {used_text} {limit.symbol} + {amount} {verdict}"


def _count_limit(name: str, code: Code, label: str, limit: int, used: Used) -> _Check:
    count = used[2]
    words = functools.partial(_count_words, label, limit, count)
    return _fail(name, code, words) if count + 1 > limit else _ok(name, words)


def _count_words(label: str, limit: int, count: int) -> str:
    verdict = "would exceed it" if count + 1 > limit else "is within it"
    return f"{label} of {limit} payments: {count} so far + 1 {verdict}"


_NO_LIMIT = {p: _skip(f"{p.value}_limit", f"no {p.value} limit") for p in WINDOW_PERIODS}
_WINDOW_CHECK = {
    p: (f"{p.value}_limit", Code.for_period(p), f"{p.value} limit") for p in WINDOW_PERIODS
}


class _Book:
    """The limits one book applies (the agent's, or a scope's) and the tallies they read."""

    __slots__ = (
        "all_tallies", "amounts", "block", "calendar", "items", "key", "periods", "prefix",
        "rolling", "scope", "silent",
    )  # fmt: skip

    def __init__(
        self,
        block: SpendingLimits | None,
        tallies: tuple[dict[Period, Tally], dict[int, Tally], _Items],
        amounts: bool,
        scope: ScopedLimit | None = None,
        prefix: str = "",
        *,
        window_checks: bool = True,
        silent: bool = False,
    ) -> None:
        calendar, self.rolling, items = tallies
        # a silent book checks nothing: it only keeps counters a later version may limit
        self.silent = silent
        block = None if silent else block
        self.block = block
        self.calendar = calendar
        self.amounts = amounts  # whether its amount limits apply (same token)
        self.scope = scope
        self.prefix = prefix
        first = next(iter(calendar.values()))
        self.key: BookKey = (first.owner, first.book)
        self.items = items
        self.all_tallies: tuple[Tally, ...] = (*calendar.values(), *self.rolling.values())
        # an unscoped book's calendar checks, worked out once: a check that is always
        # skipped, or what a window limit needs (name, code, label, limit, tally)
        # (none for the counts of every token beside a token's own block: that book has them)
        by_period = block.by_period if block is not None and amounts else None
        self.periods: tuple[_Check | tuple[str, Code, str, Amount, Tally], ...] = tuple(
            _NO_LIMIT[p] if by_period is None or by_period[p] is None
            else (*_WINDOW_CHECK[p], cast(Amount, by_period[p]), calendar[p])
            for p in WINDOW_PERIODS
        ) if window_checks else ()  # fmt: skip

    def checks(self, amount: Amount, usage: UsedUnits) -> list[_Check]:
        block, prefix = self.block, self.prefix
        scoped = self.scope is not None
        out: list[_Check] = []
        if self.silent:
            return out
        if scoped:
            out.append(self._per_transaction(amount))
            if self.amounts and block is not None:
                label = self._label()
                for period, limit in block.windowed:
                    name = f"{prefix}{period.value}_limit"
                    used = _used(usage, self.calendar[period])
                    words = f"{label}{period.value} limit"
                    out.append(_amount_limit(name, Code.SCOPED_LIMIT, words, limit, amount, used))
        else:
            for check in self.periods:
                if len(check) == 4:  # no limit in this window
                    out.append(check)
                    continue
                name, code, label, cap, tally = check
                out.append(_amount_limit(name, code, label, cap, amount, _used(usage, tally)))
        if block is None:
            return out
        for r in block.rolling if self.amounts else ():
            name = f"{prefix}rolling_limit[{r.window}]"
            code = Code.SCOPED_LIMIT if scoped else Code.ROLLING_LIMIT
            label = f"{self._label()}rolling {r.window} limit"
            used = _used(usage, self.rolling[r.seconds])
            out.append(_amount_limit(name, code, label, r.amount, amount, used))
        for c in block.counts:
            name = f"{prefix}count_limit[{c.window}]"
            code = Code.SCOPED_LIMIT if scoped else Code.COUNT_LIMIT
            tally = self.calendar[c.period] if c.period else self.rolling[c.seconds or 0]
            label = f"{self._label()}{c.window} count limit"
            out.append(_count_limit(name, code, label, c.max, _used(usage, tally)))
        return out

    def limits(self) -> list[tuple[str, str, Amount | int, Tally]]:
        """Every limit with a usage this book applies: ``(kind, window, limit, tally)``.

        ``kind`` is ``amount`` (``limit`` an :class:`Amount`) or ``count``
        (``limit`` a number of payments); the same limits :meth:`checks` judges.
        """
        block = self.block
        if block is None:
            return []
        found: list[tuple[str, str, Amount | int, Tally]] = []
        if self.amounts:
            found += [("amount", p.value, cap, self.calendar[p]) for p, cap in block.windowed]
            found += [("amount", r.window, r.amount, self.rolling[r.seconds])
                      for r in block.rolling]  # fmt: skip
        for c in block.counts:
            tally = self.calendar[c.period] if c.period else self.rolling[c.seconds or 0]
            found.append(("count", c.window, c.max, tally))
        return found

    def alerting(
        self, percents: tuple[int, ...]
    ) -> list[tuple[Tally, Amount, tuple[int, ...], str]]:
        """Each amount limit of this book with the alert percentages that watch it."""
        block = self.block
        if not percents or block is None or not self.amounts:
            return []
        found = [(self.calendar[p], limit, percents, p.value) for p, limit in block.windowed]
        found += [(self.rolling[r.seconds], r.amount, percents, f"rolling {r.window}")
                  for r in block.rolling]  # fmt: skip
        return found

    def _label(self) -> str:
        if self.scope is None:
            return "every token's " if self.prefix else ""  # the counts of every token
        group = self.key[1]
        shown = f" ({group[1]})" if self.scope.group_by and group is not None else ""
        return f"scope {self.scope.name}{shown}: "

    def _per_transaction(self, amount: Amount) -> _Check:
        name = f"{self.prefix}per_transaction_limit"
        limit = self.block.per_transaction if self.block is not None else None
        if limit is None or not self.amounts:
            return _skip(name, "no per-transaction limit in this scope")
        label = self._label()
        if amount.compare(limit) > 0:
            return _fail(
                name,
                Code.SCOPED_LIMIT,
                lambda: f"{label}{amount} exceeds the per-transaction limit {limit}",
            )
        return _ok(name, lambda: f"{label}{amount} is within the per-transaction limit {limit}")


def matching_threshold(policy: AgentPolicy, amount: Amount) -> ApprovalThreshold | None:
    """The highest approval threshold in ``amount``'s token that it meets or exceeds, if any."""
    return _first_met(_ranked_thresholds(policy, amount.symbol.casefold()), amount)


def _ranked_thresholds(policy: AgentPolicy, folded: str) -> tuple[ApprovalThreshold, ...]:
    """The approval thresholds in a token (its folded symbol), highest first, ties as listed."""
    config = policy.approval_config
    if config is None:
        return ()
    mine = [t for t in config.thresholds if t.amount.symbol.casefold() == folded]
    return tuple(sorted(mine, key=_THRESHOLD_ORDER))  # sorted() is stable: ties keep their order


def _higher_first(x: ApprovalThreshold, y: ApprovalThreshold) -> int:
    return y.amount.compare(x.amount)


_THRESHOLD_ORDER = functools.cmp_to_key(_higher_first)


def _first_met(ranked: tuple[ApprovalThreshold, ...], amount: Amount) -> ApprovalThreshold | None:
    """The first of ``ranked`` (highest first) that ``amount`` meets or exceeds: the highest met."""
    for threshold in ranked:
        if amount.compare(threshold.amount) >= 0:
            return threshold
    return None


def _approval(
    policy: AgentPolicy, amount: Amount, comparable: bool, ranked: tuple[ApprovalThreshold, ...]
) -> tuple[_Check, ApprovalThreshold | None]:
    name = "approval_threshold"
    if policy.approval_config is None or not policy.approval_config.thresholds:
        return _skip(name, "no approval thresholds"), None
    if not comparable:
        return _skip(name, "not checked: asset mismatch"), None
    if not ranked:  # thresholds only in other tokens: none applies to this payment
        return _skip(name, f"no approval threshold in {amount.symbol}"), None
    threshold = _first_met(ranked, amount)
    if threshold is None:
        return _ok(name, lambda: f"{amount} is below every approval threshold"), None

    def words() -> str:
        if threshold.groups:
            each = ", ".join(f"{g.name} {g.required} of {len(g.approvers)}"
                             for g in threshold.groups)  # fmt: skip
            return f"{amount} meets the threshold {threshold.amount}: needs every group: {each}"
        return (
            f"{amount} meets the threshold {threshold.amount}: needs "
            f"{threshold.required_approvers} of {len(threshold.approvers)} approvers"
        )

    return (name, _APPROVAL, Code.APPROVAL_REQUIRED, words), threshold


class Assessment:
    """Every check that does not depend on usage, done once; :func:`judge` adds usage.

    ``early`` is the whole decision when there is no policy or it is disabled.
    ``blocking`` is the first usage-independent check that failed, if any;
    ``threshold`` the approval threshold the amount meets. ``books`` are the
    limits of the agent (or, for an ancestor's assessment, of that budget)
    with the counters they read.

    ``parents`` are the assessments of the budgets above the agent, its
    parent first; ``every_book`` and ``tallies`` cover them too: every
    counter the payment counts in, which ``judge`` reads from its usage.
    """

    __slots__ = (
        "approval", "blocking", "books", "budget_id", "checks", "comparable", "early",
        "every_book", "now", "parents", "policy", "request", "tallies", "threshold", "windows",
    )  # fmt: skip

    def __init__(
        self,
        policy: AgentPolicy | None,
        request: PaymentRequest,
        now: datetime,
        windows: tuple[Window, ...],
        early: Decision | None = None,
        checks: tuple[_Check, ...] = (),
        blocking: _Check | None = None,
        comparable: bool = False,
        approval: _Check | None = None,
        threshold: ApprovalThreshold | None = None,
        books: tuple[_Book, ...] = (),
        budget_id: str | None = None,
        parents: tuple[Assessment, ...] = (),
    ) -> None:
        self.policy = policy
        self.request = request
        self.now = now
        self.windows = windows
        self.early = early
        self.checks = checks
        self.blocking = blocking
        self.comparable = comparable
        self.approval = approval
        self.threshold = threshold
        self.books = books
        self.budget_id = request.agent_id if budget_id is None else budget_id
        self.parents = parents
        every = books + tuple(b for p in parents for b in p.books) if parents else books
        self.every_book: tuple[_Book, ...] = every
        n = len(every)
        self.tallies: tuple[Tally, ...] = (
            every[0].all_tallies
            if n == 1
            else every[0].all_tallies + every[1].all_tallies
            if n == 2  # a token's book and every token's: joined without a generator
            else tuple(t for b in every for t in b.all_tallies)
        )

    def windows_in_force(self) -> tuple[Window, ...]:
        """The calendar windows of the agent's policy and of each budget above it, now.

        A book keeps a counter until the window in force under its key ends
        (see :meth:`agentpolicy.ledger.tallies.Book.prune`).
        """
        if not self.parents:
            return self.windows
        return tuple(w for level in (self, *self.parents) for w in level.windows)

    def alerting(self) -> list[tuple[Tally, Amount, tuple[int, ...], str]]:
        """Every amount limit the payment counts against that alerts watch (every budget)."""
        found = []
        for level in (self, *self.parents):
            if level.policy is None or not level.comparable:
                continue
            for book in level.books:
                alerts = level.policy.alerts if book.scope is None else book.scope.alerts
                found += book.alerting(tuple(a.percent for a in alerts))
        return found

    def approvals(self) -> list[tuple[str, ApprovalThreshold, AgentPolicy]]:
        """Every budget whose approval threshold the amount meets, the agent's first."""
        return [
            (level.budget_id, level.threshold, level.policy)
            for level in (self, *self.parents)
            if level.threshold is not None and level.policy is not None
        ]


class _Plan:
    """What assessing a payment in one token needs of a policy, for one hour: worked out once.

    The windows of the hour, the asset check (its words name the token as
    the request spells it), the block of limits of the token, the budget's
    own book with its counters, the token's approval thresholds (highest
    first), whether the hour is inside the allowed windows, the blocked
    periods that reach into the hour, and the payee checks of the payees
    seen (:meth:`payee`). Kept
    by the policy's identity (a policy never changes), the token as spelled
    and the budget, and used while the hour contains ``now``.
    """

    __slots__ = (
        "asset", "block", "blocked", "book", "comparable", "every_token", "hour", "inside",
        "payees", "policy", "thresholds", "windows",
    )  # fmt: skip

    def __init__(self, policy: AgentPolicy, symbol: str, now: datetime, owner: str | None) -> None:
        self.policy = policy
        self.windows = windows = windows_for(policy, now)
        self.hour = windows[0]
        self.asset = _asset(policy, symbol)
        self.comparable = comparable = self.asset[1] is not _FAIL
        folded = symbol.casefold()
        self.block = block = policy.limits_for(folded)
        self.book, self.every_token = _token_books(
            None, folded, windows, block, policy.limits, owner, comparable
        )
        self.thresholds = _ranked_thresholds(policy, folded)
        self.inside = _inside(policy, now)
        rules = policy.time_rules
        hour = self.hour
        # the blocked periods that can contain an instant of the hour (both ends are inside one)
        self.blocked = () if rules is None else tuple(
            p for p in rules.blocked_periods if p.start < hour.end and p.end >= hour.start
        )  # fmt: skip
        self.payees: dict[tuple[str, str, str | None], tuple[_Check, _Check, _Check]] = {}

    def payee(self, request: PaymentRequest) -> tuple[_Check, _Check, _Check]:
        """The merchant, network and category checks of a request (kept by the three as spelled).

        Each depends on the policy and on the recipient, network or category
        alone, and its words name them as the request spells them, so one
        answer serves every request that spells all three alike.
        """
        key = (request.recipient, request.network, request.category)
        found = self.payees.get(key)
        if found is None:
            policy = self.policy
            found = (_merchant(policy, request), _network(policy, request),
                     _category(policy, request))  # fmt: skip
            if len(self.payees) >= _PAYEES_KEPT:
                self.payees.clear()
            self.payees[key] = found
        return found


_PAYEES_KEPT = 1024
"""Payees a plan keeps the checks of (then it starts over: many payees cost time, not memory)."""


def _plan(policy: AgentPolicy, symbol: str, now: datetime, owner: str | None) -> _Plan:
    """The :class:`_Plan` of ``policy`` for a payment in ``symbol`` at ``now`` (cached)."""
    _check_now(now)
    key = (id(policy), symbol, owner)
    found = _PLANS.get(key)
    if found is not None and found.policy is policy and found.hour.start <= now < found.hour.end:
        return found
    plan = _Plan(policy, symbol, now, owner)
    if len(_PLANS) > 4096:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


_PLANS: dict[tuple[int, str, str | None], _Plan] = {}
"""Plans by policy (its identity, checked: the plan keeps the policy alive), token and budget."""


def _scope_books(
    policy: AgentPolicy,
    request: PaymentRequest,
    windows: tuple[Window, ...],
    owner: str | None,
) -> list[_Book]:
    books = []
    folded = request.symbol.casefold()
    for scope in policy.scoped_limits:
        if not scope.covers(request):
            continue
        group = scope.group(request.category, request.recipient, request.network)
        book = (scope.name, group)
        prefix = f"scope[{scope.name}]."
        own = _tallies(book, folded if scope.token == "*" else scope.token, windows,  # noqa: S105
                       scope.limits, owner)  # fmt: skip
        every = _tallies(book, "*", windows, scope.limits, owner)
        if scope.token == "*":  # noqa: S105 - counts alone: of every token together
            books.append(_Book(scope.limits, own, amounts=True, scope=scope, prefix=prefix,
                               silent=True))  # fmt: skip
            books.append(_Book(scope.limits, every, amounts=True, scope=scope, prefix=prefix))
        else:
            books.append(_Book(scope.limits, own, amounts=True, scope=scope, prefix=prefix))
            books.append(_Book(scope.limits, every, amounts=True, scope=scope, prefix=prefix,
                               silent=True))  # fmt: skip
    return books


def _token_books(
    book: tuple[str, str] | None,
    folded: str,
    windows: tuple[Window, ...],
    block: SpendingLimits | None,
    top: SpendingLimits | None,
    owner: str | None,
    comparable: bool,
) -> tuple[_Book, _Book]:
    """The book of a payment's own token and the book of every token's counts, in one document.

    Every payment counts in both: in counters of its own token (``usdt|...``)
    and in counters of every token together (``*|...``), whatever limits
    the policy sets now, so that a version that limits the other (an amount
    limit added to counts alone, or the amounts taken away from counts)
    sees what was paid before it in the windows it limits. The limits of
    ``block`` (the payment's token's) are checked on the first; a block of
    counts alone (no token named: the payments of every token together) on
    the second, as is the top-level ``limits`` block of counts alone beside
    an asset's own block (``every_token.``). Beside such a block both keep
    their trailing counters for the durations of the two blocks.
    """
    # counts alone is the top-level block naming no token; an asset's block of counts alone
    # (no amounts) is still that asset's own: its counts are of its token's payments
    counts_alone = block is not None and block is top and block.symbol is None
    if counts_alone:
        own = _tallies(book, folded, windows, block, owner)
        every = _tallies(book, "*", windows, block, owner)
        return _Book(None, own, comparable), _Book(block, every, amounts=False,
                                                   window_checks=False)  # fmt: skip
    token = folded  # the block's token (an asset's block may name no amount)
    if top is not None and top is not block and top.symbol is None and top.counts:
        # both the token's own trailing counters and every token's are kept for the
        # durations of both blocks: either block may be the one a later version limits
        own = _tallies(book, token, windows, block, owner, also=top)
        every = _tallies(book, "*", windows, top, owner, also=block)
        return _Book(block, own, comparable), _Book(top, every, amounts=False,
                                                    prefix="every_token.",
                                                    window_checks=False)  # fmt: skip
    own = _tallies(book, token, windows, block, owner)
    first = _Book(block, own, comparable)
    every = _tallies(book, "*", windows, block, owner)
    return first, _Book(block, every, amounts=False, window_checks=False, silent=True)


Ancestor = tuple[str, AgentPolicy | None, Delegation | None]
"""A budget above the agent: its id, its policy, and its delegation if it was delegated."""


def _delegation(grant: Delegation, now: datetime) -> _Check:
    name = "delegation"
    if grant.revoked_at is not None:
        return _fail(name, Code.DELEGATION_REVOKED,
                     lambda: f"the budget delegated by {grant.parent_id} was revoked")  # fmt: skip
    if grant.expires_at is not None and now >= grant.expires_at:
        return _fail(
            name,
            Code.DELEGATION_EXPIRED,
            lambda: f"the budget delegated by {grant.parent_id} expired at {grant.expires_at}",
        )
    return _ok(name, lambda: f"delegated by {grant.parent_id}" + (
        f" until {grant.expires_at}" if grant.expires_at is not None else ""))  # fmt: skip


def assess(
    policy: AgentPolicy | None,
    request: PaymentRequest,
    now: datetime,
    *,
    grant: Delegation | None = None,
    ancestors: Sequence[Ancestor] = (),
) -> Assessment:
    """Run every check that does not need usage (see :func:`evaluate`).

    ``grant`` is the agent's delegation, when its budget was delegated (a
    revoked or expired one denies). ``ancestors`` are the budgets above the
    agent, its parent first: their rules and limits are checked too, and the
    payment counts in their windows as well.
    """
    own = _assess_level(policy, request, now, None, grant)
    if not ancestors or own.early is not None:
        return own
    parents = tuple(_assess_level(p, request, now, bid, g) for bid, p, g in ancestors)
    return Assessment(
        own.policy, request, now, own.windows, None, own.checks, own.blocking, own.comparable,
        own.approval, own.threshold, own.books, None, parents,
    )  # fmt: skip


def _assess_level(
    policy: AgentPolicy | None,
    request: PaymentRequest,
    now: datetime,
    owner: str | None,
    grant: Delegation | None,
) -> Assessment:
    if policy is None or not policy.enabled:
        windows = windows_for(policy, now)
        code = Code.NO_POLICY if policy is None else Code.POLICY_DISABLED
        who = request.agent_id if owner is None else owner
        detail = (
            f"no policy is set for agent {who}"
            if policy is None
            else "the policy is disabled: every payment is denied"
        )
        early = Decision(
            allowed=False,
            code=code,
            reason=detail,
            evaluations=(Evaluation("policy", Outcome.FAIL, code, detail),),
            windows=windows,
            budget_id=who,
        )
        return Assessment(policy, request, now, windows, early=early, budget_id=owner)
    amount = request.asset_amount
    plan = _plan(policy, request.symbol, now, owner)
    windows, asset, comparable, block = plan.windows, plan.asset, plan.comparable, plan.block
    approval, threshold = _approval(policy, amount, comparable, plan.thresholds)
    checks = (
        _ENABLED,
        *(() if grant is None else (_delegation(grant, now),)),
        _blocked_periods(policy, now, plan.blocked),
        _allowed_windows(policy, now, plan.inside),
        *plan.payee(request),
        asset,
        _per_transaction(block, amount, comparable),
    )
    blocking = None
    for check in checks:
        if check[1] is _FAIL:
            blocking = check
            break
    books = [plan.book, plan.every_token]
    if comparable and policy.scoped_limits:
        books += _scope_books(policy, request, windows, owner)
    return Assessment(
        policy, request, now, windows, None, checks, blocking, comparable, approval, threshold,
        tuple(books), owner,
    )  # fmt: skip


def _units(usage: Usage) -> dict[str, tuple[int, int]]:
    return {key: (a.value, a.decimals) for key, a in usage.items()}


class Verdict:
    """The code a finished assessment decides, with every check it ran (details unwritten).

    ``budget_id`` is the budget whose check decided (``None`` when allowed).
    """

    __slots__ = ("assessment", "budget_id", "checks", "code", "failure", "threshold")

    def __init__(
        self,
        assessment: Assessment,
        code: Code,
        failure: _Check | None,
        checks: tuple[_Check, ...],
        budget_id: str | None = None,
        threshold: ApprovalThreshold | None = None,
    ) -> None:
        self.assessment = assessment
        self.code = code
        self.failure = failure
        self.checks = checks
        self.budget_id = budget_id
        self.threshold = threshold

    def decision(
        self,
        reservation_id: str | None = None,
        approval_id: str | None = None,
        expires_at: datetime | None = None,
        policy_version: int | None = None,
        decided_at: datetime | None = None,
        **more: Any,
    ) -> Decision:
        """The :class:`~agentpolicy.Decision`, with the engine's fields (ids, version, time).

        ``more`` are other fields of the decision, set as given.
        """
        a = self.assessment
        if a.early is not None:
            named = {"reservation_id": reservation_id, "approval_id": approval_id,
                     "expires_at": expires_at, "policy_version": policy_version,
                     "decided_at": decided_at}  # fmt: skip
            engine = {k: v for k, v in named.items() if v is not None} | more
            return attrs.evolve(a.early, **engine) if engine else a.early
        if more:
            made = self.decision(reservation_id, approval_id, expires_at, policy_version,
                                 decided_at)  # fmt: skip
            return attrs.evolve(made, **more)
        checks = self.checks

        def evaluations() -> tuple[Evaluation, ...]:
            return tuple(_evaluation(c) for c in checks)

        # Decision's fields in their order, given by position: a call naming ten of them
        # costs a third more than the making of the decision (keywords are matched by name)
        if self.failure is not None:
            return Decision(
                False, self.code, self.failure[3], False, None, evaluations, a.windows,  # noqa: FBT003
                reservation_id, approval_id, expires_at, policy_version, decided_at,
                self.budget_id,
            )  # fmt: skip
        if self.code is Code.APPROVAL_REQUIRED:
            first = next(level for level in (a, *a.parents) if level.threshold is not None)
            assert first.approval is not None  # noqa: S101 - set whenever there is a policy
            return Decision(
                False, Code.APPROVAL_REQUIRED, first.approval[3], True, self.threshold,  # noqa: FBT003
                evaluations, a.windows, reservation_id, approval_id, expires_at,
                policy_version, decided_at, self.budget_id,
            )  # fmt: skip
        return Decision(
            True, Code.ALLOWED, "every check passed", False, None, evaluations, a.windows,  # noqa: FBT003
            reservation_id, approval_id, expires_at, policy_version, decided_at,
        )  # fmt: skip


def _level(a: Assessment, units: UsedUnits) -> tuple[_Check | None, tuple[_Check, ...]]:
    """One budget's first failing check (if any) and every check it ran."""
    if a.early is not None:
        code = a.early.code
        early = a.early
        check = ("policy", _FAIL, code, lambda: early.reason)
        return check, (check,)
    approval = a.approval
    assert approval is not None  # noqa: S101 - set whenever there is no early decision
    amount = a.request.asset_amount
    limits: list[_Check]
    if a.comparable:  # an assessment that compares has its own book at least
        books = a.books
        limits = books[0].checks(amount, units)
        for book in books[1:]:
            limits += book.checks(amount, units)
    else:
        limits = [_skip(f"{p.value}_limit", "not checked: asset mismatch") for p in WINDOW_PERIODS]
    checks = (*a.checks, *limits, approval)
    failure = a.blocking
    if failure is None:
        for limit in limits:
            if limit[1] is _FAIL:
                return limit, checks
    return failure, checks


def _prefixed(prefix: str, checks: tuple[_Check, ...]) -> tuple[_Check, ...]:
    return tuple((prefix + c[0], c[1], c[2], c[3]) for c in checks)


def judge(assessment: Assessment, usage: Usage | UsedUnits) -> Verdict:
    """Finish an :class:`Assessment` with what its tallies have used: the verdict.

    ``usage`` maps each tally's ``usage_key`` to ``(base units, decimals,
    payments)``; a missing key means nothing was used. For the agent's own
    calendar windows the window's key (as :func:`windows_for` names it) is
    accepted too, and so are :class:`~agentpolicy.Amount` values (then the
    count is 0).

    With ancestors, the agent's checks come first, then its parent's (their
    names prefixed ``budget[<id>].``), and so on up: the first failure
    decides, and names its budget in ``budget_id``.
    """
    if assessment.early is not None:
        return Verdict(assessment, assessment.early.code, None, (), assessment.budget_id)
    units = cast(
        UsedUnits,
        _units(cast(Usage, usage))
        if usage and isinstance(next(iter(usage.values())), Amount)
        else usage,
    )
    failure, checks = _level(assessment, units)
    if failure is not None and not assessment.parents:
        assert failure[2] is not None  # noqa: S101 - every failure carries its code
        return Verdict(assessment, failure[2], failure, checks, assessment.budget_id)
    failed_at = assessment.budget_id if failure is not None else None
    for parent in assessment.parents:
        found, more = _level(parent, units)
        prefix = f"budget[{parent.budget_id}]."
        checks += _prefixed(prefix, more)
        if failure is None and found is not None:
            words, who = found[3], parent.budget_id
            failure = (prefix + found[0], found[1], found[2],
                       lambda words=words, who=who: f"budget {who}: {words()}")  # fmt: skip
            failed_at = who
    if failure is not None:
        assert failure[2] is not None  # noqa: S101 - every failure carries its code
        return Verdict(assessment, failure[2], failure, checks, failed_at)
    wanted = assessment.approvals()
    if wanted:
        budget_id, threshold, _ = wanted[0]
        return Verdict(assessment, Code.APPROVAL_REQUIRED, None, checks, budget_id, threshold)
    return Verdict(assessment, Code.ALLOWED, None, checks)


def conclude(assessment: Assessment, usage: Usage | UsedUnits, **engine: Any) -> Decision:
    """Finish an :class:`Assessment` with the usage of its tallies: the decision.

    ``usage`` is as for :func:`judge`. ``engine`` sets the fields an engine
    fills in (``reservation_id``, ``approval_id``, ``expires_at``,
    ``policy_version``, ``decided_at``). Details are worded when read.
    """
    return judge(assessment, usage).decision(**engine)


def evaluate(
    policy: AgentPolicy | None,
    request: PaymentRequest,
    usage: Usage,
    now: datetime,
) -> Decision:
    """Decide whether ``request`` may be paid now, as a pure function of its arguments.

    ``usage`` maps window keys (see :func:`windows_for`) to the amount already
    used in that window; a missing key means nothing was used. ``now`` must be
    timezone-aware (else :class:`~agentpolicy.PolicyValidationError`).
    Returns a :class:`~agentpolicy.Decision`; a denial is a decision, not an
    exception. Equal to ``conclude(assess(policy, request, now), usage)``.

    Arguments of the wrong kind raise :class:`~agentpolicy.PolicyValidationError`
    (``INVALID_INPUT``) naming each: ``policy`` must be an
    :class:`~agentpolicy.AgentPolicy` or ``None`` (:func:`~agentpolicy.load_policy`
    reads the JSON form), ``request`` a :class:`~agentpolicy.PaymentRequest`,
    ``usage`` a mapping of window keys to :class:`~agentpolicy.Amount`
    values (or, as :func:`judge` takes them, ``(base units, decimals[,
    payments])`` of non-negative integers).
    """
    problems = _argument_problems(policy, request, usage, now)
    if problems:
        raise PolicyValidationError(problems)
    return conclude(assess(policy, request, now), _usage_units(usage))


def _argument_problems(policy: Any, request: Any, usage: Any, now: Any) -> list[Problem]:
    """What is wrong with :func:`evaluate`'s arguments (nothing, for arguments of their types)."""
    problems = []
    if policy is not None and not isinstance(policy, AgentPolicy):
        problems.append(Problem("$.policy", "must be an AgentPolicy or None (load_policy reads "
                                            "the JSON form)"))  # fmt: skip
    if not isinstance(request, PaymentRequest):
        problems.append(Problem("$.request", "must be a PaymentRequest"))
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        problems.append(Problem("$.now", "must be a timezone-aware datetime"))
    if not isinstance(usage, Mapping):
        problems.append(Problem("$.usage", "must be a mapping of window keys to amounts used"))
        return problems
    for key, used in usage.items():
        if not isinstance(key, str):
            problems.append(Problem("$.usage", f"has a key that is not a string: {key!r}"))
        elif not isinstance(used, Amount) and not _units_used(used):
            problems.append(Problem(f"$.usage[{key!r}]", "must be an Amount, or (base units, "
                                                         "decimals[, payments]) of non-negative "
                                                         "integers"))  # fmt: skip
    return problems


def _units_used(used: Any) -> bool:
    return (
        isinstance(used, tuple | list)
        and len(used) in (2, 3)
        and all(type(n) is int and n >= 0 for n in used)
    )


def _usage_units(usage: Usage | UsedUnits) -> UsedUnits:
    """Usage as :func:`judge` reads it: Amounts and unit tuples may be mixed in one mapping."""
    return {
        key: (used.value, used.decimals) if isinstance(used, Amount) else tuple(used)
        for key, used in usage.items()
    }


def _floor_units(value: int, decimals: int, to: int) -> int:
    step: int = 10 ** abs(to - decimals)
    return value * step if to >= decimals else value // step


def _ceil_units(value: int, decimals: int, to: int) -> int:
    step: int = 10 ** abs(to - decimals)
    return value * step if to >= decimals else -(-value // step)


def headroom(assessment: Assessment, usage: UsedUnits) -> tuple[Headroom, ...]:
    """Every limit the payment counts against, with what it would leave there.

    ``usage`` is as for :func:`judge` (base units, decimals, payments per
    tally). One :class:`~agentpolicy.Headroom` per calendar, rolling and
    count limit of the agent's budget and of every budget above it, in the
    order :func:`judge` checks them. A budget whose checks do not apply (no
    policy, disabled, or a payment in another token) has none.
    """
    found: list[Headroom] = []
    amount = assessment.request.asset_amount
    for level in (assessment, *assessment.parents):
        if level.early is not None or not level.comparable:
            continue
        for book in level.books:
            scope, group = book.key[1] or (None, None)
            for kind, window, limit, tally in book.limits():
                value, decimals, count = _used(usage, tally)
                w = tally.window
                start, end = (None, None) if w is None or w.period is Period.LIFETIME else (
                    w.start, w.end)  # fmt: skip
                if isinstance(limit, int):
                    every = tally.key.startswith("*|")  # counts of every token together
                    found.append(Headroom(
                        level.budget_id, kind, window, count + 1 <= limit, scope, group,
                        max_count=limit, count=count, remaining_count=max(0, limit - count - 1),
                        window_start=start, window_end=end,
                        symbol=None if every else assessment.request.symbol,
                    ))  # fmt: skip
                    continue
                d = max(decimals, amount.decimals, limit.decimals)
                used = value * 10 ** (d - decimals)
                left = limit.scaled_to(d) - used - amount.scaled_to(d)
                ld, symbol = limit.decimals, limit.symbol
                found.append(Headroom(
                    level.budget_id, kind, window, left >= 0, scope, group, limit=limit,
                    used=Amount(_ceil_units(used, d, ld), ld, symbol),
                    remaining=Amount(_floor_units(max(0, left), d, ld), ld, symbol),
                    window_start=start, window_end=end, symbol=symbol,
                ))  # fmt: skip
    return tuple(found)
