"""Where the engine keeps its state: the :class:`Storage` primitive and :func:`open_storage`.

A store offers versioned documents, sorted indexes, logs and one atomic,
idempotent commit (see :mod:`agentpolicy.storage.base`); every rule of the
ledger lives in :mod:`agentpolicy.ledger`, once. Every backend passes the
same contract test suite. The memory and SQLite backends use only the
standard library; Redis and PostgreSQL need their extras.
"""

from __future__ import annotations

from pathlib import Path

from agentpolicy.errors import ErrorCode, PolicyError, PolicyValidationError
from agentpolicy.storage.base import Storage
from agentpolicy.storage.memory import MemoryStorage
from agentpolicy.storage.sqlite import SQLiteStorage

__all__ = ["MemoryStorage", "SQLiteStorage", "Storage", "open_storage"]


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
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from agentpolicy.storage.postgres import PostgresStorage  # noqa: PLC0415 - the extra
        except ImportError:
            raise PolicyError(
                "PostgreSQL storage needs the postgres extra: pip install 'agentpolicy[postgres]'",
                code=ErrorCode.STORAGE_UNAVAILABLE,
            ) from None
        return PostgresStorage(url)
    raise PolicyValidationError.single(
        "$.storage",
        f"unknown storage URL {url!r}: use memory://, sqlite:///relative.db, "
        "sqlite:////absolute/path.db, redis://host:port/db, redis+cluster://host:port or "
        "postgresql://user@host:port/dbname",
    )
