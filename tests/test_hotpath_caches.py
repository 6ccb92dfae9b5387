"""The hot path's caches and shortcuts answer as the plain rules do.

Each test compares what a cached or shortened path answers with the plain rule
(written out here from docs/semantics.md) or with what the contract requires,
asking the same things repeatedly and in mixed order so that a cache keyed too
loosely or too tightly, or kept too long, would answer wrongly.
"""

from __future__ import annotations

import collections
import itertools
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentpolicy import ErrorCode, PolicyEngine, PolicyError, evaluate
from agentpolicy.codec import load_policy
from agentpolicy.decisions import Code, Decision, Outcome
from agentpolicy.ledger.keys import agent_of_id, new_token
from agentpolicy.policy import normalize_recipient, whitelist_form
from agentpolicy.storage import MemoryStorage, SQLiteStorage
from agentpolicy.storage._time import micros
from agentpolicy.storage.base import OP_KEEP_US, Encoded, Txn, dumps, new_op, share
from agentpolicy.testing import ManualClock, payment

NOW = datetime(2026, 3, 10, 10, 30, tzinfo=UTC)
USDT = {"daily": {"value": "1000000000", "decimals": 6, "symbol": "USDT"}}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _check(decision: Decision, name: str) -> Any:
    (found,) = [e for e in decision.evaluations if e.name == name]
    return found


# -- payee checks kept per plan, by recipient, network and category as spelled ---------------

# spellings of one payee (or of payees the rules tell apart), family by family
RECIPIENT_FAMILIES = [
    ["0xAbC", "0xabc", "0XABC", "0xabc "],
    ["vendor.eth", "VENDOR.ETH", "vendor.eth.", "\uff56\uff45\uff4e\uff44\uff4f\uff52.eth"],
    ["Σίσυφος.eth", "σίσυφοσ.eth", "σίσυφος.eth"],
    ["xn--bcher-kva.eth", "XN--BCHER-KVA.eth", "bücher.eth", "BÜCHER.eth"],
    ["bc1qxyz", "BC1QXYZ", "Bc1qxyz"],
    ["So1ana", "so1ana", "SO1ANA"],
    ["strasse.eth", "straße.eth", "ǅ.eth", "ǆ.eth"],
]
RECIPIENTS = [r for family in RECIPIENT_FAMILIES for r in family]
NETWORK_FAMILIES = [["eip155:8453", "EIP155:8453", "Eip155:8453"], ["eip155:56", "EIP155:56"],
                    ["solana:mainnet", "SOLANA:MAINNET"]]  # fmt: skip
NETWORKS = [n for family in NETWORK_FAMILIES for n in family]
CATEGORY_FAMILIES = [[None, ""], ["api", "API", "Api"], ["gambling", "GAMBLING"],
                     ["ß", "SS", "ss", "ẞ"], ["ǅ", "ǆ", "Ǆ"]]  # fmt: skip
CATEGORIES = [c for family in CATEGORY_FAMILIES for c in family]


def _plain_payee(rules: dict[str, Any], recipient: str, network: str, category: str | None):
    """The merchant, network and category rules of docs/semantics.md, written plainly."""
    merchant = rules.get("merchantRules")
    if merchant is not None:
        blacklist = {normalize_recipient(r) for r in merchant.get("blacklist", [])}
        whitelist = {whitelist_form(r) for r in merchant.get("whitelist", [])}
        if normalize_recipient(recipient) in blacklist:
            return Code.RECIPIENT_BLOCKED
        applies = merchant.get("requireWhitelist", False) or bool(merchant.get("whitelist"))
        if applies and whitelist_form(recipient) not in whitelist:
            return Code.RECIPIENT_NOT_WHITELISTED
    networks = rules.get("networkRules")
    if networks is not None:
        if network.casefold() in {n.casefold() for n in networks.get("blockedNetworks", [])}:
            return Code.NETWORK_BLOCKED
        allowed = {n.casefold() for n in networks.get("allowedNetworks", [])}
        if allowed and network.casefold() not in allowed:
            return Code.NETWORK_NOT_ALLOWED
    categories = rules.get("categoryRules")
    if categories is not None:
        allowed = {c.casefold() for c in categories.get("allowedCategories", [])}
        if not category:
            return Code.CATEGORY_REQUIRED if allowed else Code.ALLOWED
        if category.casefold() in {c.casefold() for c in categories.get("blockedCategories", [])}:
            return Code.CATEGORY_BLOCKED
        if allowed and category.casefold() not in allowed:
            return Code.CATEGORY_NOT_ALLOWED
    return Code.ALLOWED


