"""Writers of one shard in one process take turns (the async Redis and PostgreSQL stores).

Many tasks of one process writing to one agent at once would otherwise
contend in the store: on Redis their optimistic commits lose to each other
and are run again (300 at once: up to 96 gave up after 100 attempts and
5 s); on PostgreSQL each holds a pooled connection while it waits for the
agent's row, so the pool runs dry (300 at once on a busy host: up to 111
found all 10 connections busy past the pool timeout), and calls for other
agents find none either. Taking turns in the process first, each task
meets the store alone: one connection per agent, a commit at the first
attempt. Other processes still contend as before, in the store.

Turns go in the order writers came, each handed to the next directly. A
turn is waited for as long as the line moves: a writer gives up (with
``STORAGE_UNAVAILABLE``, nothing changed) only when no turn began in the
line for :data:`~agentpolicy.ledger.runner.RETRY_SECONDS` (or the store's
own bound on one writer's turn, when a turn may take longer: PostgreSQL's
waits for a row another process holds), that is when the writer ahead is
stuck (its store does not answer). A long line that moves,
however long, is waited out. A writer cancelled while it waits leaves its
place; one cancelled as its turn came hands it on. A line is dropped when
its last writer leaves, so a process that paid for a million agents keeps
nothing per agent.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from agentpolicy.errors import StorageUnavailableError
from agentpolicy.ledger.runner import RETRY_SECONDS

__all__ = ["Turns"]


class _Line:
    """The writers of one shard: whether one has the turn, who waits, when a turn last began."""

    __slots__ = ("held", "moved", "users", "waiting")

    def __init__(self) -> None:
        self.held = False
        self.waiting: deque[asyncio.Future[None]] = deque()
        self.users = 0
        self.moved = time.monotonic()

    def hand_on(self) -> None:
        """The turn ends: hand it to the first writer still waiting, if any."""
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                self.moved = time.monotonic()
                return
        self.held = False


class Turns:
    """The lines of one store's writers, by shard (use it on one event loop)."""

    __slots__ = ("lines", "patience")

    def __init__(self, patience: float | None = None) -> None:
        self.lines: dict[str, _Line] = {}
        self.patience = patience
        """How long a line may stand still (seconds; ``None``: ``RETRY_SECONDS``)."""

    async def take(self, shard: str) -> None:
        """Wait for this task's turn on ``shard``; :meth:`give` it back when done.

        Raises :class:`~agentpolicy.errors.StorageUnavailableError` when the
        line did not move for :attr:`patience` (see the module docs).
        """
        line = self.lines.get(shard)
        if line is None:
            line = self.lines[shard] = _Line()
        line.users += 1
        if not line.held:
            line.held = True
            line.moved = time.monotonic()
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line.waiting.append(turn)
        try:
            await _wait(line, turn, RETRY_SECONDS if self.patience is None else self.patience)
        except BaseException:
            if turn.done() and not turn.cancelled():
                line.hand_on()  # the turn came as this writer left: the next one has it
            else:
                turn.cancel()
                line.waiting.remove(turn)
            self._leave(shard, line)
            raise

    def give(self, shard: str) -> None:
        """Give back the turn this task took on ``shard``."""
        line = self.lines[shard]
        line.hand_on()
        self._leave(shard, line)

    def _leave(self, shard: str, line: _Line) -> None:
        line.users -= 1
        if not line.users:
            del self.lines[shard]


async def _wait(line: _Line, turn: asyncio.Future[None], patience: float) -> None:
    """Wait until ``turn`` comes, as long as the line moved within ``patience`` seconds."""
    while not turn.done():
        left = line.moved + patience - time.monotonic()
        if left <= 0:
            raise _stuck(patience)
        await asyncio.wait((turn,), timeout=left)  # then look again: the line may have moved


def _stuck(patience: float) -> StorageUnavailableError:
    return StorageUnavailableError(
        f"the call ahead of this one on the same agent has not ended in {patience:g} s "
        "(the store does not answer); nothing was changed"
    )
