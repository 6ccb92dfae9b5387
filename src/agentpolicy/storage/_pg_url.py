"""PostgreSQL URLs: the ``?schema=`` parameter taken out and checked, without importing psycopg.

:mod:`agentpolicy.config` checks ``AGENT_POLICY_POSTGRES_URL`` with this
module when it reads the environment, so a bad schema name is reported
before anything connects, and even when the ``postgres`` extra is missing.
"""

from __future__ import annotations

import re
import socket
import urllib.parse
from collections.abc import Mapping

from agentpolicy.errors import PolicyValidationError
from agentpolicy.urls import REDACTED

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


# -- after libpq has read the URL: what libpq itself would refuse only when it connects ------------

_C_SPACE = " \t\n\v\f\r"
_INTEGER = re.compile(rf"[{_C_SPACE}]*[+-]?[0-9]+[{_C_SPACE}]*")  # libpq's strtol, base 10
_INT_MAX = 2**31 - 1
_OPTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

_CHOICES: dict[str, tuple[str, ...]] = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "channel_binding": ("disable", "prefer", "require"),
    "gssencmode": ("disable", "prefer", "require"),
    "sslnegotiation": ("postgres", "direct"),
    "sslcertmode": ("disable", "allow", "require"),
    "target_session_attrs": (
        "any",
        "read-write",
        "read-only",
        "primary",
        "standby",
        "prefer-standby",
    ),
    "load_balance_hosts": ("disable", "random"),
}
"""Options whose value libpq takes from a list (compared exactly, as libpq does)."""

_TLS_VERSIONS = ("", "tlsv1", "tlsv1.1", "tlsv1.2", "tlsv1.3")  # compared caselessly by libpq
_INTEGERS = ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
             "tcp_user_timeout")  # fmt: skip

_LIBPQ_REASONS = (
    ("end of string reached when looking for matching", "an IPv6 address in [ ] has no ]"),
    ("IPv6 host address may not be empty", "an IPv6 address in [ ] is empty"),
    ("unexpected character", "an IPv6 address in [ ] is followed by other than :port, / or ?"),
    ("extra key/value separator", "a query option has more than one ="),
    ("missing key/value separator", "a query option has no = (write name=value)"),
    ("invalid percent-encoded token", "a % is not followed by two hexadecimal digits"),
    ("forbidden value %00", "%00 is not allowed in a value"),
)  # fmt: skip


def bad_postgres_url(reason: str, path: str = "$.storage") -> PolicyValidationError:
    """The error for a PostgreSQL URL libpq cannot read: the reason, never the URL (a password)."""
    return PolicyValidationError.single(path, f"not a PostgreSQL URL that libpq can read: {reason}")


def libpq_reason(message: str) -> str:
    """Why libpq could not parse a URL, in words that quote none of it.

    libpq quotes what it could not read (``invalid percent-encoded token:
    "s3cr%zzet"``, or the whole URL), which may be a password: only the name
    of an unknown option is repeated, and only when it looks like one.
    """
    text = message.strip()
    head, _, quoted = (text.splitlines()[0] if text else "").partition(': "')
    if head == "invalid URI query parameter":
        name = quoted[:-1] if quoted.endswith('"') else ""
        if not name:
            return "a query option has no name"
        return (
            f"libpq knows no option {name!r}" if _OPTION_NAME.fullmatch(name)
            else "libpq knows no option of that name"
        )  # fmt: skip
    for start, reason in _LIBPQ_REASONS:
        if head.startswith(start):
            return reason
    return "libpq cannot parse it"


def _integer(value: str) -> bool:
    return _INTEGER.fullmatch(value) is not None and abs(int(value)) <= _INT_MAX


def _count(value: str | None) -> int:
    return value.count(",") + 1 if value else 0


