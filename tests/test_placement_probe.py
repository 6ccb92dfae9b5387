"""A probe of an agent placed in a tree after it was decided ``NO_POLICY`` in its own shard.

An agent with no policy is decided in its own shard, which keeps its
idempotency keys and denials; once placed in a tree (a delegation, or a
policy naming a parent) it is decided in the tree's shard, and on memory and
Redis the engine reads what its own shard kept from there. These tests try
to break that: keys used before the placement and again across the 24-hour
window, dry runs and the payment guard, an agent flagged but never placed,
revocation and a new parent, history with limits, versions and a full
denial log, a Redis Cluster whose own and tree slots live on different
nodes, and real processes (and an async engine) paying while another places
the agent. Each key must keep exactly one decision, the budgets must count
exactly the distinct allowed reservations, and history must list each
decision once, in the order the calls were made. Three defects the probe
found in the first version of the fix stay as regression tests: two answers
to one key at the window's end under clocks a second apart, ``simulate``
missing the payments asked before, and a read of the own shard on every
keyed payment for good.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agentpolicy import Code, ConflictError, ErrorCode, PaymentDenied, PolicyEngine
from agentpolicy.decisions import Decision
from agentpolicy.records import HistoryRecord
from agentpolicy.testing import ManualClock, payment
from tests.backends import Backend, serve

U = 1_000_000
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
DAY = timedelta(hours=24)
US = timedelta(microseconds=1)


def daily(units: int, **more: Any) -> dict[str, Any]:
    return {"limits": {"daily": {"value": str(units * U)}}, **more}


def reserved(engine: PolicyEngine, agent: str) -> int:
    """What the agent's daily budget holds (reserved and spent), in base units."""
    window = engine.budget(agent, "daily").periods["daily"]  # type: ignore[index]
    return int(window.reserved.value + window.spent.value)


def answer(decision: Decision) -> tuple[Any, ...]:
    """What two answers to the same key must share."""
    return decision.code, decision.reservation_id, decision.decided_at, decision.policy_version


def decisions(records: list[HistoryRecord]) -> list[tuple[Any, ...]]:
    """The decisions of a history: code, amount, key, memo, reservation."""
    return [
        (h.code, h.request.amount, h.request.idempotency_key, h.request.memo, h.reservation_id)
        for h in records
        if h.event == "decision" and h.request is not None
    ]


def served(name: str, tmp_path: Any, request: pytest.FixtureRequest) -> Backend:
    """A backend of :mod:`tests.backends` by name, its storages closed after the test."""
    running = serve(name, tmp_path, request)
    request.addfinalizer(lambda: next(running, None))
    return next(running)


def conflict(engine: PolicyEngine, request: Any, **kwargs: Any) -> None:
    with pytest.raises(ConflictError) as refused:
        engine.authorize(request, **kwargs)
    assert refused.value.code == ErrorCode.IDEMPOTENCY_CONFLICT


# -- one engine after another, on every store -----------------------------------------------------


def test_a_key_from_before_the_placement_answers_until_its_window_ends_then_anew(
    backend: Backend,
) -> None:
    """The first decision holds to the microsecond of its window, for every way of asking."""
    clock = ManualClock(T0)
    engine = backend.engine(clock)
    engine.set_policy("bot", daily(100))
    ask = payment(5 * U, agent_id="kid", idempotency_key="k1")
    other = payment(6 * U, agent_id="kid", idempotency_key="k1")
    first = engine.authorize(ask)
    assert first.code == Code.NO_POLICY
    clock.advance(timedelta(hours=1))
    engine.delegate("bot", "kid", daily(10))
    clock.advance(DAY - timedelta(hours=1) - US)  # the last microsecond of the key's window
    for asker in (engine, backend.engine(clock)):  # this process, and one that cached nothing
        assert answer(asker.authorize(ask)) == answer(first)
        dry = asker.authorize(ask, dry_run=True)
        assert (dry.code, dry.dry_run, dry.reservation_id) == (Code.NO_POLICY, True, None)
        conflict(asker, other)
        conflict(asker, other, dry_run=True)
        with pytest.raises(PaymentDenied) as denied, asker.payment(ask):
            pytest.fail("the guard ran a payment its key denied")  # pragma: no cover
        assert denied.value.decision is not None
        assert denied.value.decision.code == Code.NO_POLICY
    assert reserved(engine, "kid") == reserved(engine, "bot") == 0
    clock.advance(US)  # the window is over: decided anew, in the tree, and held there
    fresh = backend.engine(clock)
    preview = fresh.authorize(ask, dry_run=True)
    assert (preview.code, preview.dry_run) == (Code.ALLOWED, True)
    later = fresh.authorize(ask)
    assert later.code == Code.ALLOWED
    for asker in (engine, fresh, backend.engine(clock)):
        assert answer(asker.authorize(ask)) == answer(later)
        conflict(asker, other)
    assert reserved(engine, "kid") == reserved(engine, "bot") == 5 * U
    clock.advance(DAY)  # the tree's own key is over too: a third decision
    third = backend.engine(clock).authorize(ask)
    assert third.code == Code.ALLOWED
    assert third.reservation_id not in (None, later.reservation_id)
    assert answer(engine.authorize(ask)) == answer(third)
    assert [(c, a, k) for c, a, k, _, _ in decisions(engine.history("kid"))] == [
        (Code.ALLOWED, 5 * U, "k1"),
        (Code.ALLOWED, 5 * U, "k1"),
        (Code.NO_POLICY, 5 * U, "k1"),
    ]


