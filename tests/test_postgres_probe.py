"""An adversarial probe of the PostgreSQL stores (sync and async) beyond test_postgres*.py.

URLs libpq cannot read (INVALID_INPUT at open, no password in any message or
log), a password that holds ``?``, odd schema names and two stores in one
database, a read-only database, a role without CREATE or without INSERT, a
statement_timeout set on the role, a connection terminated on the server in
the middle of a commit (recorded once, never twice, and the error says what
is known), and a schema that holds another program's tables.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from agentpolicy import (
    AsyncPolicyEngine,
    ErrorCode,
    PolicyEngine,
    PolicyError,
    open_async_storage,
    open_storage,
)
from agentpolicy.storage._pg_url import split_postgres_url
from agentpolicy.storage.postgres import PostgresStorage
from agentpolicy.storage.postgres_async import AsyncPostgresStorage
from agentpolicy.testing import ManualClock, payment
from tests.postgres_servers import drop_schema, with_schema
from tests.redis_servers import free_port

USDT = 1_000_000
DAILY_100 = {"limits": {"daily": {"value": str(100 * USDT)}}}
SECRET = "hunter2"
READ_ONLY = "options=-c%20default_transaction_read_only%3Don"

Store = Callable[..., Any]
STORES: list[Store] = [PostgresStorage, AsyncPostgresStorage, open_storage, open_async_storage]


def sql(url: str, query: str) -> list[tuple[Any, ...]]:
    """One statement outside agentpolicy, on the server of ``url`` (``@s``: the URL's schema)."""
    base, schema = split_postgres_url(url)
    with psycopg.connect(base, autocommit=True) as conn:
        cur = conn.execute(query.replace("@s", f'"{schema}"'))
        return cur.fetchall() if cur.description else []


def count(url: str, query: str) -> int:
    rows = sql(url, query)
    return int(rows[0][0])


def state(url: str, agent: str = "agent-1") -> tuple[int, int, int, int]:
    """(history entries, denials, reservations, operation ids) of ``agent``, by plain SQL."""
    return (
        count(url, f"SELECT count(*) FROM @s.logs WHERE log = 'hc/{agent}'"),
        count(url, f"SELECT count(*) FROM @s.logs WHERE log = 'hd/{agent}'"),
        count(url, "SELECT count(*) FROM @s.docs WHERE name LIKE 'r/%'"),
        count(url, "SELECT count(*) FROM @s.ops"),
    )


def reserved(engine: PolicyEngine) -> int:
    return next(iter(engine.budget("agent-1", "daily").periods.values())).reserved.value


def schema_exists(url: str) -> bool:
    return bool(sql(url, f"SELECT to_regnamespace('\"{split_postgres_url(url)[1]}\"')")[0][0])


@pytest.fixture
def role(postgres_url: str) -> Iterator[str]:
    """A login role of its own (no privileges), dropped afterwards; skips unless we may make one."""
    name = f"r_{uuid.uuid4().hex[:12]}"
    try:
        sql(postgres_url, f'CREATE ROLE "{name}" LOGIN')
    except psycopg.Error as exc:
        pytest.skip(f"may not create a role: {exc}")
    try:
        yield name
    finally:
        sql(postgres_url, f'DROP OWNED BY "{name}"')  # its grants in this database
        sql(postgres_url, f'DROP ROLE "{name}"')


def as_role(url: str, name: str) -> str:
    """``url`` with its user replaced by ``name`` (trust authentication: no password)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{name}@{rest.partition('@')[2]}"


def async_engine(url: str) -> AsyncPolicyEngine:
    return AsyncPolicyEngine(
        PostgresStorage(url, pool_size=2),
        ManualClock(),
        async_storage=AsyncPostgresStorage(url, pool_size=2),
    )


# -- URLs libpq cannot read: INVALID_INPUT at open, the reason and never the URL ------------------

BAD_URLS = [
    ("postgresql://u:hunter2@h/db?nosuchparam=1", "libpq knows no option 'nosuchparam'"),
    ("postgresql://u:hunter2@h/db?sslmode=bogus", "sslmode must be one of"),
    ("postgresql://u:hunter2@h:abc/db", "a port must be a number from 1 to 65535"),
    ("postgresql://u:hunter2@h:0/db", "a port must be a number"),
    ("postgresql://u:hunter2@h:99999/db", "a port must be a number"),
    ("postgresql://u:hunter2@h/db?port=5432x", "a port must be a number"),
    ("postgresql://u:hunter2@h1:1,h2:2/db?port=1,2,3", "3 ports for 2 hosts"),
    ("postgresql://u:hunter2@h/db?connect_timeout=abc", "connect_timeout must be a number"),
    ("postgresql://u:hunter2@h/db?connect_timeout=", "connect_timeout must be a number"),
    ("postgresql://u:hunter2@h/db?keepalives=yes", "keepalives must be an integer"),
    ("postgresql://u:hunter2@h/db?target_session_attrs=READ-WRITE", "target_session_attrs"),
    ("postgresql://u:hunter2@h/db?channel_binding=x", "channel_binding must be one of"),
    ("postgresql://u:hunter2@h/db?ssl_min_protocol_version=SSLv3", "ssl_min_protocol_version"),
    ("postgresql://u:hunter2@h/db?hostaddr=db.example", "hostaddr must be numeric"),
    ("postgresql://u:hunter2@h/db?sslmode", "a query option has no ="),
    ("postgresql://u:hunter2@h/db?a=b=c", "more than one ="),
    ("postgresql://u:hunter2@h/db?=1", "a query option has no name"),
    ("postgresql://u:hunter2%zz@h/db", "a % is not followed by two hexadecimal digits"),
    ("postgresql://u:hunter2@h/db?dbname=x%00y", "%00 is not allowed"),
    ("postgresql://u:hunter2@[::1/db", "an IPv6 address in [ ] has no ]"),
    ("postgresql://u:hunter2@[::1]x/db", "an IPv6 address in [ ] is followed by"),
    # a / in a password: libpq reads host "u", port "hunter2/x..." (or a dbname with the rest)
    ("postgresql://u:hunter2/x@h/db", "its @ comes after a /"),
    ("postgresql://u:4242/hunter2@h/db", "its @ comes after a /"),
    # an @ in a password: libpq reads host "hunter2@h", and its error named that host
    ("postgresql://u:4242@hunter2@h/db", "holds an @"),
    ("postgresql://u:hunter2@@h/db", "holds an @"),
    ("postgresql://u:hun?4242@hunter2@h/db", "holds an @"),
]


@pytest.mark.parametrize("make", STORES, ids=lambda f: f.__name__)
@pytest.mark.parametrize(("url", "reason"), BAD_URLS, ids=[u for u, _ in BAD_URLS])
def test_a_url_libpq_cannot_read_is_invalid_input_at_open_without_the_password(
    make: Store, url: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PolicyError) as err:
        make(url)  # raised by the constructor: no pool, no connection, nothing changed
    assert err.value.code == ErrorCode.INVALID_INPUT
    assert err.value.message.startswith("$.storage: not a PostgreSQL URL that libpq can read: ")
    assert reason in err.value.message
    assert SECRET not in err.value.message
    assert "4242" not in err.value.message  # what libpq would take for the port: not shown
    assert "//" not in err.value.message  # nor the URL
    assert SECRET not in caplog.text


GOOD_URLS = [
    "postgresql://u:hunter2@h:%205432/db",  # libpq's strtol skips spaces, takes a sign
    "postgresql://u@h/db?port=+5432&connect_timeout=1.5&keepalives=%201",
    "postgresql://u@h/db?hostaddr=127.1&sslmode=verify-full&ssl_min_protocol_version=tlsv1.2",
    "postgresql://u@h1,h2/db?port=5432,&target_session_attrs=prefer-standby",
    "postgresql://u@[::1]:5432,h2/db?ssl=true&requiressl=1",
    "postgresql://u@h1,h2/db?hostaddr=127.0.0.1,&load_balance_hosts=random",
    "postgresql://u:p%2Fss@h/db%40x?application_name=a%40b",  # encoded / and @
    "postgresql:///db?host=/var/run/postgresql",
]


@pytest.mark.parametrize("url", GOOD_URLS)
def test_odd_but_valid_urls_still_open(url: str) -> None:
    for make in (PostgresStorage, AsyncPostgresStorage):
        make(url)  # nothing connects until the first call


@pytest.mark.parametrize("password", ["hun?ter2", "hun#ter2", "hun?a=1&b=ter2", "hunter2"])
def test_a_down_server_stays_unavailable_and_no_password_is_shown(
    password: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A password with ``?`` was shown whole: a URL parser took it for the query."""
    caplog.set_level(logging.DEBUG)
    port = free_port()
    url = f"postgresql://u:{password}@127.0.0.1:{port}/db?sslmode=disable"
    fast = timedelta(milliseconds=300)
    sync = PostgresStorage(url, pool_timeout=fast)
    assert sync.shown_url == f"postgresql://u:***@127.0.0.1:{port}/db?sslmode=***"
    with pytest.raises(PolicyError) as err, sync.session("agent-1") as session:
        session.get(["h/agent-1"])
    sync.close()

    async def main() -> PolicyError:
        store = AsyncPostgresStorage(url, pool_timeout=fast)
        try:
            with pytest.raises(PolicyError) as aerr:
                async with store.session("agent-1") as asession:
                    await asession.get(["h/agent-1"])
            return aerr.value
        finally:
            await store.aclose()

    for error in (err.value, asyncio.run(main())):
        assert error.code == ErrorCode.STORAGE_UNAVAILABLE
        assert "nothing was allowed or changed" in error.message
        assert "ter2" not in error.message
    assert "ter2" not in caplog.text


# -- schema names, and stores side by side in one database ---------------------------------------


@pytest.mark.parametrize(
    "schema",
    ["a;drop", "a%20b", "a%22b", "a%27b", "%C3%A9t%C3%A9", "a.b", "PG_x", "a%00", "x%3Bselect"],
)
def test_schema_names_with_metacharacters_are_invalid_input(schema: str) -> None:
    for make in STORES:
        with pytest.raises(PolicyError) as err:
            make(f"postgresql://u:hunter2@h/db?schema={schema}")
        assert err.value.code == ErrorCode.INVALID_INPUT
        assert SECRET not in err.value.message


def test_schemas_differing_only_in_case_are_separate_stores_sync_and_async(
    postgres_url: str,
) -> None:
    tag = uuid.uuid4().hex[:12]
    lower, upper = f"t_{tag}", f"T_{tag}"
    a, b = with_schema(postgres_url, lower), with_schema(postgres_url, upper)
    try:
        one = PolicyEngine(storage=PostgresStorage(a), clock=ManualClock())
        two = async_engine(b)
        one.set_policy("agent-1", DAILY_100)

        async def on_two() -> tuple[bool, bool]:
            await two.set_policy("agent-1", {"limits": {"daily": {"value": str(5 * USDT)}}})
            first = (await two.authorize(payment(5 * USDT))).allowed
            second = (await two.authorize(payment(1))).allowed
            await two.close()
            return first, second

        assert asyncio.run(on_two()) == (True, False)  # its own 5 USDT, spent
        assert one.authorize(payment(50 * USDT)).allowed  # the other's 100, untouched
        assert reserved(one) == 50 * USDT
        # each: its policy, one allowed payment (and the other's denial); the budget read commits
        assert state(a) == (2, 0, 1, 3)
        assert state(b) == (2, 1, 1, 3)
        one.close()
    finally:
        drop_schema(postgres_url, lower)
        drop_schema(postgres_url, upper)


# -- a database that accepts no writes; a role without privileges ---------------------------------


def test_a_read_only_database_is_unavailable_and_nothing_is_created(pg_schema: str) -> None:
    """It was INTERNAL: 'PostgreSQL refused a statement (25006)', as if agentpolicy had a bug."""
    base, _, query = pg_schema.partition("?")
    read_only = f"{base}?{READ_ONLY}&{query}"
    fresh = PolicyEngine(storage=PostgresStorage(read_only), clock=ManualClock())
    with pytest.raises(PolicyError) as err:
        fresh.authorize(payment(USDT))
    fresh.close()
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "accepts no writes" in err.value.message
    assert "nothing was allowed or changed" in err.value.message
    assert not schema_exists(pg_schema)

    writer = PolicyEngine(storage=PostgresStorage(pg_schema), clock=ManualClock())
    writer.set_policy("agent-1", DAILY_100)
    assert writer.authorize(payment(USDT)).allowed
    before = state(pg_schema)
    engine = PolicyEngine(storage=PostgresStorage(read_only), clock=ManualClock())
    aengine = async_engine(read_only)

    async def async_calls() -> list[PolicyError]:
        errors = []
        for call in (
            lambda: aengine.authorize(payment(USDT)),
            lambda: aengine.set_policy("agent-1", DAILY_100),
        ):
            with pytest.raises(PolicyError) as aerr:
                await call()
            errors.append(aerr.value)
        await aengine.close()
        return errors

    errors = []
    for sync_call in (
        lambda: engine.authorize(payment(USDT)),
        lambda: engine.set_policy("agent-1", DAILY_100),
        lambda: engine.budget("agent-1"),
    ):
        with pytest.raises(PolicyError) as serr:
            sync_call()
        errors.append(serr.value)
    errors += asyncio.run(async_calls())
    for error in errors:
        assert error.code == ErrorCode.STORAGE_UNAVAILABLE, error
        assert "accepts no writes" in error.message
    assert state(pg_schema) == before  # nothing changed
    assert reserved(writer) == USDT
    engine.close()
    writer.close()


def test_a_role_without_create_is_unavailable_not_internal(postgres_url: str, role: str) -> None:
    """It was INTERNAL: 'PostgreSQL refused a statement (42501): permission denied ...'."""
    url = with_schema(as_role(postgres_url, role), f"t_{uuid.uuid4().hex[:12]}")
    engine = PolicyEngine(storage=PostgresStorage(url), clock=ManualClock())
    aengine = async_engine(url)

    async def acall() -> PolicyError:
        with pytest.raises(PolicyError) as aerr:
            await aengine.authorize(payment(USDT))
        await aengine.close()
        return aerr.value

    with pytest.raises(PolicyError) as err:
        engine.set_policy("agent-1", DAILY_100)
    engine.close()
    for error in (err.value, asyncio.run(acall())):
        assert error.code == ErrorCode.STORAGE_UNAVAILABLE, error
        assert "lack of privilege" in error.message
        assert "permission denied for database" in error.message
        assert "nothing was allowed or changed" in error.message
    assert not schema_exists(url)


def test_a_role_that_may_only_read_changes_nothing(pg_schema: str, role: str) -> None:
    owner = PolicyEngine(storage=PostgresStorage(pg_schema), clock=ManualClock())
    owner.set_policy("agent-1", DAILY_100)
    assert owner.authorize(payment(USDT)).allowed
    sql(pg_schema, f'GRANT USAGE ON SCHEMA @s TO "{role}"')
    sql(pg_schema, f'GRANT SELECT ON ALL TABLES IN SCHEMA @s TO "{role}"')
    url = as_role(pg_schema, role)
    before = state(pg_schema)
    for grant in ("", f'GRANT UPDATE ON @s.shards TO "{role}"'):  # then the lock, not the write
        if grant:
            sql(pg_schema, grant)
        engine = PolicyEngine(storage=PostgresStorage(url), clock=ManualClock())
        with pytest.raises(PolicyError) as err:
            engine.authorize(payment(USDT))
        engine.close()
        assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
        assert "lack of privilege" in err.value.message
        assert ("table ops" if grant else "table shards") in err.value.message
        assert "nothing was allowed or changed" in err.value.message
        assert state(pg_schema) == before
    assert reserved(owner) == USDT
    owner.close()


# -- a statement_timeout set on the role ----------------------------------------------------------


def test_a_statement_timeout_of_the_role_fails_closed_and_says_so(
    pg_schema: str, role: str
) -> None:
    owner = PolicyEngine(storage=PostgresStorage(pg_schema), clock=ManualClock())
    owner.set_policy("agent-1", DAILY_100)
    assert owner.authorize(payment(USDT)).allowed
    sql(pg_schema, f'GRANT USAGE ON SCHEMA @s TO "{role}"')
    sql(pg_schema, f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA @s TO "{role}"')
    sql(pg_schema, f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA @s TO "{role}"')
    sql(pg_schema, f'ALTER ROLE "{role}" SET statement_timeout = 150')
    url = as_role(pg_schema, role)
    engine = PolicyEngine(storage=PostgresStorage(url), clock=ManualClock())
    aengine = async_engine(url)
    base = split_postgres_url(pg_schema)[0]
    held = [  # the agent's row (the first round trip waits), its head (the commit waits)
        "SELECT 1 FROM @s.shards WHERE shard = 'agent-1' FOR UPDATE",
        "SELECT 1 FROM @s.docs WHERE name = 'h/agent-1' FOR UPDATE",
    ]
    schema = f'"{split_postgres_url(pg_schema)[1]}"'
    before = state(pg_schema)

    async def main() -> tuple[list[PolicyError], bool]:
        errors: list[PolicyError] = []
        for hold in held:
            with psycopg.connect(base) as holder:  # one transaction, held until the block ends
                holder.execute(hold.replace("@s", schema).encode())
                with pytest.raises(PolicyError) as err:
                    engine.authorize(payment(USDT))
                errors.append(err.value)
                with pytest.raises(PolicyError) as aerr:
                    await aengine.authorize(payment(USDT))
                errors.append(aerr.value)
        assert state(pg_schema) == before  # true: nothing was
        allowed = (await aengine.authorize(payment(USDT))).allowed  # without the lock, all is well
        await aengine.close()
        return errors, allowed

    errors, allowed = asyncio.run(main())
    assert allowed
    for error in errors:
        assert error.code == ErrorCode.STORAGE_UNAVAILABLE, error
        assert "cancelled a statement (canceling statement due to statement timeout)" in (
            error.message
        )
        assert "nothing was allowed or changed" in error.message
    assert engine.authorize(payment(USDT)).allowed
    assert reserved(owner) == 3 * USDT
    assert state(pg_schema)[:3] == (before[0] + 2, 0, before[2] + 2)
    engine.close()
    owner.close()


# -- the connection terminated on the server in the middle of a commit ----------------------------


def kill_in_commit(url: str, *, every_time: bool) -> None:
    """Make the server terminate the connection inside a commit (first, or every, time).

    A trigger on ``ops`` (the commit's first statement) calls
    ``pg_terminate_backend(pg_backend_pid())``: the transaction is rolled
    back, the client sees its connection lost after it sent ``COMMIT``. A
    sequence (not rolled back with it) makes "the first time" exact.
    """
    when = "true" if every_time else "nextval('@s.kills') = 1"
    sql(url, "CREATE SEQUENCE @s.kills")
    sql(
        url,
        "CREATE FUNCTION @s.kill() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF {when} THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF; "
        "RETURN NEW; END $$".replace("@s", f'"{split_postgres_url(url)[1]}"'),
    )
    sql(url, "CREATE TRIGGER kill BEFORE INSERT ON @s.ops FOR EACH ROW EXECUTE FUNCTION @s.kill()")


def stop_killing(url: str) -> None:
    sql(url, "DROP TRIGGER kill ON @s.ops")
    sql(url, "DROP SEQUENCE @s.kills")


@pytest.mark.parametrize("native", [False, True], ids=["sync", "async"])
def test_a_commit_whose_connection_is_terminated_once_is_recorded_once(
    pg_schema: str, native: bool
) -> None:
    engine = PolicyEngine(storage=PostgresStorage(pg_schema), clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    before = state(pg_schema)
    kill_in_commit(pg_schema, every_time=False)
    request = payment(3 * USDT, idempotency_key="k1")
    if native:
        aengine = async_engine(pg_schema)

        async def twice() -> tuple[Any, Any]:
            first = await aengine.authorize(request)
            again = await aengine.authorize(request)
            await aengine.close()
            return first, again

        first, again = asyncio.run(twice())
    else:
        first, again = engine.authorize(request), engine.authorize(request)
    assert count(pg_schema, "SELECT last_value FROM @s.kills") == 2  # killed once, then went
    assert first.allowed
    assert again.reservation_id == first.reservation_id  # the first decision
    assert reserved(engine) == 3 * USDT  # once, never twice
    assert state(pg_schema)[:3] == (before[0] + 1, 0, before[2] + 1)
    stop_killing(pg_schema)
    engine.close()


@pytest.mark.parametrize("native", [False, True], ids=["sync", "async"])
def test_a_commit_killed_every_time_says_unknown_and_how_and_nothing_was_recorded(
    pg_schema: str, native: bool
) -> None:
    """It said the connection 'could not be made again': it was, three times, and lost each time."""
    engine = PolicyEngine(storage=PostgresStorage(pg_schema), clock=ManualClock())
    engine.set_policy("agent-1", DAILY_100)
    before = state(pg_schema)
    kill_in_commit(pg_schema, every_time=True)
    request = payment(3 * USDT, idempotency_key="k1")
    aengine = async_engine(pg_schema)

    async def once() -> None:
        try:
            await aengine.authorize(request)
        finally:
            await aengine.close()

    with pytest.raises(PolicyError) as err:
        asyncio.run(once()) if native else engine.authorize(request)
    assert err.value.code == ErrorCode.STORAGE_UNAVAILABLE
    message = err.value.message
    assert "was lost during a commit and again on each of 3 new connections" in message
    assert "whether this change was recorded is unknown" in message
    assert "could not be made again" not in message
    assert state(pg_schema) == before  # here, in fact, nothing was
    stop_killing(pg_schema)
    assert engine.authorize(request).allowed  # the key was never used: a decision now, once
    assert reserved(engine) == 3 * USDT
    assert state(pg_schema)[:3] == (before[0] + 1, 0, before[2] + 1)
    engine.close()


# -- a schema that holds another program's tables -------------------------------------------------


def test_a_schema_holding_another_programs_docs_table_is_unavailable_and_left_alone(
    pg_schema: str,
) -> None:
    """It was INTERNAL: 'PostgreSQL refused a statement (42703): column "expires" does not exist'."""
    sql(pg_schema, "CREATE SCHEMA @s")
    sql(pg_schema, "CREATE TABLE @s.docs (id int PRIMARY KEY, title text)")
    sql(pg_schema, "INSERT INTO @s.docs VALUES (1, 'theirs')")
    engine = PolicyEngine(storage=PostgresStorage(pg_schema), clock=ManualClock())
    aengine = async_engine(pg_schema)

    async def acall() -> PolicyError:
        with pytest.raises(PolicyError) as aerr:
            await aengine.authorize(payment(USDT))
        await aengine.close()
        return aerr.value

    with pytest.raises(PolicyError) as err:
        engine.set_policy("agent-1", DAILY_100)
    engine.close()
    for error in (err.value, asyncio.run(acall())):
        assert error.code == ErrorCode.STORAGE_UNAVAILABLE, error
        assert "could not be set up in schema" in error.message
        assert "nothing was allowed or changed" in error.message
    tables = sql(
        pg_schema,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = "
        f"'{split_postgres_url(pg_schema)[1]}'",
    )
    assert tables == [("docs",)]  # the setup was rolled back: nothing of ours was left
    assert sql(pg_schema, "SELECT id, title FROM @s.docs") == [(1, "theirs")]
