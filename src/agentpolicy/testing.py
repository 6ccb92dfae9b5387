"""Helpers for testing code that uses agentpolicy: a settable clock and shortcuts.

Tests move the clock; they never sleep::

    clock = ManualClock()
    engine = PolicyEngine(clock=clock)
    clock.advance(minutes=5)
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from agentpolicy.engine import PolicyEngine
from agentpolicy.policy import AgentPolicy
from agentpolicy.requests import PaymentRequest
from agentpolicy.storage import Storage

__all__ = ["DEFAULT_START", "ManualClock", "engine_with_policy", "payment"]

DEFAULT_START = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)
"""A Monday, 10:00 UTC: inside the example policy's Monday-to-Friday 9-17 window."""


class ManualClock:
    """A clock that stands still until a test moves it; thread-safe.

    Pass it as ``PolicyEngine(clock=clock)``. ``clock()`` returns the current
    instant; :meth:`advance` and :meth:`set` move it.
    """

    def __init__(self, start: datetime = DEFAULT_START) -> None:
        self._check(start)
        self._now = start
        self._lock = threading.Lock()

    @staticmethod
    def _check(instant: datetime) -> None:
        if instant.tzinfo is None or instant.utcoffset() is None:
            raise ValueError("ManualClock needs a timezone-aware datetime")

    def __call__(self) -> datetime:
        """The current instant."""
        with self._lock:
            return self._now

    @property
    def now(self) -> datetime:
        """The current instant."""
        return self()

    def advance(self, delta: timedelta | None = None, **kwargs: float) -> datetime:
        """Move forward by ``delta`` or by ``timedelta(**kwargs)``; return the new instant."""
        step = delta if delta is not None else timedelta(**kwargs)
        with self._lock:
            self._now += step
            return self._now

    def set(self, instant: datetime) -> None:
        """Jump to ``instant`` (forwards or backwards)."""
        self._check(instant)
        with self._lock:
            self._now = instant


def payment(
    amount: int | str = 1_000_000,
    *,
    agent_id: str = "agent-1",
    recipient: str = "0xvendor",
    network: str = "eip155:8453",
    **kwargs: Any,
) -> PaymentRequest:
    """A valid :class:`~agentpolicy.PaymentRequest` with sensible defaults (1 USDT on Base)."""
    return PaymentRequest(
        agent_id=agent_id, amount=amount, recipient=recipient, network=network, **kwargs
    )


def engine_with_policy(
    policy: AgentPolicy | Mapping[str, Any],
    *,
    agent_id: str = "agent-1",
    storage: Storage | str | None = None,
    clock: ManualClock | None = None,
    reservation_ttl: timedelta = timedelta(minutes=5),
) -> tuple[PolicyEngine, ManualClock]:
    """An engine with ``policy`` set for ``agent_id``, and its clock (in memory by default)."""
    clock = clock or ManualClock()
    engine = PolicyEngine(storage=storage, clock=clock, reservation_ttl=reservation_ttl)
    engine.set_policy(agent_id, policy)
    return engine, clock
