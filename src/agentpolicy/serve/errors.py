"""What a client of ``agentpolicy serve`` gets on an error: structured JSON, or a page.

A client that asks for JSON (an ``Accept`` naming ``application/json`` or a
``+json`` type, and not ``text/html``), and every caller of the API routes
``/healthz`` and ``/metrics``, gets ``{"error": {"code": ..., "message":
...}}`` (and ``"path"`` when the engine named the bad input), the shape of
the MCP tools' errors (:meth:`agentpolicy.errors.PolicyError.to_dict`).
``code`` is the engine's :class:`~agentpolicy.errors.ErrorCode` when the
engine refused, else one of :data:`HTTP_CODES` by status. A browser gets the
service's error page. ``/mcp`` answers JSON-RPC errors, as MCP clients
expect (:mod:`agentpolicy.serve.mcp_http`). No answer ever carries a
traceback: an unexpected exception is logged and answered ``500``
(``INTERNAL``).
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import Scope

from agentpolicy.serve import pages
from agentpolicy.serve.service import html

__all__ = ["API_PATHS", "HTTP_CODES", "error_json", "error_page", "error_response", "wants_json"]

API_PATHS = frozenset(("/healthz", "/metrics"))
"""Paths whose errors are JSON whatever the caller accepts (``/mcp`` answers JSON-RPC)."""

HTTP_CODES: Mapping[int, str] = {
    400: "INVALID_INPUT",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    421: "MISDIRECTED_REQUEST",
    500: "INTERNAL",
    503: "STORAGE_UNAVAILABLE",
}
"""The ``code`` of an error the engine did not name, by HTTP status."""

_HEADINGS = {400: "Refused", 401: "Sign in", 403: "Refused", 404: "Not found",
             405: "Not allowed", 413: "Too large", 415: "Not a form of this service",
             421: "Wrong host", 500: "Something went wrong", 503: "Unavailable"}  # fmt: skip


def wants_json(scope: Scope) -> bool:
    """Whether this request's errors are answered as JSON (see the module docs)."""
    if scope.get("path") in API_PATHS:
        return True
    accept = Headers(scope=scope).get("accept", "").lower()
    return ("application/json" in accept or "+json" in accept) and "text/html" not in accept


def error_json(
    status: int,
    message: str,
    code: str | None = None,
    *,
    path: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """``{"error": {"code", "message", "path"?}}`` with ``status``."""
    error = {"code": str(code or HTTP_CODES.get(status, "INTERNAL" if status >= 500 else
                                                "INVALID_INPUT")), "message": message}  # fmt: skip
    if path is not None:
        error["path"] = path
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def error_page(
    status: int,
    message: str,
    heading: str | None = None,
    *,
    signin: bool = False,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The service's error page with ``status``."""
    heading = heading or _HEADINGS.get(status, "Refused")
    return html(pages.render("error.html", title=heading, heading=heading, message=message,
                             signin=signin, who=None), status,
                dict(headers) if headers else None)  # fmt: skip


def error_response(
    scope: Scope,
    status: int,
    message: str,
    code: str | None = None,
    *,
    heading: str | None = None,
    path: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """JSON for a JSON client (:func:`wants_json`), else the error page."""
    if wants_json(scope):
        return error_json(status, message, code, path=path, headers=headers)
    return error_page(status, message, heading, headers=headers)
