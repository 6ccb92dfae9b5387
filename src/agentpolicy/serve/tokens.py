"""Access tokens and browser sessions of ``agentpolicy serve``, kept in the store.

A token is ``apt_<16 hex: its id>_<43 base64url characters: 256 random
bits>``. It is printed once, when it is made; the store keeps its id, its
SHA-256 and what it may do (its role and binding), never the token. A
token is checked by reading its document by id and comparing the SHA-256
of what was presented with the stored one in constant time; a token that
was revoked, or whose expiry has passed (by the engine's clock), is
refused, at once, by every process that shares the store.

A browser session is made by signing in with a token: a 256-bit random
session id in an HttpOnly cookie, of which the store keeps only the
SHA-256, the token it came from and when it ends. Every request with a
session checks that token again, so revoking a token ends its sessions.

Everything lives in a shard of its own, ``@tokens``, written through the
ledger's :func:`~agentpolicy.ledger.runner.run` like every other step::

    "tok/<id>": {"h": sha256 hex, "role", "agent", "org", "approver", "label",
                 "at": created (us), "x": expires (us) or None, "rv": revoked (us) or None}
    "ses/<sha256 hex of the session id>": {"tok": token id, "at", "x"}
    "csrf": {"k": base64url of 32 random bytes}   (the key of the pages' CSRF tokens)

and the index ``"tokx"`` lists the token ids by creation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import attrs

from agentpolicy._checks import check_identifier, check_text, raise_if
from agentpolicy.errors import (
    ConflictError,
    ErrorCode,
    PolicyValidationError,
    Problem,
    StorageUnavailableError,
)
from agentpolicy.ledger.runner import View, run
from agentpolicy.storage import Storage
from agentpolicy.storage._time import instant, micros
from agentpolicy.storage.base import Txn

__all__ = [
    "ROLES",
    "SHARD",
    "AccessToken",
    "SignedIn",
    "TokenRejected",
    "TokenStore",
    "token_hash",
]

log = logging.getLogger("agentpolicy.serve")

SHARD = "@tokens"
"""The shard of tokens, sessions and the CSRF key."""

ROLES = ("agent", "admin", "approver", "metrics")
"""What a token may be for: see ``docs/serve.md``."""

_INDEX = "tokx"
_CSRF = "csrf"
_TOKEN = re.compile(r"apt_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_MAX_LABEL = 200
_MAX_LIST = 100_000

Body = dict[str, Any]


def token_hash(secret: str) -> str:
    """The hex SHA-256 of a token or session id (what the store keeps instead of it)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _random(n: int = 32) -> str:
    return base64.urlsafe_b64encode(os.urandom(n)).rstrip(b"=").decode()


