"""What both Redis stores do, without I/O: key names, the commit's KEYS and ARGV, its reply.

:class:`~agentpolicy.storage.redis.RedisStorage` (redis-py) and
:class:`~agentpolicy.storage.redis_async.AsyncRedisStorage`
(``redis.asyncio``) keep the same keys and run the same script, so data
written by one is read by the other. Everything they decide is here, once:
each operation is a generator that yields the requests it needs sent
(:class:`Read`, :class:`Scan`, :class:`Eval`, :class:`Hints`,
:class:`Lines`) and receives their answers; a store only sends them, with
its client, and turns Redis failures into structured errors with
:func:`failure`.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Callable, Generator, Sequence
from contextvars import ContextVar
from datetime import timedelta
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import redis.exceptions
from redis.backoff import ExponentialBackoff

from agentpolicy.errors import (
    InternalError,
    PolicyError,
    PolicyValidationError,
    StorageUnavailableError,
)
from agentpolicy.ledger.keys import tag
from agentpolicy.storage.base import (
    CONFLICT,
    NEXT_SEQ,
    OP_KEEP_US,
    Doc,
    Encoded,
    Outcome,
    Txn,
)

T = TypeVar("T")

CACHE_SIZE = 50_000
"""Documents a store keeps in its cache before it starts again from nothing."""

_UNAVAILABLE = frozenset(
    {"CLUSTERDOWN", "TRYAGAIN", "LOADING", "MASTERDOWN", "READONLY", "BUSY", "NOSCRIPT"}
)
"""Error codes of a server that refused a command without running it, for now."""

POOL_SIZE = 100
"""Connections a store keeps to one Redis node at most; a call waits for a free one."""

GlobalOps = list[tuple[str, str, int | None]]


def script() -> str:
    """The text of ``redis_commit.lua``."""
    return (resources.files("agentpolicy.storage") / "redis_commit.lua").read_text("utf-8")


def cluster_url(url: str) -> tuple[bool, str]:
    """Whether ``url`` names a Cluster, and the URL the client takes (``+cluster`` dropped).

    Raises :class:`~agentpolicy.PolicyValidationError` for a URL whose host,
    port or database cannot be read: redis-py takes any path that is not a
    number as database 0, so ``redis://host:6379/tenant-a`` would share
    database 0 with every other such URL.
    """
    cluster = url.startswith(("redis+cluster://", "rediss+cluster://"))
    plain = url.replace("+cluster", "", 1) if cluster else url
    try:
        parts = urlsplit(plain)
        parts.port  # noqa: B018 - reading it checks it
    except ValueError as exc:
        raise _bad_url(exc) from None
    database = parts.path[1:] if parts.path.startswith("/") else parts.path
    if database and not (database.isascii() and database.isdigit()):
        got = "" if "@" in database else f", got {database[:64]!r}"  # maybe part of a password
        raise PolicyValidationError.single(
            "$.storage", f"the database of a Redis URL is a number (redis://host:6379/0){got}"
        )
    given = {name for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
    unknown = sorted(given - _known_options())
    if unknown:
        name = unknown[0]
        said = repr(name) if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name) else "of that name"
        raise PolicyValidationError.single(
            "$.storage", f"not a valid Redis URL: redis-py knows no option {said}"
        )
    tls_only = sorted(given & _tls_options()) if parts.scheme == "redis" else []
    if tls_only:  # a plain connection takes none: a TypeError at the first command, "damaged"
        raise PolicyValidationError.single(
            "$.storage", f"not a valid Redis URL: the option {tls_only[0]!r} is for a TLS "
            "connection (rediss://), and this URL is redis://",
        )  # fmt: skip
    named = [value for name, value in parse_qsl(parts.query) if name == "client_name"]
    if any(not re.fullmatch(r"[!-~]*", value) for value in named):  # Redis refuses it later
        raise PolicyValidationError.single(
            "$.storage", "not a valid Redis URL: client_name may hold no spaces, newlines or "
            "characters other than printable ASCII",
        )  # fmt: skip
    if cluster and database and int(database) != 0:
        raise PolicyValidationError.single(
            "$.storage", f"a Redis Cluster has only database 0, got {database[:64]!r}"
        )
    return cluster, plain


_ENCODE = "(a / ? or # in a password is written %2F %3F %23)"

_REASONS = (
    ("Port could not be cast", f"Port could not be cast to a number {_ENCODE}"),
    ("Port out of range", "Port out of range 0-65535"),
    ("port must be in", "Port out of range 0-65535"),
    ("Invalid IPv6 URL", "Invalid IPv6 URL: a [ is not closed"),
    ("does not appear to be an IPv4 or IPv6 address", "what is in [ ] is not an IPv6 address"),
)
_OPTION = re.compile(r"Invalid value for '[A-Za-z_]{1,64}' in connection URL\.")


@functools.cache
def _known_options() -> frozenset[str]:
    """The options a Redis URL may give: what redis-py's connections and pools take by name.

    redis-py passes an option it does not parse itself to the connection,
    which refuses a name it does not know only when the first connection is
    made (a ``TypeError`` that would read as damaged data).
    """
    import redis.asyncio.connection as aconn  # noqa: PLC0415 - only when a URL is opened
    import redis.connection as conn  # noqa: PLC0415

    takers = (conn.AbstractConnection, conn.Connection, conn.SSLConnection, conn.ConnectionPool,
              conn.BlockingConnectionPool, aconn.AbstractConnection, aconn.Connection,
              aconn.SSLConnection, aconn.ConnectionPool, aconn.BlockingConnectionPool)  # fmt: skip
    names = set(conn.URL_QUERY_ARGUMENT_PARSERS)
    for taker in takers:
        for name, param in inspect.signature(taker.__init__).parameters.items():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and name != "self":
                names.add(name)
    return frozenset(names)


@functools.cache
def _tls_options() -> frozenset[str]:
    """The options only a TLS connection takes (``ssl_cert_reqs``, ...): none for redis://."""
    import redis.connection as conn  # noqa: PLC0415 - only when a URL is opened

    tls = set(inspect.signature(conn.SSLConnection.__init__).parameters)
    return frozenset(tls - set(inspect.signature(conn.Connection.__init__).parameters))


