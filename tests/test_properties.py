"""Properties of the pure core: tightening a policy or using more budget never allows more."""

from __future__ import annotations

from datetime import datetime, timedelta

import attrs
from hypothesis import assume, given
from hypothesis import strategies as st

from agentpolicy import (
    AgentPolicy,
    Amount,
    ApprovalConfig,
    ApprovalThreshold,
    BlockedPeriod,
    CategoryRules,
    MerchantRules,
    NetworkRules,
    PaymentRequest,
    PolicyValidationError,
    SpendingLimits,
    TimeRules,
    TimeWindow,
    evaluate,
    windows_for,
)
from tests.strategies import (
    CATEGORIES,
    NETWORKS,
    RECIPIENTS,
    instants,
    policies,
    requests,
    usage_amounts,
)


def _lower(draw: st.DrawFn, amount: Amount | None) -> Amount:
    if amount is None:
        return Amount(draw(st.integers(0, 10**12)))
    return attrs.evolve(amount, value=draw(st.integers(0, amount.value)))


def _tighten_limits(draw: st.DrawFn, p: AgentPolicy) -> AgentPolicy:
    limits = p.limits or SpendingLimits()
    name = draw(st.sampled_from(["per_transaction", "hourly", "daily", "weekly", "monthly"]))
    lowered = _lower(draw, getattr(limits, name))
    return attrs.evolve(p, limits=attrs.evolve(limits, **{name: lowered}))


def _tighten_time(draw: st.DrawFn, p: AgentPolicy) -> AgentPolicy:
    rules = p.time_rules or TimeRules()
    choice = draw(st.sampled_from(["block", "window"]))
    if choice == "block":
        start = draw(instants)
        period = BlockedPeriod(start, start + timedelta(hours=draw(st.integers(0, 500))))
        return attrs.evolve(
            p, time_rules=attrs.evolve(rules, blocked_periods=(*rules.blocked_periods, period))
        )
    if not rules.allowed_windows:
        start = draw(st.integers(0, 23))
        window = TimeWindow(
            frozenset(draw(st.sets(st.integers(0, 6), min_size=1))),
            start,
            draw(st.integers(start + 1, 24)),
        )
        return attrs.evolve(p, time_rules=attrs.evolve(rules, allowed_windows=(window,)))
    i = draw(st.integers(0, len(rules.allowed_windows) - 1))
    w = rules.allowed_windows[i]
    if len(rules.allowed_windows) > 1 and draw(st.booleans()):
        windows = rules.allowed_windows[:i] + rules.allowed_windows[i + 1 :]
    else:
        days = w.days
        if len(days) > 1 and draw(st.booleans()):
            days = days - {draw(st.sampled_from(sorted(days)))}
        start = draw(st.integers(w.start_hour, w.end_hour - 1))
        end = draw(st.integers(start + 1, w.end_hour))
        new = TimeWindow(days, start, end)
        windows = (*rules.allowed_windows[:i], new, *rules.allowed_windows[i + 1 :])
    return attrs.evolve(p, time_rules=attrs.evolve(rules, allowed_windows=windows))


def _shrink(draw: st.DrawFn, values: tuple[str, ...], pool: list[str]) -> tuple[str, ...]:
    """Make an allow-list (empty = anything) stricter: narrow it, or start one."""
    if not values:
        return (draw(st.sampled_from(pool)),)
    if len(values) == 1:
        return values
    return tuple(v for v in values if v != draw(st.sampled_from(values)))