def test_an_agent_flagged_but_never_placed_lives_on_its_own_budget(backend: Backend) -> None:
    """Keys recorded with no policy, then a policy of its own: an agent like any other."""
    clock = ManualClock(T0)
    engine = backend.engine(clock)
    engine.set_policy("bot", daily(100))
    before = engine.authorize(payment(2 * U, agent_id="solo", idempotency_key="a"))
    assert before.code == Code.NO_POLICY
    assert engine.authorize(payment(2 * U, agent_id="solo", idempotency_key="a")) == before
    engine.set_policy("solo", daily(10))
    for asker in (engine, backend.engine(clock)):
        assert answer(asker.authorize(payment(2 * U, agent_id="solo", idempotency_key="a"))) == (
            answer(before)
        )
        conflict(asker, payment(3 * U, agent_id="solo", idempotency_key="a"))
    paid = engine.authorize(payment(4 * U, agent_id="solo", idempotency_key="b"))
    assert paid.code == Code.ALLOWED
    assert engine.authorize(payment(7 * U, agent_id="solo")).code == Code.DAILY_LIMIT
    assert (reserved(engine, "solo"), reserved(engine, "bot")) == (4 * U, 0)
    with pytest.raises(ConflictError) as refused:
        engine.delegate("bot", "solo", daily(10))
    assert refused.value.code == ErrorCode.BUDGET_CONFLICT
    with pytest.raises(ConflictError):
        engine.set_policy("solo", daily(10, parent="bot"))
    clock.advance(DAY)
    again = backend.engine(clock).authorize(payment(2 * U, agent_id="solo", idempotency_key="a"))
    assert again.code == Code.ALLOWED  # its window over, decided anew on its own budget
    assert (reserved(engine, "solo"), reserved(engine, "bot")) == (2 * U, 0)  # a new day
    assert [(c, a, k) for c, a, k, _, _ in decisions(engine.history("solo"))] == [
        (Code.ALLOWED, 2 * U, "a"),
        (Code.DAILY_LIMIT, 7 * U, None),
        (Code.ALLOWED, 4 * U, "b"),
        (Code.NO_POLICY, 2 * U, "a"),
    ]


def test_a_new_parent_in_the_same_tree_keeps_the_keys_from_before(backend: Backend) -> None:
    clock = ManualClock(T0)
    engine = backend.engine(clock)
    engine.set_policy("bot", daily(100))
    engine.delegate("bot", "mid", daily(50))
    ask = payment(3 * U, agent_id="kid", idempotency_key="k")
    first = engine.authorize(ask)
    engine.authorize(payment(1 * U, agent_id="kid", memo="before"))
    clock.advance(timedelta(minutes=1))
    engine.set_policy("kid", daily(10, parent="bot"))
    paid = engine.authorize(payment(1 * U, agent_id="kid", idempotency_key="p"))
    assert paid.code == Code.ALLOWED
    clock.advance(timedelta(minutes=1))
    engine.set_policy("kid", daily(10, parent="mid"))  # a new parent in the same tree
    for asker in (engine, backend.engine(clock)):
        assert answer(asker.authorize(ask)) == answer(first)
        conflict(asker, payment(4 * U, agent_id="kid", idempotency_key="k"))
        assert answer(asker.authorize(payment(1 * U, agent_id="kid", idempotency_key="p"))) == (
            answer(paid)
        )
    moved = engine.authorize(payment(2 * U, agent_id="kid", idempotency_key="q"))
    assert moved.code == Code.ALLOWED
    assert (reserved(engine, "kid"), reserved(engine, "mid"), reserved(engine, "bot")) == (
        3 * U,
        2 * U,
        3 * U,
    )  # the reservation made below bot was undone on bot when kid moved below mid
    assert decisions(backend.engine(clock).history("kid")) == [
        (Code.ALLOWED, 2 * U, "q", None, moved.reservation_id),
        (Code.ALLOWED, 1 * U, "p", None, paid.reservation_id),
        (Code.NO_POLICY, 1 * U, None, "before", None),
        (Code.NO_POLICY, 3 * U, "k", None, None),
    ]


