"""The tools over stdio, on the official MCP Python SDK (the ``mcp`` extra).

stdout carries only protocol messages; logs go to stderr. Every tool call
runs on a worker thread, so a slow storage never holds up the event loop:
pings and other requests are answered while a call waits. Expired
reservations and approvals are swept on a schedule, so expiry happens even
when nobody reads. :mod:`agentpolicy.mcp.command` is the
``agent-policy-mcp`` command that starts it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
import anyio.to_thread
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

from agentpolicy import __version__
from agentpolicy.config import Settings, build_engine
from agentpolicy.errors import PolicyError
from agentpolicy.mcp.server import AgentPolicyMcpServer
from agentpolicy.signing import SigningKey

__all__ = [
    "INSTRUCTIONS",
    "build_server",
    "call_result",
    "make_app",
    "sdk_tool",
    "serve",
    "summary",
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


def build_server(app: AgentPolicyMcpServer) -> Server[Any]:
    """An SDK server whose tools are ``app``'s (only those its role may call)."""

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[sdk_tool(t) for t in app.tools()])

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        # The engine blocks on its storage: run it on a worker thread, never on the loop.
        result = await anyio.to_thread.run_sync(app.call, params.name, params.arguments)
        return call_result(result)

    return Server(
        "agent-policy",
        version=__version__,
        title="agentpolicy: spending limits",
        instructions=INSTRUCTIONS,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


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


async def serve(app: AgentPolicyMcpServer) -> None:
    """Serve ``app`` over stdio until the client closes the stream."""
    server = build_server(app)

    async def sweep_forever() -> None:
        while True:
            await anyio.sleep(SWEEP_EVERY_SECONDS)
            try:
                await anyio.to_thread.run_sync(app.engine.sweep)
            except PolicyError as err:
                log.warning("sweep failed: %s", err.message)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(sweep_forever)
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
        tasks.cancel_scope.cancel()