def _bad_url(exc: ValueError) -> PolicyValidationError:
    """The error for a Redis URL that cannot be read: the reason, never the URL (a password).

    The reasons of ``urllib.parse`` and redis-py quote what they could not
    read (``Port could not be cast to integer value as 'S3'``: the start of
    a password holding a ``/``), so they are reworded; an option's name is
    the only part of the URL repeated.
    """
    message = str(exc)
    reason = next((words for start, words in _REASONS if start in message), None)
    if reason is None:
        reason = message if _OPTION.fullmatch(message) else "redis-py cannot read it"
    return PolicyValidationError.single("$.storage", f"not a valid Redis URL: {reason}")


_RESENT: ContextVar[bool] = ContextVar("agentpolicy_redis_resent", default=False)


def first_attempt() -> None:
    """Note that no attempt of the command about to be sent has failed yet (this thread or task)."""
    _RESENT.set(False)


def resent() -> bool:
    """Whether an attempt of the last command sent failed without an answer and it went again.

    redis-py sends a command again, on a new socket, after a timeout or a
    dropped connection: a refusal that ends the call then answers a later
    attempt, and the first one may have run.
    """
    return _RESENT.get()


def noting(fail: Callable[..., T]) -> Callable[..., T]:
    """``fail`` (redis-py's handler of a failed attempt), noting that an attempt failed."""

    def noted(error: Exception, *count: int) -> T:
        if _refusal(error) is None:  # a refused login ran nothing: it got an answer
            _RESENT.set(True)
        return fail(error, *count)

    return noted


def client_options(timeout: timedelta, retry: Any) -> dict[str, Any]:
    """What both stores give their client: ``timeout`` per command, then two quick retries.

    ``retry`` is the store's ``Retry`` class (a subclass of redis-py's, or
    ``redis.asyncio``'s, whose handler of a failed attempt is :func:`noting`).
    """
    seconds = timeout.total_seconds()
    return {
        "socket_timeout": seconds,
        "socket_connect_timeout": seconds,
        "decode_responses": True,
        "retry": retry(ExponentialBackoff(cap=0.2, base=0.05), 2),
    }


def pool_options(timeout: timedelta) -> dict[str, Any]:
    """What a blocking pool takes besides :func:`client_options`: its size, and how long to wait.

    redis-py's default pool fails at once when all its connections are in
    use; a ``BlockingConnectionPool`` waits up to ``timeout`` for one to come
    back, then raises ``ConnectionError("No connection available.")``.
    """
    return {"max_connections": POOL_SIZE, "timeout": timeout.total_seconds()}


