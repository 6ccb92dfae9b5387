"""MCP over Streamable HTTP at ``/mcp``: the stdio tools, each call under its caller's token.

The official SDK's Streamable HTTP transport runs **stateless** with JSON
responses: every POST carries its own bearer token and is answered on its
own, so any process of the service can answer any request (no session is
held per client, nothing breaks behind a load balancer), and revoking a
token stops its next request. The tools are those of
:class:`~agentpolicy.mcp.AgentPolicyMcpServer`, one per binding of a token
(role, agent or org, approver), sharing one engine; the token decides which
tools are listed and what each may touch, exactly as the stdio server's
settings do.

``agent`` and ``admin`` tokens may call ``/mcp``; an ``approver`` or
``metrics`` token is refused (403). An admin token bound to an org may not
change the approver registry, which every org shares.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.types import Message, Receive, Scope, Send

from agentpolicy import __version__
from agentpolicy.engine import PolicyEngine
from agentpolicy.errors import ErrorCode, StorageUnavailableError
from agentpolicy.mcp.server import AgentPolicyMcpServer
from agentpolicy.mcp.stdio import INSTRUCTIONS, call_result, called, lenient_tool_calls, sdk_tool
from agentpolicy.mcp.tools import REGISTRY_CHANGES, Tool, find_tool
from agentpolicy.serve.metrics import Metrics
from agentpolicy.serve.tokens import AccessToken, TokenRejected, TokenStore

__all__ = [
    "MCP_ROLES",
    "TOKEN_KEY",
    "McpEndpoint",
    "ToolServers",
    "build_sdk_server",
    "challenge",
    "new_session_manager",
]

log = logging.getLogger("agentpolicy.serve")

MCP_ROLES = ("agent", "admin")
"""The roles whose tokens may call ``/mcp``."""

TOKEN_KEY = "agentpolicy.token"  # noqa: S105 - a key of the scope, not a secret
"""Where the checked token of a request is kept in its ASGI scope's ``state``."""

_AUTHORIZE = "agent_policy_authorize"


def challenge(error: str | None = None) -> str:
    """The ``WWW-Authenticate`` value of a 401: ``Bearer realm="agentpolicy"`` (and why)."""
    value = 'Bearer realm="agentpolicy"'
    return value if error is None else f'{value}, error="{error}"'


class ToolServers:
    """One :class:`AgentPolicyMcpServer` per token binding, all on one engine (made once each)."""

    def __init__(self, engine: PolicyEngine) -> None:
        self.engine = engine
        self._made: dict[tuple[Any, ...], AgentPolicyMcpServer] = {}
        self._listed: dict[tuple[Any, ...], list[types.Tool]] = {}
        self._lock = threading.Lock()

    def for_token(self, token: AccessToken) -> AgentPolicyMcpServer:
        """The server whose role and binding are the token's."""
        key = (token.role, token.agent_id, token.org_id, token.approver)
        with self._lock:
            found = self._made.get(key)
            if found is None:
                if len(self._made) > 10_000:
                    self._made.clear()
                found = AgentPolicyMcpServer(
                    role=token.role, agent_id=token.agent_id, org_id=token.org_id,
                    approver=token.approver, engine=self.engine,
                )  # fmt: skip
                self._made[key] = found
            return found

    @staticmethod
    def refused(token: AccessToken, name: object) -> bool:
        """Whether the token may not call this tool although its role has it."""
        tool = find_tool(name)
        return token.org_id is not None and tool is not None and tool.name in REGISTRY_CHANGES

    def tools(self, token: AccessToken) -> list[Tool]:
        """The tools listed to this token."""
        return [t for t in self.for_token(token).tools() if not self.refused(token, t.name)]

    def listed(self, token: AccessToken) -> list[types.Tool]:
        """The tools as the SDK lists them to this token, made once per binding.

        The SDK asks for them on every call too (to check the arguments), so
        they are not rebuilt each time.
        """
        key = (token.role, token.agent_id, token.org_id, token.approver)
        found = self._listed.get(key)
        if found is None:
            found = [sdk_tool(t) for t in self.tools(token)]
            with self._lock:
                if len(self._listed) > 10_000:
                    self._listed.clear()
                self._listed[key] = found
        return found


def _token_of(ctx: Any) -> AccessToken:
    request = getattr(ctx, "request", None)
    state = None if request is None else request.scope.get("state", {})
    token = None if state is None else state.get(TOKEN_KEY)
    if not isinstance(token, AccessToken):  # only reachable through /mcp, which sets it
        raise StorageUnavailableError("this call carries no checked token")
    return token


def build_sdk_server(servers: ToolServers, metrics: Metrics) -> Server[Any]:
    """The SDK server of ``/mcp``: the tools of each call's token, counted in ``metrics``."""

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        token = _token_of(ctx)
        return types.ListToolsResult(tools=list(servers.listed(token)))

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        token = _token_of(ctx)
        name, arguments = called(params)  # as sent: a mistyped call is refused by the tools
        if servers.refused(token, name):
            result: dict[str, Any] = {"success": False, "error": {
                "code": str(ErrorCode.FORBIDDEN),
                "message": f"{name} changes the approver registry, which every org "
                f"shares; this token is bound to {token.org_id}:* and may not",
            }}  # fmt: skip
            return call_result(result)
        app = servers.for_token(token)
        started = time.perf_counter()
        result = await anyio.to_thread.run_sync(app.call, name, arguments)
        tool = find_tool(name)
        if tool is not None and tool.name == _AUTHORIZE:
            code = result["data"]["code"] if result["success"] else result["error"]["code"]
            metrics.decided(code, time.perf_counter() - started)
        return call_result(result)

    server: Server[Any] = Server(
        "agent-policy",
        version=__version__,
        title="agentpolicy: spending limits",
        instructions=INSTRUCTIONS,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )
    server.middleware.append(lenient_tool_calls)  # mistyped calls: the tools' structured error
    return server


