"""A PostgreSQL server that stops answering: every round trip is bounded by the client.

A stalled server (its backend paused, or a network that stops delivering)
sends no error and closes nothing, so only the client's own bound can end
the wait. The stall here is real and touches nothing shared: a small TCP
proxy between the store and the server, which the test tells to stop
forwarding (both ways, or only the server's answers).
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import psycopg
import psycopg.conninfo
import pytest

from agentpolicy import ErrorCode, PolicyEngine, PolicyError, PolicyValidationError, open_storage
from agentpolicy.decisions import Decision
from agentpolicy.storage import postgres
from agentpolicy.storage._pg_url import split_postgres_url
from agentpolicy.storage.base import Txn
from agentpolicy.storage.postgres import PostgresStorage
from agentpolicy.storage.postgres_async import AsyncPostgresStorage, _AsyncPostgresSession
from agentpolicy.testing import ManualClock, payment
from tests.async_stores import AsyncLedger

USDT = 1_000_000
DAILY_100 = {"limits": {"daily": {"value": str(100 * USDT)}}}
BOUND = timedelta(seconds=1)
QUICK = {  # every wait of the store short, so that a test never waits long
    "pool_size": 1,
    "connect_timeout": timedelta(seconds=1),
    "pool_timeout": timedelta(milliseconds=500),
    "lock_timeout": timedelta(milliseconds=500),
    "round_trip_timeout": BOUND,
}
GENEROUS = 6.0  # seconds: what "bounded" means in these tests (the bound is 1 s)


class _Link:
    """One client connection through the proxy, with what it may forward."""

    def __init__(self, client: socket.socket, requests: bool, answers: bool) -> None:
        self.client = client
        self.requests = requests  # client -> server
        self.answers = answers  # server -> client
        self.ended = threading.Event()


class StallingProxy:
    """A TCP proxy to the server that can be told to stop forwarding (a thread per link)."""

    def __init__(self, upstream: tuple[int, Any]) -> None:
        self.upstream = upstream  # (family, address)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port: int = self.listener.getsockname()[1]
        self.links: list[_Link] = []
        self.new_links_forward = True
        self.lock = threading.Lock()
        self.stopping = False
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def stall(self) -> None:
        """Nothing goes through any more, either way, on every link, old or new."""
        with self.lock:
            self.new_links_forward = False
            for link in self.links:
                link.requests = link.answers = False

    def swallow_answers(self, *, new_links_too: bool = False) -> None:
        """What the client sends still reaches the server; its answers are held."""
        with self.lock:
            for link in self.links:
                link.answers = False
            if new_links_too:
                self.new_links_forward = False

    def resume(self) -> None:
        with self.lock:
            self.new_links_forward = True
            for link in self.links:
                link.requests = link.answers = True

    def wait_ended(self, count: int) -> None:
        """Wait until ``count`` links have ended (what they held was delivered first)."""
        deadline = time.monotonic() + 10
        while sum(link.ended.is_set() for link in list(self.links)) < count:
            assert time.monotonic() < deadline, "the proxy's links did not end"
            time.sleep(0.02)

    def close(self) -> None:
        self.stopping = True
        for thread in self.threads:
            thread.join(5)
        self.listener.close()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            with self.lock:
                link = _Link(client, self.new_links_forward, self.new_links_forward)
                self.links.append(link)
            thread = threading.Thread(target=self._pump, args=(link,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _pump(self, link: _Link) -> None:
        family, address = self.upstream
        client = link.client
        server = socket.socket(family, socket.SOCK_STREAM)
        try:
            server.connect(address)
            while not self.stopping:
                with self.lock:
                    wanted = [
                        s for s, go in ((client, link.requests), (server, link.answers)) if go
                    ]
                if not wanted:
                    time.sleep(0.02)
                    continue
                ready, _, _ = select.select(wanted, [], [], 0.05)
                for source in ready:
                    data = source.recv(65536)
                    if not data:
                        return  # one side ended: end the other (the server rolls back)
                    (server if source is client else client).sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            server.close()
            link.ended.set()


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[StallingProxy]:
    params = psycopg.conninfo.conninfo_to_dict(postgres_url.partition("?")[0])
    host = str(params.get("host") or "127.0.0.1").split(",")[0]
    port = int(str(params.get("port") or 5432).split(",")[0])
    upstream: tuple[int, Any]
    if host.startswith("/"):
        upstream = (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}")
    else:
        upstream = (socket.AF_INET, (host, port))
    running = StallingProxy(upstream)
    yield running
    running.close()


def through(proxy: StallingProxy, url: str) -> str:
    """``url`` (with its schema) reaching the server through ``proxy``."""
    conninfo, schema = split_postgres_url(url)
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    user = quote(str(params.get("user") or "postgres"), safe="")
    password = params.get("password")
    auth = user if password is None else f"{user}:{quote(str(password), safe='')}"
    db = quote(str(params.get("dbname") or "postgres"), safe="")
    return f"postgresql://{auth}@127.0.0.1:{proxy.port}/{db}?sslmode=disable&schema={schema}"


def used(engine: PolicyEngine, agent: str = "agent-1") -> tuple[int, int]:
    window = next(iter(engine.budget(agent, "daily").periods.values()))
    return window.spent.value, window.reserved.value


def decisions(engine: PolicyEngine, key: str, agent: str = "agent-1") -> list[Any]:
    return [
        h
        for h in engine.history(agent)
        if h.event == "decision" and h.request is not None and h.request.idempotency_key == key
    ]


def _swallow_at_the_commit(
    monkeypatch: pytest.MonkeyPatch, proxy: StallingProxy, *, new_links_too: bool
) -> list[int]:
    """At the next commit: let it reach the server, hold the server's answer."""
    real = postgres._PostgresSession._apply
    fired: list[int] = []

    def apply(self: Any, txn: Txn) -> None:
        if not fired:
            fired.append(1)
            proxy.swallow_answers(new_links_too=new_links_too)
        real(self, txn)

    monkeypatch.setattr(postgres._PostgresSession, "_apply", apply)
    return fired