def _tighten_lists(draw: st.DrawFn, p: AgentPolicy) -> AgentPolicy:
    kind = draw(st.sampled_from(["merchant", "network", "category"]))
    if kind == "merchant":
        m = p.merchant_rules or MerchantRules()
        action = draw(st.sampled_from(["blacklist", "require", "narrow"]))
        if action == "blacklist":
            m = attrs.evolve(m, blacklist=(*m.blacklist, draw(st.sampled_from(RECIPIENTS))))
        elif action == "require":
            m = attrs.evolve(m, require_whitelist=True)
        elif m.whitelist_applies:
            narrowed = _shrink(draw, m.whitelist, RECIPIENTS)
            m = attrs.evolve(m, whitelist=narrowed, require_whitelist=True)
        return attrs.evolve(p, merchant_rules=m)
    if kind == "network":
        n = p.network_rules or NetworkRules()
        if draw(st.booleans()):
            n = attrs.evolve(
                n, blocked_networks=(*n.blocked_networks, draw(st.sampled_from(NETWORKS)))
            )
        else:
            n = attrs.evolve(n, allowed_networks=_shrink(draw, n.allowed_networks, NETWORKS))
        return attrs.evolve(p, network_rules=n)
    c = p.category_rules or CategoryRules()
    if draw(st.booleans()):
        c = attrs.evolve(
            c, blocked_categories=(*c.blocked_categories, draw(st.sampled_from(CATEGORIES)))
        )
    else:
        c = attrs.evolve(c, allowed_categories=_shrink(draw, c.allowed_categories, CATEGORIES))
    return attrs.evolve(p, category_rules=c)


def _tighten_approvals(draw: st.DrawFn, p: AgentPolicy) -> AgentPolicy:
    config = p.approval_config or ApprovalConfig()
    threshold = ApprovalThreshold(Amount(draw(st.integers(0, 10**12))), 1, ("alice@example.com",))
    return attrs.evolve(
        p, approval_config=attrs.evolve(config, thresholds=(*config.thresholds, threshold))
    )


@st.composite
def tightened(draw: st.DrawFn, policy: AgentPolicy) -> AgentPolicy:
    steps = draw(st.lists(st.sampled_from(["off", "limits", "time", "lists", "approvals"]),
                          min_size=1, max_size=4))  # fmt: skip
    for step in steps:
        try:
            if step == "off":
                policy = attrs.evolve(policy, enabled=False)
            elif step == "limits":
                policy = _tighten_limits(draw, policy)
            elif step == "time":
                policy = _tighten_time(draw, policy)
            elif step == "lists":
                policy = _tighten_lists(draw, policy)
            else:
                policy = _tighten_approvals(draw, policy)
        except PolicyValidationError:
            assume(
                condition=False
            )  # e.g. a repeated threshold amount: not a valid policy to compare
    return policy


@given(st.data(), policies(), requests(), instants)
def test_tightening_a_policy_never_turns_a_denial_into_an_allowance(
    data: st.DataObject, policy: AgentPolicy, request: PaymentRequest, now: datetime
) -> None:
    stricter = data.draw(tightened(policy))
    usage = {
        w.key: data.draw(usage_amounts())
        for w in windows_for(policy, now)
        if data.draw(st.booleans())
    }
    loose = evaluate(policy, request, usage, now)
    strict = evaluate(stricter, request, usage, now)
    if not loose.allowed:
        assert not strict.allowed, (loose.code, strict.code)


@given(st.data(), policies(), requests(), instants)
def test_more_usage_never_allows_what_less_usage_denied(
    data: st.DataObject, policy: AgentPolicy, request: PaymentRequest, now: datetime
) -> None:
    windows = windows_for(policy, now)
    less = {w.key: data.draw(usage_amounts()) for w in windows}
    more = {k: v.plus(data.draw(usage_amounts())) for k, v in less.items()}
    if not evaluate(policy, request, less, now).allowed:
        assert not evaluate(policy, request, more, now).allowed


@given(policies(), requests(), instants)
def test_evaluate_is_pure_and_deterministic(
    policy: AgentPolicy, request: PaymentRequest, now: datetime
) -> None:
    first = evaluate(policy, request, {}, now)
    assert evaluate(policy, request, {}, now) == first
    assert first.allowed == (first.code == "ALLOWED")
    assert first.requires_approval == (first.code == "APPROVAL_REQUIRED")
    failures = [e for e in first.evaluations if e.failed]
    if failures:
        assert first.code == failures[0].code
