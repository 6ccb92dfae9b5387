"""The ``agent-policy-mcp`` command: the tools over stdio, on the official MCP Python SDK.

stdout carries only protocol messages; logs go to stderr. Configuration is
read from the environment at start (see :mod:`agentpolicy.config`); a bad
value prints one line on stderr and exits with status 2. Expired
reservations and approvals are swept on a schedule, so expiry happens even
when nobody reads.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import anyio
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

from agentpolicy import __version__
from agentpolicy.config import Settings, read_settings
from agentpolicy.errors import PolicyError
from agentpolicy.mcp.server import AgentPolicyMcpServer
from agentpolicy.storage import open_storage
from agentpolicy.webhooks import endpoints_from_env

__all__ = ["build_server", "main", "serve", "summary"]

log = logging.getLogger("agentpolicy.mcp")

SWEEP_EVERY_SECONDS = 30.0


def summary(result: dict[str, Any]) -> str:
    """A short human-readable line for a tool result (the structured content has it all)."""
    if not result["success"]:
        error = result["error"]
        where = f" at {error['path']}" if "path" in error else ""
        return f"Error {error['code']}{where}: {error['message']}"
    data = result["data"]
    if "allowed" in data:
        if data["allowed"]:
            return f"ALLOWED: reserved as {data['reservationId']}; confirm it after paying."
        if data.get("requiresApproval"):
            return f"APPROVAL_REQUIRED: wait for approval {data['approvalId']}. {data['reason']}"
        return f"DENIED ({data['code']}): {data['reason']}"
    return json.dumps(data, separators=(",", ":"))[:2000]


def build_server(app: AgentPolicyMcpServer) -> Server[Any]:
    """An SDK server whose tools are ``app``'s (only those its role may call)."""

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(
            tools=[
                types.Tool(name=t.name, description=t.description, input_schema=t.input_schema)
                for t in app.tools()
            ]
        )

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        result = await app.handle_tool_call(params.name, params.arguments)
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=summary(result))],
            structured_content=result,
            is_error=not result["success"],
        )

    return Server(
        "agent-policy",
        version=__version__,
        instructions="Call agent_policy_authorize before every payment; confirm or release "
        "the reservation afterwards.",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


def make_app(settings: Settings) -> AgentPolicyMcpServer:
    """The server the environment describes (a SQLite file in the state dir by default)."""
    if settings.demo_mode:
        return AgentPolicyMcpServer(demo_mode=True)
    url = settings.storage_url(fallback_to_file=True)
    assert url is not None  # noqa: S101 - fallback_to_file always gives one
    return AgentPolicyMcpServer(
        storage=open_storage(url, key_prefix=settings.key_prefix),
        role=settings.role,
        reservation_ttl=settings.reservation_ttl,
        agent_id=settings.agent_id,
        org_id=settings.org_id,
        webhook_endpoints=endpoints_from_env(),
    )


async def serve(app: AgentPolicyMcpServer) -> None:
    """Serve ``app`` over stdio until the client closes the stream."""
    server = build_server(app)

    async def sweep_forever() -> None:
        while True:
            await anyio.sleep(SWEEP_EVERY_SECONDS)
            try:
                app.engine.sweep()
            except PolicyError as err:
                log.warning("sweep failed: %s", err.message)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(sweep_forever)
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
        tasks.cancel_scope.cancel()


def main() -> None:
    """Entry point of ``agent-policy-mcp`` and ``python -m agentpolicy.mcp``."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    try:
        app = make_app(read_settings())
    except PolicyError as err:
        sys.stderr.write(f"agent-policy-mcp: {err.code}: {err.message}\n")
        raise SystemExit(2) from None
    log.info("agent-policy-mcp %s serving role %s on stdio", __version__, app.role)
    try:
        anyio.run(serve, app)
    except KeyboardInterrupt:  # pragma: no cover - interactive stop
        pass
    finally:
        app.close()
