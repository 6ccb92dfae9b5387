"""The tools over stdio, on the official MCP Python SDK (the ``mcp`` extra).

stdout carries only protocol messages; logs go to stderr. Every tool call
runs on a worker thread, so a slow storage never holds up the event loop:
pings and other requests are answered while a call waits. Expired
reservations and approvals are swept on a schedule, so expiry happens even
when nobody reads. Every line the SDK cannot read as a message is answered
with a JSON-RPC error (:func:`unreadable_reply`), so no client waits forever,
and the client going away ends :func:`serve` quietly.
:mod:`agentpolicy.mcp.command` is the ``agent-policy-mcp`` command that
starts it.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import json
import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.to_thread
import mcp_types as types
import pydantic
from mcp.server.context import CallNext, HandlerResult
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage

from agentpolicy import __version__
from agentpolicy._checks import utf8_text
from agentpolicy.config import Settings, build_engine
from agentpolicy.errors import PolicyError
from agentpolicy.mcp.server import AgentPolicyMcpServer
from agentpolicy.signing import SigningKey

__all__ = [
    "INSTRUCTIONS",
    "build_server",
    "call_result",
    "called",
    "lenient_tool_calls",
    "make_app",
    "sdk_tool",
    "serve",
    "summary",
    "unreadable_reply",
]

log = logging.getLogger("agentpolicy.mcp")

SWEEP_EVERY_SECONDS = 30.0

INSTRUCTIONS = (
    "Call agent_policy_authorize before every payment and pay only when it answers allowed; "
    "then confirm the reservation with agent_policy_confirm once paid, or release it with "
    "agent_policy_release if you did not pay. When approval is required, wait until "
    "agent_policy_approvals_get shows it approved."
)
"""What the server tells the client's model about using it."""


def summary(result: dict[str, Any]) -> str:
    """The text of a tool result: a line for decisions and errors, else the data as JSON.

    JSON is never cut: long listings come in pages instead.
    """
    if not result["success"]:
        error = result["error"]
        where = f" at {error['path']}" if "path" in error else ""
        return f"Error {error['code']}{where}: {error['message']}"
    data = result["data"]
    if data.get("dryRun"):
        if data["allowed"]:
            verdict = "WOULD BE ALLOWED"
        elif data.get("requiresApproval"):
            verdict = "WOULD NEED APPROVAL"
        else:
            verdict = f"WOULD BE DENIED ({data['code']})"
        return f"{verdict}, dry run (nothing reserved or recorded): {data['reason']}"
    if "allowed" in data:
        if data["allowed"]:
            return f"ALLOWED: reserved as {data['reservationId']}; confirm it after paying."
        if data.get("requiresApproval"):
            return f"APPROVAL_REQUIRED: wait for approval {data['approvalId']}. {data['reason']}"
        return f"DENIED ({data['code']}): {data['reason']}"
    return json.dumps(data, separators=(",", ":"))


def sdk_tool(tool: Any) -> types.Tool:
    """A tool of the table as the SDK lists it (also used by ``agentpolicy serve``)."""
    a = tool.annotations
    return types.Tool(
        name=tool.name,
        title=a.title,
        description=tool.description,
        input_schema=tool.input_schema,
        output_schema=tool.output_schema,
        annotations=types.ToolAnnotations(
            title=a.title,
            read_only_hint=a.read_only,
            destructive_hint=a.destructive,
            idempotent_hint=a.idempotent,
            open_world_hint=False,
        ),
    )


def call_result(result: dict[str, Any]) -> types.CallToolResult:
    """The SDK's result of a call: the summary line (then, for decisions and errors, all of it).

    ``structuredContent`` is ``result``; ``isError`` is true exactly when it failed.
    """
    content: list[types.ContentBlock] = [types.TextContent(type="text", text=summary(result))]
    if not result["success"] or "allowed" in result["data"]:  # the line, then all of it
        full = json.dumps(result, separators=(",", ":"))
        content.append(types.TextContent(type="text", text=full))
    return types.CallToolResult(
        content=content, structured_content=result, is_error=not result["success"]
    )


_AS_SENT: contextvars.ContextVar[tuple[object, object] | None] = contextvars.ContextVar(
    "agentpolicy_tool_call_as_sent", default=None
)
"""The ``name`` and ``arguments`` of a ``tools/call`` the SDK would refuse, as they were sent."""