def unreachable(exc: BaseException) -> PolicyError:
    """A client that could not even be made: a bad option in its URL, or a host it cannot reach."""
    if isinstance(exc, ValueError):  # redis-py read an option of the URL and refused it
        return _bad_url(exc)
    refused = _refusal(exc)  # a Cluster's client logs in as it is made
    if refused is not None:
        return StorageUnavailableError(f"{refused[1]}; {NOTHING_CHANGED}")
    return StorageUnavailableError(f"cannot reach Redis: {type(exc).__name__}")


class NoTurn(redis.exceptions.ConnectionError):
    """No turn at the pool came within the timeout: raised before a command was sent."""


def not_sent(exc: BaseException) -> bool:
    """Whether ``exc`` says no connection was free, so the command was never sent.

    redis-py's default pool raises ``MaxConnectionsError``; a blocking pool
    that waited its timeout in vain raises a plain ``ConnectionError`` whose
    only mark is its message.
    """
    return isinstance(exc, redis.exceptions.MaxConnectionsError | NoTurn) or (
        type(exc) is redis.exceptions.ConnectionError
        and str(exc).startswith("No connection available")
    )


FAILURES = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException)
"""What redis-py raises when Redis fails (a Cluster's routing errors are not ``RedisError``)."""


def failure(
    exc: BaseException, *, writing: bool, cluster: bool = False, again: bool = False
) -> PolicyError:
    """The structured error for a Redis failure (``writing``: a commit may have been sent).

    A Cluster's routing error (``RedisClusterException``: no node for a
    slot, no target) is raised before a command is sent, or after an
    attempt that failed: for a commit, its outcome is unknown. So is any
    refusal of a commit on a Cluster (``cluster``), whose client sends a
    command again, on another connection, after one timed out: the refusal
    (no free connection, READONLY, OOM, ...) may answer that second attempt
    while the first one ran. Only :class:`NoTurn` is certainly before any.
    On one node the same holds when ``again`` (:func:`resent`): an attempt
    of the commit failed without an answer before the refusal came. A
    Cluster client that gave up after MOVED, ASK and TRYAGAIN answers (a
    plain ``ClusterError``, "TTL exhausted": the slot is migrating, so a
    commit that names a key the node lacks is refused) is such a refusal
    too: a commit applied, whose answer was lost, can delete a key (an
    emptied index), and its retry is then refused.

    A refused login or permission (:func:`_refusal`) is such a refusal: Redis
    ran nothing of the command it refused. Its message says which, never
    what the URL holds; a command the commit script runs refused inside it
    may follow the script's first writes (Redis undoes none of them) on a
    server before Redis 7.0. From 7.0 the script asks whether each of its
    writes is allowed before the first (its ``"N"`` reply, :func:`acl_refused`),
    so a refusal inside it is of a read it makes before writing.
    """
    refusal = _refusal(exc)
    if refusal is not None:
        kind, words = refusal
        if kind == "script":
            return StorageUnavailableError(
                f"{words}: on a server before Redis 7.0 the script may have written part of "
                "this change before it, since Redis undoes none of a script's writes (from 7.0 "
                "the script checks every write before its first, so only a read it makes "
                "first can be refused there); give the store's user every command of @read, "
                "@write and @scripting"
            )
        if writing and (cluster or again):
            return _unknown(exc, refused=words, cluster=cluster)
        return StorageUnavailableError(f"{words}; {NOTHING_CHANGED}")
    if isinstance(exc, redis.exceptions.ClusterError) and not isinstance(
        exc, redis.exceptions.ResponseError
    ):  # "TTL exhausted": every attempt was redirected (MOVED, ASK) or told TRYAGAIN
        words = (
            "Redis Cluster kept redirecting the command or answering TRYAGAIN until the "
            "client gave up (ClusterError), as it does while the slot of these keys migrates "
            "between nodes"
        )
        if writing:  # an attempt before those, timed out, may have run (see above)
            return _unknown(exc, refused=words, cluster=True)
        return StorageUnavailableError(f"{words}; {NOTHING_CHANGED}")
    if isinstance(exc, redis.exceptions.RedisClusterException):
        if writing:
            return _unknown(exc)
        return StorageUnavailableError(
            f"Redis Cluster is unavailable ({type(exc).__name__}); nothing was allowed or changed"
        )
    if isinstance(exc, redis.exceptions.ResponseError):
        text = str(exc)
        # redis-py takes the code off the text of the errors it has a class for (READONLY, OOM...)
        code = getattr(exc, "status_code", None) or text.split(" ", 1)[0]
        down = isinstance(exc, redis.exceptions.ClusterError)  # CLUSTERDOWN, MASTERDOWN, ...
        refused = down or code in _UNAVAILABLE or code == "OOM" or "OOM command not allowed" in text
        if writing and (cluster or again) and refused:
            return _unknown(exc)
        if down or code in _UNAVAILABLE:
            word = type(exc).__name__ if down else code
            return StorageUnavailableError(
                f"Redis is unavailable ({word}); nothing was allowed or changed"
            )
        if code == "OOM" or "OOM command not allowed" in text:  # (Redis 6 wraps a script's)
            # refused before the script's first write, and once it has written nothing more is
            # refused (Redis checks memory only while a script has not written): all or nothing
            return StorageUnavailableError(
                "Redis is out of memory (OOM: maxmemory reached and nothing can be evicted), "
                "so it refused the change; nothing was allowed or changed"
            )
        if "DB index is out of range" in text:  # SELECT, as the connection opened: nothing ran
            return StorageUnavailableError(
                "Redis has no database of the number in the storage URL (it is beyond the "
                "server's `databases` setting); nothing was allowed or changed"
            )
        return InternalError(f"Redis refused a command: {text}")
    if writing and cluster and not_sent(exc) and not isinstance(exc, NoTurn):
        return _unknown(exc)  # maybe the second attempt's: see above
    if not_sent(exc):
        return StorageUnavailableError(
            "Redis is unavailable (no free connection: every connection of this process's "
            "pool stayed in use for the whole timeout); nothing was allowed or changed"
        )
    if writing and isinstance(
        exc, redis.exceptions.TimeoutError | redis.exceptions.ConnectionError
    ):
        return _unknown(exc)
    return StorageUnavailableError(
        f"Redis is unavailable ({type(exc).__name__}); nothing was allowed or changed"
    )


