"""URLs shown to people: credentials and query values are never printed.

Webhook URLs often carry a token (``https://user:pass@host/hook``,
``https://host/hook?token=...``) and storage URLs a password
(``redis://:secret@host:6379/0``). Everything agentpolicy logs or shows
passes through :func:`redact_url` first.
"""

from __future__ import annotations

import urllib.parse

__all__ = ["REDACTED", "redact_url"]

REDACTED = "***"
"""What a secret is replaced with."""


def redact_url(url: str) -> str:
    """``url`` with its password (or a user part alone) and every query value replaced.

    ``https://user:pass@host/h?token=abc&x=1`` becomes
    ``https://user:***@host/h?token=***&x=***``; ``https://tok@host/h``
    becomes ``https://***@host/h``; a fragment is dropped. Something that is
    not a URL at all is shown as ``***``.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except (ValueError, TypeError):
        return REDACTED
    if not parts.scheme or not parts.netloc:
        return REDACTED
    userinfo, at, host = parts.netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        userinfo = f"{user}:{REDACTED}" if colon else REDACTED
        host = f"{userinfo}@{host}"
    query = "&".join(
        f"{pair.partition('=')[0]}={REDACTED}" for pair in parts.query.split("&") if pair
    )
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, query, ""))
