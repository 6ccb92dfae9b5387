"""The benchmark suite: every figure beside its anchor, measured in the same run.

Run (after ``pip install -e '.[dev,bench]'``)::

    .venv/bin/python benchmarks/run.py            # everything
    .venv/bin/python benchmarks/run.py --quick    # fewer rounds, 10,000 agents

Redis figures use ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) with a
key prefix of their own, deleting only their own keys afterwards. PostgreSQL
figures use ``POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``)
with schemas of their own (``?schema=bench_...``), dropped afterwards. Figures are
medians of several rounds; these machines are noisy, so the ratios are what
count.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import shutil
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agentpolicy import PolicyEngine
from agentpolicy.examples import example_policy
from agentpolicy.storage import MemoryStorage, SQLiteStorage
from agentpolicy.testing import ManualClock, payment

NOW = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)  # a Monday, inside the example's 9-17 window
ROUNDS = 7
ROWS: list[tuple[str, str, str, str, str]] = []


def per_call(fn: Callable[[], object], number: int, rounds: int | None = None) -> float:
    """Median seconds per call over several rounds."""
    samples = []
    for _ in range(rounds or ROUNDS):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return statistics.median(samples)


def row(figure: str, value: str, anchor: str, ratio: float | None, target: str) -> None:
    ROWS.append((figure, value, anchor, "-" if ratio is None else f"{ratio:.2f}x", target))
    print(f"  {figure}: {value} | {anchor} | {ROWS[-1][3]} | {target}", flush=True)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us"


def full_policy(limit: int = 10**30) -> dict[str, Any]:
    """The full example policy (every rule kind, all five limits) with limits nothing reaches."""
    policy = example_policy()
    policy["limits"] = {k: {**v, "value": str(limit)} for k, v in policy["limits"].items()}
    policy["approvalConfig"]["thresholds"] = [
        {**t, "amount": {**t["amount"], "value": str(limit)}}
        for t in policy["approvalConfig"]["thresholds"]
    ]
    policy["approvalConfig"]["thresholds"][1]["amount"]["value"] = str(limit + 1)
    return policy


def every_kind_policy() -> dict[str, Any]:
    """The full policy plus every limit kind of Limits v2, none of them reached."""
    policy = full_policy()
    big = {"value": str(10**30), "decimals": 6, "symbol": "USDT"}
    policy["limits"].update(
        yearly=big, lifetime=big, rolling=[{"window": "24h", "amount": big}],
        counts=[{"window": "daily", "max": 10**9}, {"window": "10m", "max": 10**9}],
    )  # fmt: skip
    policy["scopedLimits"] = [{
        "name": "vendors", "match": {"categories": ["api_usage"]}, "groupBy": "recipient",
        "limits": {"perTransaction": big, "daily": big, "rolling": [{"window": "1h", "amount": big}],
                   "counts": [{"window": "hourly", "max": 10**9}]},
    }]  # fmt: skip
    policy["alerts"] = [{"percent": 80}]
    return policy


REQUEST = payment(1, recipient="0xaddr1", category="api_usage")


def make_engine(storage: Any) -> PolicyEngine:
    engine = PolicyEngine(storage=storage, clock=ManualClock(NOW))
    engine.set_policy("agent-1", full_policy())
    return engine


def cycle(engine: PolicyEngine) -> Callable[[], None]:
    def run() -> None:
        d = engine.authorize(REQUEST)
        assert d.reservation_id is not None, d.reason
        engine.confirm(d.reservation_id)

    return run


# -- figures ---------------------------------------------------------------------------------


def limits_hit(batch: int, total: int = 20_000) -> float:
    """Median seconds of one ``limits`` moving-window ``hit``, a new storage every ``batch`` hits.

    The moving window keeps one list entry per hit and inserts at its front,
    so a hit costs more the more hits the window holds: a fresh storage (the
    issue's anchor) is a hit on a window holding few entries. ``batch=total``
    is one storage for the whole round, its window holding up to ``total``
    entries (how this anchor was measured before 2026-12-03).
    """
    from limits import parse, storage, strategies

    item = parse("1000000/second")
    samples = []
    for _ in range(ROUNDS):
        elapsed = 0.0
        for _ in range(total // batch):
            hit = strategies.MovingWindowRateLimiter(storage.MemoryStorage()).hit
            start = time.perf_counter()
            for _ in range(batch):
                hit(item, "agent-1")
            elapsed += time.perf_counter() - start
        samples.append(elapsed / total)
    return statistics.median(samples)


def memory_vs_limits() -> None:
    anchor = limits_hit(100)
    engine = make_engine(MemoryStorage())
    value = per_call(cycle(engine), 2_000)
    row("authorize+confirm, memory, every rule kind", us(value),
        f"limits moving-window hit on a fresh storage {us(anchor)}", value / anchor,
        "<= 6x")  # fmt: skip
    from floor import floor_cycle  # the same work hand-inlined on plain dicts (a lower bound)

    floor = per_call(floor_cycle(), 5_000)
    row("the same cycle's work hand-inlined on plain dicts (benchmarks/floor.py: a lower "
        "bound, not the product)", us(floor), f"limits moving-window hit on a fresh storage "
        f"{us(anchor)}", floor / anchor, "reported")  # fmt: skip
    row("authorize+confirm, memory, every rule kind", us(value), f"the hand-inlined floor "
        f"{us(floor)}", value / floor, "reported")  # fmt: skip
    crowded = limits_hit(20_000)
    row("the same anchor on one storage whose window holds up to 20,000 hits (as measured "
        "before 2026-12-03)", us(crowded), f"on a fresh storage {us(anchor)}", crowded / anchor,
        "reported")  # fmt: skip


def every_kind_vs_plain() -> None:
    plain = per_call(cycle(make_engine(MemoryStorage())), 2_000)
    engine = PolicyEngine(storage=MemoryStorage(), clock=ManualClock(NOW))
    engine.set_policy("agent-1", every_kind_policy())
    value = per_call(cycle(engine), 2_000)
    row("authorize+confirm, memory, every limit kind (yearly, lifetime, rolling, counts, "
        "a grouped scope, alerts)", us(value), f"the plain full policy {us(plain)}",
        value / plain, "reported")  # fmt: skip


def shadow_vs_none() -> None:
    plain = per_call(cycle(make_engine(MemoryStorage())), 2_000)
    same = make_engine(MemoryStorage())
    same.set_shadow_policy("agent-1", full_policy(10**29))
    value = per_call(cycle(same), 2_000)
    row("authorize+confirm, memory, a shadow policy set (the same limit kinds, tighter)",
        us(value), f"no shadow {us(plain)}", value / plain, "reported")  # fmt: skip
    more = make_engine(MemoryStorage())
    more.set_shadow_policy("agent-1", every_kind_policy())
    value = per_call(cycle(more), 2_000)
    row("authorize+confirm, memory, a shadow policy with limit kinds the live one has not "
        "(rolling, counts, a grouped scope)", us(value), f"no shadow {us(plain)}", value / plain,
        "reported")  # fmt: skip


def sqlite_anchor(path: Path) -> Callable[[], None]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")

    def run() -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (body) VALUES ('x')")
        conn.execute("COMMIT")

    return run


class _Recorder:
    """A connection that notes every statement and its parameters before running it."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.notes: list[tuple[bool, str, Any]] = []

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        self.notes.append((False, sql, params))
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        rows = list(rows)
        self.notes.append((True, sql, rows))
        return self.conn.executemany(sql, rows)


def sqlite_floor(tmp: Path, cycles: int = 1_000) -> tuple[float, int, list[Any]]:
    """Seconds per authorize+confirm of only the SQL the SQLite store issues, and statements.

    A store on a fresh file runs 300 payments; its database is copied; the
    next ``cycles`` payments run with every statement and its parameters noted;
    then each round replays those statements, in order, on a copy taken
    before them, with one ``execute`` per statement and nothing else: the
    cost of the layout and its statements, without the ledger's Python.
    """
    storage = SQLiteStorage(tmp / "floor.db")
    engine = make_engine(storage)
    run = cycle(engine)
    for _ in range(300):
        run()
    real = storage._connection()
    copy = sqlite3.connect(tmp / "floor-start.db")
    real.backup(copy)  # a consistent copy, whatever the WAL holds
    copy.close()
    recorder = _Recorder(real)
    storage._local.conn = recorder
    for _ in range(cycles):
        run()
    storage._local.conn = real
    engine.close()
    notes = recorder.notes
    recorded = _sqlite_contents(tmp / "floor.db")
    samples = []
    for n in range(ROUNDS):
        path = tmp / f"floor-{n}.db"
        shutil.copyfile(tmp / "floor-start.db", path)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint = 10000")
        execute, executemany = conn.execute, conn.executemany
        start = time.perf_counter()
        for many, sql, params in notes:
            if many:
                executemany(sql, params)
            else:
                execute(sql, params).fetchall()
        samples.append((time.perf_counter() - start) / cycles)
        conn.close()
        assert _sqlite_contents(path) == recorded, "the replay must leave what the store left"
    return statistics.median(samples), len(notes) // cycles, notes


def wal_frames(conn: sqlite3.Connection, path: Path) -> tuple[int, collections.Counter[str]]:
    """Commits in the WAL of ``path`` (open on ``conn``), and its frames by the tree they belong to.

    A commit writes each page it changed once, as one WAL frame; a frame's
    page number is mapped to its table or index (and leaf or interior) by
    SQLite's ``dbstat`` table.
    """
    owner = {
        page: f"{name} {kind}"
        for name, page, kind in conn.execute("SELECT name, pageno, pagetype FROM dbstat")
    }
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    data = (path.parent / (path.name + "-wal")).read_bytes()
    frames: collections.Counter[str] = collections.Counter()
    commits, at = 0, 32  # a 32-byte WAL header, then frames of a 24-byte header and a page
    while at + 24 + size <= len(data):
        page, size_after = struct.unpack(">II", data[at : at + 8])
        frames[owner.get(page, "a new page")] += 1
        commits += size_after != 0  # a commit's last frame carries the database's size
        at += 24 + size
    return commits, frames


def sqlite_frames(tmp: Path, notes: list[Any], statements: int) -> None:
    """WAL frames (pages written) per commit: the store's statements replayed, and the anchor's."""
    shutil.copyfile(tmp / "floor-start.db", tmp / "frames.db")
    conn = sqlite3.connect(tmp / "frames.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")  # every frame stays in the WAL to be read
    for many, sql, params in notes[: 200 * statements]:
        if many:
            conn.executemany(sql, params)
        else:
            conn.execute(sql, params).fetchall()
    commits, frames = wal_frames(conn, tmp / "frames.db")
    conn.close()
    anchor = sqlite3.connect(tmp / "frames-anchor.db", isolation_level=None)
    anchor.execute("PRAGMA journal_mode = WAL")
    anchor.execute("PRAGMA wal_autocheckpoint = 0")
    anchor.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")
    anchor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for _ in range(400):
        anchor.execute("BEGIN IMMEDIATE")
        anchor.execute("INSERT INTO t (body) VALUES ('x')")
        anchor.execute("COMMIT")
    anchor_commits, anchor_frames = wal_frames(anchor, tmp / "frames-anchor.db")
    anchor.close()
    per = sum(frames.values()) / commits
    bare = sum(anchor_frames.values()) / anchor_commits
    trees = ", ".join(f"{tree} {n / commits:.2f}" for tree, n in frames.most_common())
    row(f"WAL frames (pages written) per commit of an authorize or a confirm: {trees}",
        f"{per:.2f}", f"bare transaction {bare:.2f}", per / bare, "reported")  # fmt: skip


def _sqlite_contents(path: Path) -> tuple[Any, ...]:
    """What a store's file holds, compared whole: every table's rows."""
    conn = sqlite3.connect(path)
    try:
        tables = ("docs", "idx", "logs", "ops", "sequence")
        return tuple(conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables)
    finally:
        conn.close()


def sqlite_figures(tmp: Path, history: int) -> None:
    anchor = per_call(sqlite_anchor(tmp / "anchor.db"), 3_000)
    engine = make_engine(SQLiteStorage(tmp / "bench.db"))
    empty = per_call(cycle(engine), 500)
    row("authorize+confirm, SQLite file (WAL)", us(empty),
        f"BEGIN IMMEDIATE;INSERT;COMMIT {us(anchor)}", empty / anchor, "<= 12x")  # fmt: skip
    floor, statements, notes = sqlite_floor(tmp)
    row(f"the SQLite store's own {statements} statements per authorize+confirm, replayed alone",
        us(floor), f"BEGIN IMMEDIATE;INSERT;COMMIT {us(anchor)}", floor / anchor,
        "reported (the layout's floor)")  # fmt: skip
    sqlite_frames(tmp, notes, statements)
    run = cycle(engine)
    for _ in range(history):
        run()
    full = per_call(run, 500)
    row(f"the same after {history:,} recorded payments", us(full),
        f"at an empty database {us(empty)}", full / empty, "<= 1.1x")  # fmt: skip
    engine.close()


def redis_figures(url: str) -> None:
    import redis

    from agentpolicy.storage.redis import RedisStorage

    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    storage = RedisStorage(url, key_prefix=prefix)
    engine = make_engine(storage)
    engine.authorize(REQUEST)
    ping = per_call(storage.client.ping, 3_000)
    value = per_call(lambda: engine.authorize(REQUEST), 1_000)
    probe = redis.Redis.from_url(url)
    calls = probe.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    for _ in range(200):
        engine.authorize(REQUEST)
    per = (probe.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0) - calls) / 200
    row("authorize on Redis", us(value), f"PING, same connection {us(ping)}", value / ping,
        "<= 4x")  # fmt: skip
    row("Redis commands per authorize (INFO)", f"{per:.2f} EVALSHA", "-", None, "exactly 1")
    for key in probe.scan_iter(match=prefix + "*"):  # only this run's own keys
        probe.delete(key)
    probe.close()
    engine.close()