def _unknown(
    exc: BaseException, *, refused: str | None = None, cluster: bool = False
) -> StorageUnavailableError:
    if refused is None:
        said = f"Redis did not answer ({type(exc).__name__}), so whether this change was recorded"
    else:  # the refusal answered an attempt sent again: an earlier one may have run
        who = "the Cluster client may have sent" if cluster else "the client sent"
        said = (
            f"{refused}, but {who} this change before, in an attempt that got no answer "
            "and may have run, so whether it was recorded"
        )
    return StorageUnavailableError(
        f"{said} is unknown: a reservation it made expires by itself, and the "
        "same idempotency key answers the first decision"
    )


NOTHING_CHANGED = "nothing was allowed or changed"


def before_the_call(exc: PolicyError) -> PolicyError:
    """A failure of a store's check for data of 0.1, told as of the call, which had not begun.

    The check (and a conversion, which writes) runs on a store's first use,
    before the caller's call: its failure is worded as a read's (nothing of
    the call ran), never as a change of unknown fate. Other errors are as they were.
    """
    if not isinstance(exc, StorageUnavailableError):
        return exc
    return StorageUnavailableError(
        f"{exc.message} (this was before the call began, while agentpolicy checked this key "
        "prefix for data of agentpolicy 0.1 to convert; a conversion it began is taken up "
        "again on the next use)"
    )


_LOGIN = (  # (what the refusal says, what it means), first match wins
    ("NOAUTH", "the server requires a password and the storage URL gives none (NOAUTH)"),
    ("WRONGPASS", "the user name or password in the storage URL is wrong, or the user is "
                  "disabled (WRONGPASS)"),
    ("invalid password", "the password in the storage URL is wrong (invalid password)"),
    ("without any password configured", "the storage URL gives a password and the server "
                                        "has none configured"),
    ("no password is set", "the storage URL gives a password and the server has none set"),
    ("wrong number of arguments", "the server takes no user name with a password (AUTH "
                                  "before Redis 6)"),
)  # fmt: skip

