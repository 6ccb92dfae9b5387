"""Where the engine keeps its state: the :class:`Storage` protocol and :func:`open_storage`.

Every backend passes the same contract test suite. The memory and SQLite
backends use only the standard library.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from agentpolicy.errors import ErrorCode, PolicyError, PolicyValidationError
from agentpolicy.records import (
    Approval,
    AuthorizeOutcome,
    AuthorizePlan,
    Counter,
    HistoryRecord,
    PolicyRecord,
    Reservation,
    SweepResult,
)
from agentpolicy.storage.memory import MemoryStorage
from agentpolicy.storage.sqlite import SQLiteStorage

__all__ = ["MemoryStorage", "SQLiteStorage", "Storage", "open_storage"]


@runtime_checkable
class Storage(Protocol):
    """What the engine needs from a storage; every method is atomic.

    Times are passed in (the engine's clock): a storage never reads a clock
    to decide anything. Methods raise
    :class:`~agentpolicy.errors.StorageUnavailableError` when the backend
    cannot be reached, and the state-conflict errors documented on
    :class:`~agentpolicy.PolicyEngine`.
    """

    def put_policy(self, agent_id: str, policy: dict[str, Any], now: datetime) -> PolicyRecord:
        """Store a new version of an agent's policy (its JSON form)."""
        ...

    def get_policy(self, agent_id: str, version: int | None = None) -> PolicyRecord | None:
        """The current policy, or a given version of it."""
        ...

    def list_policies(self, prefix: str | None = None) -> list[PolicyRecord]:
        """Current policies of agents whose id starts with ``prefix``."""
        ...

    def authorize(self, plan: AuthorizePlan) -> AuthorizeOutcome:
        """Re-check the plan's limits and record its outcome, atomically."""
        ...

    def confirm(self, reservation_id: str, now: datetime) -> Reservation:
        """Turn a reservation into spending."""
        ...

    def release(self, reservation_id: str, now: datetime) -> Reservation:
        """Give a reservation's budget back."""
        ...

    def vote(
        self,
        approval_id: str,
        approver: str,
        decision: str,
        comment: str | None,
        now: datetime,
        reservation_ttl: timedelta,
    ) -> Approval:
        """Record an approver's decision."""
        ...

    def get_reservation(self, reservation_id: str, now: datetime) -> Reservation | None:
        """A reservation, expired if its time is up."""
        ...

    def get_approval(self, approval_id: str, now: datetime) -> Approval | None:
        """An approval, expired if its time is up."""
        ...

    def list_approvals(self, agent_id: str | None, now: datetime) -> list[Approval]:
        """Pending approvals, oldest first."""
        ...

    def usage(self, agent_id: str, keys: Iterable[str], now: datetime) -> dict[str, Counter]:
        """Counters of these window keys, after due expiries."""
        ...

    def history(self, agent_id: str, limit: int = 100) -> list[HistoryRecord]:
        """An agent's history, newest first."""
        ...

    def sweep(self, now: datetime) -> SweepResult:
        """Expire every due reservation and approval."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


def open_storage(url: str, *, key_prefix: str = "agent-policy:") -> Storage:
    """Open a storage by URL.

    ``memory://`` (a fresh in-memory storage), ``sqlite:///relative.db``,
    ``sqlite:////absolute/path.db``, ``redis://host:port/db``, ``rediss://...``
    and ``redis+cluster://host:port`` (the ``redis`` extra; ``key_prefix``
    separates tenants on one server). Raises
    :class:`~agentpolicy.PolicyValidationError` for any other form.
    """
    if not isinstance(url, str):
        raise PolicyValidationError.single("$.storage", "must be a storage URL string")
    if url == "memory://":
        return MemoryStorage()
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path:
            raise PolicyValidationError.single("$.storage", "sqlite:/// needs a file path")
        return SQLiteStorage(Path(path))
    if url.startswith(("redis://", "rediss://", "redis+cluster://", "rediss+cluster://")):
        try:
            from agentpolicy.storage.redis import RedisStorage  # noqa: PLC0415 - the extra
        except ImportError:
            raise PolicyError(
                "Redis storage needs the redis extra: pip install 'agentpolicy[redis]'",
                code=ErrorCode.STORAGE_UNAVAILABLE,
            ) from None
        return RedisStorage(url, key_prefix=key_prefix)
    raise PolicyValidationError.single(
        "$.storage",
        f"unknown storage URL {url!r}: use memory://, sqlite:///relative.db, "
        "sqlite:////absolute/path.db, redis://host:port/db or redis+cluster://host:port",
    )
