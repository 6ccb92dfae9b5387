"""Settings read from the environment by the MCP server and the command line.

Every value is checked when read; a bad one raises
:class:`~agentpolicy.PolicyValidationError` naming the variable, which the
programs print as one line before exiting with status 2.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import attrs

from agentpolicy._checks import check_identifier
from agentpolicy.errors import PolicyValidationError, Problem

__all__ = ["Settings", "default_db_path", "parse_bool", "parse_duration", "read_settings"]

ROLES = ("agent", "admin")
_DURATION = re.compile(r"(\d+)(ms|s|m|h)?")
_UNITS = {"ms": "milliseconds", "s": "seconds", "m": "minutes", "h": "hours", None: "seconds"}


def parse_bool(raw: str, name: str) -> bool:
    """``true/false``, ``1/0``, ``yes/no``, ``on/off`` (any case)."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise PolicyValidationError.single(f"${name}", f"must be true or false, got {raw!r}")


def parse_duration(raw: str, name: str) -> timedelta:
    """A positive duration: ``300`` (seconds), ``300s``, ``5m``, ``1h``, ``1500ms``."""
    match = _DURATION.fullmatch(raw.strip())
    if match is None or int(match.group(1)) <= 0:
        raise PolicyValidationError.single(
            f"${name}", f"must be a positive duration such as 300, 300s, 5m or 1h, got {raw!r}"
        )
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def default_db_path() -> Path:
    """The SQLite file in the user's state directory, so budgets survive a restart."""
    if sys.platform == "win32":  # pragma: no cover - not run in CI
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "agentpolicy" / "agentpolicy.db"


@attrs.frozen
class Settings:
    """What the environment configures."""

    demo_mode: bool = False
    role: str = "agent"
    db: str | None = None
    redis_url: str | None = None
    key_prefix: str = "agent-policy:"
    reservation_ttl: timedelta | None = None
    agent_id: str | None = None
    org_id: str | None = None

    def storage_url(self, *, fallback_to_file: bool) -> str | None:
        """The storage URL: Redis wins over the DB; else the state-dir file, or ``None``."""
        if self.redis_url:
            return self.redis_url
        if self.db:
            return f"sqlite:///{Path(self.db).expanduser().absolute()}"
        if fallback_to_file:
            path = default_db_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            return f"sqlite:///{path}"
        return None


def read_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and check the ``AGENT_POLICY_*`` variables."""
    env = os.environ if env is None else env
    problems: list[Problem] = []

    def get(name: str) -> str | None:
        value = env.get(name)
        return value if value not in (None, "") else None

    demo = role = ttl = None
    try:
        demo = parse_bool(env.get("AGENT_POLICY_DEMO_MODE", ""), "AGENT_POLICY_DEMO_MODE")
    except PolicyValidationError as err:
        problems += err.problems
    role = (get("AGENT_POLICY_ROLE") or "agent").strip().lower()
    if role not in ROLES:
        problems += PolicyValidationError.single(
            "$AGENT_POLICY_ROLE", f"must be agent or admin, got {role!r}"
        ).problems
    raw_ttl = get("AGENT_POLICY_RESERVATION_TTL")
    if raw_ttl is not None:
        try:
            ttl = parse_duration(raw_ttl, "AGENT_POLICY_RESERVATION_TTL")
        except PolicyValidationError as err:
            problems += err.problems
    redis_url = get("AGENT_POLICY_REDIS_URL")
    if redis_url is not None and not redis_url.startswith(("redis://", "rediss://")):
        problems += PolicyValidationError.single(
            "$AGENT_POLICY_REDIS_URL", "must start with redis:// or rediss://"
        ).problems
    for name in ("AGENT_POLICY_AGENT_ID", "AGENT_POLICY_ORG_ID", "AGENT_POLICY_KEY_PREFIX"):
        value = get(name)
        if value is not None:
            problems += check_identifier(value, f"${name}")
    if problems:
        raise PolicyValidationError(problems)
    return Settings(
        demo_mode=bool(demo),
        role=role,
        db=get("AGENT_POLICY_DB"),
        redis_url=redis_url,
        key_prefix=get("AGENT_POLICY_KEY_PREFIX") or "agent-policy:",
        reservation_ttl=ttl,
        agent_id=get("AGENT_POLICY_AGENT_ID"),
        org_id=get("AGENT_POLICY_ORG_ID"),
    )
