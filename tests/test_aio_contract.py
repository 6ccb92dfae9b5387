"""The storage contract, run through AsyncPolicyEngine on every backend.

The tests below are the contract suite's own (imported from
``test_storage_contract``): this module overrides the ``backend`` fixture so
that ``backend.engine(...)`` hands them an :class:`AsyncPolicyEngine` built
with the same arguments, driven to the end of each coroutine on a private
event loop: natively on async clients for Redis, Redis Cluster and
PostgreSQL, in threads for memory and SQLite. They cover authorize, confirm, release, expiry, sweep,
approvals, idempotency, budgets, policies and history.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agentpolicy import AsyncPolicyEngine, Storage
from agentpolicy.storage import open_async_storage
from agentpolicy.testing import ManualClock
from tests.backends import Backend
from tests.test_storage_contract import (  # noqa: F401 - collected here, through the fixture below
    test_allowed_payment_reserves_until_confirmed,
    test_approval_expires_after_its_timeout_and_gives_the_budget_back,
    test_budget_reports_limited_windows_or_the_one_asked_for,
    test_confirm_twice_is_a_no_op_reporting_the_same_reservation,
    test_denials_reserve_nothing_and_are_recorded,
    test_enough_approvals_approve,
    test_five_payments_of_30_against_100_three_pass,
    test_history_is_newest_first_and_records_state_changes,
    test_one_deny_denies_at_once_and_gives_the_budget_back,
    test_release_after_confirm_and_confirm_after_release_are_refused,
    test_release_gives_budget_back_and_twice_is_a_no_op,
    test_reservation_expires_at_its_ttl_and_gives_budget_back_lazily,
    test_same_idempotency_key_and_request_answers_the_first_decision_once,
    test_set_policy_bumps_the_version_and_decisions_name_it,
    test_sweep_expires_due_reservations_and_reports_them,
    test_unauthorized_and_duplicate_approvers_change_nothing,
    test_unknown_reservation_is_not_found,
)


class Blocking:
    """An AsyncPolicyEngine seen through blocking calls: each coroutine runs to its end.

    Only the coroutine methods are reachable, so a test cannot go around the
    async engine.
    """

    def __init__(self, aengine: AsyncPolicyEngine) -> None:
        self._aengine = aengine
        self._loop = asyncio.new_event_loop()
        self.calls = 0

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._aengine, name)
        if not inspect.iscoroutinefunction(method):
            raise AttributeError(f"{name} is not a coroutine method of AsyncPolicyEngine")

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self._loop.run_until_complete(method(*args, **kwargs))

        return call

    def shut(self) -> None:
        self._loop.run_until_complete(self._aengine.close())
        self._loop.close()


class AsyncBackend:
    """The contract's backend, handing out AsyncPolicyEngines."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.engines: list[Blocking] = []

    def handle(self) -> Storage:
        return self.inner.handle()

    def engine(self, clock: ManualClock, **kwargs: Any) -> Blocking:
        native = None
        if self.inner.spec is not None:  # None for SQLite: it has no async client
            native = open_async_storage(self.inner.spec[0], key_prefix=self.inner.spec[1])
        aengine = AsyncPolicyEngine(
            storage=self.inner.open(), clock=clock, async_storage=native, **kwargs
        )
        assert aengine.native == (native is not None)
        made = Blocking(aengine)
        self.engines.append(made)
        return made


@pytest.fixture
def backend(backend: Backend) -> Iterator[AsyncBackend]:
    wrapped = AsyncBackend(backend)
    yield wrapped
    assert wrapped.engines
    assert all(e.calls for e in wrapped.engines)
    for e in wrapped.engines:
        e.shut()  # closes the engine it made, and so its storage handle
