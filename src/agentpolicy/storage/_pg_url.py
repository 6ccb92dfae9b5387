"""PostgreSQL URLs: the ``?schema=`` parameter taken out and checked, without importing psycopg.

:mod:`agentpolicy.config` checks ``AGENT_POLICY_POSTGRES_URL`` with this
module when it reads the environment, so a bad schema name is reported
before anything connects, and even when the ``postgres`` extra is missing.
"""

from __future__ import annotations

import re
import urllib.parse

from agentpolicy.errors import PolicyValidationError

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
"""How a PostgreSQL URL may start."""

DEFAULT_SCHEMA = "agentpolicy"
"""The schema that holds the tables when the URL names none."""

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def split_postgres_url(url: str, path: str = "$.storage") -> tuple[str, str]:
    """``url`` without its ``schema`` parameter, and the schema it names (or the default).

    Every other part of the URL is kept byte for byte (libpq reads it).
    Raises :class:`~agentpolicy.PolicyValidationError` at ``path`` for a URL
    that does not start with ``postgresql://`` or ``postgres://``, a
    ``schema`` given twice or empty, or a name that is not a plain
    identifier (a letter or ``_``, then letters, digits or ``_``, at most 63
    characters, not starting with ``pg_``).
    """
    if not url.startswith(POSTGRES_SCHEMES):
        raise PolicyValidationError.single(path, "must start with postgresql:// or postgres://")
    base, mark, query = url.partition("?")
    query, hash_mark, fragment = query.partition("#")
    kept: list[str] = []
    schemas: list[str] = []
    for item in query.split("&") if mark else []:
        key, _, value = item.partition("=")
        if urllib.parse.unquote(key) == "schema":
            schemas.append(urllib.parse.unquote(value))
        elif item:
            kept.append(item)
    if len(schemas) > 1:
        raise PolicyValidationError.single(path, "names ?schema= more than once")
    schema = schemas[0] if schemas else DEFAULT_SCHEMA
    if not _IDENTIFIER.fullmatch(schema) or schema.lower().startswith("pg_"):
        raise PolicyValidationError.single(
            path,
            f"?schema={schema!r} is not a plain identifier: use a letter or _, then letters, "
            "digits or _ (at most 63 characters, not starting with pg_)",
        )
    rebuilt = base + ("?" + "&".join(kept) if kept else "") + (hash_mark + fragment)
    return rebuilt, schema
