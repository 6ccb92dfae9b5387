"""Settings read from the environment, and the one engine they describe.

The ``agentpolicy`` command, the ``agent-policy-mcp`` server and
``python -m agentpolicy.mcp`` all read :func:`read_settings` and build their
engine with :func:`build_engine`: the same storage, key prefix, reservation
lifetime and webhook endpoints whichever program runs.

When several stores are configured, one is used, in this order:
``AGENT_POLICY_POSTGRES_URL``, then ``AGENT_POLICY_REDIS_URL``, then
``AGENT_POLICY_DB``, then the SQLite file in the state directory. A command
line's ``--postgres-url``, ``--redis-url`` or ``--db`` (in that order, when
several are given) replaces all of them.

Every value is checked when read; a bad one raises
:class:`~agentpolicy.PolicyValidationError` naming the variable, which the
programs print as one line before exiting with status 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path

import attrs

from agentpolicy import durations
from agentpolicy._checks import check_identifier
from agentpolicy.engine import DEFAULT_RESERVATION_TTL, PolicyEngine
from agentpolicy.errors import PolicyValidationError, Problem, StorageUnavailableError
from agentpolicy.links import MIN_SECRET_LENGTH
from agentpolicy.storage import MemoryStorage, Storage, open_storage
from agentpolicy.storage._pg_url import POSTGRES_SCHEMES, split_postgres_url
from agentpolicy.urls import redact_url
from agentpolicy.webhooks import WebhookEndpoint, endpoints_from_env

__all__ = [
    "POSTGRES_SCHEMES",
    "REDIS_SCHEMES",
    "ROLES",
    "Settings",
    "build_engine",
    "default_db_path",
    "ensure_folder",
    "open_configured_storage",
    "parse_bool",
    "parse_duration",
    "read_settings",
    "with_overrides",
]

ROLES = ("agent", "admin")
"""The roles an MCP server can run as."""

REDIS_SCHEMES = ("redis://", "rediss://", "redis+cluster://", "rediss+cluster://")
"""How a Redis URL may start: plain, TLS, and either on a Redis Cluster."""


def parse_bool(raw: str, name: str) -> bool:
    """``true/false``, ``1/0``, ``yes/no``, ``on/off`` (any case)."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise PolicyValidationError.single(f"${name}", f"must be true or false, got {raw!r}")


def parse_duration(raw: str, name: str) -> timedelta:
    """A positive duration in the one syntax of every setting (a bare number is seconds).

    ``300``, ``300s``, ``5m``, ``1h``, ``1d``, ``1500ms``: see
    :mod:`agentpolicy.durations`.
    """
    return durations.parse_duration(raw, f"${name}", bare="s")


def default_db_path() -> Path:
    """The SQLite file in the user's state directory, so budgets survive a restart.

    ``$XDG_STATE_HOME`` when it is an absolute path, else ``~/.local/state``:
    a relative one would make the store depend on the current directory.
    """
    if sys.platform == "win32":  # pragma: no cover - not run in CI
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:  # a relative XDG_STATE_HOME is invalid (XDG Base Directory): ignored, as it says
        given = os.environ.get("XDG_STATE_HOME") or ""
        base = Path(given) if os.path.isabs(given) else Path.home() / ".local" / "state"
    return base / "agentpolicy" / "agentpolicy.db"


def ensure_folder(folder: Path) -> None:
    """Create ``folder`` and any missing parents, each readable by its owner only (0700).

    Folders that already exist are left as they are. Raises
    :class:`~agentpolicy.StorageUnavailableError` when one cannot be created.
    """
    missing = []
    current = folder
    while not current.exists():
        missing.append(current)
        if current.parent == current:  # pragma: no cover - the root always exists
            break
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
            path.chmod(0o700)  # whatever the umask
        except FileExistsError:  # pragma: no cover - created meanwhile by another process
            continue
        except OSError as exc:
            raise StorageUnavailableError(
                f"cannot create the folder {path} for the SQLite file: {exc.strerror}"
            ) from None


