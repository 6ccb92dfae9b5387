"""Run a ledger step over an async store: the same steps as :func:`~agentpolicy.ledger.runner.run`.

A step is a plain function that reads through a :class:`View` and writes
only into its :class:`~agentpolicy.storage.base.Txn`; it cannot await. So
:func:`arun` runs it against a view whose session answers from a memo of
what this session has read so far. When the step asks for something the
memo lacks, the memo raises a private exception naming it; :func:`arun`
awaits that read on the real (async) session, adds it to the memo, and runs
the step again from the start, with a fresh transaction, until it completes.
Then it awaits the commit, and retries exactly as :func:`run` does (the
decisions are the same code: :class:`~agentpolicy.ledger.runner._Attempts`).

This is safe because a step is a deterministic function of what it reads:
given the same answers it asks the same questions in the same order, so
each run gets one step further, and a run that stops at a missing read has
written nothing anyone sees (its transaction is dropped). Ids a step makes
up at random differ between runs, and only the last run's transaction is
committed. The cost: a step that needs ``k`` rounds of reads runs ``k + 1``
times, which is CPU only (the memo answers every read it has seen, and the
store sees the same ``k`` requests as with :func:`run`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from agentpolicy.errors import InternalError
from agentpolicy.ledger.runner import View, _Attempts
from agentpolicy.storage.base import AsyncSession, AsyncStorage, Doc, Outcome, Txn, new_op

__all__ = ["arun"]

T = TypeVar("T")


class _Missing(BaseException):
    """A read the memo cannot answer yet (a ``BaseException``: no step can swallow it)."""

    __slots__ = ("guess", "index", "names")

    def __init__(
        self,
        names: Sequence[str] = (),
        guess: frozenset[str] = frozenset(),
        index: tuple[str, int, int] | None = None,
    ) -> None:
        super().__init__()
        self.names = names
        self.guess = guess
        self.index = index


class _Memo:
    """A sync :class:`~agentpolicy.storage.base.Session` answering from what was read so far."""

    __slots__ = ("docs", "fresh", "scans")

    def __init__(self, fresh: bool) -> None:
        self.fresh = fresh
        self.docs: dict[str, Doc | None] = {}
        self.scans: dict[tuple[str, int, int], list[tuple[str, int]]] = {}

    def get(self, names: Sequence[str], guess: frozenset[str] = frozenset()) -> dict[str, Doc]:
        docs = self.docs
        missing = [name for name in names if name not in docs]
        if missing:
            raise _Missing(missing, guess.intersection(missing))
        found: dict[str, Doc] = {}
        for name in names:
            doc = docs[name]
            if doc is not None:
                found[name] = doc
        return found

    def scan(self, index: str, upto: int, limit: int) -> list[tuple[str, int]]:
        key = (index, upto, limit)
        found = self.scans.get(key)
        if found is None:
            raise _Missing(index=key)
        return list(found)

    def commit(self, txn: Txn) -> Outcome:
        raise InternalError("a ledger step does not commit: its runner does")

    async def learn(self, session: AsyncSession, missing: _Missing) -> None:
        """Await the read ``missing`` names on the real session and remember its answer."""
        if missing.index is not None:
            self.scans[missing.index] = await session.scan(*missing.index)
            return
        got = await session.get(missing.names, missing.guess)
        for name in missing.names:
            self.docs[name] = got.get(name)


async def arun(
    storage: AsyncStorage,
    shard: str,
    step: Callable[[View, Txn], None],
    finish: Callable[[Any], T],
    *,
    at: int,
    write: bool = True,
    op: str | None = None,
) -> T:
    """Run ``step`` on ``shard`` until its transaction commits; return ``finish(result)``.

    Exactly :func:`~agentpolicy.ledger.runner.run` on an
    :class:`~agentpolicy.storage.base.AsyncStorage`: the same steps, the
    same retries on conflict (waiting with :func:`asyncio.sleep`), the same
    fresh re-run when an error or an answer that writes nothing rests on a
    guess, the same :class:`~agentpolicy.errors.StorageUnavailableError`
    past :data:`~agentpolicy.ledger.runner.MAX_ATTEMPTS` and
    :data:`~agentpolicy.ledger.runner.RETRY_SECONDS`. The step runs once
    more per round of reads it needs (see the module docs).
    """
    op = op or new_op(at)
    attempts = _Attempts(write)
    while True:
        async with storage.session(shard, write=attempts.write) as session:
            memo = _Memo(session.fresh)
            while True:
                txn = Txn(op, at)
                try:
                    commit = attempts.ran(step, attempts.view(memo), txn)
                    break
                except _Missing as missing:
                    wanted = missing
                await memo.learn(session, wanted)  # outside the except: errors chain to nothing
            if commit is None:
                continue
            if not commit:
                return finish(txn.result)
            outcome = await session.commit(txn)
        if not outcome.conflict:
            return finish(outcome.result)
        await asyncio.sleep(attempts.conflicted())