_PAYEE_RULES = st.fixed_dictionaries(
    {},
    optional={
        "merchantRules": st.fixed_dictionaries(
            {},
            optional={
                "whitelist": st.lists(st.sampled_from(RECIPIENTS), max_size=4, unique=True),
                "blacklist": st.lists(st.sampled_from(RECIPIENTS), max_size=4, unique=True),
                "requireWhitelist": st.booleans(),
            },
        ),
        "networkRules": st.fixed_dictionaries(
            {},
            optional={
                "allowedNetworks": st.lists(st.sampled_from(NETWORKS[:4]), max_size=3),
                "blockedNetworks": st.lists(st.sampled_from(NETWORKS[:4]), max_size=2),
            },
        ),
        "categoryRules": st.fixed_dictionaries(
            {},
            optional={
                "allowedCategories": st.lists(st.sampled_from(CATEGORIES[2:]), max_size=3),
                "blockedCategories": st.lists(st.sampled_from(CATEGORIES[2:]), max_size=2),
            },
        ),
    },
)
_FAMILIES = st.tuples(
    st.lists(st.sampled_from(RECIPIENT_FAMILIES), min_size=1, max_size=2),
    st.lists(st.sampled_from(NETWORK_FAMILIES), min_size=1, max_size=2),
    st.lists(st.sampled_from(CATEGORY_FAMILIES), min_size=1, max_size=2),
)


def _policy_or_none(document: dict[str, Any]) -> Any:
    try:
        return load_policy(document)
    except PolicyError:
        return None  # a policy the loader refuses (a repeated entry, say): nothing to check


@settings(max_examples=150, deadline=None)
@given(_PAYEE_RULES, _FAMILIES, st.randoms())
def test_payee_checks_kept_per_plan_match_the_plain_rule_in_any_order(
    rules: dict[str, Any], families: tuple[list[list[Any]], ...], rnd: Any
) -> None:
    policy = _policy_or_none({"limits": USDT, **rules})
    if policy is None:
        return
    recipients, networks, categories = ([x for f in fs for x in f] for fs in families)
    payees = list(itertools.product(recipients, networks, categories))
    asked = rnd.sample(payees, min(len(payees), 30)) * 2
    rnd.shuffle(asked)  # every spelling of a payee asked, each twice, interleaved
    for recipient, network, category in asked:
        try:
            request = payment(1, recipient=recipient, network=network, category=category)
        except PolicyError:
            continue  # a recipient the request refuses (trailing space): nothing to judge
        expected = _plain_payee(rules, recipient, network, category)
        decision = evaluate(policy, request, {}, NOW)
        assert decision.code is expected, (recipient, network, category, decision.reason)
        # the words name the payee as this request spells it, even when the checks were kept
        merchant = _check(decision, "merchant_rules")
        if merchant.outcome is Outcome.FAIL:
            assert f"recipient {recipient} is" in merchant.detail
        network_check = _check(decision, "network_rules")
        if network_check.outcome is not Outcome.SKIP:
            assert f"network {network} is" in network_check.detail
        category_check = _check(decision, "category_rules")
        if category_check.outcome is not Outcome.SKIP and category:  # as kept: NFKC (Dž for ǅ)
            assert f"category {request.category} is" in category_check.detail


def test_payees_beyond_what_a_plan_keeps_are_judged_again_correctly() -> None:
    # 1,024 payees kept a plan; far more, every other one blacklisted, then the first asked again
    blocked = [f"0xb{i:04x}" for i in range(0, 1500, 2)]
    policy = load_policy({"limits": USDT, "merchantRules": {"blacklist": blocked}})
    names = [f"0xb{i:04x}" for i in range(1500)]
    for _ in range(2):
        for i, name in enumerate([*names, *reversed(names[:40])]):
            spelled = name.upper().replace("0X", "0x") if i % 3 == 0 else name
            code = evaluate(policy, payment(1, recipient=spelled), {}, NOW).code
            expected = Code.RECIPIENT_BLOCKED if int(name[3:], 16) % 2 == 0 else Code.ALLOWED
            assert code is expected, spelled


def test_a_category_empty_or_missing_is_judged_alike_and_a_present_one_apart() -> None:
    # "" and None are one payee (an empty category is none); "api" is not
    policy = load_policy({"limits": USDT, "categoryRules": {"allowedCategories": ["api"]}})
    for _ in range(2):
        for category in [None, "", "api", "", None, "API"]:
            decision = evaluate(policy, payment(1, category=category), {}, NOW)
            expected = Code.ALLOWED if category else Code.CATEGORY_REQUIRED
            assert decision.code is expected, category


# -- plans and policies that change -------------------------------------------------------