@attrs.frozen
class Settings:
    """What the environment configures (see :func:`read_settings`)."""

    demo_mode: bool = False
    role: str = "agent"
    db: str | None = None
    redis_url: str | None = None
    postgres_url: str | None = None
    key_prefix: str = "agent-policy:"
    reservation_ttl: timedelta | None = None
    agent_id: str | None = None
    org_id: str | None = None
    webhook_endpoints: tuple[WebhookEndpoint, ...] = ()
    approver: str | None = None
    """The approver an admin MCP server (or the command line) votes as."""
    approver_key_file: str | None = None
    """The private key file that approver signs votes with."""
    link_secret: str | None = attrs.field(default=None, repr=False)
    """The secret one-time approval links are signed with (never shown)."""

    def sqlite_path(self, *, fallback_to_file: bool) -> Path | None:
        """The SQLite file in use, when neither PostgreSQL nor Redis is configured."""
        if self.postgres_url or self.redis_url:
            return None
        if self.db:
            return Path(self.db).expanduser().absolute()
        return default_db_path() if fallback_to_file else None

    def storage_url(self, *, fallback_to_file: bool) -> str | None:
        """The storage URL: PostgreSQL, else Redis, else the DB, else the state-dir file or None.

        Creates nothing: :func:`open_configured_storage` creates the file's folder.
        """
        if self.postgres_url:
            return self.postgres_url
        if self.redis_url:
            return self.redis_url
        path = self.sqlite_path(fallback_to_file=fallback_to_file)
        return None if path is None else f"sqlite:///{path}"

    def shown_storage_url(self, *, fallback_to_file: bool) -> str | None:
        """:meth:`storage_url` with any password replaced by ``***``, for people to read."""
        url = self.storage_url(fallback_to_file=fallback_to_file)
        if url is None or url.startswith("sqlite:"):
            return url
        return redact_url(url)


def _db_problems(db: str, path: str) -> list[Problem]:
    """A DB file name with spaces at either end: a mistake, where it would open another file.

    ``AGENT_POLICY_DB=' /srv/ap.db'`` named ``./ /srv/ap.db``, a new and
    empty store in the current folder, and ``'   '`` a file named by spaces.
    """
    if db != db.strip():
        return [Problem(path, "must not have whitespace at either end (it would name another "
                              "file, a new and empty store)")]  # fmt: skip
    return []


def _redis_url_problems(url: str, path: str) -> list[Problem]:
    if url.startswith(REDIS_SCHEMES):
        return []
    return [Problem(path, "must start with " + ", ".join(REDIS_SCHEMES))]


def _postgres_url_problems(url: str, path: str) -> list[Problem]:
    try:
        split_postgres_url(url, path)
    except PolicyValidationError as err:
        return list(err.problems)
    return []


