"""The pure decision function: (policy, request, usage, now) -> Decision.

Every check runs, in the order of docs/semantics.md section 2, and is listed in the
decision's ``evaluations``; the first failure decides the code. Nothing here
reads a clock, a storage or the environment.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import UTC, datetime, tzinfo

import attrs

from agentpolicy.amounts import Amount, format_units, over_limit, same_symbol
from agentpolicy.decisions import Code, Decision, Evaluation, Outcome
from agentpolicy.errors import PolicyValidationError
from agentpolicy.policy import AgentPolicy, ApprovalThreshold, normalize_recipient
from agentpolicy.requests import PaymentRequest
from agentpolicy.windows import WINDOW_PERIODS, Period, Window, window_at

__all__ = ["Assessment", "assess", "conclude", "evaluate", "policy_zone", "windows_for"]

Usage = Mapping[str, Amount]
"""Amount already used (spent plus reserved), keyed by :attr:`Window.key`."""


def policy_zone(policy: AgentPolicy | None) -> tzinfo:
    """The timezone in which ``policy`` reads the clock (``UTC`` when it names none)."""
    if policy is None or policy.time_rules is None:
        return UTC
    return policy.time_rules.zone


def windows_for(policy: AgentPolicy | None, now: datetime) -> tuple[Window, ...]:
    """The spending windows that contain ``now``, hourly to monthly, in the policy's timezone.

    A payment counts in all four, whether or not the policy limits them, so a
    limit added later already sees what was spent in its current window.
    Raises :class:`~agentpolicy.PolicyValidationError` for a naive ``now``.
    """
    _check_now(now)
    zone = policy_zone(policy)
    # Windows nest (every day boundary is an hour boundary, and so on up), so all four
    # are the same throughout one hourly window: compute the longer ones once per hour.
    hour = _current_hour.get(zone)
    if hour is None or not hour.contains(now):
        hour = window_at(Period.HOURLY, now, zone)
        if len(_current_hour) > 4096:
            _current_hour.clear()
        _current_hour[zone] = hour
    return _windows(zone, hour)


# The hourly window last seen per zone: windows tile time, so containing `now` identifies it.
_current_hour: dict[tzinfo, Window] = {}


@functools.lru_cache(maxsize=4096)
def _windows(zone: tzinfo, hour: Window) -> tuple[Window, ...]:
    return (hour, *(window_at(period, hour.start, zone) for period in WINDOW_PERIODS[1:]))


def _check_now(now: datetime) -> None:
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise PolicyValidationError.single("$.now", "must be a timezone-aware datetime")


def _ok(name: str, detail: str) -> Evaluation:
    return Evaluation(name, Outcome.PASS, None, detail)


def _fail(name: str, code: Code, detail: str) -> Evaluation:
    return Evaluation(name, Outcome.FAIL, code, detail)


def _skip(name: str, detail: str) -> Evaluation:
    return Evaluation(name, Outcome.SKIP, None, detail)


def _blocked_periods(policy: AgentPolicy, now: datetime) -> Evaluation:
    name = "blocked_periods"
    rules = policy.time_rules
    if rules is None or not rules.blocked_periods:
        return _skip(name, "no blocked periods")
    for period in rules.blocked_periods:
        if period.contains(now):
            why = f" ({period.reason})" if period.reason else ""
            return _fail(
                name,
                Code.BLOCKED_PERIOD,
                f"payments are blocked from {period.start.isoformat()} "
                f"to {period.end.isoformat()}{why}",
            )
    return _ok(name, "not in a blocked period")


_DAY_NAMES = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")


def _allowed_windows(policy: AgentPolicy, now: datetime) -> Evaluation:
    name = "allowed_windows"
    rules = policy.time_rules
    if rules is None or not rules.allowed_windows:
        return _skip(name, "no time windows: any time is allowed")
    local = now.astimezone(rules.zone)
    day = local.isoweekday() % 7
    where = f"{_DAY_NAMES[day]} {local:%H:%M} {rules.timezone}"
    if any(w.matches(day, local.hour) for w in rules.allowed_windows):
        return _ok(name, f"{where} is inside an allowed window")
    return _fail(name, Code.OUTSIDE_ALLOWED_WINDOW, f"{where} is outside every allowed window")


def _merchant(policy: AgentPolicy, request: PaymentRequest) -> Evaluation:
    name = "merchant_rules"
    rules = policy.merchant_rules
    if rules is None:
        return _skip(name, "no merchant rules")
    recipient = normalize_recipient(request.recipient)
    if recipient in rules.blacklisted:
        return _fail(name, Code.RECIPIENT_BLOCKED, f"recipient {request.recipient} is blacklisted")
    if rules.whitelist_applies and recipient not in rules.whitelisted:
        return _fail(
            name,
            Code.RECIPIENT_NOT_WHITELISTED,
            f"recipient {request.recipient} is not on the whitelist",
        )
    if rules.whitelist_applies:
        return _ok(name, "recipient is whitelisted")
    return _ok(name, "recipient is not blacklisted")


def _network(policy: AgentPolicy, request: PaymentRequest) -> Evaluation:
    name = "network_rules"
    rules = policy.network_rules
    if rules is None:
        return _skip(name, "no network rules")
    network = request.network.casefold()
    if network in rules.blocked:
        return _fail(name, Code.NETWORK_BLOCKED, f"network {request.network} is blocked")
    if rules.allowed and network not in rules.allowed:
        return _fail(name, Code.NETWORK_NOT_ALLOWED, f"network {request.network} is not allowed")
    return _ok(name, f"network {request.network} is allowed")


def _category(policy: AgentPolicy, request: PaymentRequest) -> Evaluation:
    name = "category_rules"
    rules = policy.category_rules
    if rules is None:
        return _skip(name, "no category rules")
    if request.category is None:
        if rules.allowed:
            return _fail(name, Code.CATEGORY_REQUIRED, "a category is required")
        return _ok(name, "no category given and none required")
    category = request.category.casefold()
    if category in rules.blocked:
        return _fail(name, Code.CATEGORY_BLOCKED, f"category {request.category} is blocked")
    if rules.allowed and category not in rules.allowed:
        return _fail(name, Code.CATEGORY_NOT_ALLOWED, f"category {request.category} is not allowed")
    return _ok(name, f"category {request.category} is allowed")


def _asset(policy: AgentPolicy, request: PaymentRequest) -> Evaluation:
    name = "asset"
    symbol = policy.symbol
    if symbol is None:
        return _skip(name, "the policy sets no amounts")
    if not same_symbol(symbol, request.symbol):
        return _fail(
            name,
            Code.ASSET_MISMATCH,
            f"the policy's limits are in {symbol}, the payment is in {request.symbol}",
        )
    return _ok(name, f"the payment is in {symbol}, as the policy's limits")


def _per_transaction(policy: AgentPolicy, amount: Amount, comparable: bool) -> Evaluation:
    name = "per_transaction_limit"
    limit = policy.limits.per_transaction if policy.limits else None
    if limit is None:
        return _skip(name, "no per-transaction limit")
    if not comparable:
        return _skip(name, "not checked: asset mismatch")
    if amount.compare(limit) > 0:
        return _fail(
            name, Code.PER_TRANSACTION_LIMIT, f"{amount} exceeds the per-transaction limit {limit}"
        )
    return _ok(name, f"{amount} is within the per-transaction limit {limit}")


def _window_limits(
    policy: AgentPolicy,
    amount: Amount,
    windows: tuple[Window, ...],
    usage: Usage,
    comparable: bool,
) -> list[Evaluation]:
    out: list[Evaluation] = []
    limits = policy.limits
    for window in windows:
        name = f"{window.period.value}_limit"
        limit = limits.for_period(window.period) if limits else None
        if limit is None:
            out.append(_skip(name, f"no {window.period.value} limit"))
            continue
        if not comparable:
            out.append(_skip(name, "not checked: asset mismatch"))
            continue
        used = usage.get(window.key)
        used_text = "0" if used is None else format_units(used.value, used.decimals)
        label = f"{window.period.value} limit {limit}: used {used_text} {limit.symbol} + {amount}"
        if over_limit(used, amount, limit):
            out.append(_fail(name, Code.for_period(window.period), f"{label} would exceed it"))
        else:
            out.append(_ok(name, f"{label} is within it"))
    return out


def matching_threshold(policy: AgentPolicy, amount: Amount) -> ApprovalThreshold | None:
    """The highest approval threshold that ``amount`` meets or exceeds, if any."""
    config = policy.approval_config
    if config is None:
        return None
    best: ApprovalThreshold | None = None
    for threshold in config.thresholds:
        if amount.compare(threshold.amount) >= 0 and (
            best is None or threshold.amount.compare(best.amount) > 0
        ):
            best = threshold
    return best


def _approval(
    policy: AgentPolicy, amount: Amount, comparable: bool
) -> tuple[Evaluation, ApprovalThreshold | None]:
    name = "approval_threshold"
    if policy.approval_config is None or not policy.approval_config.thresholds:
        return _skip(name, "no approval thresholds"), None
    if not comparable:
        return _skip(name, "not checked: asset mismatch"), None
    threshold = matching_threshold(policy, amount)
    if threshold is None:
        return _ok(name, f"{amount} is below every approval threshold"), None
    detail = (
        f"{amount} meets the threshold {threshold.amount}: needs "
        f"{threshold.required_approvers} of {len(threshold.approvers)} approvers"
    )
    return Evaluation(name, Outcome.APPROVAL, Code.APPROVAL_REQUIRED, detail), threshold


@attrs.frozen
class Assessment:
    """Every check that does not depend on usage, done once; :func:`conclude` adds usage.

    ``early`` is the whole decision when there is no policy or it is disabled.
    ``checks`` are the usage-independent evaluations in order (policy to
    per-transaction limit); ``blocking`` is the first of them that failed.
    """

    policy: AgentPolicy | None
    request: PaymentRequest
    now: datetime
    windows: tuple[Window, ...]
    early: Decision | None = None
    checks: tuple[Evaluation, ...] = ()
    blocking: Evaluation | None = None
    comparable: bool = False
    approval: Evaluation | None = None
    threshold: ApprovalThreshold | None = None


def assess(policy: AgentPolicy | None, request: PaymentRequest, now: datetime) -> Assessment:
    """Run every check that does not need usage (see :func:`evaluate`)."""
    windows = windows_for(policy, now)
    if policy is None or not policy.enabled:
        code = Code.NO_POLICY if policy is None else Code.POLICY_DISABLED
        detail = (
            f"no policy is set for agent {request.agent_id}"
            if policy is None
            else "the policy is disabled: every payment is denied"
        )
        early = Decision(
            allowed=False,
            code=code,
            reason=detail,
            evaluations=(_fail("policy", code, detail),),
            windows=windows,
        )
        return Assessment(policy, request, now, windows, early=early)
    amount = request.asset_amount
    asset = _asset(policy, request)
    comparable = not asset.failed
    approval, threshold = _approval(policy, amount, comparable)
    checks = (
        _ok("policy", "the policy is enabled"),
        _blocked_periods(policy, now),
        _allowed_windows(policy, now),
        _merchant(policy, request),
        _network(policy, request),
        _category(policy, request),
        asset,
        _per_transaction(policy, amount, comparable),
    )
    blocking = next((e for e in checks if e.failed), None)
    return Assessment(
        policy, request, now, windows, None, checks, blocking, comparable, approval, threshold
    )


def conclude(assessment: Assessment, usage: Usage) -> Decision:
    """Finish an :class:`Assessment` with the usage of its windows: the decision."""
    if assessment.early is not None:
        return assessment.early
    policy = assessment.policy
    assert policy is not None  # noqa: S101 - set whenever there is no early decision
    assert assessment.approval is not None  # noqa: S101 - likewise
    windows = assessment.windows
    limits = _window_limits(
        policy, assessment.request.asset_amount, windows, usage, assessment.comparable
    )
    evaluations = (*assessment.checks, *limits, assessment.approval)
    failure = assessment.blocking or next((e for e in limits if e.failed), None)
    if failure is not None:
        assert failure.code is not None  # noqa: S101 - every failure carries its code
        return Decision(
            allowed=False,
            code=failure.code,
            reason=failure.detail,
            evaluations=evaluations,
            windows=windows,
        )
    if assessment.threshold is not None:
        return Decision(
            allowed=False,
            code=Code.APPROVAL_REQUIRED,
            reason=assessment.approval.detail,
            requires_approval=True,
            threshold=assessment.threshold,
            evaluations=evaluations,
            windows=windows,
        )
    return Decision(
        allowed=True,
        code=Code.ALLOWED,
        reason="every check passed",
        evaluations=evaluations,
        windows=windows,
    )


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
    """
    return conclude(assess(policy, request, now), usage)