async def lenient_tool_calls(ctx: Any, call_next: CallNext) -> HandlerResult:
    """SDK middleware: a ``tools/call`` with a mistyped ``name`` or ``arguments`` reaches the tools.

    The SDK checks a call's params against its model before any handler runs,
    and answers a ``name`` that is not a string (or none) or ``arguments`` that
    are not an object (a list, a string) with a bare JSON-RPC ``-32602``. The
    governed agent's model gets the project's structured error instead, as for
    any other bad argument: the call goes on with params the SDK accepts, and
    :func:`called` gives the handler what was sent, for the tools to refuse
    (``INVALID_INPUT``; nothing is called). This is the SDK's documented way to
    rewrite params (``Server.middleware``); every other request passes untouched.
    """
    params = ctx.params
    if ctx.method != "tools/call" or ctx.request_id is None:
        return await call_next(ctx)
    if params is not None and not isinstance(params, Mapping):  # the transport refuses these
        return await call_next(ctx)
    raw: Mapping[str, Any] = params or {}
    name, arguments = raw.get("name"), raw.get("arguments")
    if isinstance(name, str) and (arguments is None or isinstance(arguments, Mapping)):
        return await call_next(ctx)
    sent = _AS_SENT.set((name, arguments))
    try:
        accepted = {**raw, "name": name if isinstance(name, str) else "", "arguments": None}
        return await call_next(dataclasses.replace(ctx, params=accepted))
    finally:
        _AS_SENT.reset(sent)


def called(params: types.CallToolRequestParams) -> tuple[object, object]:
    """The ``name`` and ``arguments`` of the call being handled, as its client sent them.

    They are ``params``' own unless :func:`lenient_tool_calls` let a mistyped
    call through.
    """
    sent = _AS_SENT.get()
    return sent if sent is not None else (params.name, params.arguments)


def build_server(app: AgentPolicyMcpServer) -> Server[Any]:
    """An SDK server whose tools are ``app``'s (only those its role may call).

    A call whose ``name`` or ``arguments`` is mistyped gets the tools'
    structured error, never the SDK's bare ``-32602`` (:func:`lenient_tool_calls`).
    """

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[sdk_tool(t) for t in app.tools()])

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        # The engine blocks on its storage: run it on a worker thread, never on the loop.
        result = await anyio.to_thread.run_sync(app.call, *called(params))
        return call_result(result)

    server: Server[Any] = Server(
        "agent-policy",
        version=__version__,
        title="agentpolicy: spending limits",
        instructions=INSTRUCTIONS,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )
    server.middleware.append(lenient_tool_calls)
    return server


def make_app(settings: Settings) -> AgentPolicyMcpServer:
    """The server the settings describe, on :func:`~agentpolicy.config.build_engine`'s engine."""
    if settings.demo_mode:
        return AgentPolicyMcpServer(demo_mode=True)
    engine = build_engine(settings)
    try:
        return AgentPolicyMcpServer(
            role=settings.role, agent_id=settings.agent_id, org_id=settings.org_id, engine=engine,
            approver=settings.approver,
            approver_key=None if settings.approver_key_file is None
            else SigningKey.load(settings.approver_key_file, "$AGENT_POLICY_APPROVER_KEY_FILE"),
        )  # fmt: skip
    except BaseException:
        engine.close()
        raise


_GONE = (BrokenPipeError, ConnectionResetError, anyio.BrokenResourceError)
"""How the client going away shows: the reader of stdout is gone."""


async def serve(app: AgentPolicyMcpServer) -> None:
    """Serve ``app`` over stdio until the client goes away; then return.

    The client going away is the normal end, whichever way it goes: stdin
    reaches its end, stdin or stdout is closed from the start, or the reader
    of stdout is gone (a broken pipe). Each returns normally after at most
    one log line; none raises.
    """
    if sys.stdin is None or sys.stdout is None:  # started with fd 0 or fd 1 closed
        log.info("stdin or stdout is closed: there is no client to serve")
        return
    server = build_server(app)

    async def sweep_forever() -> None:
        while True:
            await anyio.sleep(SWEEP_EVERY_SECONDS)
            try:
                await anyio.to_thread.run_sync(app.engine.sweep)
            except PolicyError as err:
                log.warning("sweep failed: %s", err.message)

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(sweep_forever)
            async with stdio_server() as (read, write):
                await _run(server, read, write)
            tasks.cancel_scope.cancel()
    except* _GONE:
        log.info("the client went away (stdout is closed)")