def test_delegated_again_then_revoked_the_key_still_answers(backend: Backend) -> None:
    clock = ManualClock(T0)
    engine = backend.engine(clock)
    engine.set_policy("bot", daily(100))
    ask = payment(3 * U, agent_id="kid", idempotency_key="k")
    first = engine.authorize(ask)
    clock.advance(timedelta(minutes=1))
    engine.delegate("bot", "kid", daily(10))
    paid = engine.authorize(payment(1 * U, agent_id="kid", idempotency_key="p"))
    clock.advance(timedelta(minutes=1))
    engine.delegate("bot", "kid", daily(12))  # the same parent delegates it again: version 2
    assert answer(backend.engine(clock).authorize(ask)) == answer(first)
    clock.advance(timedelta(minutes=1))
    engine.revoke("kid", by="bot")
    for asker in (engine, backend.engine(clock)):
        assert answer(asker.authorize(ask)) == answer(first)
        conflict(asker, payment(4 * U, agent_id="kid", idempotency_key="k"))
        assert answer(asker.authorize(payment(1 * U, agent_id="kid", idempotency_key="p"))) == (
            answer(paid)
        )
    assert engine.authorize(payment(1 * U, agent_id="kid")).code == Code.DELEGATION_REVOKED
    with pytest.raises(ConflictError):  # a revoked budget is not delegated again
        engine.delegate("bot", "kid", daily(10))
    assert answer(backend.engine(clock).authorize(ask)) == answer(first)
    assert (reserved(engine, "kid"), reserved(engine, "bot")) == (1 * U, 1 * U)
    assert decisions(backend.engine(clock).history("kid")) == [
        (Code.DELEGATION_REVOKED, 1 * U, None, None, None),
        (Code.ALLOWED, 1 * U, "p", None, paid.reservation_id),
        (Code.NO_POLICY, 3 * U, "k", None, None),
    ]


def test_history_across_the_two_shards_with_limits_and_versions(backend: Backend) -> None:
    """Every limit is a prefix of the whole; a version keeps its records only."""
    clock = ManualClock(T0)
    engine = backend.engine(clock)
    engine.set_policy("bot", daily(100))
    for n, key in enumerate(["k0", "k1", None, "k0"]):  # the last one answered again
        amount = 1 if key == "k0" else n + 1
        engine.authorize(payment(amount * U, agent_id="kid", idempotency_key=key))
        clock.advance(timedelta(seconds=1))
    engine.set_policy("kid", daily(10, parent="bot"))
    engine.authorize(payment(1 * U, agent_id="kid"))
    engine.set_policy("kid", daily(20, parent="bot"))
    engine.authorize(payment(2 * U, agent_id="kid"))
    engine.authorize(payment(30 * U, agent_id="kid"))
    whole = backend.engine(clock).history("kid")
    assert [(h.event, h.code, h.policy_version) for h in whole] == [
        ("decision", Code.DAILY_LIMIT, 2),
        ("decision", Code.ALLOWED, 2),
        ("policy_set", None, 2),
        ("decision", Code.ALLOWED, 1),
        ("policy_set", None, 1),
        ("decision", Code.NO_POLICY, 0),
        ("decision", Code.NO_POLICY, 0),
        ("decision", Code.NO_POLICY, 0),
    ]
    assert [h.request.amount for h in whole[-3:]] == [3 * U, 2 * U, 1 * U]  # type: ignore[union-attr]
    for limit in range(1, len(whole) + 2):
        assert engine.history("kid", limit=limit) == whole[:limit]
    assert engine.history("kid", version=1) == [h for h in whole if h.policy_version == 1]
    assert engine.history("kid", version=2, limit=2) == whole[:2]
    assert engine.history("kid", version=3) == []