def read_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and check the ``AGENT_POLICY_*`` variables; report every bad one at once."""
    env = os.environ if env is None else env
    problems: list[Problem] = []

    def get(name: str) -> str | None:
        value = env.get(name)
        return value if value not in (None, "") else None

    demo = role = ttl = None
    endpoints: tuple[WebhookEndpoint, ...] = ()
    try:
        demo = parse_bool(env.get("AGENT_POLICY_DEMO_MODE", ""), "AGENT_POLICY_DEMO_MODE")
    except PolicyValidationError as err:
        problems += err.problems
    role = (get("AGENT_POLICY_ROLE") or "agent").strip().lower()
    if role not in ROLES:
        problems.append(Problem("$AGENT_POLICY_ROLE", f"must be agent or admin, got {role!r}"))
    raw_ttl = get("AGENT_POLICY_RESERVATION_TTL")
    if raw_ttl is not None:
        try:
            ttl = parse_duration(raw_ttl, "AGENT_POLICY_RESERVATION_TTL")
        except PolicyValidationError as err:
            problems += err.problems
    db = get("AGENT_POLICY_DB")
    if db is not None:
        problems += _db_problems(db, "$AGENT_POLICY_DB")
    redis_url = get("AGENT_POLICY_REDIS_URL")
    if redis_url is not None:
        problems += _redis_url_problems(redis_url, "$AGENT_POLICY_REDIS_URL")
    postgres_url = get("AGENT_POLICY_POSTGRES_URL")
    if postgres_url is not None:
        problems += _postgres_url_problems(postgres_url, "$AGENT_POLICY_POSTGRES_URL")
    for name in ("AGENT_POLICY_AGENT_ID", "AGENT_POLICY_ORG_ID", "AGENT_POLICY_KEY_PREFIX",
                 "AGENT_POLICY_APPROVER"):  # fmt: skip
        value = get(name)
        if value is not None:
            problems += check_identifier(value, f"${name}")
    key_file = get("AGENT_POLICY_APPROVER_KEY_FILE")
    if key_file is not None and get("AGENT_POLICY_APPROVER") is None:
        problems.append(
            Problem(
                "$AGENT_POLICY_APPROVER_KEY_FILE",
                "needs AGENT_POLICY_APPROVER: the approver the key signs for",
            )
        )
    link_secret = get("AGENT_POLICY_LINK_SECRET")
    if link_secret is not None and len(link_secret) < MIN_SECRET_LENGTH:
        problems.append(Problem("$AGENT_POLICY_LINK_SECRET",
                                f"must be at least {MIN_SECRET_LENGTH} characters"))  # fmt: skip
    try:
        endpoints = endpoints_from_env(env)
    except PolicyValidationError as err:
        problems += err.problems
    if problems:
        raise PolicyValidationError(problems)
    return Settings(
        demo_mode=bool(demo),
        role=role,
        db=db,
        redis_url=redis_url,
        postgres_url=postgres_url,
        key_prefix=get("AGENT_POLICY_KEY_PREFIX") or "agent-policy:",
        reservation_ttl=ttl,
        agent_id=get("AGENT_POLICY_AGENT_ID"),
        org_id=get("AGENT_POLICY_ORG_ID"),
        webhook_endpoints=endpoints,
        approver=get("AGENT_POLICY_APPROVER"),
        approver_key_file=key_file,
        link_secret=link_secret,
    )


def with_overrides(
    settings: Settings,
    *,
    db: str | None = None,
    redis_url: str | None = None,
    postgres_url: str | None = None,
) -> Settings:
    """``settings`` with a command line's ``--postgres-url``, ``--redis-url`` or ``--db``.

    The one given replaces every store the environment names; when several
    are given, PostgreSQL wins over Redis, and Redis over the DB file.
    """
    if postgres_url:
        problems = _postgres_url_problems(postgres_url, "$.postgresUrl")
        if problems:
            raise PolicyValidationError(problems)
        return attrs.evolve(settings, postgres_url=postgres_url, redis_url=None)
    if redis_url:
        problems = _redis_url_problems(redis_url, "$.redisUrl")
        if problems:
            raise PolicyValidationError(problems)
        return attrs.evolve(settings, redis_url=redis_url, postgres_url=None)
    if db:
        problems = _db_problems(db, "$.db")
        if problems:
            raise PolicyValidationError(problems)
        return attrs.evolve(settings, db=db, redis_url=None, postgres_url=None)
    return settings


def open_configured_storage(settings: Settings, *, fallback_to_file: bool = True) -> Storage:
    """Open the storage ``settings`` name, creating the SQLite file's folder (0700) if missing.

    Without PostgreSQL, Redis or a DB file: the file in the state directory when
    ``fallback_to_file``, else a fresh in-memory storage.
    """
    path = settings.sqlite_path(fallback_to_file=fallback_to_file)
    if path is not None:
        ensure_folder(path.parent)
    url = settings.storage_url(fallback_to_file=fallback_to_file)
    if url is None:
        return MemoryStorage()
    return open_storage(url, key_prefix=settings.key_prefix)


def build_engine(
    settings: Settings,
    *,
    fallback_to_file: bool = True,
    clock: Callable[[], datetime] | None = None,
) -> PolicyEngine:
    """The engine ``settings`` describe: storage, key prefix, reservation TTL, webhooks, links.

    Used by the command line, the stdio MCP server and ``python -m
    agentpolicy.mcp``, so all three act alike. ``demo_mode`` is not read
    here: the MCP server's demo runs its own in-memory engine.
    """
    storage = open_configured_storage(settings, fallback_to_file=fallback_to_file)
    try:
        return PolicyEngine(
            storage=storage,
            clock=clock,
            reservation_ttl=settings.reservation_ttl or DEFAULT_RESERVATION_TTL,
            webhook_endpoints=settings.webhook_endpoints,
            link_secret=settings.link_secret,
        )
    except BaseException:
        storage.close()
        raise
