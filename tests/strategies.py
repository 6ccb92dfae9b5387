"""Hypothesis strategies for policies, requests, usage and instants."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import strategies as st

from agentpolicy import (
    AgentPolicy,
    Amount,
    ApprovalConfig,
    ApprovalThreshold,
    ApproverGroup,
    BlockedPeriod,
    CategoryRules,
    MerchantRules,
    NetworkRules,
    PaymentRequest,
    SpendingLimits,
    TimeRules,
    TimeWindow,
)

RECIPIENTS = ["0xaaa", "0xBBB", "0xccc", "So1anaBase58Addr", "so1anabase58addr"]
NETWORKS = ["eip155:1", "eip155:8453", "EIP155:56", "solana:mainnet"]
CATEGORIES = ["api_usage", "Gambling", "subscription", "data"]
ZONES = ["UTC", "America/New_York", "Europe/Berlin", "Asia/Kolkata", "Australia/Lord_Howe"]
APPROVERS = ["alice@example.com", "bob@example.com", "carol@example.com"]

instants = st.datetimes(
    min_value=datetime(2025, 1, 1),
    max_value=datetime(2028, 12, 31),
    timezones=st.just(UTC),
)

decimals = st.sampled_from([0, 2, 6, 18])


@st.composite
def amounts(draw: st.DrawFn, max_value: int = 10**12) -> Amount:
    d = draw(decimals)
    return Amount(draw(st.integers(0, max_value)) * 10 ** max(0, d - 6), d, "USDT")


def _opt(strategy: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.none() | strategy


@st.composite
def time_windows(draw: st.DrawFn) -> TimeWindow:
    start = draw(st.integers(0, 23))
    end = draw(st.integers(start + 1, 24))
    days = draw(st.frozensets(st.integers(0, 6), min_size=1))
    return TimeWindow(days=days, start_hour=start, end_hour=end)


@st.composite
def blocked_periods(draw: st.DrawFn) -> BlockedPeriod:
    start = draw(instants)
    length = draw(st.integers(0, 10 * 86400))
    return BlockedPeriod(start=start, end=start + timedelta(seconds=length), reason="test")


@st.composite
def thresholds(draw: st.DrawFn) -> tuple[ApprovalThreshold, ...]:
    values = draw(st.lists(st.integers(0, 10**10), max_size=3, unique=True))
    out = []
    for v in values:
        approvers = draw(st.lists(st.sampled_from(APPROVERS), min_size=1, unique=True))
        if len(approvers) > 1 and draw(st.booleans()):  # in groups, each approver in one
            cut = draw(st.integers(1, len(approvers) - 1))
            parts = (approvers[:cut], approvers[cut:])
            groups = tuple(ApproverGroup(f"g{i}", tuple(who), draw(st.integers(1, len(who))))
                           for i, who in enumerate(parts))  # fmt: skip
            out.append(ApprovalThreshold(Amount(v), groups=groups))
            continue
        need = draw(st.integers(1, len(approvers)))
        out.append(ApprovalThreshold(Amount(v), need, tuple(approvers)))
    return tuple(out)


@st.composite
def policies(draw: st.DrawFn) -> AgentPolicy:
    limits = draw(
        _opt(
            st.builds(
                SpendingLimits,
                per_transaction=_opt(amounts()),
                hourly=_opt(amounts()),
                daily=_opt(amounts()),
                weekly=_opt(amounts()),
                monthly=_opt(amounts()),
            )
        )
    )
    time_rules = draw(
        _opt(
            st.builds(
                TimeRules,
                allowed_windows=st.lists(time_windows(), max_size=2).map(tuple),
                blocked_periods=st.lists(blocked_periods(), max_size=2).map(tuple),
                timezone=st.sampled_from(ZONES),
            )
        )
    )
    names = st.lists(st.sampled_from(RECIPIENTS), max_size=3, unique=True).map(tuple)
    merchant = draw(
        _opt(
            st.builds(
                MerchantRules,
                whitelist=names,
                blacklist=names,
                require_whitelist=st.booleans(),
            )
        )
    )
    nets = st.lists(st.sampled_from(NETWORKS), max_size=3, unique=True).map(tuple)
    network = draw(_opt(st.builds(NetworkRules, allowed_networks=nets, blocked_networks=nets)))
    cats = st.lists(st.sampled_from(CATEGORIES), max_size=3, unique=True).map(tuple)
    category = draw(
        _opt(st.builds(CategoryRules, allowed_categories=cats, blocked_categories=cats))
    )
    approval = draw(
        _opt(
            st.builds(
                ApprovalConfig,
                thresholds=thresholds(),
                timeout=st.integers(1, 10**9),
                require_signed_votes=st.booleans(),
            )
        )
    )
    return AgentPolicy(
        enabled=draw(st.booleans()),
        limits=limits,  # type: ignore[arg-type]
        time_rules=time_rules,  # type: ignore[arg-type]
        merchant_rules=merchant,  # type: ignore[arg-type]
        network_rules=network,  # type: ignore[arg-type]
        category_rules=category,  # type: ignore[arg-type]
        approval_config=approval,  # type: ignore[arg-type]
    )


@st.composite
def requests(draw: st.DrawFn) -> PaymentRequest:
    d = draw(decimals)
    return PaymentRequest(
        agent_id="agent-1",
        amount=draw(st.integers(1, 10**11)) * 10 ** max(0, d - 6),
        recipient=draw(st.sampled_from(RECIPIENTS)),
        network=draw(st.sampled_from(NETWORKS)),
        category=draw(st.none() | st.sampled_from(CATEGORIES)),
        decimals=d,
        symbol=draw(st.sampled_from(["USDT", "usdt", "USDC"])),
    )


def usage_amounts() -> st.SearchStrategy[Amount]:
    return amounts(max_value=10**11)
