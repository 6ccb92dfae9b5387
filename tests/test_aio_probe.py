"""The async engine under cancellation and stalls: nothing overspends, nothing stays stuck.

Agent frameworks cancel tasks all the time (``asyncio.wait_for``, a failed
``TaskGroup``, a client that went away). These tests cancel the calls of an
:class:`~agentpolicy.AsyncPolicyEngine` at every point they await (on its
native Redis and PostgreSQL stores and in its threads), behind stalled
servers and in crowds on one agent, and then check that the ledger is exact
(what is held is what the allowed decisions hold, each idempotency key
counted once), that the same key answers the same decision again, and that
the next call on the same agent neither waits nor fails.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg.conninfo
import pytest

from agentpolicy import AsyncPolicyEngine, PolicyEngine, open_storage
from agentpolicy.storage.postgres_async import AsyncPostgresStorage
from agentpolicy.testing import ManualClock, payment
from tests.test_postgres_stall import StallingProxy, through

USDT = 1_000_000
DAILY_100 = {"limits": {"daily": {"value": str(100 * USDT)}}}


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[StallingProxy]:
    """A TCP proxy to the test server that can be told to stop forwarding."""
    params = psycopg.conninfo.conninfo_to_dict(postgres_url.partition("?")[0])
    host = str(params.get("host") or "127.0.0.1").split(",")[0]
    port = int(str(params.get("port") or 5432).split(",")[0])
    if host.startswith("/"):
        pytest.skip("the server is reached by a Unix socket: no TCP proxy")
    running = StallingProxy((socket.AF_INET, (host, port)))
    yield running
    running.close()


def held(engine: PolicyEngine, agent: str = "agent-1") -> tuple[int, int]:
    """(spent, reserved) of the agent's daily window, read afresh."""
    window = next(iter(engine.budget(agent, "daily").periods.values()))
    return window.spent.value, window.reserved.value


def decided(engine: PolicyEngine, key: str, agent: str = "agent-1") -> list[str | None]:
    """The reservation ids of the decisions recorded under an idempotency key."""
    return [
        h.reservation_id
        for h in engine.history(agent, 10_000)
        if h.event == "decision" and h.request is not None and h.request.idempotency_key == key
    ]


# -- PostgreSQL that stops answering ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_call_cancelled_on_a_stalled_postgres_ends_at_once_and_the_agent_goes_on(
    pg_schema: str, proxy: StallingProxy
) -> None:
    """``asyncio.wait_for(authorize, 0.3)`` while the server does not answer.

    Cancelled, psycopg asks the server to cancel the statement and waits for
    its end (5 s for the request, 5 s more for the end): the caller of
    ``wait_for`` was held 10.3 s (4.9 s with a round-trip bound of 4 s).
    It now waits for that a moment at most, then the connection is cut.
    """
    clock = ManualClock()

    async def main() -> tuple[float, float, Any]:
        astore = AsyncPostgresStorage(
            through(proxy, pg_schema), pool_size=2, round_trip_timeout=timedelta(seconds=4)
        )
        async with AsyncPolicyEngine(open_storage(pg_schema), clock, async_storage=astore) as ae:
            await ae.set_policy("agent-1", DAILY_100)
            await ae.authorize(payment(USDT, idempotency_key="before"))
            proxy.stall()
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ae.authorize(payment(10 * USDT, idempotency_key="k")), 0.3)
            cancelled = time.monotonic() - started
            proxy.resume()
            started = time.monotonic()
            again = await ae.authorize(payment(10 * USDT, idempotency_key="k"))
            retried = time.monotonic() - started
            return cancelled, retried, again

    cancelled, retried, again = asyncio.run(main())
    assert cancelled < 2.0, f"wait_for(0.3) held its caller {cancelled:.1f} s"
    assert retried < 2.0
    assert again.allowed
    with PolicyEngine(storage=open_storage(pg_schema), clock=clock) as direct:
        assert decided(direct, "k") == [again.reservation_id]
        assert held(direct) == (0, 11 * USDT)
