"""Where the engine keeps its state: the :class:`Storage` primitive and :func:`open_storage`.

A store offers versioned documents, sorted indexes, logs and one atomic,
idempotent commit (see :mod:`agentpolicy.storage.base`); every rule of the
ledger lives in :mod:`agentpolicy.ledger`, once. Every backend passes the
same contract test suite. The memory and SQLite backends use only the
standard library; Redis and PostgreSQL need their extras.

:func:`open_async_storage` opens the asyncio stores (:class:`AsyncStorage`):
Redis on ``redis.asyncio`` and PostgreSQL on psycopg's async pool. Memory
and SQLite have none: their calls are short or local, and run off the event
loop in threads.
"""

from __future__ import annotations

from pathlib import Path

from agentpolicy.errors import ErrorCode, PolicyError, PolicyValidationError
from agentpolicy.storage.base import AsyncStorage, Storage
from agentpolicy.storage.memory import MemoryStorage
from agentpolicy.storage.sqlite import SQLiteStorage

__all__ = [
    "AsyncStorage",
    "MemoryStorage",
    "SQLiteStorage",
    "Storage",
    "open_async_storage",
    "open_storage",
]

_REDIS = ("redis://", "rediss://", "redis+cluster://", "rediss+cluster://")
_POSTGRES = ("postgresql://", "postgres://")
_EXTRAS = {
    "redis": "Redis storage needs the redis extra: pip install 'agentpolicy[redis]'",
    "postgres": (
        "PostgreSQL storage needs the postgres extra: pip install 'agentpolicy[postgres]'"
    ),
}


def _kind(url: object) -> str:
    """Which store ``url`` names: ``memory``, ``sqlite``, ``redis`` or ``postgres``.

    Raises :class:`~agentpolicy.PolicyValidationError` for anything else.
    """
    if not isinstance(url, str):
        raise PolicyValidationError.single("$.storage", "must be a storage URL string")
    if url == "memory://":
        return "memory"
    if url.startswith("sqlite:///"):
        if not url[len("sqlite:///") :]:
            raise PolicyValidationError.single("$.storage", "sqlite:/// needs a file path")
        return "sqlite"
    if url.startswith(_REDIS):
        return "redis"
    if url.startswith(_POSTGRES):
        return "postgres"
    raise PolicyValidationError.single(
        "$.storage",
        f"unknown storage URL {url!r}: use memory://, sqlite:///relative.db, "
        "sqlite:////absolute/path.db, redis://host:port/db, redis+cluster://host:port or "
        "postgresql://user@host:port/dbname",
    )


def _missing(kind: str) -> PolicyError:
    """The error for a store whose extra is not installed."""
    return PolicyError(_EXTRAS[kind], code=ErrorCode.STORAGE_UNAVAILABLE)


def open_storage(url: str, *, key_prefix: str = "agent-policy:") -> Storage:
    """Open a storage by URL.

    ``memory://`` (a fresh in-memory storage), ``sqlite:///relative.db``,
    ``sqlite:////absolute/path.db``, ``redis://host:port/db``, ``rediss://...``
    and ``redis+cluster://host:port`` (the ``redis`` extra; ``key_prefix``
    separates tenants on one server), ``postgresql://user@host:port/dbname``
    and ``postgres://...`` (the ``postgres`` extra; ``?schema=NAME`` separates
    stores in one database, ``key_prefix`` is not used). Raises
    :class:`~agentpolicy.PolicyValidationError` for any other form.
    """
    kind = _kind(url)
    if kind == "memory":
        return MemoryStorage()
    if kind == "sqlite":
        return SQLiteStorage(Path(url[len("sqlite:///") :]))
    if kind == "redis":
        try:
            from agentpolicy.storage.redis import RedisStorage  # noqa: PLC0415 - the extra
        except ImportError:
            raise _missing(kind) from None
        return RedisStorage(url, key_prefix=key_prefix)
    try:
        from agentpolicy.storage.postgres import PostgresStorage  # noqa: PLC0415 - the extra
    except ImportError:
        raise _missing(kind) from None
    return PostgresStorage(url)


def open_async_storage(url: str, *, key_prefix: str = "agent-policy:") -> AsyncStorage | None:
    """Open an asyncio storage by URL, or ``None`` for a store that has none.

    Takes every URL of :func:`open_storage`, with the same options and the
    same errors: ``redis://``, ``rediss://``, ``redis+cluster://`` and
    ``rediss+cluster://`` give an
    :class:`~agentpolicy.storage.redis_async.AsyncRedisStorage`,
    ``postgresql://`` and ``postgres://`` an
    :class:`~agentpolicy.storage.postgres_async.AsyncPostgresStorage`.
    ``memory://`` and ``sqlite:///...`` answer ``None``: those stores are
    used through :func:`open_storage`, with their calls run off the event
    loop in threads. Nothing connects until the first call.
    """
    kind = _kind(url)
    if kind in ("memory", "sqlite"):
        return None
    if kind == "redis":
        try:
            from agentpolicy.storage.redis_async import AsyncRedisStorage  # noqa: PLC0415
        except ImportError:
            raise _missing(kind) from None
        return AsyncRedisStorage(url, key_prefix=key_prefix)
    try:
        from agentpolicy.storage.postgres_async import AsyncPostgresStorage  # noqa: PLC0415
    except ImportError:
        raise _missing(kind) from None
    return AsyncPostgresStorage(url)
