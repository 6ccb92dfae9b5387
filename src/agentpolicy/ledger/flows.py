"""The engine's calls as flows: generators of storage requests, driven sync or async.

Every method of :class:`~agentpolicy.PolicyEngine` that touches the store
is written once, as a generator that *yields* what it needs from the store
(run a ledger step, read documents, scan an index, read a log) and receives
the answer; it never calls the store itself. :func:`drive` answers on a
:class:`~agentpolicy.storage.base.Storage` (the sync engine);
:func:`adrive` awaits the answers on an
:class:`~agentpolicy.storage.base.AsyncStorage` (the async engine, on
redis.asyncio or psycopg's async pool), running the same steps through
:func:`~agentpolicy.ledger.arunner.arun`. An error the store raises is
thrown into the flow where it yielded, so a flow handles it as a call would.

So the sync and the async engine share every rule, check and answer; only
the two small drivers differ, by ``await``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

from agentpolicy.errors import PolicyError, StorageUnavailableError
from agentpolicy.ledger.arunner import arun
from agentpolicy.ledger.runner import UNREADABLE, View, run
from agentpolicy.storage.base import AsyncStorage, Storage, Txn

__all__ = ["UNREADABLE", "Flow", "Log", "Read", "Request", "Run", "Scan", "adrive", "drive",
           "unreadable"]  # fmt: skip


def unreadable(where: str, exc: BaseException) -> StorageUnavailableError:
    """The error for stored data that cannot be read (``where``: which data)."""
    return StorageUnavailableError(
        f"the stored data {where} cannot be read ({type(exc).__name__}: {exc}): it is damaged, "
        "or was not written by agentpolicy; the call stopped there and allowed nothing"
    )


T = TypeVar("T")


def _same(result: Any) -> Any:
    return result


class Run:
    """Run a ledger step on a shard until it commits; the answer is its result."""

    __slots__ = ("at", "op", "shard", "step", "write")

    def __init__(
        self,
        shard: str,
        step: Callable[[View, Txn], None],
        *,
        at: int,
        write: bool = True,
        op: str | None = None,
    ) -> None:
        self.shard = shard
        self.step = step
        self.at = at
        self.write = write
        self.op = op


class Read:
    """Read documents of a shard; the answer is their bodies (``None`` when absent), in order."""

    __slots__ = ("names", "shard")

    def __init__(self, shard: str, names: Sequence[str]) -> None:
        self.shard = shard
        self.names = names


class Scan:
    """Members of an index with ``score <= upto``, lowest first, at most ``limit``."""

    __slots__ = ("index", "limit", "shard", "upto")

    def __init__(self, shard: str, index: str, upto: int, limit: int) -> None:
        self.shard = shard
        self.index = index
        self.upto = upto
        self.limit = limit


class Log:
    """The newest ``limit`` entries of a log, newest first, as ``(seq, at, entry)``."""

    __slots__ = ("limit", "name", "shard")

    def __init__(self, shard: str, name: str, limit: int) -> None:
        self.shard = shard
        self.name = name
        self.limit = limit


Request = Run | Read | Scan | Log
"""What a flow may ask of the store."""

Flow = Generator[Request, Any, T]
"""A call of the engine: yields requests, receives their answers, returns the call's answer."""


def _answer(storage: Storage, request: Read | Scan | Log) -> Any:
    """Answer a request other than :class:`Run` (which :func:`drive` runs itself)."""
    if isinstance(request, Read):
        with storage.session(request.shard, write=False) as session:
            view = View(session)
            view.read(request.names)
            return [view.doc(n) for n in request.names]
    if isinstance(request, Scan):
        with storage.session(request.shard, write=False) as session:
            return session.scan(request.index, request.upto, request.limit)
    return storage.log(request.shard, request.name, request.limit)


async def _aanswer(storage: AsyncStorage, request: Request) -> Any:
    if isinstance(request, Run):
        return await arun(storage, request.shard, request.step, _same, at=request.at,
                          write=request.write, op=request.op)  # fmt: skip
    if isinstance(request, Read):
        async with storage.session(request.shard, write=False) as session:
            found = await session.get(request.names)
        return [found[n][1] if n in found else None for n in request.names]
    if isinstance(request, Scan):
        async with storage.session(request.shard, write=False) as session:
            return await session.scan(request.index, request.upto, request.limit)
    return await storage.log(request.shard, request.name, request.limit)


def drive(storage: Storage, flow: Flow[T]) -> T:
    """Run a flow to its end on a sync store; return its answer (or raise its error).

    Stored data that cannot be read (:data:`UNREADABLE`) is a
    :class:`~agentpolicy.errors.StorageUnavailableError` naming the shard.
    """
    where = _Where()
    try:
        return _drive(storage, flow, where)
    except PolicyError:
        raise
    except UNREADABLE as exc:
        raise unreadable(where.said(), exc) from exc


class _Where:
    """The shard of a flow's last request (for the words of an error)."""

    __slots__ = ("shard",)

    def __init__(self) -> None:
        self.shard: str | None = None

    def said(self) -> str:
        return "of this call" if self.shard is None else f"of shard {self.shard!r}"


def _drive(storage: Storage, flow: Flow[T], where: _Where) -> T:
    answer: Any = None
    error: BaseException | None = None
    while True:
        try:
            request = flow.send(answer) if error is None else flow.throw(error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        where.shard = request.shard
        answer, error = None, None
        try:
            if isinstance(request, Run):
                answer = run(storage, request.shard, request.step, _same, at=request.at,
                             write=request.write, op=request.op)  # fmt: skip
            else:
                answer = _answer(storage, request)
        except BaseException as exc:  # thrown into the flow, which decides
            error = exc


async def adrive(storage: AsyncStorage, flow: Flow[T]) -> T:
    """Run a flow to its end on an async store, awaiting every request; return its answer.

    Stored data that cannot be read is reported as by :func:`drive`.
    """
    where = _Where()
    try:
        return await _adrive(storage, flow, where)
    except PolicyError:
        raise
    except UNREADABLE as exc:
        raise unreadable(where.said(), exc) from exc


async def _adrive(storage: AsyncStorage, flow: Flow[T], where: _Where) -> T:
    answer: Any = None
    error: BaseException | None = None
    while True:
        try:
            request = flow.send(answer) if error is None else flow.throw(error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        where.shard = request.shard
        answer, error = None, None
        try:
            answer = await _aanswer(storage, request)
        except BaseException as exc:  # thrown into the flow, which decides
            error = exc
