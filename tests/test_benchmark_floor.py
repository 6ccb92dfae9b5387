"""The benchmarks' hand-inlined floor does the engine's work: same results, same refusals.

``benchmarks/floor.py`` is a lower bound that ``docs/performance.md`` reasons
from; a floor that skipped a check or returned less than the engine would
make that reasoning wrong, so its results are held to the engine's here.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import pytest

from agentpolicy import PaymentRequest, PolicyEngine
from agentpolicy.storage import MemoryStorage
from agentpolicy.testing import ManualClock

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def modules() -> Iterator[tuple[ModuleType, ModuleType]]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import floor
        import run

        yield floor, run
    finally:
        sys.path.remove(str(BENCHMARKS))


def _engine(run: Any, when: Any) -> PolicyEngine:
    engine = PolicyEngine(storage=MemoryStorage(), clock=ManualClock(when))
    engine.set_policy("agent-1", run.full_policy())
    return engine


def test_the_floor_returns_what_the_engine_returns(modules: tuple[ModuleType, ModuleType]) -> None:
    floor, run = modules
    engine, mine = _engine(run, run.NOW), floor.Floor()
    for _ in range(3):
        theirs = engine.authorize(run.REQUEST)
        ours = mine.authorize(run.REQUEST, run.NOW)
        assert ours is not None
        assert theirs.reservation_id is not None
        assert ours.reservation_id is not None
        # ids made as the ledger makes them: the same shape, another random part
        assert len(ours.reservation_id) == len(theirs.reservation_id)
        assert ours.reservation_id.split("_")[::2] == theirs.reservation_id.split("_")[::2]
        same = ("allowed", "code", "requires_approval", "windows", "expires_at", "decided_at")
        assert {k: getattr(ours, k) for k in same} == {k: getattr(theirs, k) for k in same}
        confirmed, done = (
            engine.confirm(theirs.reservation_id),
            mine.confirm(ours.reservation_id, run.NOW),
        )
        assert done is not None
        skip = {"id", "policy_version", "approval_id"}
        fields = [f.name for f in attrs.fields(type(done)) if f.name not in skip]
        assert {k: getattr(done, k) for k in fields} == {k: getattr(confirmed, k) for k in fields}
    assert mine.confirm(ours.reservation_id, run.NOW) is None  # confirmed once only


@pytest.mark.parametrize(
    ("change", "later"),
    [
        ({"recipient": "0xelsewhere"}, timedelta(0)),
        ({"recipient": "0xbadaddr1"}, timedelta(0)),
        ({"network": "eip155:56"}, timedelta(0)),
        ({"network": "eip155:10"}, timedelta(0)),
        ({"category": "gambling"}, timedelta(0)),
        ({"category": "travel"}, timedelta(0)),
        ({}, timedelta(hours=8)),  # 18:00: outside the allowed hours
        ({}, timedelta(days=5)),  # a Saturday
        ({}, timedelta(days=1)),  # the blocked maintenance day
        ({"amount": str(10**30)}, timedelta(0)),  # the first approval threshold
    ],
)
def test_the_floor_refuses_what_the_engine_refuses(
    modules: tuple[ModuleType, ModuleType], change: dict[str, Any], later: timedelta
) -> None:
    floor, run = modules
    when = run.NOW + later
    fields = {f.name: getattr(run.REQUEST, f.name) for f in attrs.fields(PaymentRequest)}
    request = PaymentRequest(**{**fields, **change})
    assert not _engine(run, when).authorize(request).allowed
    assert floor.Floor().authorize(request, when) is None
