"""How much of a request body the service reads: a bound on every body but ``/mcp``'s.

The pages' forms (a vote, a sign-in, a sign-out) are small: even a vote
with the longest comment the engine takes, through the longest link token
it mints, is under 32 KiB urlencoded. :class:`BodyLimit` reads at most
:data:`FORM_BODY_LIMIT` bytes of any body before the route sees it (before
any caller is checked): a larger ``Content-Length`` is refused at once, and
a body sent without one (chunked) is refused as soon as it grows past the
bound, so nothing larger is ever held in memory or parsed. The forms post
``application/x-www-form-urlencoded``; ``multipart/form-data`` (file
uploads, which a parser would spool to disk) is refused before a byte of
it is read. ``/mcp`` keeps the MCP SDK's own bound on JSON-RPC bodies
(4 MiB, answered ``413`` before parsing).
"""

from __future__ import annotations

from collections import deque

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentpolicy.serve.errors import error_response

__all__ = ["FORM_BODY_LIMIT", "FORM_FIELDS", "BodyLimit"]

FORM_BODY_LIMIT = 32 * 1024
"""The most bytes of a request body read on any path but ``/mcp`` (answered ``413`` above)."""

FORM_FIELDS = 16
"""The most fields a form may have (the vote form has five)."""

_UNBOUNDED = frozenset(("/mcp",))
"""Paths whose bodies are bounded by what serves them (the MCP SDK: 4 MiB)."""


class BodyLimit:
    """Read at most ``limit`` bytes of a request body, and no multipart, before the app runs.

    Refused, with the service's error page (a JSON client: the structured
    error) and ``Connection: close`` (the rest of the body is never read):
    a multipart body (``415``), a declared ``Content-Length`` above
    ``limit``, or a streamed body that grows past it (``413``). Otherwise
    the app gets the body, read here, as if from the server. A
    ``Content-Length`` that is not ASCII digits is refused ``400`` (an ASGI
    server may pass one on).
    """

    def __init__(self, app: ASGIApp, limit: int = FORM_BODY_LIMIT) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in _UNBOUNDED:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media == "multipart/form-data":
            await _refuse(scope, receive, send, 415, "Not a form of this service",
                          "This service's forms are sent as application/x-www-form-urlencoded; "
                          "it takes no multipart/form-data (no file uploads). Nothing was read "
                          "or changed.")  # fmt: skip
            return
        declared = headers.get("content-length")
        if declared is not None and not (declared.isascii() and declared.isdigit()):
            # "²" is a digit to str.isdigit, not to int(); "-1" is no length either
            await _refuse(scope, receive, send, 400, "Refused",
                          "This request's Content-Length is not a number of bytes. Nothing was "
                          "read or changed.")  # fmt: skip
            return
        if declared is not None and int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        body = bytearray()
        complete = False
        replay: deque[Message] = deque()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: the app hears it too
                replay.append(message)
                break
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                complete = True
                break
        replay.appendleft({"type": "http.request", "body": bytes(body), "more_body": not complete})

        async def replayed() -> Message:
            return replay.popleft() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _refuse(scope, receive, send, 413, "Too large",
                      f"This request's body is larger than the {self.limit // 1024} KiB this "
                      "service reads from a form. Nothing was read or changed.")  # fmt: skip


async def _refuse(
    scope: Scope, receive: Receive, send: Send, status: int, heading: str, message: str
) -> None:
    answer = error_response(scope, status, message, heading=heading,
                            headers={"Connection": "close"})  # fmt: skip
    await answer(scope, receive, send)
