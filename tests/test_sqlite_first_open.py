"""Many processes opening one new SQLite file at once all get a working store.

Switching a new file to WAL answers "database is locked" at once (without
SQLite's busy handler) while another process holds it; the store retries
within its busy timeout instead of failing the open.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from agentpolicy import PolicyEngine, PolicyError
from agentpolicy.storage import SQLiteStorage
from agentpolicy.testing import ManualClock, payment

PROCESSES = 8
ROUNDS = 60


def _open_and_pay(path: str, start: Any, answers: Any, n: int) -> None:
    start.wait()
    try:
        engine = PolicyEngine(storage=SQLiteStorage(path), clock=ManualClock())
        if n == 0:
            engine.set_policy("agent-1", {"limits": {"daily": {"value": "1000000"}}})
        engine.close()
        answers.put("ok")
    except PolicyError as err:
        answers.put(f"{err.code}: {err.message}")


def test_processes_opening_one_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    failures: list[str] = []
    for round_ in range(ROUNDS):
        path = str(tmp_path / f"new-{round_}.db")
        start, answers = ctx.Barrier(PROCESSES), ctx.Queue()
        workers = [
            ctx.Process(target=_open_and_pay, args=(path, start, answers, n))
            for n in range(PROCESSES)
        ]
        for w in workers:
            w.start()
        failures += [a for a in (answers.get(timeout=60) for _ in workers) if a != "ok"]
        for w in workers:
            w.join(30)
    assert failures == []
    engine = PolicyEngine(storage=SQLiteStorage(tmp_path / "new-0.db"), clock=ManualClock())
    assert engine.authorize(payment(1)).allowed
    engine.close()