def option_problem(conninfo: str, given: Mapping[str, object]) -> str | None:
    """What libpq would refuse in ``given`` (its reading of ``conninfo``) only when it connects.

    libpq reads a URL's options when the URL is parsed but checks most of
    their values only when it connects; a connection refused for such a
    value would look like a server that is down. So: ports (1 to 65535, one
    per host or one for all), hostaddr (numeric addresses, one per host),
    ``connect_timeout`` (as psycopg reads it), the integer options
    (keepalives, ``tcp_user_timeout``) and the options that take one of a
    list of values (``sslmode``, ``target_session_attrs``, ...), as libpq 18
    checks them. The answer names the option and never repeats its value,
    which may be a password misplaced (``postgresql://u:pa/ss@h`` is host
    ``u``, port ``pa``). ``None``: nothing to refuse.
    ``given`` is what psycopg's ``conninfo_to_dict`` answers.
    """
    params = {key: str(value) for key, value in given.items() if value is not None}
    rest = conninfo.partition("://")[2]
    authority, _, path = rest.partition("/")
    if "@" not in authority and "@" in path.partition("?")[0]:
        return (
            "its @ comes after a /, so libpq would read the user and password as the host and "
            "port: write a / in a user name or password (or an @ in a database name) as %2F (%40)"
        )
    if "@" in authority.partition("@")[2].partition("?")[0]:  # the host libpq would read
        return (
            "its user name or password holds an @, so libpq would read the rest as the host: "
            "write an @ in them as %40"
        )
    hosts, addrs = params.get("host"), params.get("hostaddr")
    if hosts and addrs and _count(hosts) != _count(addrs):
        return f"{_count(hosts)} hosts but {_count(addrs)} hostaddr values"
    connections = _count(addrs) or _count(hosts) or 1
    ports = params.get("port")
    if ports:
        if _count(ports) not in (1, connections):
            return f"{_count(ports)} ports for {connections} hosts"
        for port in ports.split(","):
            if port and not (_integer(port) and 1 <= int(port) <= 65535):
                return "a port must be a number from 1 to 65535"
    for addr in (addrs or "").split(","):
        if addr and not _numeric_address(addr):
            return "hostaddr must be numeric IP addresses (a name goes in host)"
    timeout = params.get("connect_timeout")
    if timeout is not None:
        try:
            int(float(timeout))
        except (ValueError, OverflowError):
            return "connect_timeout must be a number of seconds"
    for name in _INTEGERS:
        value = params.get(name)
        if value is not None and not _integer(value):
            return f"{name} must be an integer"
    for name, choices in _CHOICES.items():
        value = params.get(name)
        if value is not None and value not in choices:
            return f"{name} must be one of " + ", ".join(choices)
    for name in ("ssl_min_protocol_version", "ssl_max_protocol_version"):
        value = params.get(name)
        if value is not None and value.lower() not in _TLS_VERSIONS:
            return f"{name} must be TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3"
    return None


def _numeric_address(addr: str) -> bool:
    """Whether libpq takes ``addr`` as a hostaddr: the resolver, numeric only (no lookup)."""
    try:
        socket.getaddrinfo(addr, None, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return False
    return True


def shown_postgres_url(url: str) -> str:
    """``url`` to show in messages: its password and every query value replaced by ``***``.

    The user information ends where libpq ends it, at the first ``@``
    before any ``/`` (a password may hold ``?`` or ``#``, which a generic
    URL parser takes for the query or the fragment, so it would show the
    password), or at the last ``@`` of what would be the host (a password
    holding ``@``, a URL refused at open). A user name without a password is replaced too, as
    :func:`agentpolicy.urls.redact_url` does.
    """
    scheme, _, rest = url.partition("://")
    authority = rest.partition("/")[0]
    userinfo, at, host = authority.partition("@")
    extra = host.partition("?")[0].rfind("@")  # u:S3CRET@pw@host (refused): show no part of it
    if extra >= 0:
        userinfo += "@" + host[:extra]
    shown = f"{scheme}://"
    if at:
        user, colon, _ = userinfo.partition(":")
        shown += f"{user}:{REDACTED}@" if colon else f"{REDACTED}@"
        rest = rest[len(userinfo) + 1 :]
    place, mark, query = rest.partition("?")
    shown += place
    if mark:
        shown += "?" + "&".join(
            f"{item.partition('=')[0]}={REDACTED}" for item in query.split("&") if item
        )
    return shown