DRAIN_SECONDS = 120.0
"""How long, once stdin has ended, the server waits for calls under way to be answered."""


def _call_key(request_id: Any) -> Any:
    """A request id as the SDK correlates it: a string ``int()`` reads is that number.

    The SDK cancels request ``11`` on ``notifications/cancelled`` naming
    ``"11"`` (or ``"1_1"``, which ``int()`` reads too), as the TypeScript SDK
    does; the drain must count the same call as cancelled.
    """
    if isinstance(request_id, str):
        try:
            return int(request_id)
        except ValueError:
            return request_id
    return request_id


async def _run(server: Server[Any], read: Any, write: Any) -> None:
    """Run ``server`` on the stdio streams, answering every line it would drop.

    The SDK hands a line it cannot read to the server as an exception, and the
    server drops it unanswered; here such a line gets its JSON-RPC error instead.
    When stdin ends, the requests still under way are answered before the
    server stops (it would drop their answers, and a call under way has taken
    effect: a payment reserved whose id the client never read), for at most
    :data:`DRAIN_SECONDS`; a request the client cancelled is not waited for.
    """
    to_server, server_read = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    server_write, from_server = anyio.create_memory_object_stream[SessionMessage](0)
    # calls under way, counted by id as the SDK correlates them ("7" and 7 are one id), and
    # counted, not merely noted: a client may send one id twice, and each call is answered
    open_calls: collections.Counter[Any] = collections.Counter()
    changed = anyio.Event()

    def settled(request_id: Any) -> None:
        nonlocal changed
        key = _call_key(request_id)
        if open_calls[key] > 0:
            open_calls[key] -= 1
            if not open_calls[key]:
                del open_calls[key]
            changed.set()
            changed = anyio.Event()

    async def relay() -> None:
        async with to_server:
            async for item in read:
                if not isinstance(item, Exception):
                    message = item.message
                    if isinstance(message, types.JSONRPCRequest):
                        open_calls[_call_key(message.id)] += 1
                    elif (
                        isinstance(message, types.JSONRPCNotification)
                        and message.method == "notifications/cancelled"
                        and isinstance(message.params, dict)
                    ):
                        settled(message.params.get("requestId"))
                    await to_server.send(item)
                    continue
                reply = unreadable_reply(item)
                if reply is not None:
                    await write.send(SessionMessage(reply))
            with anyio.move_on_after(DRAIN_SECONDS) as waiting:  # stdin ended
                while open_calls:
                    await changed.wait()
            if waiting.cancelled_caught:
                log.warning("stdin ended; %d call(s) still unanswered after %g s",
                            open_calls.total(), DRAIN_SECONDS)  # fmt: skip

    async def answer() -> None:  # the server's messages to stdout; closes it after the last
        async with from_server, write:
            async for item in from_server:
                await write.send(item)
                if isinstance(item.message, types.JSONRPCResponse | types.JSONRPCError):
                    settled(item.message.id)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(relay)
        tasks.start_soon(answer)
        async with server_write:
            await server.run(server_read, server_write, server.create_initialization_options())


