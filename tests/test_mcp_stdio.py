"""The MCP server through the SDK (in process) and as the agent-policy-mcp command (stdio)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from agentpolicy.mcp import AgentPolicyMcpServer
from agentpolicy.mcp.stdio import build_server, summary
from agentpolicy.storage import MemoryStorage
from agentpolicy.testing import ManualClock

PAY = {"agentId": "bot", "amount": "5000000", "recipient": "0xv", "network": "eip155:8453"}


def test_sdk_client_lists_tools_and_calls_them_with_structured_content() -> None:
    storage = MemoryStorage()
    clock = ManualClock()
    admin = AgentPolicyMcpServer(storage=storage, role="admin", clock=clock)
    agent = AgentPolicyMcpServer(storage=storage, clock=clock)

    async def run() -> None:
        async with Client(build_server(admin)) as client:
            listed = (await client.list_tools()).tools
            assert len(listed) == 10
            setter = next(t for t in listed if t.name == "agent_policy_set")
            assert setter.input_schema["required"] == ["agentId", "policy"]
            result = await client.call_tool(
                "agent_policy_set",
                {"agentId": "bot", "policy": {"limits": {"daily": {"value": "9000000"}}}},
            )
            assert result.is_error is False
            assert result.structured_content == {
                "success": True, "data": {"agentId": "bot", "version": 1},
            }  # fmt: skip
        async with Client(build_server(agent)) as client:
            names = [t.name for t in (await client.list_tools()).tools]
            assert "agent_policy_set" not in names
            assert len(names) == 7
            allowed = await client.call_tool("agent_policy_authorize", PAY)
            assert allowed.is_error is False
            assert allowed.structured_content is not None
            assert allowed.structured_content["data"]["allowed"] is True
            assert allowed.content[0].text.startswith("ALLOWED")  # type: ignore[union-attr]
            denied = await client.call_tool("agent_policy_authorize", {**PAY, "amount": "5000001"})
            assert denied.is_error is False  # a denial is a successful call
            assert denied.content[0].text.startswith("DENIED (DAILY_LIMIT)")  # type: ignore[union-attr]
            forbidden = await client.call_tool("agent_policy_set", {"agentId": "bot", "policy": {}})
            assert forbidden.is_error is True
            assert forbidden.structured_content == {
                "success": False,
                "error": {
                    "code": "FORBIDDEN",
                    "message": forbidden.structured_content["error"]["message"],
                },  # type: ignore[index]
            }
            bad = await client.call_tool("agent_policy_budget", {"agentId": 7})
            assert bad.is_error is True
            assert bad.content[0].text.startswith("Error INVALID_INPUT at $.agentId")  # type: ignore[union-attr]

    anyio.run(run)


def test_summary_lines() -> None:
    assert summary({"success": True, "data": {"allowed": False, "requiresApproval": True,
                    "approvalId": "apr_1", "reason": "r"}}).startswith("APPROVAL_REQUIRED")  # fmt: skip
    assert summary({"success": True, "data": {"x": 1}}) == '{"x":1}'


ROOT = Path(__file__).resolve().parent.parent


class Stdio:
    """A client speaking newline-delimited JSON-RPC to a real agent-policy-mcp process."""

    def __init__(self, env: dict[str, str], command: list[str] | None = None) -> None:
        exe = Path(sys.executable).with_name("agent-policy-mcp")
        self.proc = subprocess.Popen(
            command or [str(exe)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        self.next_id = 0

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self.next_id += 1
        self._write(
            {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params or {}}
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        message: dict[str, Any] = json.loads(line)  # stdout carries only protocol messages
        assert message["id"] == self.next_id
        return message

    def _write(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def initialize(self) -> dict[str, Any]:
        reply = self.send("initialize", {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"}})  # fmt: skip
        self._write({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return reply

    def call(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.send("tools/call", {"name": name, "arguments": arguments})[
            "result"
        ]
        return result

    def close(self) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=20)
        assert self.proc.stderr is not None
        assert self.proc.stdout is not None
        err = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return err


def _env(tmp_path: Path, role: str) -> dict[str, str]:
    return {"AGENT_POLICY_DB": str(tmp_path / "mcp.db"), "AGENT_POLICY_ROLE": role,
            "AGENT_POLICY_REDIS_URL": "", "AGENT_POLICY_DEMO_MODE": ""}  # fmt: skip


def test_stdio_server_for_both_roles_on_one_database(tmp_path: Path) -> None:
    admin = Stdio(_env(tmp_path, "admin"))
    init = admin.initialize()
    assert init["result"]["serverInfo"]["name"] == "agent-policy"
    tools = admin.send("tools/list")["result"]["tools"]
    assert len(tools) == 10
    assert all("inputSchema" in t and t["description"] for t in tools)
    result = admin.call("agent_policy_set", {"agentId": "bot", "policy": {
        "limits": {"daily": {"value": "100000000"}}}})  # fmt: skip
    assert result["structuredContent"] == {
        "success": True,
        "data": {"agentId": "bot", "version": 1},
    }
    assert result["isError"] is False
    admin_log = admin.close()
    assert "serving role admin" in admin_log

    agent = Stdio(_env(tmp_path, "agent"))
    agent.initialize()
    assert len(agent.send("tools/list")["result"]["tools"]) == 7
    allowed = agent.call("agent_policy_authorize", PAY)
    assert allowed["structuredContent"]["data"]["allowed"] is True  # the admin's policy persisted
    assert allowed["isError"] is False
    forbidden = agent.call("agent-policy/set", {"agentId": "bot", "policy": {}})
    assert (forbidden["isError"], forbidden["structuredContent"]["error"]["code"]) == (
        True,
        "FORBIDDEN",
    )
    invalid = agent.call("agent_policy_authorize", {**PAY, "amount": "-1"})
    assert invalid["structuredContent"]["error"]["path"] == "$.amount"
    unknown = agent.call("agent_policy_transfer", {})
    assert unknown["structuredContent"]["error"]["code"] == "UNKNOWN_TOOL"
    log = agent.close()
    assert "Traceback" not in log


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"AGENT_POLICY_ROLE": "root"}, "AGENT_POLICY_ROLE"),
        ({"AGENT_POLICY_DEMO_MODE": "maybe"}, "AGENT_POLICY_DEMO_MODE"),
        ({"AGENT_POLICY_RESERVATION_TTL": "soon"}, "AGENT_POLICY_RESERVATION_TTL"),
        ({"AGENT_POLICY_REDIS_URL": "http://x"}, "AGENT_POLICY_REDIS_URL"),
        ({"AGENT_POLICY_WEBHOOKS": "{not json"}, "AGENT_POLICY_WEBHOOKS"),
        ({"AGENT_POLICY_WEBHOOK_URL": "http://127.0.0.1:9/h"}, "secret"),
    ],
)
def test_a_bad_setting_is_one_line_on_stderr_and_exit_2(
    tmp_path: Path, env: dict[str, str], needle: str
) -> None:
    exe = Path(sys.executable).with_name("agent-policy-mcp")
    done = subprocess.run(
        [str(exe)], check=False, input="", capture_output=True, text=True, timeout=30,
        env={**os.environ, **_env(tmp_path, "agent"), **env},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert needle in lines[0]


def test_the_cli_serves_mcp_too(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("agentpolicy")
    server = Stdio(
        {"AGENT_POLICY_REDIS_URL": "", "AGENT_POLICY_ROLE": "agent"},
        [str(exe), "--db", str(tmp_path / "s.db"), "serve-mcp", "--role", "admin"],
    )
    assert server.initialize()["result"]["serverInfo"]["name"] == "agent-policy"
    assert len(server.send("tools/list")["result"]["tools"]) == 10
    assert "Traceback" not in server.close()
