"""authorize + confirm on memory and SQLite, beside named anchors measured in the same run.

Run: .venv/bin/python benchmarks/bench_engine.py
Anchors: for memory, a dict update under a lock (the least any thread-safe
in-memory counter costs); for SQLite, a bare ``BEGIN IMMEDIATE; INSERT;
COMMIT`` on the same disk with the same pragmas. Medians of several rounds.
"""

from __future__ import annotations

import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from agentpolicy import PolicyEngine
from agentpolicy.examples import seed_policy
from agentpolicy.storage import MemoryStorage, SQLiteStorage
from agentpolicy.testing import ManualClock, payment

NOW = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)


def per_call(fn: Callable[[], object], number: int, rounds: int = 5) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return statistics.median(samples)


def engine_cycle(engine: PolicyEngine) -> Callable[[], object]:
    request = payment(1, recipient="0xaddr1", category="api_usage")

    def cycle() -> None:
        d = engine.authorize(request)
        assert d.reservation_id is not None, d.reason
        engine.confirm(d.reservation_id)

    return cycle


def make_engine(storage: object) -> PolicyEngine:
    policy = seed_policy()
    policy["limits"] = {k: {**v, "value": str(10**30)} for k, v in policy["limits"].items()}
    policy.pop("approvalConfig")
    engine = PolicyEngine(storage=storage, clock=ManualClock(NOW))  # type: ignore[arg-type]
    engine.set_policy("agent-1", policy)
    return engine


def sqlite_anchor(path: Path) -> Callable[[], object]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")

    def run() -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (body) VALUES ('x')")
        conn.execute("COMMIT")

    return run


def main() -> None:
    lock = threading.Lock()
    counters: dict[str, int] = {}

    def memory_anchor() -> None:
        with lock:
            counters["k"] = counters.get("k", 0) + 1

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        memory = make_engine(MemoryStorage())
        a = per_call(memory_anchor, 50_000)
        m = per_call(engine_cycle(memory), 2_000)
        rows.append(("authorize+confirm, memory", m, "dict update under a lock", a))
        sqlite = make_engine(SQLiteStorage(Path(tmp) / "bench.db"))
        s_anchor = per_call(sqlite_anchor(Path(tmp) / "anchor.db"), 2_000)
        s = per_call(engine_cycle(sqlite), 500)
        rows.append(
            ("authorize+confirm, SQLite (WAL)", s, "BEGIN IMMEDIATE;INSERT;COMMIT", s_anchor)
        )
    print(f"{'figure':<34}{'median':>11}  {'anchor':<32}{'median':>11}{'ratio':>8}")
    for name, value, anchor_name, anchor in rows:
        print(
            f"{name:<34}{value * 1e6:>9.1f}us  {anchor_name:<32}{anchor * 1e6:>9.1f}us"
            f"{value / anchor:>8.1f}"
        )


if __name__ == "__main__":
    main()