def _ledger_authorize(storage: Any) -> Callable[[], tuple[Any, int]]:
    """A new authorize step of the ledger (and its time), as an engine makes one per call."""
    from agentpolicy.codec import load_policy
    from agentpolicy.ledger import keys, operations
    from agentpolicy.ledger.state import LedgerConfig
    from agentpolicy.storage._time import micros

    config = LedgerConfig(history_retention=storage.default_history_retention)
    parsed: dict[tuple[str, int], Any] = {}

    def policies(agent: str, version: int, view: Any) -> Any:
        if version == 0:
            return None
        if (agent, version) not in parsed:
            parsed[(agent, version)] = load_policy(view.doc(keys.policy(agent, version))["policy"])
        return parsed[(agent, version)]

    def step() -> tuple[Any, int]:
        seen: list[Any] = []
        return operations.authorize(config, "agent-1", REQUEST, NOW, policies, seen), micros(NOW)

    return step


def async_redis_figures(url: str) -> None:
    """arun(authorize) on AsyncRedisStorage beside run(authorize) on RedisStorage."""
    import asyncio

    from agentpolicy.ledger.arunner import arun
    from agentpolicy.ledger.runner import run
    from agentpolicy.storage.redis import RedisStorage
    from agentpolicy.storage.redis_async import AsyncRedisStorage

    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    make_engine(RedisStorage(url, key_prefix=prefix)).close()  # the full example policy
    sync = RedisStorage(url, key_prefix=prefix)
    sync_step = _ledger_authorize(sync)

    def sync_once() -> None:
        step, at = sync_step()
        assert run(sync, "agent-1", step, dict, at=at)["rec"]["code"] == "ALLOWED"

    engine = PolicyEngine(storage=RedisStorage(url, key_prefix=prefix), clock=ManualClock(NOW))
    engine.authorize(REQUEST)
    sync_once()
    n = 1_000

    async def measure() -> tuple[list[float], list[float], list[float]]:
        storage = AsyncRedisStorage(url, key_prefix=prefix)
        async_step = _ledger_authorize(storage)

        async def once() -> None:
            step, at = async_step()
            assert (await arun(storage, "agent-1", step, dict, at=at))["rec"]["code"] == "ALLOWED"

        await once()
        engines, syncs, asyncs = [], [], []
        for _ in range(ROUNDS):  # alternate, so all three see the same server and noise
            engines.append(per_call(lambda: engine.authorize(REQUEST), n, rounds=1))
            syncs.append(per_call(sync_once, n, rounds=1))
            start = time.perf_counter()
            for _ in range(n):
                await once()
            asyncs.append((time.perf_counter() - start) / n)
        await storage.aclose()
        return engines, syncs, asyncs

    engines, syncs, asyncs = asyncio.run(measure())
    e, s, a = (statistics.median(x) for x in (engines, syncs, asyncs))
    row("authorize step on Redis: arun on AsyncRedisStorage", us(a),
        f"run() on RedisStorage {us(s)}", a / s, "reported")  # fmt: skip
    row("authorize step on Redis: run() on RedisStorage", us(s),
        f"PolicyEngine.authorize {us(e)}", s / e, "reported")  # fmt: skip
    engine.close()
    sync.close()
    import redis

    probe = redis.Redis.from_url(url)
    for key in probe.scan_iter(match=prefix + "*"):  # only this run's own keys
        probe.delete(key)
    probe.close()