class TokenRejected(Exception):  # noqa: N818 - an answer, not a bug
    """A token or session that does not let its bearer in; ``reason`` says why.

    ``reason`` is ``missing``, ``malformed``, ``unknown``, ``revoked`` or
    ``expired``. The service answers all of them alike (401); the reason is
    for its log.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class AccessToken:
    """What a token may do: its role and binding, and when it was made, ends or was revoked.

    ``role`` is ``agent`` (the agent MCP tools, for ``agent_id`` or the agents
    ``"{org_id}:*"``), ``admin`` (every MCP tool and every page, for
    ``org_id``'s agents when set; voting as ``approver`` only when set),
    ``approver`` (the approvals pages, voting as ``approver``) or
    ``metrics`` (``/metrics`` only).
    """

    id: str
    role: str
    created_at: datetime
    agent_id: str | None = None
    org_id: str | None = None
    approver: str | None = None
    label: str | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def status(self, now: datetime) -> str:
        """``active``, ``expired`` or ``revoked`` at ``now``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def may_see(self, agent_id: str) -> bool:
        """Whether this token's binding covers ``agent_id`` (its agent, or its org's agents)."""
        if self.agent_id is not None and agent_id != self.agent_id:
            return False
        return self.org_id is None or agent_id.startswith(f"{self.org_id}:")

    @property
    def binding(self) -> str:
        """The binding in words: ``agent bot``, ``org acme:*``, ``approver alice``, ``all``."""
        parts = []
        if self.agent_id is not None:
            parts.append(f"agent {self.agent_id}")
        if self.org_id is not None:
            parts.append(f"org {self.org_id}:*")
        if self.approver is not None:
            parts.append(f"approver {self.approver}")
        return ", ".join(parts) or "all agents"


@attrs.frozen
class SignedIn:
    """A browser session: the token it was made with, and when it ends."""

    token: AccessToken
    created_at: datetime
    expires_at: datetime
    key: str = attrs.field(repr=False)
    """The session's store key (the SHA-256 of its id): what CSRF tokens are bound to."""


def _record(token_id: str, doc: Body) -> AccessToken:
    return AccessToken(
        id=token_id,
        role=doc["role"],
        created_at=instant(doc["at"]),
        agent_id=doc.get("agent"),
        org_id=doc.get("org"),
        approver=doc.get("approver"),
        label=doc.get("label"),
        expires_at=None if doc.get("x") is None else instant(doc["x"]),
        revoked_at=None if doc.get("rv") is None else instant(doc["rv"]),
    )


def _check_binding(
    role: object,
    agent_id: str | None,
    org_id: str | None,
    approver: str | None,
    label: str | None,
) -> None:
    problems: list[Problem] = []
    if role not in ROLES:
        problems.append(Problem("$.role", "must be agent, admin, approver or metrics"))
    for path, value in (("$.agentId", agent_id), ("$.orgId", org_id), ("$.approver", approver)):
        if value is not None:
            problems += check_identifier(value, path)
    if label is not None:
        problems += check_text(label, "$.label", _MAX_LABEL)
    if role == "agent" and (agent_id is None) == (org_id is None):
        problems.append(Problem("$.agentId", "an agent token is bound to one agent or one org: "
                                             "give exactly one of --agent and --org"))  # fmt: skip
    if role == "agent" and approver is not None:
        problems.append(Problem("$.approver", "only admin and approver tokens vote"))
    if role in ("admin", "approver", "metrics") and agent_id is not None:
        problems.append(Problem("$.agentId", f"a {role} token is not bound to one agent "
                                             "(use --org for a group of agents)"))  # fmt: skip
    if role == "approver" and approver is None:
        problems.append(Problem("$.approver", "an approver token names its approver"))
    if role == "metrics" and (org_id is not None or approver is not None):
        problems.append(Problem("$.role", "a metrics token has no binding"))
    raise_if(problems)


class TokenStore:
    """Tokens and sessions over a :class:`~agentpolicy.storage.Storage`, on the engine's clock.

    ``TokenStore(engine.storage, engine.clock)`` shares the engine's store.
    Every method may raise :class:`~agentpolicy.StorageUnavailableError`.
    """

    def __init__(self, storage: Storage, clock: Callable[[], datetime]) -> None:
        self.storage = storage
        self.clock = clock

    # -- plumbing -------------------------------------------------------------------------

    def _run(self, step: Callable[[View, Txn], None]) -> Any:
        return run(self.storage, SHARD, step, lambda r: r, at=micros(self.clock()))

    def _read_unknown(self, names: list[str]) -> list[Any]:
        """:meth:`_read` for a caller not known yet: a store failure in words that name nothing."""
        try:
            return self._read(names)
        except StorageUnavailableError as err:
            raise _unnamed(err) from None

    def _read(self, names: list[str]) -> list[Any]:
        with self.storage.session(SHARD, write=False) as session:
            view = View(session)
            view.read(names)
            return [view.doc(n) for n in names]

    # -- tokens ---------------------------------------------------------------------------

    def create(
        self,
        role: str,
        *,
        agent_id: str | None = None,
        org_id: str | None = None,
        approver: str | None = None,
        label: str | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[AccessToken, str]:
        """Make a token; return its record and the token itself (shown once, never stored).

        Refused with ``INVALID_INPUT`` (and nothing stored): an unknown role,
        an agent token bound to neither one agent nor one org (or to both),
        an approver token without its approver, a binding the role does not
        take, or an expiry that is not in the future.
        """
        _check_binding(role, agent_id, org_id, approver, label)
        now = self.clock()
        if expires_at is not None and (expires_at.utcoffset() is None or expires_at <= now):
            raise PolicyValidationError.single(
                "$.expiresAt", "must be a future, timezone-aware instant"
            )
        token_id = os.urandom(8).hex()
        secret = f"apt_{token_id}_{_random()}"
        doc = {
            "h": token_hash(secret), "role": role, "agent": agent_id, "org": org_id,
            "approver": approver, "label": label, "at": micros(now),
            "x": None if expires_at is None else micros(expires_at), "rv": None,
        }  # fmt: skip
        name = "tok/" + token_id

        def step(view: View, txn: Txn) -> None:
            if view.doc(name) is not None:  # 64 random bits met again: refuse, never overwrite
                raise ConflictError(
                    "a token with this id exists; try again", code=ErrorCode.INTERNAL
                )
            txn.put[name] = doc
            txn.index.append((_INDEX, token_id, micros(now)))
            txn.result = True

        self._run(step)
        return _record(token_id, doc), secret

    def get(self, token_id: str) -> AccessToken:
        """A token's record by its id (as ``token list`` shows it); ``INVALID_INPUT`` if none."""
        raise_if(check_identifier(token_id, "$.tokenId"))
        plain = token_id.removeprefix("tok_")
        (doc,) = self._read(["tok/" + plain]) if re.fullmatch("[0-9a-f]{16}", plain) else (None,)
        if doc is None:
            raise PolicyValidationError.single("$.tokenId", f"there is no token {token_id}")
        return _record(plain, doc)

    def list_tokens(self, *, include_inactive: bool = False) -> list[AccessToken]:
        """Every token, oldest first; revoked and expired ones only with ``include_inactive``."""
        with self.storage.session(SHARD, write=False) as session:
            ids = [m for m, _ in session.scan(_INDEX, 2**62, _MAX_LIST)]
        docs = self._read(["tok/" + i for i in ids]) if ids else []
        now = self.clock()
        found = [_record(i, d) for i, d in zip(ids, docs, strict=True) if d is not None]
        return [t for t in found if include_inactive or t.status(now) == "active"]

    def revoke(self, token_id: str) -> AccessToken:
        """Revoke a token now: it and its sessions stop working at once. Again: no change."""
        plain = self.get(token_id).id
        name = "tok/" + plain
        now = micros(self.clock())

        def step(view: View, txn: Txn) -> None:
            doc = view.doc(name)
            if doc["rv"] is None:
                doc = {**doc, "rv": now}
                txn.put[name] = doc
            txn.result = doc

        return _record(plain, self._run(step))

    def verify(self, presented: str | None) -> AccessToken:
        """The active token ``presented`` is, or :class:`TokenRejected` saying why not."""
        if not presented:
            raise TokenRejected("missing")
        match = _TOKEN.fullmatch(presented)
        if match is None:
            raise TokenRejected("malformed")
        token_id = match.group(1)
        (doc,) = self._read_unknown(["tok/" + token_id])
        if doc is None or not hmac.compare_digest(doc["h"], token_hash(presented)):
            raise TokenRejected("unknown")
        return self._active(_record(token_id, doc))

    def _active(self, token: AccessToken) -> AccessToken:
        status = token.status(self.clock())
        if status != "active":
            raise TokenRejected(status)
        return token

    # -- browser sessions -----------------------------------------------------------------

    def open_session(self, token: AccessToken, ttl: timedelta) -> tuple[str, SignedIn]:
        """Sign in with ``token`` for ``ttl`` (never past the token's expiry): the id, and it."""
        now = self.clock()
        ends = now + ttl
        if token.expires_at is not None:
            ends = min(ends, token.expires_at)
        secret = _random()
        key = token_hash(secret)
        name = "ses/" + key
        doc = {"tok": token.id, "at": micros(now), "x": micros(ends)}

        def step(view: View, txn: Txn) -> None:
            txn.put[name] = doc
            txn.ttl[name] = max(1, (micros(ends) - micros(now)) // 1000) + 60_000
            txn.result = True

        self._run(step)
        return secret, SignedIn(token, now, ends, key)

    def session(self, secret: str | None) -> SignedIn:
        """The session of a cookie's id, its token checked again; else :class:`TokenRejected`."""
        if not secret or len(secret) > 64:
            raise TokenRejected("missing" if not secret else "malformed")
        key = token_hash(secret)
        (doc,) = self._read_unknown(["ses/" + key])
        if doc is None:
            raise TokenRejected("unknown")
        if micros(self.clock()) >= doc["x"]:
            raise TokenRejected("expired")
        (found,) = self._read_unknown(["tok/" + doc["tok"]])
        if found is None:
            raise TokenRejected("unknown")
        token = self._active(_record(doc["tok"], found))
        return SignedIn(token, instant(doc["at"]), instant(doc["x"]), key)

    def close_session(self, secret: str) -> None:
        """Sign out: forget the session (an unknown one: nothing to do)."""
        name = "ses/" + token_hash(secret)

        def step(view: View, txn: Txn) -> None:
            if view.doc(name) is not None:
                txn.delete.append(name)
            txn.result = True

        self._run(step)

    # -- the pages' CSRF key --------------------------------------------------------------

    def csrf_key(self) -> bytes:
        """The key CSRF tokens are made with, created on first use and shared by every process.

        It lets no one vote: a CSRF token only ties a form to a session or a
        link its bearer already has.
        """

        def step(view: View, txn: Txn) -> None:
            doc = view.doc(_CSRF)
            if doc is None:
                doc = {"k": _random()}
                txn.put[_CSRF] = doc
            txn.result = doc["k"]

        try:  # the sign-in form needs it: asked by anyone
            key: str = self._run(step)
        except StorageUnavailableError as err:
            raise _unnamed(err) from None
        return base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))

    def ping(self) -> None:
        """One cheap read of the store (for ``/healthz``)."""
        self._read([_CSRF])


def _unnamed(err: StorageUnavailableError) -> StorageUnavailableError:
    """A store failure told to a caller not known yet: the store's own words go to the log.

    They may name a file or a host, and a token is checked for anyone who
    sends one (as ``/healthz`` keeps them to the log).
    """
    log.warning("the store failed while a token was checked: %s", err.message)
    return StorageUnavailableError(
        "it failed while checking the token; the reason is in the service's log"
    )