_LOGIN_ERRORS: tuple[type[Exception], ...] = tuple(
    getattr(redis.exceptions, name)
    for name in (
        "AuthenticationError",
        "AuthenticationWrongNumberOfArgsError",
        "AuthorizationError",
    )
    if hasattr(redis.exceptions, name)  # AuthorizationError: only in newer redis-py
)

_CATEGORY = {
    **dict.fromkeys(("get", "hget", "hmget", "zrangebyscore", "lrange", "lindex", "smembers",
                     "exists", "scan", "type"), "@read"),
    **dict.fromkeys(("evalsha", "eval", "script", "script|load", "script|exists"), "@scripting"),
    **dict.fromkeys(("set", "del", "hset", "hincrby", "pexpire", "persist", "zadd", "zrem",
                     "incr", "lpush", "ltrim", "rpop"), "@write"),
}  # fmt: skip
"""The category of each command the stores send (or their script runs), to name in a refusal."""

_COMMAND = re.compile(r"run the '([A-Za-z][A-Za-z0-9_|.-]{0,63})' command")


def _refusal(exc: BaseException) -> tuple[str, str] | None:
    """What a refused login or permission means, as ``(kind, words)``; ``None`` if not one.

    ``kind`` is ``"login"`` (the connection's ``AUTH`` was refused, or a
    command was answered ``NOAUTH``), ``"permission"`` (``NOPERM``: the
    user may not run that command or touch those keys) or ``"script"`` (a
    command inside the commit script was refused). Either way Redis ran
    nothing of the command it refused. The words come from a fixed list
    (and a command's name), never from the URL: no password can show.
    A Cluster's client that could not log in to any node raises a
    ``RedisClusterException`` caused by the refusal, which is looked at.
    """
    seen = 0
    while isinstance(exc, redis.exceptions.RedisClusterException) and seen < 5:
        cause = exc.__cause__ or exc.__context__
        if cause is None:
            return None
        exc, seen = cause, seen + 1
    if not isinstance(exc, redis.exceptions.RedisError):
        return None
    text = str(exc)
    code = getattr(exc, "status_code", None) or text.split(" ", 1)[0]
    login = isinstance(exc, _LOGIN_ERRORS) or code in ("NOAUTH", "WRONGPASS")
    if login:
        reason = next((words for mark, words in _LOGIN if mark in text or mark == code), None)
        return "login", f"Redis refused the login: {reason or type(exc).__name__}"
    named = _COMMAND.search(text)
    command = named.group(1).lower() if named else None
    what = f"'{command}'" if command else "a command"
    note = f"; a command of {_CATEGORY[command]}" if command in _CATEGORY else ""
    if "can't run this command or subcommand" in text or "ACL failure in script" in text:
        return (
            "script",
            f"Redis refused the store's user {what} inside the commit script (ACL{note})",
        )
    if not (isinstance(exc, redis.exceptions.NoPermissionError) or code == "NOPERM"):
        return None
    if command is None and "key" in text:
        return "permission", (
            "Redis refused the store's user access to its keys (NOPERM: the user's key "
            "patterns do not cover the key prefix)"
        )
    return (
        "permission",
        f"Redis refused the store's user the permission to run {what} (NOPERM{note})",
    )


def acl_refused(command: str, key: str) -> StorageUnavailableError:
    """The error for a commit whose script found a write its user may not make (``"N"`` reply).

    The script asks Redis (``redis.acl_check_cmd``, Redis 7.0+) whether the
    store's user may run each write of the commit on its key before it makes
    the first, and writes nothing when one is refused: so, unlike a command
    refused while the script runs (:func:`failure`), nothing changed. Redis
    does not say whether the command or the key was refused; the message
    names both (the key is one of the store's own, never part of the URL).
    """
    name = command.lower()
    note = f"; a command of {_CATEGORY[name]}" if name in _CATEGORY else ""
    shown = key if len(key) <= 120 else key[:117] + "..."
    return StorageUnavailableError(
        f"Redis refused the store's user '{name}' on the key {shown!r} inside the commit "
        f"script (ACL{note}: the user may not run that command, or not on that key); the "
        f"script checked every write before its first, so {NOTHING_CHANGED}; give the "
        "store's user every command of @read, @write and @scripting on the keys under its "
        "prefix"
    )