def test_a_full_denial_log_in_both_shards_is_listed_newest_first(backend: Backend) -> None:
    clock = ManualClock(T0)
    engine = backend.engine(clock, max_denials=3)
    engine.set_policy("bot", daily(100))
    for n in range(5):
        engine.authorize(payment((n + 1) * U, agent_id="kid", memo=f"own {n}"))
        clock.advance(timedelta(seconds=1))
    engine.delegate("bot", "kid", daily(1))
    for n in range(5):
        engine.authorize(payment((n + 2) * U, agent_id="kid", memo=f"tree {n}"))
        clock.advance(timedelta(seconds=1))
    memos = [memo for _, _, _, memo, _ in decisions(backend.engine(clock).history("kid"))]
    tree = [m for m in memos if m.startswith("tree")]
    own = [m for m in memos if m.startswith("own")]
    assert memos == tree + own  # every denial in the tree is newer than every one before it
    assert tree[:3] == ["tree 4", "tree 3", "tree 2"]
    assert own[:3] == ["own 4", "own 3", "own 2"]
    assert tree == sorted(tree, reverse=True)
    assert own == sorted(own, reverse=True)
    assert len(set(memos)) == len(memos)


# -- what memory and Redis answer against SQLite (one namespace: the reference) -------------------

STORES = ["sqlite", "memory", "redis"]
"""SQLite (one namespace) as the reference; memory and Redis keep shards apart."""


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    return served(request.param, tmp_path, request)


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_an_engine_a_second_behind_gets_the_answer_given_after_the_window(store: Backend) -> None:
    """At the window's end, two engines whose clocks differ by 2 s get one decision.

    The engine ahead decides the key anew in the tree (allowed, held); the
    engine behind, still inside the window by its clock, must answer the
    tree's newer entry, not the one the agent's own shard kept (``NO_POLICY``):
    on one shard (SQLite, or an agent never placed) the later entry replaces
    the earlier, and the engine behind answers it.
    """
    ahead, behind = ManualClock(T0), ManualClock(T0)
    engine, late = store.engine(ahead), store.engine(behind)
    engine.set_policy("bot", daily(100))
    ask = payment(5 * U, agent_id="kid", idempotency_key="k")
    engine.authorize(ask)
    engine.delegate("bot", "kid", daily(10))
    ahead.advance(DAY + timedelta(seconds=1))
    behind.advance(DAY - timedelta(seconds=1))
    anew = engine.authorize(ask)
    assert anew.code == Code.ALLOWED
    assert late.authorize(ask).reservation_id == anew.reservation_id


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_simulate_replays_the_payments_asked_before_the_placement(store: Backend) -> None:
    """Simulate replays what the agent was asked before it was placed, on every store.

    ``simulate`` replays "the recorded authorize requests of the agent": the
    two asked with no policy too (counted spent under the candidate), which
    memory and Redis keep in the agent's own shard.
    """
    clock = ManualClock(T0)
    engine = store.engine(clock)
    engine.set_policy("bot", daily(100))
    engine.authorize(payment(7 * U, agent_id="kid", idempotency_key="k0"))
    engine.authorize(payment(8 * U, agent_id="kid"))
    clock.advance(timedelta(minutes=1))
    engine.delegate("bot", "kid", daily(10))
    clock.advance(timedelta(minutes=1))
    engine.authorize(payment(3 * U, agent_id="kid"))
    assert len(engine.history("kid")) == 5  # the fix: history lists them on every store
    report = engine.simulate("kid", daily(50), since=timedelta(hours=1))
    assert (report.payments, report.live_codes) == (3, {"NO_POLICY": 2, "ALLOWED": 1})