def _worker(args: tuple[str, str, str, int]) -> tuple[int, float]:
    kind, where, prefix, count = args
    if kind == "sqlite":
        storage: Any = SQLiteStorage(where)
    else:
        from agentpolicy.storage.redis import RedisStorage

        storage = RedisStorage(where, key_prefix=prefix)
    engine = PolicyEngine(storage=storage, clock=ManualClock(NOW))
    start = time.perf_counter()
    allowed = sum(engine.authorize(payment(1_000_000)).allowed for _ in range(count))
    elapsed = time.perf_counter() - start
    engine.close()
    return allowed, elapsed


def throughput(kind: str, where: str, per_process: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    base = None
    for processes in (1, 2, 4):
        prefix = f"bench-{uuid.uuid4().hex[:8]}:"
        agent_db = where
        if kind == "sqlite":
            agent_db = str(Path(where) / f"tp{processes}.db")
            setup: Any = SQLiteStorage(agent_db)
        else:
            from agentpolicy.storage.redis import RedisStorage

            setup = RedisStorage(where, key_prefix=prefix)
        total = processes * per_process
        limit = total // 2  # half the requests must be refused: the count is checked exactly
        engine = PolicyEngine(storage=setup, clock=ManualClock(NOW))
        engine.set_policy("agent-1", {"limits": {"daily": {"value": str(limit * 1_000_000)}}})
        start = time.perf_counter()
        with ctx.Pool(processes) as pool:
            results = pool.map(_worker, [(kind, agent_db, prefix, per_process)] * processes)
        wall = time.perf_counter() - start
        allowed = sum(a for a, _ in results)
        assert allowed == limit, f"{kind}: {allowed} allowed, expected exactly {limit}"
        rate = total / max(e for _, e in results)
        base = base or rate
        row(f"throughput, {processes} process(es) on one budget, {kind}",
            f"{rate:,.0f} authorize/s ({allowed} of {total} allowed, exact)",
            f"1 process {base:,.0f}/s", rate / base, "reported")  # fmt: skip
        del wall
        engine.close()
        if kind == "redis":
            import redis

            probe = redis.Redis.from_url(where)
            for key in probe.scan_iter(match=prefix + "*"):
                probe.delete(key)
            probe.close()


def import_times(runs: int) -> None:
    def median_import(statement: str) -> float:
        code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
        times = [
            float(
                subprocess.run(
                    [sys.executable, "-c", code], capture_output=True, text=True, check=True
                ).stdout
            )  # fmt: skip
            for _ in range(runs)
        ]
        return statistics.median(times)

    anchor = median_import("import attrs, cattrs, dateutil")
    value = median_import("import agentpolicy")
    row("import agentpolicy", f"{value * 1e3:.1f} ms",
        f"import attrs, cattrs, dateutil {anchor * 1e3:.1f} ms", value / anchor, "<= 1.2x")  # fmt: skip


def memory_per_agent(agents: int) -> None:
    code = f"""
import tracemalloc, json
from datetime import UTC, datetime
tracemalloc.start()
from agentpolicy import PolicyEngine
from agentpolicy.storage import MemoryStorage
from agentpolicy.testing import ManualClock, payment
engine = PolicyEngine(storage=MemoryStorage(), clock=ManualClock())
base = tracemalloc.get_traced_memory()[0]
policy = {{"limits": {{"daily": {{"value": "100000000"}}, "monthly": {{"value": "900000000"}}}}}}
for i in range({agents}):
    agent = f"agent-{{i}}"
    engine.set_policy(agent, policy)
    d = engine.authorize(payment(1_000_000, agent_id=agent))
    engine.confirm(d.reservation_id)
print(json.dumps((tracemalloc.get_traced_memory()[0] - base) / {agents}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)  # fmt: skip
    per = json.loads(done.stdout)
    row(f"memory per agent, {agents:,} agents in memory", f"{per / 1024:.1f} KiB",
        "(policy, counters, one confirmed payment, its history)", None, "reported")  # fmt: skip


# -- PostgreSQL ------------------------------------------------------------------------------


def _pg_schema_url(base: str) -> tuple[str, str]:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    return f"{base}{'&' if '?' in base else '?'}schema={schema}", schema


def _pg_drop(base: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')  # only this run's own schema


def postgres_figures(base: str) -> None:
    """authorize+confirm beside a bare one-row INSERT transaction on the same connection."""
    from agentpolicy.storage.postgres import PostgresStorage

    url, schema = _pg_schema_url(base)
    storage = PostgresStorage(url, pool_size=1)  # one connection: the engine's is the anchor's
    engine = make_engine(storage)
    run = cycle(engine)
    run()
    conn = storage._pool.getconn()
    conn.execute(f'CREATE TABLE "{schema}".anchor (id bigserial PRIMARY KEY, body text)')
    insert = f'INSERT INTO "{schema}".anchor (body) VALUES (%s)'

    def anchor() -> None:
        conn.execute("BEGIN")
        conn.execute(insert, ("x",))
        conn.execute("COMMIT")

    for _ in range(50):
        anchor()
    storage._pool.putconn(conn)
    for _ in range(50):
        run()
    anchors, values = [], []
    for _ in range(ROUNDS):  # alternate, so both see the same server and the same noise
        conn = storage._pool.getconn()
        anchors.append(per_call(anchor, 300, rounds=1))
        storage._pool.putconn(conn)
        values.append(per_call(run, 150, rounds=1))
    a, v = statistics.median(anchors), statistics.median(values)
    row("authorize+confirm, PostgreSQL", us(v),
        f"BEGIN;INSERT;COMMIT, same connection {us(a)}", v / a, "<= 6x")  # fmt: skip
    engine.close()
    _pg_drop(base, schema)


def _pg_worker(args: tuple[str, list[str], int]) -> tuple[int, float]:
    from agentpolicy.storage.postgres import PostgresStorage

    url, agents, count = args
    engine = PolicyEngine(storage=PostgresStorage(url, pool_size=2), clock=ManualClock(NOW))
    engine.get_policy(agents[0])  # connects before the clock starts
    start = time.perf_counter()
    allowed = sum(
        engine.authorize(payment(1_000_000, agent_id=agents[i % len(agents)])).allowed
        for i in range(count)
    )
    elapsed = time.perf_counter() - start
    engine.close()
    return allowed, elapsed


def postgres_throughput(base: str, per_process: int, agents: int) -> None:
    """authorize/s with 1, 2 and 4 processes on one budget, then spread over many agents."""
    from agentpolicy.storage.postgres import PostgresStorage

    ctx = multiprocessing.get_context("spawn")
    for label, names in (("one budget", ["agent-1"]),
                         (f"{agents} agents", [f"agent-{i}" for i in range(agents)])):  # fmt: skip
        base_rate = None
        for processes in (1, 2, 4):
            url, schema = _pg_schema_url(base)
            total = processes * per_process
            each = total // len(names) // 2  # half the requests refused: counted exactly
            engine = PolicyEngine(storage=PostgresStorage(url), clock=ManualClock(NOW))
            for name in names:
                engine.set_policy(name, {"limits": {"daily": {"value": str(each * 1_000_000)}}})
            engine.close()
            jobs = [(url, names[i % len(names):] + names[: i % len(names)], per_process)
                    for i in range(processes)]  # fmt: skip
            with ctx.Pool(processes) as pool:
                results = pool.map(_pg_worker, jobs)
            allowed = sum(a for a, _ in results)
            expected = each * len(names)
            assert allowed == expected, f"postgres: {allowed} allowed, expected exactly {expected}"
            rate = total / max(e for _, e in results)
            base_rate = base_rate or rate
            row(f"throughput, {processes} process(es), {label}, PostgreSQL",
                f"{rate:,.0f} authorize/s ({allowed} of {total} allowed, exact)",
                f"1 process {base_rate:,.0f}/s", rate / base_rate, "reported")  # fmt: skip
            _pg_drop(base, schema)


def _sqlite_only(quick: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_figures(Path(tmp), 2_000 if quick else 20_000)


def _postgres_only(quick: bool) -> None:
    postgres_figures(
        os.environ.get("POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    )


ONLY: dict[str, Callable[[bool], None]] = {
    "memory": lambda quick: memory_vs_limits(),
    "sqlite": _sqlite_only,
    "redis": lambda quick: redis_figures(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")),
    "postgres": _postgres_only,
    "import": lambda quick: import_times(5 if quick else 11),
}
"""Groups of figures for ``--only NAME``: one figure and its anchor, without the rest."""


def main() -> None:
    global ROUNDS  # noqa: PLW0603 - a command-line setting
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--async-only", action="store_true", help="only the async store figures")
    parser.add_argument("--only", choices=sorted(ONLY), help="one group of figures")
    args = parser.parse_args()
    ROUNDS = 3 if args.quick else 7
    if args.async_only:
        async_redis_figures(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
        return
    if args.only:
        ONLY[args.only](args.quick)
        return
    print(f"agentpolicy benchmarks on {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    memory_vs_limits()
    every_kind_vs_plain()
    shadow_vs_none()
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_figures(Path(tmp), 2_000 if args.quick else 20_000)
        throughput("sqlite", tmp, 200 if args.quick else 500)
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except Exception as exc:
        print(f"  Redis figures skipped: {url} unreachable ({type(exc).__name__})")
    else:
        redis_figures(url)
        async_redis_figures(url)
        throughput("redis", url, 300 if args.quick else 1_000)
    pg = os.environ.get("POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        import psycopg

        psycopg.connect(pg, connect_timeout=2).close()
    except Exception as exc:
        print(f"  PostgreSQL figures skipped: {pg} unreachable ({type(exc).__name__})")
    else:
        postgres_figures(pg)
        postgres_throughput(pg, 400 if args.quick else 1_000, 100)
    import_times(5 if args.quick else 11)
    memory_per_agent(10_000 if args.quick else 100_000)
    print("\n| figure | value | anchor, in the same run | ratio | target |")
    print("|---|---|---|---|---|")
    for figure, value, anchor, ratio, target in ROWS:
        print(f"| {figure} | {value} | {anchor} | {ratio} | {target} |")


if __name__ == "__main__":
    main()