def test_a_new_policy_version_judges_a_payee_afresh_within_one_hour() -> None:
    clock = ManualClock(NOW)
    engine = PolicyEngine(clock=clock)
    strict = {"limits": USDT, "merchantRules": {"blacklist": ["0xbad"]},
              "networkRules": {"blockedNetworks": ["eip155:56"]}}  # fmt: skip
    lax = {"limits": USDT}
    request = payment(1, recipient="0xBAD", network="EIP155:56")
    for document, code in [(strict, Code.RECIPIENT_BLOCKED), (lax, Code.ALLOWED),
                           (strict, Code.RECIPIENT_BLOCKED), (lax, Code.ALLOWED)]:  # fmt: skip
        engine.set_policy("agent-1", document)
        clock.advance(seconds=1)  # the same hour throughout
        assert engine.authorize(request).code is code
    engine.close()


def test_two_agents_sharing_one_policy_object_keep_their_own_counters() -> None:
    policy = load_policy({"limits": {"daily": {"value": "5000000", "decimals": 6}},
                          "merchantRules": {"blacklist": ["0xbad"]}})  # fmt: skip
    clock = ManualClock(NOW)
    engine = PolicyEngine(clock=clock)
    engine.set_policy("a1", policy)
    engine.set_policy("a2", policy)
    first = engine.authorize(payment(5_000_000, agent_id="a1"))
    assert first.allowed
    engine.confirm(first.reservation_id)
    assert engine.authorize(payment(1, agent_id="a1")).code is Code.DAILY_LIMIT
    assert engine.authorize(payment(5_000_000, agent_id="a2")).allowed
    assert engine.authorize(payment(1, agent_id="a2", recipient="0xBad")).code is (
        Code.RECIPIENT_BLOCKED
    )
    engine.close()


def test_thresholds_of_two_tokens_are_ranked_per_token_asked_alternately() -> None:
    policy = load_policy({
        "limits": {"daily": {"value": "10000000000", "decimals": 6, "symbol": "USDT"}},
        "assets": [{"symbol": "ETH", "limits": {
            "daily": {"value": "100000000000000000000", "decimals": 18, "symbol": "ETH"}}}],
        "approvalConfig": {"thresholds": [
            {"amount": {"value": "10000000", "decimals": 6, "symbol": "USDT"},
             "requiredApprovers": 1, "approvers": ["low@x.com"]},
            {"amount": {"value": "1000000000000000000", "decimals": 18, "symbol": "ETH"},
             "requiredApprovers": 1, "approvers": ["eth@x.com"]},
            {"amount": {"value": "50000000", "decimals": 6, "symbol": "USDT"},
             "requiredApprovers": 1, "approvers": ["high@x.com"]},
        ]},
    })  # fmt: skip
    cases = [
        (payment(10_000_000), ("low@x.com",)),
        (payment(10**18, decimals=18, symbol="eth"), ("eth@x.com",)),
        (payment(50_000_000_000, decimals=9, symbol="usdt"), ("high@x.com",)),  # 50 exactly
        (payment(49_999_999_999, decimals=9), ("low@x.com",)),
        (payment(10**18 - 1, decimals=18, symbol="ETH"), None),
        (payment(9_999_999), None),
    ]
    for _ in range(3):
        for request, approvers in cases:
            decision = evaluate(policy, request, {}, NOW)
            if approvers is None:
                assert decision.code is Code.ALLOWED
            else:
                assert decision.code is Code.APPROVAL_REQUIRED
                assert decision.threshold is not None
                assert decision.threshold.approvers == approvers


# -- time: the plan's hour, allowed windows and blocked periods -----------------------------

ZONES = ["UTC", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Pacific/Chatham",
         "Asia/Kolkata", "America/St_Johns", "Asia/Kathmandu"]  # fmt: skip
# around the 2026 clock changes of those zones (March, April, October, November)
_AROUND = [datetime(2026, 3, 8, 6, tzinfo=UTC), datetime(2026, 3, 29, 1, tzinfo=UTC),
           datetime(2026, 4, 4, 15, tzinfo=UTC), datetime(2026, 10, 3, 15, tzinfo=UTC),
           datetime(2026, 10, 25, 1, tzinfo=UTC), datetime(2026, 11, 1, 6, tzinfo=UTC),
           datetime(2026, 4, 5, 1, 45, tzinfo=UTC), datetime(2026, 9, 26, 14, 45, tzinfo=UTC)]  # fmt: skip