# -- the option -----------------------------------------------------------------------------------


def test_the_round_trip_bound_defaults_to_a_little_above_the_lock_timeout() -> None:
    assert PostgresStorage("postgresql://u@h/db").round_trip_timeout == 12.0
    shorter = PostgresStorage("postgresql://u@h/db", lock_timeout=timedelta(milliseconds=300))
    assert shorter.round_trip_timeout == pytest.approx(2.3)
    given = AsyncPostgresStorage("postgresql://u@h/db", round_trip_timeout=timedelta(seconds=4))
    assert given.round_trip_timeout == 4.0
    for bad in (timedelta(0), timedelta(seconds=-1)):
        with pytest.raises(PolicyValidationError):
            PostgresStorage("postgresql://u@h/db", round_trip_timeout=bad)


def test_the_watchdog_thread_ends_when_its_storage_closes(pg_schema: str) -> None:
    storage = PostgresStorage(pg_schema)
    engine = PolicyEngine(storage=storage, clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    thread = storage._watchdog._thread
    assert thread is not None
    assert thread.is_alive()
    engine.close()
    thread.join(5)
    assert not thread.is_alive()


# -- the sync store -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["authorize", "budget"])
def test_a_stalled_server_fails_closed_within_the_bound_and_nothing_changed(
    pg_schema: str, proxy: StallingProxy, call: str
) -> None:
    engine = PolicyEngine(
        storage=PostgresStorage(through(proxy, pg_schema), **QUICK), clock=ManualClock()
    )
    engine.set_policy("agent-1", DAILY_100)
    assert engine.authorize(payment(USDT)).allowed
    proxy.stall()
    calls = {
        "authorize": lambda: engine.authorize(payment(10 * USDT, idempotency_key="stalled")),
        "budget": lambda: engine.budget("agent-1"),
    }
    started = time.monotonic()
    with pytest.raises(PolicyError) as err:
        calls[call]()
    assert time.monotonic() - started < GENEROUS  # it was forever
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "did not answer within 1 s" in err.value.message
    assert "nothing was allowed or changed" in err.value.message
    proxy.resume()
    proxy.wait_ended(1)  # the stalled link: what it held reached the server, then its end
    with PolicyEngine(storage=open_storage(pg_schema), clock=ManualClock()) as direct:
        assert used(direct) == (0, USDT)  # a fresh read: nothing was allowed
        assert decisions(direct, "stalled") == []
    # the stalled connection was dropped, not pooled: the same engine goes on
    assert engine.authorize(payment(USDT)).allowed
    assert used(engine) == (0, 2 * USDT)
    engine.close()


@pytest.mark.timeout(60)
def test_a_commit_whose_answer_stalls_is_resent_and_applied_once(
    pg_schema: str, proxy: StallingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = PolicyEngine(
        storage=PostgresStorage(through(proxy, pg_schema), **QUICK), clock=ManualClock()
    )
    engine.set_policy("agent-1", DAILY_100)
    fired = _swallow_at_the_commit(monkeypatch, proxy, new_links_too=False)
    started = time.monotonic()
    d = engine.authorize(payment(10 * USDT, idempotency_key="k1"))
    assert time.monotonic() - started < GENEROUS
    assert fired == [1]
    assert d.allowed
    with PolicyEngine(storage=open_storage(pg_schema), clock=ManualClock()) as direct:
        assert [h.reservation_id for h in decisions(direct, "k1")] == [d.reservation_id]
        assert used(direct) == (0, 10 * USDT)  # held once, not twice
    engine.close()


@pytest.mark.timeout(60)
def test_a_commit_whose_answer_stalls_on_a_server_gone_quiet_says_the_outcome_is_unknown(
    pg_schema: str, proxy: StallingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = PolicyEngine(
        storage=PostgresStorage(through(proxy, pg_schema), **QUICK), clock=ManualClock()
    )
    engine.set_policy("agent-1", DAILY_100)
    _swallow_at_the_commit(monkeypatch, proxy, new_links_too=True)  # no new connection either
    started = time.monotonic()
    with pytest.raises(PolicyError) as err:
        engine.authorize(payment(10 * USDT, idempotency_key="k1"))
    assert time.monotonic() - started < 2 * GENEROUS  # the bound, then connecting once more
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "unknown" in err.value.message
    assert "nothing was allowed" not in err.value.message  # it was applied: see the ledger
    proxy.resume()
    with PolicyEngine(storage=open_storage(pg_schema), clock=ManualClock()) as direct:
        assert len(decisions(direct, "k1")) == 1  # applied once
        assert used(direct) == (0, 10 * USDT)
    engine.close()


@pytest.mark.timeout(60)
def test_a_commit_stalled_on_its_way_is_not_claimed_unchanged(
    pg_schema: str, proxy: StallingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The COMMIT held on its way may still arrive: never "nothing changed", and here it does."""
    engine = PolicyEngine(
        storage=PostgresStorage(through(proxy, pg_schema), **QUICK), clock=ManualClock()
    )
    engine.set_policy("agent-1", DAILY_100)
    real = postgres._PostgresSession._apply

    def apply(self: Any, txn: Txn) -> None:
        proxy.stall()  # the commit never reaches the server; its session keeps the row
        monkeypatch.undo()
        real(self, txn)

    monkeypatch.setattr(postgres._PostgresSession, "_apply", apply)
    started = time.monotonic()
    with pytest.raises(PolicyError) as err:
        engine.authorize(payment(10 * USDT, idempotency_key="k1"))
    assert time.monotonic() - started < 2 * GENEROUS
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "unknown" in err.value.message
    assert "nothing was allowed" not in err.value.message
    engine.close()
    proxy.resume()  # the network delivers late what it held: the COMMIT, then the end
    proxy.wait_ended(1)
    with PolicyEngine(storage=open_storage(pg_schema), clock=ManualClock()) as direct:
        assert len(decisions(direct, "k1")) == 1  # applied once, after the client gave up
        assert used(direct) == (0, 10 * USDT)


# -- the async store ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_stalled_server_fails_an_async_call_closed_within_the_bound(
    pg_schema: str, proxy: StallingProxy
) -> None:
    clock = ManualClock()

    async def main() -> tuple[BaseException | None, float, Any]:
        storage = AsyncPostgresStorage(through(proxy, pg_schema), **QUICK)
        ledger = AsyncLedger(storage, clock)
        await ledger.set_policy("agent-1", DAILY_100)
        proxy.stall()
        started = time.monotonic()
        error: BaseException | None = None
        try:
            await ledger.authorize(payment(10 * USDT, idempotency_key="stalled"))
        except PolicyError as exc:
            error = exc
        elapsed = time.monotonic() - started
        proxy.resume()
        await asyncio.to_thread(proxy.wait_ended, 1)
        after = await ledger.authorize(payment(USDT))  # the stalled connection was dropped
        await storage.aclose()
        return error, elapsed, after

    error, elapsed, after = asyncio.run(main())
    assert elapsed < GENEROUS
    assert isinstance(error, PolicyError)
    assert error.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "did not answer within 1 s" in error.message
    assert "nothing was allowed or changed" in error.message
    assert isinstance(after, Decision)
    assert after.allowed
    with PolicyEngine(storage=open_storage(pg_schema), clock=clock) as direct:
        assert decisions(direct, "stalled") == []
        assert used(direct) == (0, USDT)


@pytest.mark.timeout(60)
def test_an_async_commit_whose_answer_stalls_is_resent_and_applied_once(
    pg_schema: str, proxy: StallingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    real = _AsyncPostgresSession._apply
    fired: list[int] = []

    async def apply(self: Any, txn: Txn) -> None:
        if not fired:
            fired.append(1)
            proxy.swallow_answers()
        await real(self, txn)

    async def main() -> tuple[Any, float]:
        storage = AsyncPostgresStorage(through(proxy, pg_schema), **QUICK)
        ledger = AsyncLedger(storage, clock)
        await ledger.set_policy("agent-1", DAILY_100)
        monkeypatch.setattr(_AsyncPostgresSession, "_apply", apply)
        started = time.monotonic()
        d = await ledger.authorize(payment(10 * USDT, idempotency_key="k1"))
        elapsed = time.monotonic() - started
        await storage.aclose()
        return d, elapsed

    d, elapsed = asyncio.run(main())
    assert elapsed < GENEROUS
    assert fired == [1]
    assert isinstance(d, Decision)
    assert d.allowed
    with PolicyEngine(storage=open_storage(pg_schema), clock=clock) as direct:
        assert [h.reservation_id for h in decisions(direct, "k1")] == [d.reservation_id]
        assert used(direct) == (0, 10 * USDT)


def test_a_commit_failing_on_the_client_side_after_it_ran_is_looked_up_not_called_unchanged(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # psycopg raised "cannot exit pipeline mode while busy" (no SQLSTATE, the connection not
    # marked broken) as its backend was ended around COMMIT: taken for the server's refusal,
    # the call said "nothing was allowed or changed" while the reservation was recorded
    engine = PolicyEngine(storage=open_storage(pg_schema), clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    real = postgres._PostgresSession._apply
    fired: list[int] = []

    def applied_then_failed(self: Any, txn: Txn) -> None:
        real(self, txn)
        if not fired:
            fired.append(1)
            raise psycopg.OperationalError("cannot exit pipeline mode while busy")

    monkeypatch.setattr(postgres._PostgresSession, "_apply", applied_then_failed)
    d = engine.authorize(payment(10 * USDT))  # no idempotency key: the op id answers
    assert fired == [1]
    assert d.allowed
    assert used(engine) == (0, 10 * USDT)  # held once
    assert [h.event for h in engine.history("agent-1")].count("decision") == 1
    engine.close()


def test_a_pooled_connection_the_server_ended_is_replaced_for_the_next_call(
    pg_schema: str,
) -> None:
    # the next call on it failed (STORAGE_UNAVAILABLE) in 3 of 5 tries: the read's error had
    # no SQLSTATE and psycopg had not marked the connection broken yet
    import uuid

    name = f"ap_ended_{uuid.uuid4().hex[:12]}"  # this store's connections, and only they
    engine = PolicyEngine(storage=open_storage(f"{pg_schema}&application_name={name}"),
                          clock=ManualClock())  # fmt: skip
    engine.set_policy("agent-1", DAILY_100)
    for _ in range(5):
        assert engine.authorize(payment(USDT)).allowed
        with psycopg.connect(pg_schema.split("?", 1)[0], autocommit=True) as admin:
            ended = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND state = 'idle'",
                (name,),
            ).fetchall()
        assert ended, "no idle connection of this store to end"
        assert engine.authorize(payment(USDT)).allowed  # on a new connection
    engine.close()