def test_a_flagged_agent_pays_no_extra_read_once_its_keys_from_before_are_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once its keys from before are past their 24 hours, an agent's payments read no more.

    docs/budgets.md: once the newest key the agent's own shard keeps is past
    its window, nothing there can answer any more, so no keyed authorize
    reads ``i/AGENT/KEY`` in its own shard (a round trip on Redis).
    """
    from agentpolicy.ledger import flows
    from agentpolicy.storage import MemoryStorage

    clock = ManualClock(T0)
    storage = MemoryStorage()
    engine = PolicyEngine(storage, clock=clock)
    engine.set_policy("bot", daily(1000))
    engine.authorize(payment(U, agent_id="flagged", idempotency_key="once"))
    engine.delegate("bot", "flagged", daily(100))
    engine.delegate("bot", "plain", daily(100))
    clock.advance(3 * DAY)
    answered = flows._answer
    reads: list[str] = []

    def counting(store: Any, request: Any) -> Any:
        reads.append(request.shard)
        return answered(store, request)

    monkeypatch.setattr(flows, "_answer", counting)
    for agent in ("plain", "flagged"):
        fresh = PolicyEngine(storage, clock=clock)
        fresh.authorize(payment(U, agent_id=agent, idempotency_key="first"))  # reads once here
        reads.clear()
        for n in range(5):
            assert fresh.authorize(payment(U, agent_id=agent, idempotency_key=f"k{n}")).allowed
        assert reads == [], agent


# -- real processes paying while another places the agent -----------------------------------------

PAYERS = 3
SHARED_KEYS = 6  # s0..s3: one request every payer sends; s4, s5: each payer its own (conflicts)
TAIL = 12  # calls each payer makes once it knows the agent is placed
MOST = 400  # calls at most per payer (the placement is awaited, not assumed)


@pytest.fixture(scope="module")
def pool() -> Any:
    """Four processes for the module, forked from a server that imported this module once."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "agentpolicy.storage.redis"])
    with ctx.Manager() as manager, ctx.Pool(PAYERS + 1) as workers:
        yield manager, workers


def call_of(worker: int, n: int) -> tuple[str | None, int, str | None]:
    """The ``n``-th call of a payer: ``(key, amount, memo)``.

    By turns: a key of its own asked for the first time, a shared key, no
    key (a memo tells the call apart), its own key of three calls before again
    (as a dry run: :func:`ask_of`).
    """
    turn, round_ = n % 4, n // 4
    if turn == 0:
        return f"w{worker}-{round_}", U, None
    if turn == 1:
        s = round_ % SHARED_KEYS
        return f"s{s}", (U if s < 4 else U + worker + 1), None
    if turn == 2:
        return None, U, f"w{worker}-u{round_}"
    return f"w{worker}-{round_}", U, None  # asked as a dry run: the first decision again


def ask_of(worker: int, n: int) -> tuple[Any, bool]:
    """The request of a payer's ``n``-th call, and whether it is a dry run."""
    key, amount, memo = call_of(worker, n)
    return payment(amount, agent_id="kid", idempotency_key=key, memo=memo), n % 4 == 3


class _Payer:
    """What one payer's calls were answered, and when it stops: ``TAIL`` calls after the placement.

    Each call is ``(key, amount, memo, code or error code, reservation id, decided_at)``.
    """

    def __init__(self, started: Any, placed: Any) -> None:
        self.started, self.placed = started, placed
        self.seen: list[tuple[Any, ...]] = []
        self.left: int | None = None

    def answered(self, request: Any, d: Any) -> None:
        key, amount, memo = request.idempotency_key, request.amount, request.memo
        self.seen.append((key, amount, memo, d.code.value, d.reservation_id, d.decided_at))

    def refused(self, request: Any, err: ConflictError) -> None:
        key, amount, memo = request.idempotency_key, request.amount, request.memo
        self.seen.append((key, amount, memo, err.code.value, None, None))

    def go_on(self, n: int) -> bool:
        """After call ``n``: whether the payer makes another."""
        if n == 2:
            self.started.set()
        if self.left is None and self.placed.is_set():
            self.left = TAIL
        if self.left is not None:
            self.left -= 1
            return self.left != 0
        return True


def pay_while_placed(
    spec: tuple[str, str], worker: int, started: Any, placed: Any
) -> list[tuple[Any, ...]]:
    """Authorize kid's calls (:func:`call_of`) until ``TAIL`` calls after the placement.

    Returns ``(key, amount, memo, code or error code, reservation id, decided_at)``.
    """
    from agentpolicy.storage import open_storage

    engine = PolicyEngine(open_storage(spec[0], key_prefix=spec[1]), clock=ManualClock(T0))
    payer = _Payer(started, placed)
    for n in range(MOST):
        request, dry = ask_of(worker, n)
        try:
            payer.answered(request, engine.authorize(request, dry_run=dry))
        except ConflictError as err:
            payer.refused(request, err)
        if not payer.go_on(n):
            break
    engine.close()
    return payer.seen


