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


def redact_url(url: str, *, hide_path: bool = False) -> str:
    """``url`` with its password (or a user part alone) and every query value replaced.

    ``hide_path=True`` replaces the path too (``https://hooks.example/***``),
    for URLs that may carry a secret there, as webhook URLs often do
    (``https://hooks.slack.com/services/T0/B0/<token>``, Discord's
    ``/api/webhooks/<id>/<token>``); every webhook URL is shown so. A
    storage URL's path, its database, is shown.

    ``https://user:pass@host/h?token=abc&x=1`` becomes
    ``https://user:***@host/h?token=***&x=***``; ``https://tok@host/h``
    becomes ``https://***@host/h``; a fragment is dropped. Something that is
    not a URL at all is shown as ``***``.

    A password is hidden even where it was not percent-encoded: one holding
    ``?`` or ``#`` (``redis://:pa?ss@host``), which a URL parser would take
    for the start of the query, and one holding ``/`` (``u:pa/ss@host``),
    which it would take for the start of the path. When in doubt, less is
    shown: a URL with a port and an ``@`` in its path or query is shown as
    ``scheme://***@`` and what follows that ``@``.
    """
    scheme, sep, rest = url.partition("://")
    userinfo, remainder = _userinfo(rest) if sep else (None, rest)
    if hide_path and userinfo is not None and "/" in userinfo:
        return f"{scheme}://{REDACTED}"  # an '@' past the host: what follows it is the path
    try:
        parts = urllib.parse.urlsplit(f"{scheme}{sep}{remainder}")
    except (ValueError, TypeError):
        return REDACTED
    if not sep or not parts.scheme or not parts.netloc:
        return REDACTED
    host = parts.netloc
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        host = f"{user}:{REDACTED}@{host}" if colon else f"{REDACTED}@{host}"
    query = "&".join(  # a part with no '=' (?s3cr3tTOKEN) is all value: it is hidden whole
        f"{pair.partition('=')[0]}={REDACTED}" if "=" in pair else REDACTED
        for pair in parts.query.split("&")
        if pair
    )
    path = f"/{REDACTED}" if hide_path and parts.path not in ("", "/") else parts.path
    return urllib.parse.urlunsplit((parts.scheme, host, path, query, ""))


def _userinfo(rest: str) -> tuple[str | None, str]:
    """``(user information or None, the rest)`` of what follows ``scheme://``.

    The authority is taken to end at the first ``/`` only (not at ``?`` or
    ``#``, which a password may hold), and the user information at its last
    ``@``. With no ``@`` there but a ``:`` (a password, or a port) and an
    ``@`` further on, the user information ends at that first ``@``: a
    password holding ``/`` (libpq reads such a URL this way too).
    """
    head = rest.partition("/")[0]
    at = head.rfind("@")
    if at < 0 and ":" in head:
        at = rest.find("@")
    if at < 0:
        return None, rest
    return rest[:at], rest[at + 1 :]