def unreadable_reply(error: Exception) -> types.JSONRPCError | None:
    """The JSON-RPC error that answers a line the SDK could not read; ``None`` for a blank line.

    ``error`` is what the SDK's stdio transport made of the line. A line that
    is not JSON the SDK reads (broken, nested too deeply, a lone surrogate, a
    number out of range) is a parse error (-32700); JSON that is not a JSON-RPC
    message is an invalid request (-32600). The error carries the request's
    ``id`` whenever the line shows one (an object with a ``method`` and a string
    or integer ``id`` at its top level), so the client is not left waiting;
    else ``id`` is null, as JSON-RPC says.
    """
    if not isinstance(error, pydantic.ValidationError):
        return _rpc_error(None, types.PARSE_ERROR, "Parse error")
    problems = error.errors(include_url=False)
    line = next((p["input"] for p in problems if p["type"] == "json_invalid"), None)
    if isinstance(line, str):
        if not line.strip():
            return None  # a blank line is no message: nothing to answer
        head = _top_scalars(line)
        return _rpc_error(
            _request_id(head), types.PARSE_ERROR, f"Parse error: {problems[0]['msg']}"
        )
    # JSON, but no message: the input of a top-level problem is the whole line's value
    value = next((p["input"] for p in problems if _about_the_whole(p)), None)
    head = value if isinstance(value, dict) else {}
    kind = "JSONRPCRequest" if "id" in head else "JSONRPCNotification"
    why = "; ".join(
        f"{'.'.join(str(part) for part in p['loc'][1:]) or 'message'}: {p['msg']}"
        for p in problems
        if p["loc"][:1] == (kind,)
    )
    message = "Invalid Request: not a JSON-RPC 2.0 message"
    return _rpc_error(
        _request_id(head), types.INVALID_REQUEST, f"{message} ({why})" if why else message
    )


def _about_the_whole(problem: Any) -> bool:
    """Whether a problem's input is the line's whole value: the value, or a field it lacks."""
    depth = len(problem["loc"])
    return depth == 1 or (problem["type"] == "missing" and depth == 2)


def _rpc_error(request_id: str | int | None, code: int, message: str) -> types.JSONRPCError:
    return types.JSONRPCError(
        jsonrpc="2.0", id=request_id, error=types.ErrorData(code=code, message=message)
    )


def _request_id(head: dict[str, Any]) -> str | int | None:
    """The ``id`` of a request (it has a ``method``) if it is one JSON-RPC allows and can echo."""
    found = head.get("id")
    if not isinstance(head.get("method"), str):
        return None
    if type(found) is int:
        return found
    if isinstance(found, str) and utf8_text(found):
        return found
    return None


_SPACE = re.compile(r"[ \t\n\r]*")
_MARK = re.compile(r'["{}[\]]')
# the rest of a string, from after its opening quote: one character or escape at a time, once
# ("(?:[^"\\]+|\\.)*" split a run of plain characters in every possible way before it gave up
# on a string left open: 28 characters took 8 s, and the server answered nothing more)
_STRING_REST = re.compile(r'(?:[^"\\]|\\.)*+"', re.DOTALL)


def _top_scalars(line: str) -> dict[str, Any]:
    """The members of the JSON object on ``line`` whose values are not objects or arrays.

    Read member by member without descending: nested values are skipped by
    counting brackets, so a line nested too deeply, or holding a value the
    SDK refuses, still shows its ``id`` and ``method``. Reading stops at the
    first thing that is not JSON; what was read until then is returned.
    """
    decoder = json.JSONDecoder()
    found: dict[str, Any] = {}
    at = _skip_space(line, 0)
    if not line.startswith("{", at):
        return found
    at += 1
    try:
        while True:
            at = _skip_space(line, at)
            if not line.startswith('"', at):
                return found
            key, at = decoder.raw_decode(line, at)
            at = _skip_space(line, at)
            if not line.startswith(":", at):
                return found
            at = _skip_space(line, at + 1)
            if line.startswith(("{", "["), at):
                at = _skip_nested(line, at)
            else:
                found[key], at = decoder.raw_decode(line, at)
            at = _skip_space(line, at)
            if not line.startswith(",", at):
                return found
            at += 1
    except ValueError:  # not JSON from here on (or a number too long to read)
        return found


def _skip_space(line: str, at: int) -> int:
    match = _SPACE.match(line, at)
    return at if match is None else match.end()


def _skip_nested(line: str, at: int) -> int:
    """Where the object or array that starts at ``at`` ends (strings skipped whole).

    Each character is looked at once: a string left open ends the reading
    (nothing after it is JSON), where looking for another string at each
    escaped quote inside it took time that grew with the square of the line.
    """
    depth = 0
    while True:
        found = _MARK.search(line, at)
        if found is None:
            raise ValueError("an object or array is not closed")
        mark, at = found.group(), found.end()
        if mark == '"':
            rest = _STRING_REST.match(line, at)
            if rest is None:
                raise ValueError("a string is not closed")
            at = rest.end()
        elif mark in "{[":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return at