def place_kid(spec: tuple[str, str], how: str, started: Any, placed: Any) -> str:
    """Once a payer has made its first calls, place kid below bot (delegate, or a policy)."""
    from agentpolicy.storage import open_storage

    engine = PolicyEngine(open_storage(spec[0], key_prefix=spec[1]), clock=ManualClock(T0))
    assert started.wait(30)
    if how == "delegate":
        engine.delegate("bot", "kid", daily(1000))
    else:
        engine.set_policy("kid", daily(1000, parent="bot"))
    placed.set()
    engine.close()
    return how


def check_race(engine: PolicyEngine, calls: list[list[tuple[Any, ...]]]) -> None:
    """One decision per key, the budgets count the distinct allowed, history lists each once."""
    by_key: dict[str, list[tuple[Any, ...]]] = {}
    for seen in calls:
        for key, amount, _, code, rid, at in seen:
            if key is not None:
                by_key.setdefault(key, []).append((amount, code, rid, at))
    allowed: dict[str, int] = {}
    for key, outcomes in by_key.items():
        decided = {o for o in outcomes if o[1] != "IDEMPOTENCY_CONFLICT"}
        assert len(decided) == 1, (key, decided)  # every call with the key: the same answer
        ((amount, code, rid, _),) = decided
        assert all(o[0] != amount for o in outcomes if o[1] == "IDEMPOTENCY_CONFLICT"), key
        if code == "ALLOWED":
            allowed[rid] = amount
    allowed.update({rid: amount for seen in calls for key, amount, _, code, rid, _ in seen
                    if key is None and code == "ALLOWED"})  # fmt: skip
    assert reserved(engine, "kid") == reserved(engine, "bot") == sum(allowed.values())
    for key, outcomes in by_key.items():  # a process that cached nothing answers the same
        ((amount, code, rid, at),) = {o for o in outcomes if o[1] != "IDEMPOTENCY_CONFLICT"}
        d = engine.authorize(payment(amount, agent_id="kid", idempotency_key=key))
        assert (d.code.value, d.reservation_id, d.decided_at) == (code, rid, at), key
    history = decisions(engine.history("kid", limit=10_000))
    keyed = [k for _, _, k, _, _ in history if k is not None]
    assert sorted(keyed) == sorted(by_key)  # each key decided once
    unkeyed = [(memo, code) for code, _, k, memo, _ in history if k is None]
    asked = [(memo, code) for seen in calls for k, _, memo, code, _, _ in seen if k is None]
    assert sorted(unkeyed) == sorted(asked)
    rids = [rid for *_, rid in history if rid is not None]
    assert sorted(rids) == sorted(allowed)
    codes = [code for code, *_ in history]  # newest first: the tree's, then the own shard's
    assert codes == sorted(codes, key=lambda c: c == Code.NO_POLICY)
    for worker, seen in enumerate(calls):  # each payer's first asks, in the order it made them
        firsts = [k or memo for n, (k, _, memo, *_) in enumerate(seen) if n % 4 in (0, 2)]
        listed = [k or memo for _, _, k, memo, _ in reversed(history)
                  if (k or memo or "").startswith(f"w{worker}-")]  # fmt: skip
        assert listed == firsts, worker


@pytest.mark.parametrize(
    ("name", "how"),
    [("redis", "delegate"), ("redis", "policy"), ("sqlite", "delegate"), ("sqlite", "policy"),
     ("redis-cluster", "delegate")],
)  # fmt: skip
def test_processes_paying_while_another_places_the_agent(
    name: str, how: str, pool: Any, request: pytest.FixtureRequest, tmp_path: Any
) -> None:

    manager, workers = pool
    backend = served(name, tmp_path, request)
    assert backend.spec is not None
    engine = backend.engine(ManualClock(T0))
    engine.set_policy("bot", daily(10_000))
    started, placed = manager.Event(), manager.Event()
    jobs = [workers.apply_async(pay_while_placed, (backend.spec, w, started, placed))
            for w in range(PAYERS)]  # fmt: skip
    placer = workers.apply_async(place_kid, (backend.spec, how, started, placed))
    calls = [job.get(60) for job in jobs]
    assert placer.get(60) == how
    codes = {code for seen in calls for *_, code, _, _ in [s[:6] for s in seen]}
    assert {"NO_POLICY", "ALLOWED"} <= codes  # the placement landed among the calls
    check_race(backend.engine(ManualClock(T0)), calls)


