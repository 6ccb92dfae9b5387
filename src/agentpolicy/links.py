"""One-time approval links: tokens the engine signs, to approve or deny one approval once.

A token names one approval, one approver, one decision and the approval's
expiry, and carries an HMAC-SHA256 by a key derived from the engine's link
secret (``AGENT_POLICY_LINK_SECRET``), which lives in the settings of the
processes, never in the store: nothing in the store can mint a token.
Tokens are deterministic (the same approval, approver and decision always
give the same token), so a webhook delivered twice carries the same links.
That a token is used once is kept in the approval itself: the vote it casts
is recorded there, and an approver votes once (see
:meth:`agentpolicy.PolicyEngine.redeem_link`).

Form: ``apl1.<base64url of the claims' JSON>.<base64url of the MAC>``, the
MAC over ``apl1.`` and the claims' part.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

import attrs

from agentpolicy._checks import same_secret
from agentpolicy.approvals import DECISIONS
from agentpolicy.errors import ErrorCode, ForbiddenError, PolicyValidationError

__all__ = ["MIN_SECRET_LENGTH", "TOKEN_PREFIX", "LinkClaims", "link_key", "mint", "read"]

TOKEN_PREFIX = "apl1"  # noqa: S105 - a format's name, not a secret
"""How every token starts (the version of its form)."""

MIN_SECRET_LENGTH = 32
"""The shortest link secret accepted, in characters (use 32 random bytes, base64)."""

_DOMAIN = b"agentpolicy-link-v1"
_MAX_TOKEN = 8192
# The longest token minted: an approval id of MAX_RECORD_ID characters and an approver of
# MAX_ID four-byte characters (12 JSON characters each), in base64: about 7,100 characters.


@attrs.frozen
class LinkClaims:
    """What a valid token says: the approval, the approver, the decision, the expiry (µs)."""

    approval_id: str
    approver: str
    decision: str
    expires: int


def link_key(secret: str, path: str = "$.linkSecret") -> bytes:
    """The HMAC key of the tokens, derived from the link secret (its own key, not the secret).

    Raises ``INVALID_INPUT`` for a secret shorter than :data:`MIN_SECRET_LENGTH`.
    """
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
        raise PolicyValidationError.single(
            path, f"must be a secret of at least {MIN_SECRET_LENGTH} characters"
        )
    return hmac.new(secret.encode(), _DOMAIN, hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def _mac(key: bytes, body: str) -> str:
    return _b64(hmac.new(key, f"{TOKEN_PREFIX}.{body}".encode(), hashlib.sha256).digest())


def mint(key: bytes, approval_id: str, approver: str, decision: str, expires: int) -> str:
    """The token casting ``decision`` on ``approval_id`` as ``approver`` until ``expires`` (µs)."""
    claims = {"a": approval_id, "d": decision, "v": approver, "x": expires}
    body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    return f"{TOKEN_PREFIX}.{body}.{_mac(key, body)}"


def _refused() -> ForbiddenError:
    return ForbiddenError(
        "this approval link is not valid (altered, or signed with another link secret)",
        code=ErrorCode.APPROVER_NOT_AUTHORIZED,
    )


def read(key: bytes, token: object) -> LinkClaims:
    """The claims of a token whose MAC is right; else ``APPROVER_NOT_AUTHORIZED``.

    Expiry is not checked here (the caller compares ``expires`` with its
    clock). A value that is not a string, or is too long, is ``INVALID_INPUT``.
    """
    if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN:
        raise PolicyValidationError.single("$.token", "must be an approval link token")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not token.isascii():  # minted: ASCII
        raise _refused()
    if not same_secret(parts[2], _mac(key, parts[1])):
        raise _refused()
    try:
        data: Any = json.loads(_unb64(parts[1]))
    except (binascii.Error, ValueError):  # pragma: no cover - only a bug mints such a token
        raise _refused() from None
    if (
        not isinstance(data, dict)
        or not all(isinstance(data.get(k), str) for k in ("a", "d", "v"))
        or type(data.get("x")) is not int
        or data["d"] not in DECISIONS
    ):  # pragma: no cover - only a bug mints such a token
        raise _refused()
    return LinkClaims(data["a"], data["v"], data["d"], data["x"])
