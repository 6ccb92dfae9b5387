"""PostgreSQL storage beyond the contract suite: URLs, schemas, locks, lost commits, outages."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agentpolicy import (
    ErrorCode,
    PolicyEngine,
    PolicyError,
    PolicyValidationError,
    ReservationStatus,
    Storage,
    open_storage,
)
from agentpolicy.config import read_settings, with_overrides
from agentpolicy.storage import postgres
from agentpolicy.storage._pg_url import split_postgres_url
from agentpolicy.storage.base import Txn
from agentpolicy.storage.postgres import SCHEMA_VERSION, PostgresStorage
from agentpolicy.testing import ManualClock, payment
from tests import workers
from tests.postgres_servers import PostgresServer, drop_schema, with_schema
from tests.redis_servers import free_port
from tests.skew import a_key_retried_after_housekeeping_ahead_answers_once

ROOT = Path(__file__).resolve().parent.parent
USDT = 1_000_000
DAILY_100 = {"limits": {"daily": {"value": str(100 * USDT)}}}
AT = 1_768_816_800_000_000  # 2026-01-19T10:00Z in microseconds


def schema_of(url: str) -> str:
    return split_postgres_url(url)[1]


def sql(url: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on the server, outside agentpolicy (the schema is the URL's)."""
    base, schema = split_postgres_url(url)
    with psycopg.connect(base, autocommit=True) as conn:
        cur = conn.execute(query.replace("@s", f'"{schema}"'), params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def used(engine: PolicyEngine, agent: str = "agent-1") -> tuple[int, int]:
    window = next(iter(engine.budget(agent, "daily").periods.values()))
    return window.spent.value, window.reserved.value


@pytest.fixture
def storage(pg_schema: str) -> Iterator[PostgresStorage]:
    s = PostgresStorage(pg_schema)
    yield s
    s.close()


# -- URLs and configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "conninfo", "schema"),
    [
        ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db", "agentpolicy"),
        ("postgres://u@h/db?schema=tenant_1", "postgres://u@h/db", "tenant_1"),
        (
            "postgresql://u@h/db?sslmode=require&schema=Other&options=-c%20x",
            "postgresql://u@h/db?sslmode=require&options=-c%20x",
            "Other",
        ),
        (
            "postgresql://u:p%40ss@h1:5432,h2:5433/db?schema=_s",
            "postgresql://u:p%40ss@h1:5432,h2:5433/db",
            "_s",
        ),
    ],
)
def test_the_schema_parameter_is_taken_out_and_everything_else_kept(
    url: str, conninfo: str, schema: str
) -> None:
    assert split_postgres_url(url) == (conninfo, schema)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://h/db?schema=",
        "postgresql://h/db?schema=has-dash",
        "postgresql://h/db?schema=1starts_with_digit",
        "postgresql://h/db?schema=pg_catalog",
        "postgresql://h/db?schema=a%22b",
        "postgresql://h/db?schema=" + "x" * 64,
        "postgresql://h/db?schema=a&schema=b",
        "mysql://h/db",
    ],
)
def test_bad_urls_are_refused_before_anything_connects(url: str) -> None:
    with pytest.raises(PolicyValidationError) as err:
        open_storage(url)
    assert err.value.code == ErrorCode.INVALID_INPUT


def test_a_url_libpq_cannot_read_is_refused_without_showing_its_password() -> None:
    with pytest.raises(PolicyValidationError) as err:
        PostgresStorage("postgresql://u:hunter2@h/db?nosuchparam=1")
    assert "hunter2" not in err.value.message
    assert "libpq" in err.value.message


def test_both_schemes_open_a_postgres_storage_and_nothing_connects_yet() -> None:
    for url in (f"postgresql://u:p@127.0.0.1:{free_port()}/db", "postgres://u@127.0.0.1/db"):
        storage = open_storage(url)
        assert isinstance(storage, PostgresStorage)
        assert storage.schema == "agentpolicy"
        storage.close()