# -- requests a store sends --------------------------------------------------------------------


class Read:
    """``HMGET key v b`` for each key (pipelined when several): answers ``[[v, b], ...]``."""

    __slots__ = ("keys",)
    writing = False

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys


class Scan:
    """``ZRANGEBYSCORE key -inf upto LIMIT 0 limit WITHSCORES``: answers ``[(member, score)]``."""

    __slots__ = ("key", "limit", "upto")
    writing = False

    def __init__(self, key: str, upto: int, limit: int) -> None:
        self.key = key
        self.upto = upto
        self.limit = limit


class Eval:
    """The commit script with these ``KEYS`` and ``ARGV`` (``EVALSHA``): answers its reply."""

    __slots__ = ("args", "keys")
    writing = True

    def __init__(self, keys: list[str], args: list[Any]) -> None:
        self.keys = keys
        self.args = args


class Hints:
    """Global index entries ``(key, member, score)`` written outside a commit (Cluster only).

    ``ZADD`` each, or ``ZREM`` when ``score`` is ``None``, in order; they are
    hints. ``applied``: sent after the commit was applied, so a failure may
    not turn its outcome into an error (see :func:`lost_hints`).
    """

    __slots__ = ("applied", "ops")
    writing = False

    def __init__(self, ops: GlobalOps, *, applied: bool = False) -> None:
        self.ops = ops
        self.applied = applied


class Lines:
    """``LRANGE key 0 limit-1``: answers the lines of a log, newest first."""

    __slots__ = ("key", "limit")
    writing = False

    def __init__(self, key: str, limit: int) -> None:
        self.key = key
        self.limit = limit


Request = Read | Scan | Eval | Hints | Lines
Steps = Generator[Request, Any, T]
"""An operation: yields requests, receives their answers, returns its result."""


def lost_hints(request: Request, exc: BaseException) -> str | None:
    """The warning to log when ``request`` failed without changing the outcome, else ``None``.

    Only hints sent after an applied commit fail so: the commit stands and
    its result is the answer. What they would have written is either already
    there (additions are written before the commit, with the same scores) or
    a removal, whose entry stays behind as a stale hint; every reader of a
    global index (sweeps and expiry through ``@due``, pending approvals
    through ``@pending``, webhook delivery through ``@outbox``, the list of
    policies through ``@agents``) checks each entry against the shard's own
    documents and skips one that no longer holds.
    """
    if not (isinstance(request, Hints) and request.applied):
        return None
    names = sorted({key for key, _, _ in request.ops})
    return (
        f"Redis Cluster: a commit was applied, but writing its global index hints "
        f"({', '.join(names)}) failed ({type(exc).__name__}: {exc}); the result stands, and "
        "readers skip the stale entries this may leave"
    )


# -- the operations ----------------------------------------------------------------------------


