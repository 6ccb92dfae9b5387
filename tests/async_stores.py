"""Async stores in tests: a blocking view of an AsyncStorage, and a small ledger on arun.

:class:`BlockingStorage` lets the suites written for the sync primitive
(``tests/test_primitive.py``) run, unchanged, on the async stores: each call
is awaited to its end on the storage's own event loop. :class:`AsyncLedger`
runs the ledger's real steps (authorize, set a policy) through
:func:`agentpolicy.ledger.arunner.arun`, as the async engine will.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from datetime import datetime
from typing import Any, TypeVar

from agentpolicy.codec import dump_policy, load_policy
from agentpolicy.decisions import Decision
from agentpolicy.ledger import keys, operations, trees
from agentpolicy.ledger.arunner import arun
from agentpolicy.ledger.runner import View
from agentpolicy.ledger.state import LedgerConfig
from agentpolicy.policy import AgentPolicy
from agentpolicy.requests import PaymentRequest
from agentpolicy.storage._time import micros
from agentpolicy.storage.base import AsyncStorage, Doc, Outcome, Txn

T = TypeVar("T")


class BlockingStorage:
    """An :class:`AsyncStorage` through the sync ``Storage`` protocol, on a private loop."""

    def __init__(self, inner: AsyncStorage) -> None:
        self.inner = inner
        self.loop = asyncio.new_event_loop()
        self.global_indexes_atomic = inner.global_indexes_atomic
        self.default_history_retention = inner.default_history_retention

    def wait(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def session(self, shard: str, *, write: bool = True) -> BlockingSession:
        return BlockingSession(self, self.inner.session(shard, write=write))

    def log(self, shard: str, name: str, limit: int) -> list[tuple[int, int, Any]]:
        return self.wait(self.inner.log(shard, name, limit))

    def close(self) -> None:
        if not self.loop.is_closed():
            self.wait(self.inner.aclose())
            self.loop.close()


class BlockingSession:
    def __init__(self, owner: BlockingStorage, opened: Any) -> None:
        self.owner = owner
        self.opened = opened
        self.session: Any = None

    @property
    def fresh(self) -> bool:
        return bool(self.session.fresh)

    def __enter__(self) -> BlockingSession:
        self.session = self.owner.wait(self.opened.__aenter__())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.owner.wait(self.opened.__aexit__(*exc))

    def get(self, names: Sequence[str], guess: frozenset[str] = frozenset()) -> dict[str, Doc]:
        return self.owner.wait(self.session.get(names, guess))

    def scan(self, index: str, upto: int, limit: int) -> list[tuple[str, int]]:
        return self.owner.wait(self.session.scan(index, upto, limit))

    def commit(self, txn: Txn) -> Outcome:
        return self.owner.wait(self.session.commit(txn))


class AsyncLedger:
    """The ledger's own steps on an async store through ``arun`` (what the async engine does).

    ``shards`` maps an agent to the shard it lives in (its tree's), as the
    engine's cache of homes does; by default an agent is its own shard.
    """

    def __init__(self, storage: AsyncStorage, clock: Any, shards: dict[str, str] | None = None):
        self.storage = storage
        self.clock = clock
        self.config = LedgerConfig(history_retention=storage.default_history_retention)
        self.parsed: dict[tuple[str, int], AgentPolicy] = {}
        self.shards = shards or {}

    def policies(self, agent: str, version: int, view: View) -> AgentPolicy | None:
        if version == 0:
            return None
        found = self.parsed.get((agent, version))
        if found is None:
            doc = view.doc(keys.policy(agent, version))
            assert doc is not None, (agent, version)
            found = self.parsed[(agent, version)] = load_policy(doc["policy"])
        return found

    async def set_policy(self, agent: str, policy: dict[str, Any]) -> int:
        parsed = load_policy(policy)
        now: datetime = self.clock()
        step = trees.put_policy(self.config, agent, parsed, dump_policy(parsed), now,
                                self.policies, shard=agent)  # fmt: skip
        version: int = await arun(self.storage, agent, step, int, at=micros(now))
        self.parsed[(agent, version)] = parsed
        return version

    async def authorize(self, request: PaymentRequest) -> Decision | dict[str, Any]:
        """The decision (or, for an idempotent replay, the stored record)."""
        now: datetime = self.clock()
        shard = self.shards.get(request.agent_id, request.agent_id)
        seen: list[Decision] = []
        step = operations.authorize(self.config, shard, request, now, self.policies, seen)
        result: dict[str, Any] = await arun(self.storage, shard, step, dict, at=micros(now))
        if result.get("replayed"):
            return dict(result["rec"])
        assert seen[-1].code == result["rec"]["code"]
        return seen[-1]