def new_session_manager(server: Server[Any]) -> StreamableHTTPSessionManager:
    """The SDK's transport for ``/mcp``: stateless, JSON responses (see the module docs)."""
    return StreamableHTTPSessionManager(server, stateless=True, json_response=True)


async def _answer(send: Send, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


def _a(role: str) -> str:
    """``role`` with its article: "an approver", "a metrics"."""
    return f"an {role}" if role[:1] in "aeiou" else f"a {role}"


def _rpc_error(message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": None, "error": {"code": -32001, "message": message}}


_SDK_REFUSALS = {
    400: "/mcp takes JSON-RPC messages sent as Content-Type: application/json",
    413: "the request body is larger than the 4 MiB /mcp reads",
}
"""What a refusal the SDK answers in plain text says instead, by status."""


_NOT_ONE_MESSAGE = {
    "jsonrpc": "2.0",
    "id": None,
    "error": {
        "code": types.INVALID_REQUEST,
        "message": "Invalid Request: the body must be one JSON-RPC 2.0 request or notification "
        "object whose params, if any, are an object (not a batch, null or another value)",
    },
}
"""What the 2025 transport's pydantic dump for a body that is no one message says instead.

The 2026 transport answers such a body with this code and much the same words.
"""


def _json_errors(send: Send) -> Send:
    """``send``, with the SDK's refusals that are not clear JSON-RPC errors made so.

    The SDK's transport refuses a wrong ``Content-Type`` (400) and a body
    past its bound (413) with a plain-text body; a JSON client gets the
    same status with the JSON-RPC error every other refusal of ``/mcp`` has.
    JSON that is not one JSON-RPC message (a batch, ``null``, ``params`` that
    are a list) it refuses, in the 2025 protocol, with ``-32602`` and a
    pydantic validation dump (its input echoed back, links to pydantic's
    docs); that becomes :data:`_NOT_ONE_MESSAGE` (``-32600``, as JSON-RPC
    names it and the SDK's 2026 transport answers).
    """
    status = 0
    replacing = False
    start: Message | None = None
    held = bytearray()

    async def guarded(message: Message) -> None:
        nonlocal status, replacing, start
        if message["type"] == "http.response.start":
            status = int(message["status"])
            kind = b""
            for key, value in message.get("headers", []):
                if key.lower() == b"content-type":
                    kind = value.lower()
            if status >= 400 and not kind.startswith(b"application/json"):
                replacing = True
                return
            if status == 400:  # a small JSON error: read it whole before it goes out
                start = message
                return
        elif replacing and message["type"] == "http.response.body":
            if not message.get("more_body", False):
                said = _SDK_REFUSALS.get(status, f"the MCP transport refused this request "
                                         f"(HTTP {status})")  # fmt: skip
                await _answer(send, status, _rpc_error(said), {})
            return
        elif start is not None and message["type"] == "http.response.body":
            held.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            if _validation_dump(bytes(held)):
                await _answer(send, status, _NOT_ONE_MESSAGE, {})
            else:
                await send(start)
                await send({"type": "http.response.body", "body": bytes(held)})
            return
        await send(message)

    return guarded


def _validation_dump(body: bytes) -> bool:
    """Whether ``body`` is the SDK's JSON-RPC error holding a pydantic validation dump."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return False
    message = error.get("message") if isinstance(error, dict) else None
    return isinstance(message, str) and message.startswith("Validation error:")


class McpEndpoint:
    """The ASGI app of ``/mcp``: checks the bearer token, then hands the request to the SDK.

    No token, a malformed, unknown, revoked or expired one: 401 with
    ``WWW-Authenticate: Bearer``; a token whose role may not call MCP: 403;
    the store unreachable: 503; a method other than POST (a ``GET`` asking
    for an event stream, a ``DELETE`` ending a session): 405, as the MCP
    specification allows a server that offers no stream. Nothing is called
    in any of these cases.
    """

    def __init__(
        self, tokens: TokenStore, manager: Callable[[], StreamableHTTPSessionManager]
    ) -> None:
        self.tokens = tokens
        self.manager = manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request to ``/mcp``."""
        header = ""
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                header = value.decode("latin-1")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            await _answer(send, 401, _rpc_error("a bearer token is required"),
                          {"www-authenticate": challenge()})  # fmt: skip
            return
        try:
            token = await anyio.to_thread.run_sync(self.tokens.verify, presented.strip())
        except TokenRejected as rejected:
            log.info("refused a %s token on /mcp", rejected.reason)
            await _answer(send, 401, _rpc_error("the token is not valid (unknown, revoked or "
                                                "expired)"),
                          {"www-authenticate": challenge("invalid_token")})  # fmt: skip
            return
        except StorageUnavailableError as err:
            await _answer(send, 503, _rpc_error(f"the store is unavailable: {err.message}"), {})
            return
        if token.role not in MCP_ROLES:
            await _answer(send, 403, _rpc_error(f"{_a(token.role)} token may not call /mcp: it is "
                                                "for the pages"), {})  # fmt: skip
            return
        if scope.get("method") != "POST":  # stateless: no stream to open, no session to end
            await _answer(send, 405, _rpc_error("/mcp answers POST only: this server offers no "
                                                "event stream and keeps no session"),
                          {"allow": "POST"})  # fmt: skip
            return
        scope.setdefault("state", {})[TOKEN_KEY] = token
        await self.manager().handle_request(scope, receive, _json_errors(send))