_WINDOWS = st.lists(
    st.tuples(
        st.sets(st.integers(0, 6), min_size=1), st.integers(0, 23), st.integers(1, 24)
    ).filter(lambda w: w[1] < w[2]),
    min_size=1,
    max_size=3,
)
_OFFSETS = st.lists(st.integers(-4 * 3600 * 10**6, 4 * 3600 * 10**6), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(ZONES), _WINDOWS, st.sampled_from(_AROUND), _OFFSETS, st.randoms())
def test_allowed_windows_read_the_local_hour_of_each_instant_across_clock_changes(
    zone: str, windows: list[tuple[set[int], int, int]], around: datetime,
    offsets: list[int], rnd: Any,
) -> None:  # fmt: skip
    policy = load_policy({"limits": USDT, "timeRules": {"timezone": zone, "allowedWindows": [
        {"days": sorted(days), "startHour": s, "endHour": e} for days, s, e in windows]}})  # fmt: skip
    instants = [around + timedelta(microseconds=o) for o in offsets]
    # neighbours of each instant: the same hour (kept plan), and the next microsecond
    instants += [i + timedelta(minutes=rnd.choice([-1, 1, 29])) for i in instants]
    instants += [i.replace(minute=0, second=0, microsecond=0) - timedelta(microseconds=1)
                 for i in instants[:3]]  # fmt: skip
    rnd.shuffle(instants)
    for now in instants:
        local = now.astimezone(ZoneInfo(zone))
        day = local.isoweekday() % 7
        inside = any(day in d and s <= local.hour < e for d, s, e in windows)
        asked = now if rnd.random() < 0.5 else now.astimezone(ZoneInfo(rnd.choice(ZONES)))
        decision = evaluate(policy, payment(1), {}, asked)
        assert (decision.code is not Code.OUTSIDE_ALLOWED_WINDOW) is inside, (zone, local)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-3 * 3600, 3 * 3600), st.integers(0, 5400)), max_size=4),
    st.lists(st.integers(-3 * 3600 * 10**6, 3 * 3600 * 10**6), min_size=1, max_size=15),
    st.sampled_from(ZONES),
    st.randoms(),
)
def test_blocked_periods_block_exactly_their_instants_both_ends_included(
    spans: list[tuple[int, int]], offsets: list[int], zone: str, rnd: Any
) -> None:
    base = datetime(2026, 3, 8, 6, tzinfo=UTC)  # New York springs forward at 07:00Z
    periods = [(base + timedelta(seconds=s), base + timedelta(seconds=s + length))
               for s, length in spans]  # fmt: skip
    policy = load_policy({"limits": USDT, "timeRules": {"timezone": zone, "blockedPeriods": [
        {"start": a.isoformat(), "end": b.isoformat()} for a, b in periods]}})  # fmt: skip
    instants = [base + timedelta(microseconds=o) for o in offsets]
    for a, b in periods:  # every boundary, and a microsecond either side
        instants += [t + timedelta(microseconds=d) for t in (a, b) for d in (-1, 0, 1)]
    rnd.shuffle(instants)
    for now in instants:
        blocked = any(a <= now <= b for a, b in periods)
        code = evaluate(policy, payment(1), {}, now).code
        assert (code is Code.BLOCKED_PERIOD) is blocked, now


def test_a_period_spanning_several_hours_blocks_each_hour_it_reaches() -> None:
    policy = load_policy({"limits": USDT, "timeRules": {"timezone": "America/New_York",
        "blockedPeriods": [{"start": "2026-11-01T05:30:00Z", "end": "2026-11-01T07:15:00Z"}]}})  # fmt: skip
    start = datetime(2026, 11, 1, 5, 30, tzinfo=UTC)  # 01:30 EDT: the repeated hour follows
    end = datetime(2026, 11, 1, 7, 15, tzinfo=UTC)
    tick = timedelta(microseconds=1)
    for _ in range(2):
        for now, blocked in [(start - tick, False), (start, True), (start + timedelta(hours=1), True),
                             (end, True), (end + tick, False), (end - timedelta(hours=1), True),
                             (start - timedelta(minutes=30), False)]:  # fmt: skip
            assert (evaluate(policy, payment(1), {}, now).code is Code.BLOCKED_PERIOD) is blocked


def test_the_repeated_fall_back_hour_is_judged_by_its_local_hour_twice() -> None:
    # 01:00-02:00 local comes twice in New York on 2026-11-01: both are hour 1, both allowed
    policy = load_policy({"limits": USDT, "timeRules": {"timezone": "America/New_York",
        "allowedWindows": [{"days": [0], "startHour": 1, "endHour": 2}]}})  # fmt: skip
    first = datetime(2026, 11, 1, 5, 0, tzinfo=UTC)  # 01:00 EDT
    for now, allowed in [(first - timedelta(microseconds=1), False), (first, True),
                         (first + timedelta(minutes=59), True), (first + timedelta(hours=1), True),
                         (first + timedelta(hours=2) - timedelta(microseconds=1), True),
                         (first + timedelta(hours=2), False)]:  # fmt: skip
        for _ in range(2):
            decision = evaluate(policy, payment(1), {}, now)
            assert (decision.code is Code.ALLOWED) is allowed, now


