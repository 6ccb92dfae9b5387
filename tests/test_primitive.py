"""The storage primitive itself, on every store: what a new store must do (docs/storage.md).

The ``backend`` fixture here adds the async stores (``AsyncRedisStorage`` on
Redis and Redis Cluster, ``AsyncPostgresStorage``), each awaited through
blocking calls, so every test below checks them too.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentpolicy.storage import MemoryStorage, SQLiteStorage
from agentpolicy.storage.base import NEXT_SEQ, OP_KEEP_US, Encoded, Storage, Txn, dumps
from tests.backends import ASYNC_BACKENDS, BACKENDS, Backend, serve

AT = 1_768_816_800_000_000  # 2026-01-19T10:00Z in microseconds


def txn(op: str, **parts: Any) -> Txn:
    t = Txn(op, parts.pop("at", AT))
    for name, value in parts.items():
        setattr(t, name, value)
    return t


def commit(storage: Storage, t: Txn, shard: str = "s1") -> Any:
    with storage.session(shard) as session:
        return session.commit(t)


def read(storage: Storage, names: list[str], shard: str = "s1") -> dict[str, Any]:
    with storage.session(shard, write=False) as session:
        return session.get(names)


@pytest.fixture(params=BACKENDS + ASYNC_BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from serve(request.param, tmp_path, request)


def test_a_commit_writes_documents_and_counts_versions(backend: Backend) -> None:
    storage = backend.handle()
    assert commit(storage, txn("op1", put={"d/a": {"n": 1}, "d/b": {"n": 2}}, result=7)).applied
    assert read(storage, ["d/a", "d/b", "d/c"]) == {"d/a": (1, {"n": 1}), "d/b": (1, {"n": 2})}
    assert commit(storage, txn("op2", expect={"d/a": 1}, put={"d/a": {"n": 3}})).applied
    assert read(storage, ["d/a"]) == {"d/a": (2, {"n": 3})}
    assert commit(storage, txn("op3", delete=["d/b"])).applied
    assert read(storage, ["d/b"]) == {}


def test_a_stale_expectation_writes_nothing(backend: Backend) -> None:
    storage = backend.handle()
    commit(storage, txn("op1", put={"d/a": {"n": 1}}))
    stale = txn("op2", expect={"d/a": 0, "d/z": 0}, put={"d/a": {"n": 9}, "d/y": {}},
                index=[("ix", "m", 5)], append=[("log", {"e": 1}, None, None)])  # fmt: skip
    outcome = commit(storage, stale)
    assert outcome.conflict
    assert read(storage, ["d/a", "d/y"]) == {"d/a": (1, {"n": 1})}
    with storage.session("s1", write=False) as session:
        assert session.scan("ix", 10**18, 10) == []
    assert storage.log("s1", "log", 10) == []


def test_the_same_operation_id_applies_once_and_answers_its_first_result(
    backend: Backend,
) -> None:
    storage = backend.handle()
    first = txn("op1", put={"d/a": {"n": 1}}, append=[("log", {"e": 1}, None, None)],
                result={"answer": 42})  # fmt: skip
    assert commit(storage, first).result == {"answer": 42}
    again = txn("op1", put={"d/a": {"n": 2}}, append=[("log", {"e": 2}, None, None)],
                result={"answer": 0})  # fmt: skip
    outcome = commit(storage, again)
    assert (outcome.applied, outcome.replayed, outcome.result) == (False, True, {"answer": 42})
    assert read(storage, ["d/a"]) == {"d/a": (1, {"n": 1})}
    assert [e[2] for e in storage.log("s1", "log", 10)] == [{"e": 1}]


def test_indexes_scan_by_score_and_take_the_next_sequence_number(backend: Backend) -> None:
    storage = backend.handle()
    commit(storage, txn("op1", index=[("ix", "b", 20), ("ix", "a", 10), ("ix", "c", 30),
                                      ("q", "x", NEXT_SEQ), ("q", "y", NEXT_SEQ)]))  # fmt: skip
    commit(storage, txn("op2", index=[("ix", "c", None), ("ix", "a", 25)]))
    with storage.session("s1", write=False) as session:
        assert session.scan("ix", 100, 10) == [("b", 20), ("a", 25)]
        assert session.scan("ix", 20, 10) == [("b", 20)]
        assert session.scan("ix", 100, 1) == [("b", 20)]
        (x, sx), (y, sy) = session.scan("q", 2**62, 10)
    assert (x, y) == ("x", "y")
    assert sx < sy


def test_logs_keep_order_and_trim_by_length_and_age(backend: Backend) -> None:
    storage = backend.handle()
    for i in range(200):
        commit(storage, txn(f"op{i}", at=AT + i, append=[("capped", {"i": i}, None, 10),
                                                          ("aged", {"i": i}, AT + 150, None)]))  # fmt: skip
    capped = storage.log("s1", "capped", 1000)
    assert [e[2]["i"] for e in capped][:10] == list(range(199, 189, -1))
    assert len(capped) <= 10 + 64  # SQL stores trim every 64 appends
    aged = storage.log("s1", "aged", 1000)
    assert [e[2]["i"] for e in aged][:50] == list(range(199, 149, -1))
    assert all(e[1] >= AT + 150 - 64 for e in aged)
    seqs = [e[0] for e in capped]
    assert seqs == sorted(seqs, reverse=True)


def test_global_indexes_are_shared_by_every_shard(backend: Backend) -> None:
    storage = backend.handle()
    commit(storage, txn("op1", index=[("@everyone", "s1", 1)]), shard="s1")
    commit(storage, txn("op2", index=[("@everyone", "s2", 2)]), shard="s2")
    with storage.session("@", write=False) as session:
        assert session.scan("@everyone", 10, 10) == [("s1", 1), ("s2", 2)]


@pytest.mark.parametrize("kind", ["memory"])
def test_memory_forgets_documents_after_their_ttl(kind: str) -> None:
    storage = MemoryStorage()
    commit(storage, txn("op1", put={"d/a": {}, "d/b": {}}, ttl={"d/a": 1000}))
    commit(storage, txn("op2", at=AT + 999_999))
    assert set(read(storage, ["d/a", "d/b"])) == {"d/a", "d/b"}
    commit(storage, txn("op3", at=AT + 1_000_000))
    assert set(read(storage, ["d/a", "d/b"])) == {"d/b"}


def test_memory_expiry_looks_at_only_what_is_due_among_14000_open_reservations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from datetime import timedelta

    from agentpolicy import PolicyEngine
    from agentpolicy.storage import memory
    from agentpolicy.testing import ManualClock, payment

    clock = ManualClock()
    engine = PolicyEngine(storage=MemoryStorage(), clock=clock, reservation_ttl=timedelta(hours=1))
    engine.set_policy("agent-1", {})
    for _ in range(14_000):
        engine.authorize(payment(1))
        clock.advance(milliseconds=1)
    popped: list[Any] = []
    real_pop = heapq.heappop

    def counting_pop(heap: list[Any]) -> Any:
        popped.append(1)
        return real_pop(heap)

    monkeypatch.setattr(memory.heapq, "heappop", counting_pop)
    for _ in range(100):  # nothing due: no entry looked at
        engine.authorize(payment(1))
    assert popped == []
    clock.set(clock.now - timedelta(milliseconds=14_000) + timedelta(hours=1, milliseconds=10))
    engine.authorize(payment(1))  # the first ten or so are due now
    assert 10 <= len(popped) <= 2 * 13  # the due ones, and the next one: O(k log n)
    assert len(engine.sweep().reservations) == 0


# -- the runner under contention -------------------------------------------------------------


class Contended(MemoryStorage):
    """A store whose first ``losses`` commits conflict, as if another engine always won."""

    def __init__(self, losses: int) -> None:
        super().__init__()
        self.losses = losses
        self.commits = 0

    def session(self, shard: str, *, write: bool = True) -> Any:
        outer = self
        inner = super().session(shard, write=write)

        class Losing:
            def __enter__(self) -> Any:
                session = inner.__enter__()

                class Wrapped:
                    fresh = session.fresh
                    get = session.get
                    scan = session.scan

                    def commit(self, t: Txn) -> Any:
                        outer.commits += 1
                        if outer.commits <= outer.losses:
                            from agentpolicy.storage.base import CONFLICT

                            return CONFLICT
                        return session.commit(t)

                return Wrapped()

            def __exit__(self, *exc: object) -> Any:
                return inner.__exit__(*exc)

        return Losing()


def _write_step(view: Any, t: Txn) -> None:
    view.read(["d"])
    t.put["d"] = {"n": 1}
    t.result = "done"


def test_a_commit_that_keeps_losing_retries_past_the_attempt_count_until_the_time_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agentpolicy.ledger import runner

    monkeypatch.setattr(runner, "_BACKOFF_BASE", 0.0)
    storage = Contended(losses=runner.MAX_ATTEMPTS + 50)  # starved past the attempt count
    assert runner.run(storage, "s1", _write_step, str, at=AT) == "done"
    assert storage.commits == runner.MAX_ATTEMPTS + 51
    assert read(storage, ["d"]) == {"d": (1, {"n": 1})}


def test_contention_past_both_bounds_fails_closed_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agentpolicy.errors import StorageUnavailableError
    from agentpolicy.ledger import runner

    monkeypatch.setattr(runner, "_BACKOFF_BASE", 0.0)
    monkeypatch.setattr(runner, "RETRY_SECONDS", 0.0)
    storage = Contended(losses=10**9)
    with pytest.raises(StorageUnavailableError, match="too busy for 100 attempts"):
        runner.run(storage, "s1", _write_step, str, at=AT)
    assert storage.commits == runner.MAX_ATTEMPTS
    assert read(storage, ["d"]) == {}


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    bodies=st.lists(st.dictionaries(st.text(max_size=5), _json, max_size=4), max_size=3),
    entries=st.lists(st.dictionaries(st.text(max_size=5), _json, max_size=4), max_size=3),
    picks=st.lists(st.tuples(st.text(max_size=5), st.integers(0, 9), _json), max_size=4),
    plain=st.booleans(),
)
def test_a_transaction_is_encoded_as_dumps_writes_each_part(
    bodies: list[dict[str, Any]],
    entries: list[dict[str, Any]],
    picks: list[tuple[str, int, Any]],
    plain: bool,
) -> None:
    # a result holding the very documents and entries of its transaction reuses their text;
    # every text is the one dumps writes
    txn = Txn("op", 1)
    for i, body in enumerate(bodies):
        txn.put[f"d{i}"] = body
    for entry in entries:
        txn.append.append(("log", entry, None, None))
    held = [*bodies, *entries]
    result: Any = {k: held[i % len(held)] if held and i < 7 else v for k, i, v in picks}
    txn.result = picks[0][2] if plain and picks else result
    text = Encoded(txn)
    assert text.result == dumps(txn.result)
    assert text.put == {name: dumps(body) for name, body in txn.put.items()}
    assert text.append == [dumps(entry) for entry in entries]


def test_memory_forgets_operation_ids_a_day_old_and_keeps_the_rest() -> None:
    storage = MemoryStorage()
    commit(storage, txn("old", at=AT, result=1))
    commit(storage, txn("mid", at=AT + 10, result=2))
    later = AT + OP_KEEP_US + 5
    assert commit(storage, txn("new", at=later, result=3)).applied
    assert commit(storage, txn("old", at=later, result=4)).applied  # forgotten: applied anew
    replay = commit(storage, txn("mid", at=later, result=5))
    assert (replay.replayed, replay.result) == (True, 2)  # within its day: answered again
    hour = 3_600_000_000
    for i in range(200):  # one commit an hour: a day's worth are remembered, no more
        commit(storage, txn(f"h{i}", at=later + i * hour))
    assert 24 <= len(storage._shards["s1"].ops) <= 25


def test_a_result_with_keys_that_are_not_strings_is_encoded_as_dumps_writes_it() -> None:
    body = {"n": 1}
    txn = Txn("op", 1)
    txn.put["d"] = body
    for result in ({1: body}, {None: body, "x": body}, {2.5: body}):
        txn.result = result
        assert Encoded(txn).result == dumps(result)
    txn.result = {(1, 2): body}
    with pytest.raises(TypeError):
        Encoded(txn)


def test_sqlite_reads_back_what_another_process_wrote_not_its_own_last_text(
    tmp_path: Path,
) -> None:
    # a storage object keeps the text and value of what it wrote last, and takes the value
    # only when the file holds that very text
    mine, theirs = SQLiteStorage(tmp_path / "s.db"), SQLiteStorage(tmp_path / "s.db")
    try:
        commit(mine, txn("op1", put={"d/a": {"n": 1}, "d/b": {"n": 2}}))
        assert read(mine, ["d/a"]) == {"d/a": (1, {"n": 1})}
        commit(theirs, txn("op2", put={"d/a": {"n": 9}}))
        assert read(mine, ["d/a", "d/b"]) == {"d/a": (2, {"n": 9}), "d/b": (1, {"n": 2})}
        commit(theirs, txn("op3", delete=["d/b"]))
        commit(theirs, txn("op4", put={"d/b": {"n": 2}}))  # the same text again, anew
        assert read(mine, ["d/b"]) == {"d/b": (1, {"n": 2})}
        for i in range(5000):
            commit(mine, txn(f"w{i}", put={f"d/{i}": {"i": i}}))
        assert len(mine._written) <= 4096
        assert read(mine, ["d/4999", "d/0"]) == {"d/4999": (1, {"i": 4999}), "d/0": (1, {"i": 0})}
    finally:
        mine.close()
        theirs.close()


def test_memory_trims_logs_exactly_and_reads_them_newest_first() -> None:
    # a memory log is flat (sequence number, time, entry, ...): every read and trim must keep
    # the three of each entry together
    storage = MemoryStorage()
    for i in range(30):
        commit(storage, txn(f"op{i}", at=AT + i, append=[("capped", {"i": i}, None, 10),
                                                         ("aged", {"i": i}, AT + i - 5, None),
                                                         ("both", {"i": i}, AT + i - 5, 3)]))  # fmt: skip
    capped = storage.log("s1", "capped", 1000)
    assert [(e[1], e[2]) for e in capped] == [(AT + i, {"i": i}) for i in range(29, 19, -1)]
    assert [e[0] for e in capped] == sorted((e[0] for e in capped), reverse=True)
    assert [e[2]["i"] for e in storage.log("s1", "aged", 1000)] == list(range(29, 23, -1))
    assert [e[2]["i"] for e in storage.log("s1", "both", 1000)] == [29, 28, 27]
    assert [e[2]["i"] for e in storage.log("s1", "capped", 4)] == [29, 28, 27, 26]
    assert storage.log("s1", "capped", 0) == []
    assert storage.log("s1", "none", 5) == []