def test_without_the_extra_the_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.delitem(sys.modules, "agentpolicy.storage.postgres")
    with pytest.raises(PolicyError) as err:
        open_storage("postgresql://u@h/db")
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "agentpolicy[postgres]" in err.value.message


def test_settings_read_the_url_and_postgres_wins_over_redis_and_the_db() -> None:
    url = "postgresql://app:hunter2@db.example:5432/ledger?schema=pay"
    both = read_settings({"AGENT_POLICY_POSTGRES_URL": url,
                          "AGENT_POLICY_REDIS_URL": "redis://h:1/0", "AGENT_POLICY_DB": "x.db"})  # fmt: skip
    assert both.storage_url(fallback_to_file=True) == url
    assert both.sqlite_path(fallback_to_file=True) is None
    shown = both.shown_storage_url(fallback_to_file=True)
    assert shown is not None
    assert "hunter2" not in shown
    assert shown.startswith("postgresql://app:***@db.example:5432/ledger")
    # a command line's store replaces every store of the environment; --postgres-url wins
    assert with_overrides(both, redis_url="redis://o:2/0").storage_url(
        fallback_to_file=True) == "redis://o:2/0"  # fmt: skip
    db = with_overrides(both, db="/tmp/cli.db")
    assert db.storage_url(fallback_to_file=True) == "sqlite:////tmp/cli.db"
    flags = with_overrides(read_settings({}), db="/tmp/x.db", redis_url="redis://o:2/0",
                           postgres_url="postgres://h/d")  # fmt: skip
    assert flags.storage_url(fallback_to_file=True) == "postgres://h/d"


@pytest.mark.parametrize("value", ["mysql://h/db", "postgresql://h/db?schema=bad-name"])
def test_a_bad_postgres_url_in_the_environment_names_the_variable(value: str) -> None:
    with pytest.raises(PolicyValidationError) as err:
        read_settings({"AGENT_POLICY_POSTGRES_URL": value})
    assert err.value.problems[0].path == "$AGENT_POLICY_POSTGRES_URL"
    with pytest.raises(PolicyValidationError) as flag:
        with_overrides(read_settings({}), postgres_url=value)
    assert flag.value.problems[0].path == "$.postgresUrl"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_POLICY_")}
    exe = str(Path(sys.executable).with_name("agentpolicy"))
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=60, env={**clean, **(env or {})},
        check=False,
    )  # fmt: skip


