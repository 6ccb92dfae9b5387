"""Random sequences of ledger calls against two oracles: the replay and the limits themselves.

Hypothesis drives an engine through authorize, confirm, release, mark_sent,
votes and a moving clock, for one budget and for a child below a parent,
with every limit kind that moves on its own (a day, a rolling window, a
rolling count, a scoped hourly limit, approvals). Then:

- replaying the agent's history against its own live policy
  (:meth:`~agentpolicy.PolicyEngine.simulate`, which keeps counters of its
  own) changes no decision: the live counters said what the history says;
- no budget ever shows more used than its limit, nor a negative amount.

Each defect of one step acting twice on a reservation (expiry under an
ancestor, a window moving past an entry just expired) broke the first.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agentpolicy import PolicyEngine
from agentpolicy.errors import PolicyError
from agentpolicy.testing import ManualClock, payment

T0 = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)
ROOT = {
    "limits": {
        "daily": {"value": "150"},
        "rolling": [{"window": "20m", "amount": {"value": "60"}}],
        "counts": [{"window": "10m", "max": 3}],
    },
    "scopedLimits": [{"name": "vendors", "match": {"categories": ["data"]},
                      "groupBy": "recipient", "limits": {"hourly": {"value": "30"}}}],
    "approvalConfig": {"timeout": 600_000, "thresholds": [
        {"amount": {"value": "35"}, "requiredApprovers": 1, "approvers": ["boss@x"]}]},
}  # fmt: skip
CHILD = {"parent": "root", "limits": {"daily": {"value": "80"}}}

_authorize = st.tuples(
    st.just("authorize"),
    st.integers(0, 1),
    st.sampled_from([5, 10, 20, 40]),
    st.sampled_from([None, "data"]),
    st.sampled_from(["0xa", "0xb"]),
)
_advance = st.tuples(st.just("advance"), st.sampled_from([1, 2, 4, 6, 11, 13, 21, 31]))
ops = st.lists(
    st.one_of(  # authorize and the clock drawn more often than the rest
        _authorize, _authorize, _authorize, _advance, _advance,
        st.tuples(st.sampled_from(["confirm", "release", "mark_sent"]), st.integers(0, 50)),
        st.tuples(st.just("decide"), st.integers(0, 50), st.booleans()),
    ),
    min_size=30,
    max_size=90,
)  # fmt: skip


def _run(engine: PolicyEngine, clock: ManualClock, agents: list[str], steps: list[Any]) -> None:
    opened: list[str] = []
    pending: list[str] = []
    for op in steps:
        try:
            if op[0] == "authorize":
                _, who, amount, category, recipient = op
                d = engine.authorize(payment(amount, agent_id=agents[who % len(agents)],
                                             category=category, recipient=recipient))  # fmt: skip
                if d.allowed and d.reservation_id:
                    opened.append(d.reservation_id)
                if d.requires_approval and d.approval_id:
                    pending.append(d.approval_id)
            elif op[0] == "decide" and pending:
                aid = pending.pop(op[1] % len(pending))
                done = engine.decide(aid, "boss@x", "approve" if op[2] else "deny")
                if done.reservation_id:
                    opened.append(done.reservation_id)
            elif op[0] == "advance":
                clock.advance(minutes=op[1])
            elif op[0] in ("confirm", "release", "mark_sent") and opened:
                rid = opened[op[1] % len(opened)]
                getattr(engine, op[0])(rid)
                if op[0] != "mark_sent":
                    opened.remove(rid)
        except PolicyError:  # expired, already settled, ...: the call changes nothing
            pass
        _within_limits(engine, agents)


def _within_limits(engine: PolicyEngine, agents: list[str]) -> None:
    for agent in agents:
        for limit in engine.budget(agent).limits:
            if limit.kind == "count":
                assert limit.count is not None
                assert limit.max_count is not None
                assert 0 <= limit.count <= limit.max_count, limit
            else:
                assert limit.limit is not None
                used = limit.spent.value + limit.reserved.value
                assert limit.spent.value >= 0
                assert limit.reserved.value >= 0
                assert (
                    used * 10**limit.limit.decimals <= limit.limit.value * 10**limit.spent.decimals
                )


@settings(max_examples=150, deadline=None)
@given(steps=ops, tree=st.booleans())
def test_the_ledger_agrees_with_its_own_replay_and_keeps_every_limit(
    steps: list[Any], tree: bool
) -> None:
    clock = ManualClock(T0)
    engine = PolicyEngine(clock=clock)
    engine.set_policy("root", ROOT)
    agents = ["root"]
    if tree:
        engine.set_policy("child", CHILD)
        agents.append("child")
    _run(engine, clock, agents, steps)
    report = engine.simulate("root", ROOT, since=T0)
    assert not report.flips, [
        (c.request.agent_id, c.request.amount, c.live_code, c.candidate_code)
        for c in report.changed
    ]
    engine.close()
