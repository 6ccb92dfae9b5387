"""Writers of one shard in one process take turns (``agentpolicy.storage._turns``)."""

from __future__ import annotations

import asyncio

import pytest

from agentpolicy import StorageUnavailableError
from agentpolicy.storage import _turns
from agentpolicy.storage._turns import Turns


@pytest.fixture
def bound(monkeypatch: pytest.MonkeyPatch) -> float:
    """How long a line may stand still before its waiters give up (short, for the tests)."""
    monkeypatch.setattr(_turns, "RETRY_SECONDS", 0.5)
    return 0.5


def test_a_line_that_moves_is_waited_out_however_long_it_is(bound: float) -> None:
    """30 turns of 0.05 s each: the last waits 1.5 s, three times the bound, and gets its turn."""

    async def main() -> list[int]:
        turns = Turns()
        order: list[int] = []

        async def writer(n: int) -> None:
            await turns.take("agent-1")
            try:
                order.append(n)
                await asyncio.sleep(0.05)
            finally:
                turns.give("agent-1")

        await asyncio.gather(*(writer(n) for n in range(30)))
        assert turns.lines == {}  # no line kept once everyone left
        return order

    assert asyncio.run(main()) == list(range(30))  # in the order they came


def test_a_line_stuck_behind_a_call_that_does_not_end_gives_up(bound: float) -> None:
    async def main() -> None:
        turns = Turns()
        await turns.take("agent-1")  # and never ends (its store does not answer)
        waiting = [asyncio.create_task(turns.take("agent-1")) for _ in range(3)]
        other = asyncio.create_task(turns.take("agent-2"))  # another agent's line is its own
        await other
        turns.give("agent-2")
        for task in waiting:
            with pytest.raises(StorageUnavailableError, match=r"has not ended in 0\.5 s"):
                await task
        assert turns.lines["agent-1"].users == 1  # only the holder is left
        turns.give("agent-1")
        assert turns.lines == {}
        await turns.take("agent-1")  # the next writer gets its turn at once
        turns.give("agent-1")

    asyncio.run(main())


def test_a_waiter_cancelled_leaves_its_place_and_the_line_goes_on(bound: float) -> None:
    async def main() -> None:
        turns = Turns()
        await turns.take("agent-1")
        first = asyncio.create_task(turns.take("agent-1"))
        second = asyncio.create_task(turns.take("agent-1"))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert turns.lines["agent-1"].users == 2
        turns.give("agent-1")
        await second  # the turn went to the writer still waiting
        turns.give("agent-1")
        assert turns.lines == {}

    asyncio.run(main())