def test_the_cli_and_the_mcp_server_use_postgres(pg_schema: str, tmp_path: Path) -> None:
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps(DAILY_100))
    done = run_cli("--postgres-url", pg_schema, "policy", "set", "agent-1", str(policy))
    assert done.returncode == 0, done.stderr
    env = {"AGENT_POLICY_POSTGRES_URL": pg_schema, "AGENT_POLICY_DB": str(tmp_path / "no.db")}
    shown = run_cli("--json", "budget", "agent-1", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["agentId"] == "agent-1"
    assert not (tmp_path / "no.db").exists()  # PostgreSQL won over the DB file
    where = json.loads(run_cli("--json", "where", env=env).stdout)
    assert where["storage"].startswith("postgresql://")
    assert where["sqlitePath"] is None
    assert where["keyPrefix"] is None
    from agentpolicy.mcp import AgentPolicyMcpServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AGENT_POLICY_POSTGRES_URL", pg_schema)
        server = AgentPolicyMcpServer(role="agent")
        assert server.call("agent_policy_get", {"agentId": "agent-1"})["data"]["version"] == 1
        server.close()


def test_the_cli_says_in_one_line_that_a_down_server_is_unavailable() -> None:
    url = f"postgresql://u:hunter2@127.0.0.1:{free_port()}/db"
    started = time.monotonic()
    done = run_cli("--postgres-url", url, "budget", "agent-1")
    assert time.monotonic() - started < 20
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # no traceback, no pool warnings
    assert lines[0].startswith(
        "agentpolicy: STORAGE_UNAVAILABLE: PostgreSQL at postgresql://u:***@"
    )
    assert "hunter2" not in done.stderr


# -- schemas, layout versions, upgrades -----------------------------------------------------------


def test_two_schemas_in_one_database_are_independent_stores(postgres_url: str) -> None:
    a, b = (f"t_{uuid.uuid4().hex[:16]}" for _ in range(2))
    try:
        one = PolicyEngine(storage=open_storage(with_schema(postgres_url, a)), clock=ManualClock())
        two = PolicyEngine(storage=open_storage(with_schema(postgres_url, b)), clock=ManualClock())
        one.set_policy("agent-1", DAILY_100)
        two.set_policy("agent-1", {"limits": {"daily": {"value": str(5 * USDT)}}})
        assert one.authorize(payment(50 * USDT)).allowed
        assert two.authorize(payment(50 * USDT)).code == "DAILY_LIMIT"
        assert used(one) == (0, 50 * USDT)
        assert used(two) == (0, 0)
        one.close()
        two.close()
    finally:
        drop_schema(postgres_url, a)
        drop_schema(postgres_url, b)


def test_the_tables_are_created_on_first_use_with_their_layout_version(pg_schema: str) -> None:
    storage = PostgresStorage(pg_schema)
    assert sql(pg_schema, "SELECT to_regnamespace(%s)", (schema_of(pg_schema),)) == [(None,)]
    with storage.session("s1") as session:
        assert session.get(["d/a"]) == {}
    assert sql(pg_schema, "SELECT version FROM @s.schema_version") == [(SCHEMA_VERSION,)]
    tables = {r[0] for r in sql(pg_schema, "SELECT tablename FROM pg_tables WHERE schemaname = %s",
                                (schema_of(pg_schema),))}  # fmt: skip
    assert tables == {"schema_version", "shards", "docs", "idx", "logs", "ops"}
    storage.close()


def test_processes_opening_a_fresh_schema_at_once_all_succeed(pg_schema: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    n = 4
    barrier = ctx.Manager().Barrier(n)
    with ctx.Pool(n) as pool:
        versions = pool.starmap(
            workers.open_fresh, [((pg_schema, ""), f"agent-{i}", barrier) for i in range(n)]
        )
    assert versions == [1] * n
    assert sql(pg_schema, "SELECT version FROM @s.schema_version") == [(SCHEMA_VERSION,)]


def _store_with_a_payment(url: str) -> str:
    engine = PolicyEngine(storage=PostgresStorage(url), clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    rid = engine.authorize(payment(10 * USDT)).reservation_id
    assert rid is not None
    engine.confirm(rid)
    engine.close()
    return rid


def test_an_older_layout_is_upgraded_when_opened_and_keeps_its_data(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rid = _store_with_a_payment(pg_schema)  # layout version 1
    monkeypatch.setattr(postgres, "SCHEMA_VERSION", 2)  # a later agentpolicy with layout 2
    monkeypatch.setattr(postgres, "_UPGRADES", {1: ("ALTER TABLE @s.docs ADD COLUMN note text",)})
    engine = PolicyEngine(storage=PostgresStorage(pg_schema), clock=ManualClock())
    assert engine.get_reservation(rid).status is ReservationStatus.CONFIRMED
    assert used(engine) == (10 * USDT, 0)
    assert engine.authorize(payment(USDT)).allowed
    engine.close()
    assert sql(pg_schema, "SELECT version FROM @s.schema_version") == [(2,)]
    columns = sql(pg_schema, "SELECT column_name FROM information_schema.columns WHERE "
                  "table_schema = %s AND table_name = 'docs'", (schema_of(pg_schema),))  # fmt: skip
    assert ("note",) in columns


def test_an_upgrade_that_fails_halfway_changes_nothing(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rid = _store_with_a_payment(pg_schema)
    monkeypatch.setattr(postgres, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(postgres, "_UPGRADES", {1: (
        "ALTER TABLE @s.docs ADD COLUMN note text", "SELECT no_such_function()")})  # fmt: skip
    engine = PolicyEngine(storage=PostgresStorage(pg_schema), clock=ManualClock())
    with pytest.raises(PolicyError):
        engine.get_reservation(rid)
    engine.close()
    assert sql(pg_schema, "SELECT version FROM @s.schema_version") == [(1,)]
    columns = sql(pg_schema, "SELECT column_name FROM information_schema.columns WHERE "
                  "table_schema = %s AND table_name = 'docs'", (schema_of(pg_schema),))  # fmt: skip
    assert ("note",) not in columns
    monkeypatch.undo()
    with PolicyEngine(storage=PostgresStorage(pg_schema), clock=ManualClock()) as engine:
        assert engine.get_reservation(rid).status is ReservationStatus.CONFIRMED


def test_a_newer_layout_is_refused_and_left_alone(pg_schema: str) -> None:
    _store_with_a_payment(pg_schema)
    sql(pg_schema, "UPDATE @s.schema_version SET version = 99")
    engine = PolicyEngine(storage=PostgresStorage(pg_schema), clock=ManualClock())
    with pytest.raises(PolicyError) as err:
        engine.authorize(payment(USDT))
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "upgrade agentpolicy" in err.value.message
    assert "99" in err.value.message
    engine.close()
    assert sql(pg_schema, "SELECT version FROM @s.schema_version") == [(99,)]


# -- locks, conflicts, replays --------------------------------------------------------------------


def _finishes_while_agent_1_is_held(url: str, agent: str) -> bool:
    holder_storage = PostgresStorage(url)
    engine = PolicyEngine(storage=PostgresStorage(url), clock=ManualClock(workers.FIXED_NOW))
    engine.set_policy("agent-1", DAILY_100)
    engine.set_policy("agent-2", DAILY_100)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with holder_storage.session("agent-1") as session:
            session.get(["h/agent-1"])  # takes agent-1's lock
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(30)
    done: list[bool] = []
    other = threading.Thread(target=lambda: done.append(engine.authorize(
        payment(USDT, agent_id=agent)).allowed))  # fmt: skip
    other.start()
    # real time: a call that waits is still waiting after 3 s; one that does not wait ends
    # however busy the host is (waited for up to 30 s, well within the 60 s hold)
    other.join(30 if agent != "agent-1" else 3)
    finished = not other.is_alive()
    release.set()
    holder.join()
    other.join()
    assert done == [True]  # and once the lock is let go, it goes through
    engine.close()
    holder_storage.close()
    return finished


def test_two_agents_never_wait_on_each_others_lock(pg_schema: str) -> None:
    assert _finishes_while_agent_1_is_held(pg_schema, "agent-2")


def test_the_same_agent_waits_for_the_lock(pg_schema: str) -> None:
    assert not _finishes_while_agent_1_is_held(pg_schema, "agent-1")


def test_a_read_only_session_that_commits_after_a_change_conflicts(
    storage: PostgresStorage, pg_schema: str
) -> None:
    first = Txn("op1", AT)
    first.put = {"d/a": {"n": 1}}
    with storage.session("s1") as session:
        assert session.commit(first).applied
    other = PostgresStorage(pg_schema)
    with storage.session("s1", write=False) as session:
        assert session.get(["d/a", "d/new"]) == {"d/a": (1, {"n": 1})}
        change = Txn("op2", AT)
        change.put = {"d/a": {"n": 2}, "d/new": {"by": "other"}}  # inserts a document read absent
        with other.session("s1") as writer:
            assert writer.commit(change).applied
        stale = Txn("op3", AT)
        stale.expect = {"d/a": 1, "d/new": 0}
        stale.put = {"d/a": {"n": 9}, "d/new": {"by": "me"}}
        outcome = session.commit(stale)
    assert outcome.conflict  # a conflict, not a unique violation, and nothing written
    with storage.session("s1", write=False) as session:
        assert session.get(["d/a", "d/new"]) == {
            "d/a": (2, {"n": 2}),
            "d/new": (1, {"by": "other"}),
        }
    other.close()


def test_a_deadlock_is_rolled_back_and_the_commit_tried_again(
    storage: PostgresStorage, pg_schema: str
) -> None:
    seed = Txn("op1", AT)
    seed.put = {"d/x": {"v": 1}, "d/a": {"v": 1}}
    with storage.session("s1") as session:
        session.commit(seed)
    base = split_postgres_url(pg_schema)[0]
    q = f'"{schema_of(pg_schema)}"'
    other = psycopg.connect(base)  # a foreign session: locks d/x, then wants the shard's row
    other.execute(f"UPDATE {q}.docs SET version = version + 1 WHERE name = 'd/x'")  # type: ignore[arg-type]
    outcome: list[Any] = []

    def commit() -> None:
        with storage.session("s1") as session:
            session.get(["d/a"])  # holds the shard's row
            txn = Txn("op2", AT)
            txn.expect = {"d/a": 1}
            txn.put = {"d/x": {"v": "mine"}}
            outcome.append(session.commit(txn))  # waits for d/x: first in the cycle

    ours = threading.Thread(target=commit)
    ours.start()
    probe = psycopg.connect(base, autocommit=True)
    deadline = time.monotonic() + 30  # real time: until our commit waits on d/x
    while True:
        waiting = probe.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                                "'Lock' AND application_name = 'agentpolicy'").fetchone()  # fmt: skip
        if waiting and waiting[0]:
            break
        assert time.monotonic() < deadline, "our commit never waited on d/x"
        time.sleep(0.02)
    probe.close()
    # closes the cycle: the server aborts our commit (it waited first) with a deadlock
    other.execute(f"SELECT 1 FROM {q}.shards WHERE shard = 's1' FOR UPDATE")  # type: ignore[arg-type]
    other.commit()
    other.close()
    ours.join(30)
    assert len(outcome) == 1
    assert outcome[0].applied
    with storage.session("s1", write=False) as session:
        assert session.get(["d/x"]) == {"d/x": (3, {"v": "mine"})}


def _lose_the_answer(monkeypatch: pytest.MonkeyPatch, *, before: bool, times: int = 1) -> list[int]:
    """Make the next ``times`` commits lose their connection, before or after the server commits."""
    real = postgres._PostgresSession._apply
    lost: list[int] = []

    def apply(self: Any, txn: Txn) -> None:
        if len(lost) >= times:
            real(self, txn)
            return
        lost.append(1)
        conn = self.conn
        if before:  # the server ends the session before the commit reaches it
            with psycopg.connect(conn.info.dsn, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
            real(self, txn)  # fails: the connection is gone
            raise AssertionError("the commit went through a terminated connection")
        real(self, txn)  # committed; its answer is lost
        conn.close()
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(postgres._PostgresSession, "_apply", apply)
    return lost


@pytest.mark.parametrize("before", [True, False])
def test_a_commit_whose_connection_is_lost_is_resent_and_applied_once(
    storage: PostgresStorage, monkeypatch: pytest.MonkeyPatch, before: bool
) -> None:
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    lost = _lose_the_answer(monkeypatch, before=before)
    d = engine.authorize(payment(10 * USDT))
    assert lost == [1]
    assert d.allowed
    assert d.reservation_id is not None
    decisions = [h for h in engine.history("agent-1") if h.event == "decision"]
    assert [h.reservation_id for h in decisions] == [d.reservation_id]  # one record
    assert used(engine) == (0, 10 * USDT)  # held once, not twice
    engine.release(d.reservation_id)
    assert used(engine) == (0, 0)


@pytest.mark.parametrize("resend", ["no connection", "refused"])
def test_a_lost_commit_that_cannot_be_resent_says_the_outcome_is_unknown(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch, resend: str
) -> None:
    storage = PostgresStorage(pg_schema, pool_timeout=timedelta(seconds=1))
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    _lose_the_answer(monkeypatch, before=False)
    if resend == "no connection":
        real_getconn = storage._getconn
        calls: list[int] = []

        def no_more_connections() -> Any:
            calls.append(1)
            if len(calls) == 1:
                return real_getconn()  # the session's own connection
            from agentpolicy.errors import StorageUnavailableError

            raise StorageUnavailableError("no connection")

        monkeypatch.setattr(storage, "_getconn", no_more_connections)
    else:  # a new connection, but the server refuses the resend (here: cancelled)

        def refused(self: Any, txn: Txn) -> Any:
            raise psycopg.errors.QueryCanceled("canceling statement due to user request")

        monkeypatch.setattr(postgres._PostgresSession, "_check", refused)
    with pytest.raises(PolicyError) as err:
        engine.authorize(payment(USDT))
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "unknown" in err.value.message  # not "nothing was changed": it was
    monkeypatch.undo()
    assert used(engine) == (0, USDT)  # it had been applied, once
    engine.close()


def test_a_lock_held_past_the_lock_timeout_fails_closed(pg_schema: str) -> None:
    holder = PostgresStorage(pg_schema)
    impatient = PostgresStorage(pg_schema, lock_timeout=timedelta(milliseconds=300))
    engine = PolicyEngine(storage=impatient, clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    with holder.session("agent-1") as session:
        session.get(["h/agent-1"])
        started = time.monotonic()
        with pytest.raises(PolicyError) as err:
            engine.authorize(payment(USDT))
        assert time.monotonic() - started < 5
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "lock" in err.value.message
    assert used(engine) == (0, 0)  # nothing changed
    assert engine.authorize(payment(USDT)).allowed  # and once let go, all is well
    engine.close()
    holder.close()


def test_amounts_stay_exact_at_10_to_the_30(storage: PostgresStorage) -> None:
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    big = 10**30
    engine.set_policy("agent-1", {"limits": {"daily": {"value": str(big + 5)}}})
    first = engine.authorize(payment(big))
    assert first.reservation_id is not None
    assert engine.authorize(payment(5)).allowed
    assert engine.authorize(payment(1)).code == "DAILY_LIMIT"
    engine.confirm(first.reservation_id)
    assert used(engine) == (big, 5)


def test_old_operation_ids_and_documents_past_their_ttl_are_pruned(
    storage: PostgresStorage, pg_schema: str
) -> None:
    clock = ManualClock()
    engine = PolicyEngine(storage=storage, clock=clock)
    engine.set_policy("agent-1", {"limits": {"monthly": {"value": str(10**12)}}})
    for i in range(5):
        engine.authorize(payment(1, idempotency_key=f"day0-{i}"))
    ops_before = sql(pg_schema, "SELECT count(*) FROM @s.ops")[0][0]
    clock.advance(hours=49)  # deleted a day after their time (storage.base.PRUNE_SLACK_US)
    engine.authorize(payment(1, idempotency_key="day1"))
    storage._commits_until_prune = 1  # every 1,000 commits: now
    engine.authorize(payment(1))
    keys = sql(pg_schema, "SELECT name FROM @s.docs WHERE name LIKE 'i/%%' ORDER BY name")
    assert keys == [("i/agent-1/day1",)]
    assert sql(pg_schema, "SELECT count(*) FROM @s.ops")[0][0] == 2  # today's two
    assert ops_before >= 6
    engine.close()


def test_an_engine_whose_clock_runs_ahead_deletes_no_idempotency_entry_another_still_answers(
    storage: PostgresStorage, pg_schema: str
) -> None:
    def prune_now(other: Storage) -> None:
        other._commits_until_prune = 1  # type: ignore[attr-defined]  # every 1,000 commits

    a_key_retried_after_housekeeping_ahead_answers_once(
        storage, PostgresStorage(pg_schema), prune_now
    )


def test_a_closed_storage_refuses_calls(storage: PostgresStorage) -> None:
    storage.close()
    with pytest.raises(PolicyError) as err, storage.session("s1") as session:
        session.get(["d/a"])
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE


# -- outages ------------------------------------------------------------------------------------------


def test_a_server_that_is_down_fails_closed_within_seconds() -> None:
    url = f"postgresql://app:hunter2@127.0.0.1:{free_port()}/db"
    engine = PolicyEngine(storage=open_storage(url), clock=ManualClock())
    for call in (lambda: engine.authorize(payment(USDT)), lambda: engine.get_policy("agent-1")):
        started = time.monotonic()
        with pytest.raises(PolicyError) as err:
            call()
        assert time.monotonic() - started < 6
        assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
        assert "hunter2" not in err.value.message
        assert "nothing was allowed" in err.value.message
    engine.close()


def test_an_outage_fails_closed_then_recovers_without_a_new_engine(
    own_postgres: PostgresServer,
) -> None:
    engine = PolicyEngine(storage=open_storage(own_postgres.url), clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    kept = engine.authorize(payment(10 * USDT)).reservation_id
    assert kept is not None
    engine.confirm(kept)
    open_one = engine.authorize(payment(5 * USDT)).reservation_id
    assert open_one is not None
    own_postgres.stop()
    for call in (lambda: engine.authorize(payment(USDT)), lambda: engine.budget("agent-1"),
                 lambda: engine.confirm(open_one)):  # fmt: skip
        started = time.monotonic()
        with pytest.raises(PolicyError) as err:
            call()
        assert time.monotonic() - started < 6  # fails closed quickly
        assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    own_postgres.start()  # same port, same data
    deadline = time.monotonic() + 15
    failures: list[str] = []
    while True:  # real time: the pool reconnects by itself
        try:
            decision = engine.authorize(payment(USDT))
            break
        except PolicyError as err:
            failures.append(err.code)
        assert time.monotonic() < deadline, f"no recovery within 15 s: {failures}"
    assert decision.allowed
    assert set(failures) <= {ErrorCode.STORAGE_UNAVAILABLE}
    assert engine.get_reservation(kept).status is ReservationStatus.CONFIRMED
    assert engine.confirm(open_one).status is ReservationStatus.CONFIRMED
    assert used(engine) == (15 * USDT, USDT)  # nothing committed before the outage was lost
    engine.close()


def test_an_authorize_is_two_round_trips_in_the_steady_state(
    storage: PostgresStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One to begin, lock the agent's row and read; one for every write and COMMIT."""
    from psycopg import _pipeline_base

    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", {"limits": {"daily": {"value": str(10**20)}}})
    for _ in range(10):  # warm: the policy is parsed, the statements prepared
        engine.authorize(payment(1))
    real = _pipeline_base.BasePipeline._enqueue_sync
    syncs: list[int] = []

    def counting(self: Any) -> None:
        syncs.append(1)
        real(self)

    sent: list[str] = []
    real_execute = psycopg.Connection.execute

    def outside_pipelines(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        if self._pipeline is None:
            sent.append(str(query))
        return real_execute(self, query, *args, **kwargs)

    monkeypatch.setattr(_pipeline_base.BasePipeline, "_enqueue_sync", counting)
    monkeypatch.setattr(psycopg.Connection, "execute", outside_pipelines)
    for _ in range(25):
        assert engine.authorize(payment(1)).allowed
    assert len(syncs) == 2 * 25
    assert sent == []  # nothing went to the server outside those two round trips


def test_a_pool_whose_connections_all_stay_busy_says_so(pg_schema: str) -> None:
    storage = PostgresStorage(pg_schema, pool_size=1, pool_timeout=timedelta(milliseconds=500))
    with storage.session("s1") as session:
        session.get(["d/a"])  # holds the pool's only connection
        started = time.monotonic()
        with pytest.raises(PolicyError) as err, storage.session("s2") as other:
            other.get(["d/b"])
        assert time.monotonic() - started < 5
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "busy" in err.value.message
    storage.close()


def test_tables_dropped_while_in_use_are_storage_unavailable(pg_schema: str) -> None:
    engine = PolicyEngine(storage=PostgresStorage(pg_schema), clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    sql(pg_schema, "DROP TABLE @s.docs")
    with pytest.raises(PolicyError) as err:
        engine.authorize(payment(USDT))
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "missing" in err.value.message
    engine.close()


def test_a_locked_commit_of_an_operation_applied_before_answers_its_first_result(
    storage: PostgresStorage,
) -> None:
    first = Txn("op1", AT)
    first.put = {"d/a": {"n": 1}}
    first.result = {"answer": 42}
    with storage.session("s1") as session:
        assert session.commit(first).applied
    with storage.session("s1") as session:
        seen = session.get(["d/a"])  # under the shard's lock: the commit checks nothing again
        again = Txn("op1", AT)  # the same id: refused by the ops table's key
        again.expect = {"d/a": seen["d/a"][0]}
        again.put = {"d/a": {"n": 2}}
        again.result = {"answer": 0}
        outcome = session.commit(again)
    assert (outcome.applied, outcome.replayed, outcome.result) == (False, True, {"answer": 42})
    with storage.session("s1", write=False) as session:
        assert session.get(["d/a"]) == {"d/a": (1, {"n": 1})}


def test_a_deadlock_at_every_attempt_is_reported_as_a_conflict(
    storage: PostgresStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    def deadlocked(self: Any, txn: Txn) -> None:
        raise psycopg.errors.DeadlockDetected("deadlock detected")

    monkeypatch.setattr(postgres._PostgresSession, "_apply", deadlocked)
    txn = Txn("op1", AT)
    txn.put = {"d/a": {"n": 1}}
    with storage.session("s1") as session:
        assert session.commit(txn).conflict  # the runner runs the step again
    monkeypatch.undo()
    with storage.session("s1", write=False) as session:
        assert session.get(["d/a"]) == {}


def test_a_connection_lost_at_every_check_fails_closed_with_nothing_changed(
    storage: PostgresStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    def dropped(self: Any, txn: Txn) -> None:
        self.conn.close()
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(postgres._PostgresSession, "_check", dropped)
    txn = Txn("op1", AT)
    txn.put = {"d/a": {"n": 1}}
    with pytest.raises(PolicyError) as err, storage.session("s1", write=False) as session:
        session.commit(txn)  # a read session's commit checks first: nothing was sent
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "nothing was allowed or changed" in err.value.message
    monkeypatch.undo()
    with storage.session("s1", write=False) as session:
        assert session.get(["d/a"]) == {}


def test_connection_settings_from_the_url_are_kept_and_bad_sizes_refused() -> None:
    mine = PostgresStorage("postgresql://u@h/db?connect_timeout=7&application_name=pay")
    assert "connect_timeout" not in mine._kwargs  # the URL's own value stands
    assert "application_name" not in mine._kwargs
    ours = PostgresStorage("postgresql://u@h/db", lock_timeout=timedelta(seconds=4))
    assert ours._kwargs["connect_timeout"] == 2
    assert ours._kwargs["application_name"] == "agentpolicy"
    assert "-c lock_timeout=4000" in ours._kwargs["options"]
    with pytest.raises(PolicyValidationError):
        PostgresStorage("postgresql://u@h/db", pool_size=0)
