"""A probe of shared budgets on real servers: fleets of sub-agents paying in several tokens at once.

Real processes on PostgreSQL and Redis (the servers on 127.0.0.1, each test
in a schema or key prefix of its own): children of one parent pay in tokens
of different decimals, with amounts near 2**256, while an administrator
writes new versions of the parent (its limits spelled in other decimals) and
a child is revoked; a parent's count and scoped limits shared by siblings;
payers killed (SIGKILL) between authorize and confirm. The totals allowed
are exact, the budget views (engine and MCP) agree with the history, and a
revoked child spends through no call.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agentpolicy import Code, PolicyEngine, PolicyError
from agentpolicy.mcp.server import AgentPolicyMcpServer
from agentpolicy.storage import open_storage
from agentpolicy.testing import ManualClock, payment

NOW = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)
U = 10**6  # 1 USDC at 6 decimals
Q = 2**250 + 12_345  # one WETH payment in base units at 18 decimals (40 of them: near 2**256)
WETH_CAP = 40 * Q
assert 2**255 < WETH_CAP < 2**256
USDC_SPELLINGS = [(1, 0), (10**6, 6), (10**7, 7), (10**18, 18)]  # 1 USDC, four ways
WETH_SPELLINGS = [(Q, 18), (Q * 10**6, 24)]  # Q at 18 decimals, two ways
REDIS = "redis://127.0.0.1:6379/0"
WORKERS = 10


# -- the real servers: a schema or a key prefix of the test's own ---------------------------------


@pytest.fixture(params=["postgres", "redis"])
def spec(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """What a worker process needs to open the test's store: ``(url, key prefix)``."""
    if request.param == "postgres":
        from tests.postgres_servers import drop_schema, with_schema

        server: str = request.getfixturevalue("postgres_url")
        schema = f"t_fleet_{uuid.uuid4().hex[:12]}"
        yield with_schema(server, schema), ""
        drop_schema(server, schema)
        return
    import redis

    client = redis.Redis.from_url(REDIS, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis is required in CI: {exc}")
        pytest.skip(f"no Redis on 127.0.0.1:6379: {exc}")
    prefix = f"fleetprobe-{uuid.uuid4().hex[:12]}:"
    yield REDIS, prefix
    names = list(client.scan_iter(match=f"{prefix}*", count=1000))  # our own keys only
    for start in range(0, len(names), 500):
        client.delete(*names[start : start + 500])
    client.close()


@pytest.fixture(scope="module")
def workers() -> Iterator[Any]:
    """Ten worker processes for the whole module, forked from a server that imported this module.

    Started once (and cheaply: nothing is imported again per process), since
    this machine's two cores would spend most of the tests starting processes.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        [__name__, "agentpolicy.storage.redis", "agentpolicy.storage.postgres"]
    )
    with ctx.Manager() as manager, ctx.Pool(WORKERS) as pool:
        barrier = manager.Barrier(WORKERS)
        assert pool.starmap(warm_up, [(barrier,)] * WORKERS, 1) == [True] * WORKERS
        yield ctx, manager, pool


def run(workers: Any, spec: tuple[str, str], plans: list[list[Any]]) -> list[list[Any]]:
    """Each plan in a worker of its own, all from one barrier on (see :func:`pay_plan`)."""
    _, manager, pool = workers
    assert len(plans) <= WORKERS  # one plan a worker: all of them wait at the barrier together
    barrier = manager.Barrier(len(plans))
    results: list[list[Any]] = pool.starmap(pay_plan, [(spec, p, barrier) for p in plans], 1)
    return results


def _engine(spec: tuple[str, str], clock: ManualClock | None = None, **kw: Any) -> PolicyEngine:
    storage = open_storage(spec[0], key_prefix=spec[1])
    return PolicyEngine(storage=storage, clock=clock or ManualClock(NOW), **kw)


def _in(value: int, decimals: int, target: int) -> int:
    """``value`` at ``decimals`` in base units at ``target`` decimals (exact: no rounding)."""
    assert target >= decimals
    return value * 10 ** (target - decimals)


def _limit(engine: PolicyEngine, agent: str, symbol: str | None, kind: str = "amount") -> Any:
    rows = [r for r in engine.budget(agent).limits
            if r.kind == kind and r.scope is None and r.window == "daily"
            and (r.symbol or "").casefold() == (symbol or "").casefold()]  # fmt: skip
    assert len(rows) == 1, rows
    return rows[0]


# -- workers (spawned processes) ------------------------------------------------------------------


def warm_up(barrier: Any) -> bool:
    """Load what a first payment loads, in memory, so that the tests time payments only."""
    engine = PolicyEngine(clock=ManualClock(NOW))
    engine.set_policy("warm", _child_policy(1))
    allowed = engine.authorize(payment(1, agent_id="warm", symbol="USDC")).allowed
    barrier.wait()  # one task a worker
    return allowed


def pay_plan(spec: tuple[str, str], plan: list[Any], barrier: Any) -> list[Any]:
    """Run ``plan`` (payments, or administrator steps) from the barrier on; return what happened.

    A payment step is ``("pay", agent, value, decimals, symbol, recipient)`` and
    returns ``(agent, code, reservation id, value, decimals, symbol)``; ``("wait",)``
    waits at the barrier again; ``("set", agent, policy)``, ``("delegate",
    parent, child, policy)`` and ``("revoke", agent, by)`` act as an administrator.
    """
    engine = _engine(spec)
    barrier.wait()
    seen: list[Any] = []
    for step in plan:
        if step[0] == "wait":
            barrier.wait()
        elif step[0] == "pay":
            _, agent, value, decimals, symbol, recipient = step
            d = engine.authorize(payment(value, agent_id=agent, decimals=decimals, symbol=symbol,
                                         recipient=recipient))  # fmt: skip
            seen.append((agent, d.code.value, d.reservation_id, value, decimals, symbol))
        elif step[0] == "set":
            seen.append(("set", engine.set_policy(step[1], step[2])))
        elif step[0] == "delegate":
            seen.append(("delegate", engine.delegate(step[1], step[2], step[3]).parent_id))
        elif step[0] == "revoke":
            seen.append(("revoke", engine.revoke(step[1], by=step[2]).revoked_at))
    engine.close()
    return seen


def pay_until_killed(spec: tuple[str, str], agent: str, ready: Any, never: Any) -> None:
    """Authorize 1 USDC and confirm every other one until denied, then wait to be killed."""
    engine = _engine(spec)
    n = 0
    while True:
        d = engine.authorize(payment(U, agent_id=agent, symbol="USDC"))
        n += 1
        if n == 1:
            ready.release()
        if not d.allowed:
            break
        if n % 2 == 0:
            assert d.reservation_id is not None
            engine.confirm(d.reservation_id)
    never.wait()  # an event nobody sets: killed here, or above while paying


# -- a fleet paying in two tokens while its parent changes and a child is revoked -----------------


def _fleet_policy(version: int) -> dict[str, Any]:
    """The fleet's policy: 100 USDC and 40 Q of WETH a day, spelled in other decimals by turns."""
    usdc = [(100 * U, 6), (100, 0), (100 * 10**18, 18)][version % 3]
    weth = WETH_SPELLINGS[version % 2]
    return {
        "limits": {"daily": {"value": str(usdc[0]), "decimals": usdc[1], "symbol": "USDC"}},
        "assets": [{"symbol": "WETH", "limits": {"daily": {
            "value": str(weth[0] * 40), "decimals": weth[1], "symbol": "WETH"}}}],
        "merchantRules": {"blacklist": [f"0xbad{version}"]},
        "delegation": {"allowed": True},
    }  # fmt: skip


def _child_policy(usdc_units: int) -> dict[str, Any]:
    """A child's own limits: ``usdc_units`` USDC a day (18 decimals) and the fleet's WETH cap."""
    return {
        "limits": {"daily": {"value": str(usdc_units * 10**18), "decimals": 18, "symbol": "usdc"}},
        "assets": [{"symbol": "weth", "limits": {"daily": {
            "value": str(WETH_CAP * 10**6), "decimals": 24, "symbol": "weth"}}}],
    }  # fmt: skip


CHILDREN = [f"fleet/c{i}" for i in range(7)] + ["fleet/r"]


def _revoked_then_settled(setup: PolicyEngine, allowed: list[Any]) -> None:
    """fleet/r allowed nothing after its revocation; its payments under way still settle."""
    # the revoked child: nothing allowed after the revocation in its history, nor now
    history = setup.history("fleet/r", 1000)
    revoked_at = next(h.seq for h in history if h.event == "revoke")
    late = [h for h in history if h.event == "decision" and h.code == "ALLOWED"
            and (h.seq or 0) > revoked_at]  # fmt: skip
    assert late == []
    for value, decimals in USDC_SPELLINGS:
        d = setup.authorize(payment(value, agent_id="fleet/r", decimals=decimals, symbol="USDC"))
        assert (d.code, d.budget_id) == (Code.DELEGATION_REVOKED, "fleet/r")
    # its payments under way still count, and are confirmed; the others' released
    for agent, _, rid, *_ in allowed:
        assert rid is not None
        if agent == "fleet/r":
            assert setup.confirm(rid).status == "confirmed"
        else:
            assert setup.get_reservation(rid).status == "reserved"
    released = [r for r in allowed if r[0] != "fleet/r"]
    for _, _, rid, *_ in released:
        setup.release(rid)
    kept = [r for r in allowed if r[0] == "fleet/r"]
    row = _limit(setup, "fleet", "USDC")
    spent, fraction = divmod(sum(_in(r[3], r[4], 18) for r in kept if r[5] == "USDC"), 10**12)
    assert fraction == 0  # whole USDC: exact at the fleet's 6 decimals
    assert (row.spent.value, row.reserved.value, row.remaining.value) == (spent, 0, 100 * U - spent)


def test_children_paying_two_tokens_in_four_spellings_while_the_parent_changes_and_one_is_revoked(
    spec: tuple[str, str], workers: Any
) -> None:
    setup = _engine(spec)
    setup.set_policy("fleet", _fleet_policy(0))
    for child in CHILDREN:
        setup.delegate("fleet", child, _child_policy(15))
    plans: list[list[Any]] = []
    for i, child in enumerate(CHILDREN):  # 20 USDC and 8 WETH asked each: 160 and 64 in all
        plan: list[Any] = []
        for k in range(28):
            if k % 7 in (3, 6):
                value, decimals = WETH_SPELLINGS[(i + k) % 2]
                plan.append(("pay", child, value, decimals, "WETH", "0xvendor"))
            else:
                value, decimals = USDC_SPELLINGS[(i + k) % 4]
                plan.append(("pay", child, value, decimals, "USDC", "0xvendor"))
        plans.append(plan)
    admin: list[Any] = []
    for version in range(1, 13):  # new versions of the parent, and of a child, under way
        admin.append(("set", "fleet", _fleet_policy(version)))
        if version % 4 == 0:
            admin.append(("delegate", "fleet", "fleet/c0", _child_policy(15)))
    plans.append(admin)
    plans.append([("pay", "fleet/r", U, 6, "USDC", "0xvendor"), ("revoke", "fleet/r", "fleet"),
                  ("pay", "fleet/r", U, 6, "USDC", "0xvendor")])  # fmt: skip
    results = run(workers, spec, plans)
    paid = [r for chunk in results for r in chunk if r[0] not in ("set", "delegate", "revoke")]
    allowed = [r for r in paid if r[1] == "ALLOWED"]
    assert len({r[2] for r in allowed}) == len(allowed)
    usdc = sum(_in(r[3], r[4], 18) for r in allowed if r[5] == "USDC")
    weth = sum(_in(r[3], r[4], 24) for r in allowed if r[5] == "WETH")
    assert usdc == 100 * 10**18  # 161 USDC asked: exactly the fleet's 100, whatever the spelling
    assert weth == WETH_CAP * 10**6  # 64 asked: exactly 40 Q
    assert {r[1] for r in paid} <= {"ALLOWED", "DAILY_LIMIT", "DELEGATION_REVOKED"}
    assert results[-1][-1][1] == "DELEGATION_REVOKED"  # after its revocation, in that process
    # every level's view, read by another engine: exact in each limit's own decimals
    setup.set_policy("fleet", _fleet_policy(3))  # USDC at 6 decimals, WETH at 24
    row = _limit(setup, "fleet", "USDC")
    assert (row.limit.decimals, row.reserved.value, row.spent.value, row.remaining.value) == (
        6, 100 * U, 0, 0)  # fmt: skip
    row = _limit(setup, "fleet", "WETH")
    assert (row.limit.decimals, row.reserved.value, row.remaining.value) == (
        24, WETH_CAP * 10**6, 0)  # fmt: skip
    for child in CHILDREN:
        mine = [r for r in allowed if r[0] == child]
        for symbol, digits in (("USDC", 18), ("WETH", 24)):
            expected = sum(_in(r[3], r[4], digits) for r in mine if r[5] == symbol)
            assert _limit(setup, child, symbol).reserved.value == expected
        assert sum(1 for r in mine if r[5] == "USDC") <= 15
    _revoked_then_settled(setup, allowed)
    setup.close()


def test_a_parents_limit_lowered_while_children_pay_binds_every_payment_decided_after_it(
    spec: tuple[str, str], workers: Any
) -> None:
    setup = _engine(spec)
    usdc = {"symbol": "USDC", "decimals": 6}
    setup.set_policy("team", {"limits": {"daily": {"value": str(40 * U), **usdc}}})
    kids = [f"team-{i}" for i in range(8)]
    for kid in kids:
        setup.set_policy(kid, {"parent": "team"})
    plans: list[list[Any]] = []
    for i, kid in enumerate(kids):  # 64 USDC asked, in four spellings
        plans.append([("pay", kid, *USDC_SPELLINGS[(i + k) % 4], "USDC", "0xv") for k in range(8)])
    lowered = {"limits": {"daily": {"value": str(25 * 10**18), "decimals": 18, "symbol": "usdc"}}}
    plans.append([("pay", kids[0], 1, 0, "USDC", "0xv"), ("set", "team", lowered)])
    results = run(workers, spec, plans)
    assert results[-1][-1] == ("set", 2)
    (changed,) = [h.seq for h in setup.history("team") if h.policy_version == 2]
    key = "@1:team|usdc|daily:2026-01-19T00:00:00+00:00"
    total = 0
    for kid in kids:
        for h in setup.history(kid, 1000):
            if h.code != "ALLOWED":
                continue
            assert h.request is not None
            assert h.usage is not None
            assert h.seq is not None
            used = h.usage.get(key)
            before = 0 if used is None else _in(used.value, used.decimals, 18)
            paid = _in(h.request.amount, h.request.decimals, 18)
            total += paid
            assert before + paid <= (25 if h.seq > changed else 40) * 10**18
    assert total <= 40 * 10**18
    row = _limit(setup, "team", "usdc")
    assert (row.limit.decimals, row.reserved.value) == (18, total)
    assert row.remaining.value == max(0, 25 * 10**18 - total)
    d = setup.authorize(payment(1, agent_id=kids[1], decimals=18, symbol="USDC"))
    assert d.allowed == (total < 25 * 10**18)
    setup.close()


# -- a parent's count and scoped count limits shared by siblings ----------------------------------


def test_siblings_share_a_parents_scoped_count_and_its_count_of_every_token_exactly(
    spec: tuple[str, str], workers: Any
) -> None:
    setup = _engine(spec)
    setup.set_policy("crew", {
        "limits": {"counts": [{"window": "daily", "max": 37}]},
        "scopedLimits": [{"name": "vendor x", "match": {"recipients": ["0xABC"]},
                          "limits": {"counts": [{"window": "daily", "max": 5}]}}],
    })  # fmt: skip
    kids = [f"crew-{i}" for i in range(8)]
    for kid in kids:
        setup.set_policy(kid, {"parent": "crew"})
    tokens = [("USDC", 1, 6), ("WETH", Q, 18), ("DAI", 2**255, 18)]
    plans = []
    for i, kid in enumerate(kids):
        plan: list[Any] = [("pay", kid, 1, 6, "USDC", "0xabc") for _ in range(3)]
        plan.append(("wait",))
        for k in range(6):
            symbol, value, decimals = tokens[(i + k) % 3]
            plan.append(("pay", kid, value, decimals, symbol, "0xvendor"))
        plans.append(plan)
    results = run(workers, spec, plans)
    scoped = [r for chunk in results for r in chunk[:3]]
    rest = [r for chunk in results for r in chunk[3:]]
    assert sum(r[1] == "ALLOWED" for r in scoped) == 5  # 24 asked of vendor x
    assert {r[1] for r in scoped} == {"ALLOWED", "SCOPED_LIMIT"}
    assert sum(r[1] == "ALLOWED" for r in rest) == 32  # 48 more asked, in three tokens
    assert {r[1] for r in rest} == {"ALLOWED", "COUNT_LIMIT"}
    row = _limit(setup, "crew", None, "count")
    assert (row.max_count, row.count, row.remaining_count) == (37, 37, 0)
    (scope,) = [r for r in setup.budget("crew").limits if r.scope == "vendor x"]
    assert (scope.count, scope.remaining_count) == (5, 0)
    for kid, chunk in zip(kids, results, strict=True):  # each child's history agrees
        mine = sum(r[1] == "ALLOWED" for r in chunk)
        assert sum(h.code == "ALLOWED" for h in setup.history(kid, 100)) == mine
    setup.close()


# -- payers killed between authorize and confirm --------------------------------------------------


def test_payers_killed_between_authorize_and_confirm_leave_nothing_stuck_and_views_match_history(
    spec: tuple[str, str], workers: Any
) -> None:
    clock = ManualClock(NOW)
    setup = _engine(spec, clock)
    setup.set_policy("pack", {"limits": {"daily": {"value": str(60 * U), "symbol": "USDC"}}})
    kids = [f"pack-{i}" for i in range(10)]
    for kid in kids:
        setup.set_policy(kid, {"parent": "pack",
                               "limits": {"daily": {"value": str(9 * 10**18), "decimals": 18,
                                                    "symbol": "USDC"}}})  # fmt: skip
    ctx = workers[0]
    ready = ctx.Semaphore(0)
    never = ctx.Event()
    procs = [ctx.Process(target=pay_until_killed, args=(spec, kid, ready, never)) for kid in kids]
    for p in procs:
        p.start()
    try:
        for _ in procs:  # every payer has authorized once: kill them wherever they are
            assert ready.acquire(timeout=60)
    finally:
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.join(timeout=30)
    assert all(p.exitcode == -signal.SIGKILL for p in procs)
    fleet = _limit(setup, "pack", "USDC")
    confirmed, open_ = 0, 0
    for kid in kids:  # each child's view is its history: confirmed spent, the rest reserved
        history = setup.history(kid, 10_000)
        allowed = {h.reservation_id for h in history if h.code == "ALLOWED"}
        done = {h.reservation_id for h in history if h.event == "confirm"}
        assert done <= allowed
        row = _limit(setup, kid, "USDC")
        assert row.spent.value == len(done) * 10**18
        assert row.reserved.value == len(allowed - done) * 10**18
        confirmed, open_ = confirmed + len(done), open_ + len(allowed - done)
    assert (fleet.spent.value, fleet.reserved.value) == (confirmed * U, open_ * U)
    assert 10 <= confirmed + open_ <= 60  # one authorized by each at least, none past the fleet
    # past the reservations' TTL everything left open expires; nothing stays held
    clock.advance(timedelta(minutes=5))
    setup.sweep()
    fleet = _limit(setup, "pack", "USDC")
    assert (fleet.spent.value, fleet.reserved.value) == (confirmed * U, 0)
    for kid in kids:
        assert _limit(setup, kid, "USDC").reserved.value == 0
    assert setup.open_reservations() == 0
    room = {kid: 9 - _limit(setup, kid, "USDC").spent.value // 10**18 for kid in kids}
    takers = [kid for kid in kids for _ in range(room[kid])][: 60 - confirmed]
    assert len(takers) == 60 - confirmed  # the children may take all that came back
    for kid in takers:  # exactly what expired comes back, to any child
        d = setup.authorize(payment(10**18, agent_id=kid, decimals=18, symbol="USDC"))
        assert d.allowed, d.reason
    (kid,) = [kid for kid in kids if _limit(setup, kid, "USDC").remaining.value > 0][:1]
    d = setup.authorize(payment(1, agent_id=kid, decimals=18, symbol="USDC"))
    assert (d.code, d.budget_id) == (Code.DAILY_LIMIT, "pack")
    setup.close()


# -- a revoked child spends through no call --------------------------------------------------------


def test_a_revoked_child_spends_through_no_call_of_the_engine_or_its_mcp_server(
    spec: tuple[str, str],
) -> None:
    clock = ManualClock(NOW)
    engine = _engine(spec, clock)
    engine.set_policy("org", {
        "limits": {"daily": {"value": str(100 * U), "symbol": "USDC"}},
        "assets": [{"symbol": "WETH", "limits": {"daily": {
            "value": str(WETH_CAP), "decimals": 18, "symbol": "WETH"}}}],
        "approvalConfig": {"thresholds": [{"amount": {"value": str(50 * U), "symbol": "USDC"},
                                           "requiredApprovers": 1, "approvers": ["boss"]}]},
        "delegation": {"allowed": True, "maxDepth": 2},
    })  # fmt: skip
    engine.delegate("org", "org/a", {**_child_policy(90), "delegation": {"allowed": True}})
    engine.delegate("org/a", "org/a/g", _child_policy(90), by_parent=True)
    before = engine.authorize(payment(U, agent_id="org/a", symbol="USDC", idempotency_key="k"))
    held = engine.authorize(payment(60 * U, agent_id="org/a/g", symbol="USDC"))
    under_way = engine.authorize(
        payment(10**18 * 20, agent_id="org/a", decimals=18, symbol="USDC")
    )  # below the threshold: reserved
    assert (before.code, held.code, under_way.code) == (
        Code.ALLOWED, Code.APPROVAL_REQUIRED, Code.ALLOWED)  # fmt: skip
    assert held.approval_id is not None
    assert before.reservation_id is not None
    server = AgentPolicyMcpServer(engine=engine, agent_id="org/a")
    engine.revoke("org/a", by="org")
    refused = []
    for agent in ("org/a", "org/a/g"):
        for symbol, value, decimals in (("USDC", 1, 0), ("USDC", 1, 18), ("WETH", Q, 18)):
            d = engine.authorize(payment(value, agent_id=agent, decimals=decimals, symbol=symbol))
            refused.append((d.code, d.budget_id))
    assert set(refused) == {(Code.DELEGATION_REVOKED, "org/a")}
    with pytest.raises(PolicyError) as err:  # the held approval expired with the revocation
        engine.decide(held.approval_id, "boss", "approve")
    assert err.value.code == "APPROVAL_NOT_PENDING"
    # the same idempotency key answers the first decision again and counts once
    again = engine.authorize(payment(U, agent_id="org/a", symbol="USDC", idempotency_key="k"))
    assert again.reservation_id == before.reservation_id
    fresh = engine.authorize(payment(U, agent_id="org/a", symbol="USDC", idempotency_key="k2"))
    assert fresh.code == Code.DELEGATION_REVOKED
    calls = [
        ("agent_policy_authorize", {"agentId": "org/a", "amount": "1", "decimals": 18,
                                    "symbol": "USDC", "recipient": "0xv",
                                    "network": "eip155:8453"}),
        ("agent_policy_delegate", {"childId": "org/a/h", "policy": _child_policy(1)}),
        ("agent_policy_delegate", {"childId": "org/a/g", "policy": _child_policy(1)}),
    ]  # fmt: skip
    answers = [server.call(tool, args) for tool, args in calls]
    assert answers[0]["success"]
    assert answers[0]["data"]["code"] == "DELEGATION_REVOKED"
    assert [a["success"] for a in answers[1:]] == [False, False]
    # an administrator's new versions, a rollback or a new budget below it revive nothing
    engine.set_policy("org/a", {**_child_policy(90), "parent": "org"})
    engine.rollback_policy("org/a", 1)
    engine.set_policy("joiner", {"parent": "org/a"})
    for agent in ("org/a", "org/a/g", "joiner"):
        d = engine.authorize(payment(1, agent_id=agent, symbol="USDC"))
        assert (d.code, d.budget_id) == (Code.DELEGATION_REVOKED, "org/a")
    view = server.call("agent_policy_budget", {"agentId": "org/a"})["data"]
    (usdc,) = [r for r in view["limits"] if r["symbol"].casefold() == "usdc"]
    assert (usdc["reserved"], usdc["decimals"]) == (str(21 * 10**18), 18)  # the two under way
    (org,) = view["ancestors"]
    assert org["agentId"] == "org"
    assert org["periods"]["daily"]["reserved"] == str(21 * U)
    engine.close()