# -- the async engine: payers as tasks, on native Redis and on memory (threads) -------------------


async def _pay_as_a_task(aengine: Any, worker: int, started: Any, placed: Any) -> list[Any]:
    """:func:`pay_while_placed`, awaited on an :class:`~agentpolicy.AsyncPolicyEngine`."""
    payer = _Payer(started, placed)
    for n in range(MOST):
        request, dry = ask_of(worker, n)
        try:
            payer.answered(request, await aengine.authorize(request, dry_run=dry))
        except ConflictError as err:
            payer.refused(request, err)
        if not payer.go_on(n):
            break
    return payer.seen


@pytest.mark.parametrize("name", ["redis", "memory"])
def test_tasks_of_an_async_engine_paying_while_another_places_the_agent(
    name: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    import asyncio

    from agentpolicy import AsyncPolicyEngine
    from agentpolicy.storage import MemoryStorage, open_async_storage, open_storage

    if name == "memory":
        shared = MemoryStorage()
        engines = [AsyncPolicyEngine(shared, ManualClock(T0)) for _ in range(2)]
        check = PolicyEngine(shared, clock=ManualClock(T0))
    else:
        backend = served(name, tmp_path, request)
        assert backend.spec is not None
        url, prefix = backend.spec
        engines = [
            AsyncPolicyEngine(open_storage(url, key_prefix=prefix), ManualClock(T0),
                              async_storage=open_async_storage(url, key_prefix=prefix))
            for _ in range(2)
        ]  # fmt: skip
        assert all(e.native for e in engines)
        check = backend.engine(ManualClock(T0))

    async def race() -> list[list[Any]]:
        started, placed = asyncio.Event(), asyncio.Event()
        payer, admin = engines
        await admin.set_policy("bot", daily(10_000))

        async def place() -> None:
            await started.wait()
            await admin.delegate("bot", "kid", daily(1000))
            placed.set()

        try:
            placer = asyncio.create_task(place())
            found = await asyncio.gather(
                *(_pay_as_a_task(payer, w, started, placed) for w in range(PAYERS))
            )
            await placer
        finally:
            for e in engines:
                await e.close()
        return list(found)

    calls = asyncio.run(race())
    check_race(check, calls)


# -- a Redis Cluster: the agent's own slot and its tree's on different nodes ----------------------


def test_on_a_cluster_the_own_and_the_tree_slots_are_on_different_nodes(
    request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    """The premise of the cluster runs above (bot's and kid's slots), and the answers across nodes."""
    import redis

    backend = served("redis-cluster", tmp_path, request)
    assert backend.spec is not None
    url, prefix = backend.spec
    host, port = url.removeprefix("redis+cluster://").split(":")
    client = redis.RedisCluster(host=host, port=int(port))
    try:
        nodes = {a: client.get_node_from_key(f"{prefix}{{{a}}}:t/kid").name  # type: ignore[no-untyped-call]
                 for a in ("bot", "kid")}  # fmt: skip
    finally:
        client.close()
    assert nodes["bot"] != nodes["kid"], nodes
    clock = ManualClock(T0)
    engine = backend.engine(clock)
    engine.set_policy("bot", daily(100))
    first = engine.authorize(payment(2 * U, agent_id="kid", idempotency_key="k"))
    engine.authorize(payment(3 * U, agent_id="kid"))
    engine.set_policy("kid", daily(10, parent="bot"))
    paid = engine.authorize(payment(4 * U, agent_id="kid", idempotency_key="p"))
    fresh = backend.engine(clock)
    assert answer(fresh.authorize(payment(2 * U, agent_id="kid", idempotency_key="k"))) == (
        answer(first)
    )
    assert answer(fresh.authorize(payment(4 * U, agent_id="kid", idempotency_key="p"))) == (
        answer(paid)
    )
    assert [(c, a) for c, a, *_ in decisions(fresh.history("kid"))] == [
        (Code.ALLOWED, 4 * U),
        (Code.NO_POLICY, 3 * U),
        (Code.NO_POLICY, 2 * U),
    ]
    assert reserved(fresh, "bot") == 4 * U