def test_a_half_hour_clock_change_splits_the_hour_and_each_piece_reads_its_local_hour() -> None:
    # Lord Howe falls back half an hour at 02:00 (+11:00) on 2026-04-05, a Sunday: 15:00Z
    change = datetime(2026, 4, 4, 15, tzinfo=UTC)
    tick = timedelta(microseconds=1)
    cases = [(change - timedelta(minutes=30), 1), (change - tick, 1), (change, 1),
             (change + timedelta(minutes=30) - tick, 1), (change + timedelta(minutes=30), 2),
             (change + timedelta(minutes=90) - tick, 2), (change + timedelta(minutes=90), 3)]  # fmt: skip
    for start in (1, 2):
        policy = load_policy({"limits": USDT, "timeRules": {"timezone": "Australia/Lord_Howe",
            "allowedWindows": [{"days": [0], "startHour": start, "endHour": start + 1}]}})  # fmt: skip
        for _ in range(2):
            for now, hour in cases:
                code = evaluate(policy, payment(1), {}, now).code
                assert (code is Code.ALLOWED) is (hour == start), (start, now)


def test_an_idempotent_request_answers_its_first_decision_across_policies_and_hours() -> None:
    clock = ManualClock(datetime(2026, 3, 10, 10, 59, 59, tzinfo=UTC))
    engine = PolicyEngine(clock=clock)
    limits = {"daily": {"value": "5000000", "decimals": 6}}
    engine.set_policy("agent-1", {"limits": limits})
    first = engine.authorize(payment(1_000_000, idempotency_key="k"))
    engine.set_policy("agent-1", {"limits": limits, "merchantRules": {"blacklist": ["0xvendor"]}})
    for step in (timedelta(seconds=2), timedelta(hours=23, minutes=58)):  # next hour, next day
        clock.advance(step)
        again = engine.authorize(payment(1_000_000, idempotency_key="k"))
        assert (again.code, again.reservation_id) == (Code.ALLOWED, first.reservation_id)
    assert engine.budget("agent-1").periods["daily"].reserved.value == 0  # a new day
    clock.advance(minutes=2)  # 24 hours on: a new request, judged by the policy now
    assert engine.authorize(payment(1_000_000, idempotency_key="k")).code is (
        Code.RECIPIENT_BLOCKED
    )
    engine.close()


# -- instants as microseconds, ids and tokens ---------------------------------------------