class Keyspace:
    """One store's keys and cache of documents, and its operations as :data:`Steps`.

    ``key_prefix`` separates tenants; on a Cluster (``cluster``) global
    indexes live outside every shard's slot and are written as hints.
    """

    __slots__ = ("cache", "inline_globals", "key_prefix")

    def __init__(self, key_prefix: str, *, cluster: bool) -> None:
        self.key_prefix = key_prefix
        self.inline_globals = not cluster
        self.cache: dict[str, Doc] = {}

    def shard_prefix(self, shard: str) -> str:
        """The prefix of every key of ``shard``: its hash tag, so one slot holds them all."""
        return f"{self.key_prefix}{{{tag(shard)}}}:"

    def key(self, prefix: str, name: str) -> str:
        """The key of ``name`` in the shard of ``prefix`` (global indexes live outside it)."""
        if name.startswith("@"):
            return self.key_prefix + name
        return prefix + name

    def remember(self, key: str, doc: Doc) -> None:
        """Keep a document this process has seen (bounded)."""
        cache = self.cache
        if len(cache) >= CACHE_SIZE:
            cache.clear()
        cache[key] = doc

    def get(
        self, prefix: str, names: Sequence[str], guess: frozenset[str]
    ) -> Steps[dict[str, Doc]]:
        """Documents of ``names``; those in ``guess`` from the cache (absent when not there)."""
        cache = self.cache
        found: dict[str, Doc] = {}
        fetch: list[tuple[str, str]] = []
        for name in names:
            key = self.key(prefix, name)
            if name in guess:
                cached = cache.get(key)
                if cached is not None and cached[0]:
                    found[name] = cached
                continue
            fetch.append((name, key))
        if fetch:
            rows = yield Read([key for _, key in fetch])
            for (name, key), (version, body) in zip(fetch, rows, strict=True):
                if version is None:
                    cache.pop(key, None)
                    continue
                doc = (int(version), json.loads(body))
                self.remember(key, doc)
                found[name] = doc
        return found

    def scan(self, prefix: str, index: str, upto: int, limit: int) -> Steps[list[tuple[str, int]]]:
        """Members of an index up to a score, lowest first."""
        rows = yield Scan(self.key(prefix, index), upto, limit)
        return [(member, int(score)) for member, score in rows]

    def log(self, shard: str, name: str, limit: int) -> Steps[list[tuple[int, int, Any]]]:
        """The newest ``limit`` entries of a log, newest first."""
        lines = yield Lines(self.shard_prefix(shard) + name, limit)
        out = []
        for line in lines:
            seq, at, entry = line.split("\t", 2)
            out.append((int(seq), int(at), json.loads(entry)))
        return out

    def commit(self, prefix: str, txn: Txn) -> Steps[Outcome]:
        """One script call; on a Cluster, global hints added before it and written after it."""
        keys_: list[str] = [prefix + "#op:" + txn.op, prefix + "#seq"]
        position: dict[str, int] = {}

        def ref(key: str) -> str:
            found = position.get(key)
            if found is None:
                keys_.append(key)
                found = position[key] = len(keys_)
            return str(found)

        text = Encoded(txn)
        args: list[Any] = [OP_KEEP_US // 1000, text.result, txn.at, len(txn.expect)]
        for name, version in txn.expect.items():
            args += [ref(self.key(prefix, name)), version]
        args.append(len(txn.put))
        put_keys = []
        for name, body in txn.put.items():
            key = self.key(prefix, name)
            put_keys.append((key, body))
            expected = txn.expect.get(name)
            args += [
                ref(key),
                text.put[name],
                txn.ttl.get(name, 0),
                "" if expected is None else expected + 1,
            ]
        args.append(len(txn.delete))
        args += [ref(self.key(prefix, name)) for name in txn.delete]
        inline = self.inline_globals
        here = [op for op in txn.index if inline or not op[0].startswith("@")]
        later = [op for op in txn.index if not (inline or not op[0].startswith("@"))]
        args.append(len(here))
        for index, member, score in here:
            code = "" if score is None else "s" if score == NEXT_SEQ else score
            args += [ref(self.key(prefix, index)), member, code]
        args.append(len(txn.append))
        for (log, _, keep_after, max_len), entry in zip(txn.append, text.append, strict=True):
            args += [
                ref(self.key(prefix, log)),
                entry,
                "" if keep_after is None else keep_after,
                "" if max_len is None else max_len,
            ]
        if later:  # hints outside the shard's slot: add before, so a crash loses none
            yield Hints(self.hint_keys([op for op in later if op[2] is not None]))
        reply = yield Eval(keys_, args)
        cache = self.cache
        kind = reply[0]
        if kind == "N":
            raise acl_refused(reply[1], reply[2])
        if kind == "R":
            for key, _ in put_keys:
                cache.pop(key, None)
            return Outcome(applied=False, replayed=True, result=json.loads(reply[1]))
        if kind == "C":
            for j in range(1, len(reply), 3):
                key, version, body = reply[j], int(reply[j + 1]), reply[j + 2]
                if version:
                    self.remember(key, (version, json.loads(body)))
                else:
                    cache.pop(key, None)
            return CONFLICT
        for (key, body), version in zip(put_keys, reply[1:], strict=True):
            self.remember(key, (int(version), body))
        for name in txn.delete:
            cache.pop(self.key(prefix, name), None)
        if later:  # the commit stands: a failure here is logged, not raised (lost_hints)
            yield Hints(self.hint_keys(later), applied=True)
        return Outcome(applied=True, replayed=False, result=txn.result)

    def hint_keys(self, ops: GlobalOps) -> GlobalOps:
        """Global index operations ``(index, member, score)`` with their keys for :class:`Hints`."""
        return [(self.key_prefix + index, member, score) for index, member, score in ops]
