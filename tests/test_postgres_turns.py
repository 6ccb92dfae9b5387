"""Async PostgreSQL: tasks of one process waiting for one agent's row leave the pool to others.

Each writing session holds a pooled connection for its whole transaction,
and waits in the server for the agent's row while another holds it. Tasks
of one process writing to one agent at once held every connection of the
pool that way, so the rest of them, and calls for any other agent, found
no connection within the pool timeout (300 tasks on a busy host: up to 111
failed). They now take turns in the process first (``storage._turns``):
one connection waits for the row, the others stay free.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from agentpolicy import AsyncPolicyEngine, PolicyEngine, open_storage
from agentpolicy.storage import _turns
from agentpolicy.storage.postgres import PostgresStorage
from agentpolicy.storage.postgres_async import AsyncPostgresStorage
from agentpolicy.testing import ManualClock, payment
from tests.test_postgres_cancel import lock_agent_row, wait_until_blocked

LIMIT = {"limits": {"daily": {"value": "1000"}}}


def native_engine(url: str, clock: ManualClock, **options: Any) -> AsyncPolicyEngine:
    """An engine on the async store with a pool of two connections."""
    return AsyncPolicyEngine(
        PostgresStorage(url, pool_size=1),
        clock,
        async_storage=AsyncPostgresStorage(url, pool_size=2, **options),
    )


@contextlib.asynccontextmanager
async def agent_1s_row_held(
    aengine: AsyncPolicyEngine, url: str, writers: int
) -> AsyncIterator[list[asyncio.Task[Any]]]:
    """Another connection holds agent-1's row; ``writers`` authorizes of agent-1 are started.

    Yields once one of them waits in the server for the row; lets the row go on leaving.
    """
    locker = await asyncio.to_thread(lock_agent_row, url, "agent-1")
    try:
        waiting = [
            asyncio.create_task(aengine.authorize(payment(1, agent_id="agent-1")))
            for _ in range(writers)
        ]
        await asyncio.to_thread(wait_until_blocked, url, threading.Event())
        yield waiting
    finally:
        await asyncio.to_thread(locker.close)


@pytest.mark.timeout(60)
def test_tasks_waiting_for_one_agents_row_leave_the_pool_to_the_other_agents(
    pg_schema: str,
) -> None:
    clock = ManualClock()
    with PolicyEngine(storage=open_storage(pg_schema), clock=clock) as direct:
        direct.set_policy("agent-1", LIMIT)
        direct.set_policy("agent-2", LIMIT)

    async def main() -> tuple[Any, list[Any]]:
        aengine = native_engine(pg_schema, clock, pool_timeout=timedelta(seconds=1))
        async with aengine:
            await aengine.budget("agent-2")  # the store is set up, its pool open
            # one of agent-1's writers waits in the server for its row
            async with agent_1s_row_held(aengine, pg_schema, 5) as waiting:
                try:
                    other: Any = await aengine.authorize(payment(1, agent_id="agent-2"))
                except Exception as exc:  # what it was is the finding
                    other = exc
            return other, await asyncio.gather(*waiting, return_exceptions=True)

    other, waited = asyncio.run(main())
    assert getattr(other, "allowed", other) is True  # agent-2 found a free connection
    assert [getattr(d, "allowed", d) for d in waited] == [True] * 5  # and agent-1's waited


@pytest.mark.timeout(120)
def test_writers_in_line_wait_as_long_as_the_first_may_wait_for_a_row_another_process_holds(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first writer waits in the server for the row (up to lock_timeout); the line waits too.

    Before, the writers behind it gave up after RETRY_SECONDS (5 s) although the
    store answered and the row came within lock_timeout (10 s): another process
    holding agent-1's row for 7 s, 1 of 3 authorizes passed and 2 failed with
    "the store does not answer" (each had waited for the row itself before the
    line). Here the line's own bound is made short (0.2 s) and the row held for
    longer (1 s), far within lock_timeout (30 s).
    """
    monkeypatch.setattr(_turns, "RETRY_SECONDS", 0.2)
    clock = ManualClock()
    with PolicyEngine(storage=open_storage(pg_schema), clock=clock) as direct:
        direct.set_policy("agent-1", LIMIT)

    async def main() -> list[Any]:
        aengine = native_engine(pg_schema, clock, lock_timeout=timedelta(seconds=30))
        async with aengine:
            await aengine.budget("agent-1")  # the store is set up, its pool open
            async with agent_1s_row_held(aengine, pg_schema, 3) as waiting:
                await asyncio.sleep(1)  # five times the line's own bound
            return await asyncio.gather(*waiting, return_exceptions=True)

    waited = asyncio.run(main())
    assert [getattr(d, "allowed", d) for d in waited] == [True] * 3