def test_micros_never_answers_for_another_object_of_the_same_or_another_instant() -> None:
    class Stamp(datetime):
        pass

    plain = datetime(2026, 3, 10, 10, 30, 0, 1, tzinfo=UTC)
    subclass = Stamp(2026, 3, 10, 10, 30, 0, 2, tzinfo=UTC)
    elsewhere = plain.astimezone(ZoneInfo("Asia/Kathmandu"))
    for when, expected in [(plain, 1), (plain, 1), (subclass, 2), (elsewhere, 1), (subclass, 2),
                           (plain + timedelta(0), 1), (plain.replace(fold=1), 1)]:  # fmt: skip
        base = (datetime(2026, 3, 10, 10, 30, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)
        assert micros(when) == base + expected


@given(st.lists(st.integers(0, 2**52 - 1), min_size=2, max_size=10))
def test_tokens_and_op_ids_sort_by_their_instant(instants: list[int]) -> None:
    for a, b in itertools.pairwise(instants):
        if a < b:
            assert new_token(a) < new_token(b)
            assert new_op(a) < new_op(b)
        assert len(new_token(a)) == 32
        assert len(new_op(a)) == 33


def test_a_reservation_made_just_below_2_52_microseconds_can_be_confirmed() -> None:
    last = EPOCH + timedelta(microseconds=2**52 - 1)  # 2112-09-17T23:53:47.370495Z
    clock = ManualClock(last)
    engine = PolicyEngine(clock=clock)
    engine.set_policy("agent-1", {"limits": USDT})
    decision = engine.authorize(payment(1))
    assert agent_of_id(decision.reservation_id) == "agent-1"
    assert engine.confirm(decision.reservation_id).status.value == "confirmed"
    engine.close()


# -- the memory store: flat logs and operation order ---------------------------------------


_COMMITS = st.lists(
    st.tuples(
        st.integers(0, 7),  # op id (a repeat replays, unless forgotten)
        st.sampled_from([0, 1, 60 * 10**6, OP_KEEP_US // 2, OP_KEEP_US]),  # clock step
        st.sampled_from(["capped", "aged", "both", "open"]),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=100, deadline=None)
@given(_COMMITS, st.integers(0, 12))
def test_memory_logs_and_replays_match_a_plain_model(
    commits: list[tuple[int, int, str]], read_limit: int
) -> None:
    storage = MemoryStorage()
    at = 1_768_816_800_000_000
    ops: dict[str, tuple[int, Any]] = {}  # op -> (at, result), in the order applied
    order: list[str] = []
    logs: dict[str, collections.deque[tuple[int, Any]]] = collections.defaultdict(collections.deque)
    keep = {"capped": (None, 3), "aged": (120 * 10**6, None), "both": (120 * 10**6, 2),
            "open": (None, None)}  # fmt: skip
    for n, (op_number, step, log) in enumerate(commits):
        at += step
        op = f"op{op_number}"
        age, max_len = keep[log]
        keep_after = None if age is None else at - age
        t = Txn(op, at)
        t.put = {f"d/{n % 3}": {"n": n}}
        t.append = [(log, {"n": n}, keep_after, max_len)]
        t.result = {"n": n}
        with storage.session("s") as session:
            outcome = session.commit(t)
        if op in ops:
            assert outcome.replayed
            assert not outcome.applied
            assert outcome.result == ops[op][1]
            continue
        assert outcome.applied
        ops[op] = (at, {"n": n})
        order.append(op)
        while ops[order[0]][0] < at - OP_KEEP_US:  # forgotten oldest first, after a day
            del ops[order.pop(0)]
        lines = logs[log]
        lines.append((at, {"n": n}))
        while lines and keep_after is not None and lines[0][0] < keep_after:
            lines.popleft()
        while max_len is not None and len(lines) > max_len:
            lines.popleft()
    for name in keep:
        got = storage.log("s", name, read_limit)
        expected = list(reversed(logs[name]))[:read_limit]
        assert [(g[1], g[2]) for g in got] == expected
        seqs = [g[0] for g in got]
        assert seqs == sorted(seqs, reverse=True)
        assert len(set(seqs)) == len(seqs)


# -- the codec: a result spliced from its transaction's text -------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(_JSON, min_size=1, max_size=3),
    st.lists(_JSON, max_size=3),
    st.text(max_size=6) | st.integers(-3, 3),
    st.integers(0, 10),
    st.booleans(),
)
def test_an_encoded_result_is_the_text_dumps_writes(
    bodies: list[Any], entries: list[Any], key: Any, pick: int, more_keys: bool
) -> None:
    t = Txn("op", 1)
    t.put = {f"d/{i}": b for i, b in enumerate(bodies)}
    t.append = [("log", e, None, None) for e in entries]
    held = [*bodies, *entries, {"other": 1}]
    value = held[pick % len(held)]
    t.result = {key: value, "extra": held[0]} if more_keys else {key: value}
    encoded = Encoded(t)
    assert encoded.result == dumps(t.result)
    assert encoded.put == {name: dumps(b) for name, b in t.put.items()}
    assert encoded.append == [dumps(e) for e in entries]


_FIELD = st.text(max_size=4) | st.integers(-3, 3) | st.none() | st.booleans()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(_FIELD, _JSON, st.integers(0, 3)), max_size=8),
    st.lists(st.lists(_JSON, max_size=4).map(tuple), min_size=1, max_size=3),
    st.booleans(),
)
def test_a_document_holding_shared_values_is_the_text_dumps_writes(
    fields: list[tuple[Any, Any, int]], values: list[tuple[Any, ...]], twice: bool
) -> None:
    # shared values at any top-level position (several, repeated, or none), beside plain
    # fields of any key type; a copy equal to a shared value but not it is encoded plainly
    shared = [share(v) for v in values]
    body: dict[Any, Any] = {}
    for key, value, which in fields:
        body[key] = (
            shared[which % len(shared)] if which in {0, 1}
            else (*shared[0],) if which == 2 and shared[0]  # equal, another object
            else value
        )  # fmt: skip
    nested = {"in": shared[0], "list": [shared[-1]]}  # shared values below the top level
    t = Txn("op", 1)
    t.put = {"d/0": body, "d/1": nested, "d/2": {"a": shared[0]}}
    t.result = {"doc": body}
    for _ in range(2 if twice else 1):  # the kept text is written on first use, then pasted
        encoded = Encoded(t)
        assert encoded.put == {name: dumps(b) for name, b in t.put.items()}
        assert encoded.result == dumps(t.result)


def test_the_targets_a_reservation_shares_are_written_as_dumps_writes_them(
    tmp_path: Path,
) -> None:
    # the token's book and every token's (their targets joined and shared), two hours, on
    # SQLite: every reservation document as written is the text dumps writes of its value
    storage = SQLiteStorage(tmp_path / "s.db")
    clock = ManualClock(NOW)
    engine = PolicyEngine(storage=storage, clock=clock)
    engine.set_policy("agent-1", {"limits": USDT})
    for hour in range(2):
        for amount in (1, 2):
            d = engine.authorize(payment(amount, recipient=f"0x{hour}{amount}"))
            assert d.reservation_id is not None
            if amount == 1:
                engine.confirm(d.reservation_id)
        clock.advance(timedelta(hours=1))
    engine.close()
    with sqlite3.connect(tmp_path / "s.db") as conn:
        texts = [t for (t,) in conn.execute("SELECT body FROM docs WHERE name LIKE 'r/%'")]
    assert len(texts) == 4
    for text in texts:
        assert text == dumps(json.loads(text))
        assert '"tg":[[' in text


# -- SQLite: an error in a session leaves nothing behind -------------------------------------


class _FailingCommit:
    """A SQLite store whose next commit writes, then fails with a SQLite error (a lost disk)."""

    def __init__(self, inner: SQLiteStorage) -> None:
        self.inner = inner
        self.fail = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def session(self, shard: str, *, write: bool = True) -> Any:
        outer = self
        real = self.inner.session(shard, write=write)

        class _Session:
            def __enter__(self) -> Any:
                self.session = real.__enter__()
                return self

            def __exit__(self, *exc: Any) -> Any:
                return real.__exit__(*exc)

            def __getattr__(self, name: str) -> Any:
                return getattr(self.session, name)

            def commit(self, txn: Txn) -> Any:
                outcome = self.session.commit(txn)
                if outer.fail:
                    outer.fail = False
                    raise sqlite3.OperationalError("disk I/O error (test)")
                return outcome

        return _Session()


def test_a_sqlite_error_after_the_writes_of_an_authorize_keeps_none_of_them(
    tmp_path: Path,
) -> None:
    store = _FailingCommit(SQLiteStorage(tmp_path / "p.db"))
    clock = ManualClock(NOW)
    engine = PolicyEngine(storage=store, clock=clock)  # type: ignore[arg-type]
    engine.set_policy("agent-1", {"limits": {"daily": {"value": "5000000", "decimals": 6}}})
    store.fail = True
    with pytest.raises(PolicyError) as caught:
        engine.authorize(payment(5_000_000, idempotency_key="k"))
    assert caught.value.code is ErrorCode.STORAGE_UNAVAILABLE
    daily = engine.budget("agent-1").periods["daily"]
    assert daily.spent.value == 0
    assert daily.reserved.value == 0
    assert [r.event for r in engine.history("agent-1")] == ["policy_set"]
    # the same key again is a first request: it counts once
    first = engine.authorize(payment(5_000_000, idempotency_key="k"))
    again = engine.authorize(payment(5_000_000, idempotency_key="k"))
    assert first.allowed
    assert again.reservation_id == first.reservation_id
    assert engine.budget("agent-1").periods["daily"].reserved.value == 5_000_000
    engine.close()


# -- the engine's shard shortcut ----------------------------------------------------------


def test_a_delegated_budget_is_found_in_its_tree_by_a_fresh_engine_and_by_the_same() -> None:
    # memory keeps each shard apart (SQLite has one database whatever the shard)
    store = MemoryStorage()
    clock = ManualClock(NOW)
    engine = PolicyEngine(storage=store, clock=clock)
    engine.set_policy("fleet", {"limits": {"daily": {"value": "10000000", "decimals": 6}},
                                "delegation": {"allowed": True}})  # fmt: skip
    engine.delegate("fleet", "bot", {"limits": {"daily": {"value": "6000000", "decimals": 6}}})
    made = engine.authorize(payment(4_000_000, agent_id="bot"))
    assert made.allowed
    other = PolicyEngine(storage=store, clock=clock)  # knows no agent's shard yet
    assert other.confirm(made.reservation_id).status.value == "confirmed"
    assert other.authorize(payment(3_000_000, agent_id="bot")).code is Code.DAILY_LIMIT
    second = engine.authorize(payment(2_000_000, agent_id="bot"))
    assert second.allowed
    assert engine.release(second.reservation_id).status.value == "released"
    fleet = other.budget("fleet").periods["daily"]
    assert (fleet.spent.value, fleet.reserved.value) == (4_000_000, 0)
    other.close()
    engine.close()


# -- ids made from 2^52 microseconds on (2112) ---------------------------------------------


def test_a_reservation_made_from_2_52_microseconds_on_can_be_confirmed() -> None:
    first = EPOCH + timedelta(microseconds=2**52)
    clock = ManualClock(first)
    engine = PolicyEngine(clock=clock)
    engine.set_policy("agent-1", {"limits": USDT})
    decision = engine.authorize(payment(1))
    assert decision.allowed
    try:
        assert engine.confirm(decision.reservation_id).status.value == "confirmed"
    finally:
        engine.close()


def test_a_requests_amount_is_worked_out_once_and_read_without_a_getattr_hook() -> None:
    # asset_amount is kept in a slot beside the fields, not by attrs' cached_property (whose
    # __getattr__ slowed every read of a request); a copy, an evolved request or one read
    # back from a pickle works its own out, from its own fields
    import pickle

    import attrs

    from agentpolicy import Amount, PaymentRequest

    assert all("__getattr__" not in vars(c) for c in PaymentRequest.__mro__)
    request = PaymentRequest(agent_id="a", amount=5, recipient="0xa", network="eip155:1",
                             decimals=2, symbol="USDC")  # fmt: skip
    first = request.asset_amount
    assert first == Amount(5, 2, "USDC")
    assert request.asset_amount is first
    assert [f.name for f in attrs.fields(PaymentRequest)] == [
        "agent_id", "amount", "recipient", "network", "category", "decimals", "symbol", "memo",
        "idempotency_key",
    ]  # fmt: skip
    assert attrs.evolve(request, amount=7).asset_amount == Amount(7, 2, "USDC")
    again = pickle.loads(pickle.dumps(request))
    assert again == request
    assert again.asset_amount == first
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        request._asset = Amount(1)  # type: ignore[misc]


def test_policy_parts_work_out_their_derived_values_once_without_a_getattr_hook() -> None:
    # values a policy part derives from its fields (a block's limits by window, a policy's
    # tokens, a zone) are kept in slots beside the fields, not by attrs' cached_property
    # (whose __getattr__ slowed every read of the class); a copy works its own out again
    import pickle

    import attrs

    from agentpolicy import policy as model

    classes = [c for c in vars(model).values()
               if isinstance(c, type) and attrs.has(c) and c.__module__ == model.__name__]  # fmt: skip
    assert len(classes) > 10
    for cls in classes:
        assert all("__getattr__" not in vars(c) for c in cls.__mro__), cls
    policy = load_policy({
        "limits": {"daily": {"value": "5", "decimals": 6, "symbol": "USDC"}},
        "timeRules": {"timezone": "Asia/Tokyo"},
    })  # fmt: skip
    assert policy.symbols is policy.symbols
    assert policy.symbols == frozenset({"usdc"})
    assert policy.time_rules is not None
    assert policy.time_rules.zone is policy.time_rules.zone
    assert str(policy.time_rules.zone) == "Asia/Tokyo"
    again = pickle.loads(pickle.dumps(policy))
    assert again == policy
    assert again.symbols == policy.symbols
    assert policy.limits is not None
    usdt = attrs.evolve(policy.limits, daily=model.Amount(5, 6, "USDT"))
    changed = attrs.evolve(policy, limits=usdt)
    assert changed.symbols == frozenset({"usdt"})
    assert [f.name for f in attrs.fields(type(policy))] == [
        f.name for f in attrs.fields(model.AgentPolicy)
    ]
    assert not any(f.name.startswith("_once") for c in classes for f in attrs.fields(c))


def test_a_derived_value_without_its_slot_is_refused_when_its_class_is_made() -> None:
    # a _Once whose slot no class of the MRO declares could work its value out and never keep
    # it (it failed on first read): the class is refused at once, naming the slot to add
    import attrs

    from agentpolicy import policy as model

    with pytest.raises((TypeError, RuntimeError)) as caught:  # 3.11 wraps it in RuntimeError

        @attrs.frozen
        class Folded(model.MerchantRules):
            @model._Once
            def folded(self) -> int:
                return 1

    said = f"{caught.value} {caught.value.__cause__}"
    assert "Folded.folded: add '_once_folded' to _Kept.__slots__" in said

    @attrs.frozen
    class Kept(model.MerchantRules):  # a name _Kept has a slot for is kept there
        @model._Once
        def symbol(self) -> str:
            return "kept"

    assert Kept().symbol == "kept"
