"""The MCP server through the SDK (in process) and as the agent-policy-mcp command (stdio)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from agentpolicy import PolicyEngine
from agentpolicy.mcp import AgentPolicyMcpServer
from agentpolicy.mcp.stdio import build_server, summary
from agentpolicy.storage import MemoryStorage, SQLiteStorage
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
            assert len(listed) == 25
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
            assert len(names) == 10
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

    def __init__(
        self, env: dict[str, str], command: list[str] | None = None, *, inherit: bool = True
    ) -> None:
        exe = Path(sys.executable).with_name("agent-policy-mcp")
        self.proc = subprocess.Popen(
            command or [str(exe)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env} if inherit else env,
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


def test_the_text_of_a_dry_run_says_nothing_was_reserved() -> None:
    data = {"allowed": True, "code": "ALLOWED", "reason": "every check passed", "dryRun": True,
            "requiresApproval": False, "evaluations": [], "headroom": []}  # fmt: skip
    text = summary({"success": True, "data": data})
    assert text == "WOULD BE ALLOWED, dry run (nothing reserved or recorded): every check passed"
    denied = {**data, "allowed": False, "code": "DAILY_LIMIT", "reason": "over"}
    assert summary({"success": True, "data": denied}).startswith("WOULD BE DENIED (DAILY_LIMIT)")


def _env(tmp_path: Path, role: str) -> dict[str, str]:
    return {"AGENT_POLICY_DB": str(tmp_path / "mcp.db"), "AGENT_POLICY_ROLE": role,
            "AGENT_POLICY_REDIS_URL": "", "AGENT_POLICY_DEMO_MODE": ""}  # fmt: skip


def test_stdio_server_for_both_roles_on_one_database(tmp_path: Path) -> None:
    admin = Stdio(_env(tmp_path, "admin"))
    init = admin.initialize()
    assert init["result"]["serverInfo"]["name"] == "agent-policy"
    tools = admin.send("tools/list")["result"]["tools"]
    assert len(tools) == 25
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
    assert len(agent.send("tools/list")["result"]["tools"]) == 10
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
        ({"AGENT_POLICY_WEBHOOK_URL": "http://127.0.0.1:9/h"}, "AGENT_POLICY_WEBHOOK_SECRET"),
        ({"AGENT_POLICY_APPROVER_KEY_FILE": "/x.key"}, "AGENT_POLICY_APPROVER_KEY_FILE"),
        ({"AGENT_POLICY_LINK_SECRET": "short"}, "AGENT_POLICY_LINK_SECRET"),
        (
            {
                "AGENT_POLICY_ROLE": "admin",
                "AGENT_POLICY_APPROVER": "alice",
                "AGENT_POLICY_APPROVER_KEY_FILE": "/no/such.key",
            },
            "AGENT_POLICY_APPROVER_KEY_FILE",
        ),
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
    assert len(server.send("tools/list")["result"]["tools"]) == 25
    assert "Traceback" not in server.close()


# -- schemas, annotations, pages ---------------------------------------------------------------

APPROVAL_POLICY = {
    "limits": {"daily": {"value": "100000000000"}, "lifetime": {"value": "900000000000"},
               "rolling": [{"window": "24h", "amount": {"value": "100000000000"}}],
               "counts": [{"window": "10m", "max": 50}, {"window": "daily", "max": 500}]},
    "scopedLimits": [{"name": "vendors", "match": {"recipients": ["0xv"]},
                      "groupBy": "recipient", "limits": {"daily": {"value": "900000000000"}}}],
    "approvalConfig": {"thresholds": [{"amount": {"value": "100000000"}, "requiredApprovers": 1,
                                       "approvers": ["admin@company.com"]}]},
}  # fmt: skip


def test_every_tool_declares_its_schemas_and_annotations_and_its_results_match_them() -> None:
    from jsonschema import Draft202012Validator

    clock = ManualClock()
    admin = AgentPolicyMcpServer(storage=MemoryStorage(), role="admin", clock=clock)
    checked: set[str] = set()

    async def run() -> None:
        async with Client(build_server(admin)) as client:
            listed = {t.name: t for t in (await client.list_tools()).tools}
            validators = {}
            for name, tool in listed.items():
                assert tool.output_schema is not None, name
                Draft202012Validator.check_schema(tool.output_schema)
                validators[name] = Draft202012Validator(tool.output_schema)
                a = tool.annotations
                assert a is not None
                assert a.title
                assert tool.title == a.title
                assert isinstance(a.read_only_hint, bool)
                assert isinstance(a.destructive_hint, bool)
                assert isinstance(a.idempotent_hint, bool)
                assert a.open_world_hint is False

            async def check(name: str, args: dict[str, Any]) -> dict[str, Any]:
                result = await client.call_tool(name, args)  # the SDK validates successes too
                assert result.structured_content is not None
                errors = list(validators[name].iter_errors(result.structured_content))
                assert errors == [], (name, result.structured_content, errors[0].message)
                checked.add(name)
                return result.structured_content

            await check("agent_policy_set", {"agentId": "bot", "policy": APPROVAL_POLICY})
            got = await check("agent_policy_get", {"agentId": "bot"})
            assert got["data"]["policy"]["approvalConfig"]["timeout"] == 3600000
            await check("agent_policy_list", {})
            allowed = await check("agent_policy_authorize", PAY)
            await check("agent_policy_confirm", {"reservationId": allowed["data"]["reservationId"]})
            again = await check("agent_policy_authorize", {**PAY, "memo": "second"})
            await check("agent_policy_release", {"reservationId": again["data"]["reservationId"]})
            await check("agent_policy_authorize", {**PAY, "amount": "1", "network": "eip155:56",
                                                   "category": "x", "idempotencyKey": "k"})  # fmt: skip
            held = await check("agent_policy_authorize", {**PAY, "amount": "500000000"})
            budget = await check("agent_policy_budget", {"agentId": "bot"})
            kinds = {(x["kind"], x["window"], x.get("scope")) for x in budget["data"]["limits"]}
            assert kinds == {("amount", "daily", None), ("amount", "lifetime", None),
                             ("amount", "24h", None), ("count", "10m", None),
                             ("count", "daily", None), ("amount", "daily", "vendors")}  # fmt: skip
            await check("agent_policy_budget", {"agentId": "bot", "period": "hourly"})
            await check("agent_policy_approvals_list", {"agentId": "bot"})
            approval_id = held["data"]["approvalId"]
            await check("agent_policy_approvals_get", {"approvalId": approval_id})
            decided = await check("agent_policy_approvals_decide", {
                "approvalId": approval_id, "decision": "approve", "approver": "admin@company.com",
                "comment": "ok"})  # fmt: skip
            assert decided["data"]["reservationId"]
            await _signed_votes_and_the_registry(check, admin.engine)
            await _delegate_and_revoke(check)
            await _roll_out(check)
            for name, args in [
                ("agent_policy_revoke", {"childId": "bot"}),
                ("agent_policy_delegate", {"childId": "x", "policy": {}}),
                ("agent_policy_get", {"agentId": "nobody"}),
                ("agent_policy_authorize", {**PAY, "amount": "1.5"}),
                ("agent_policy_confirm", {"reservationId": "res_nope"}),
                ("agent_policy_approvals_decide", {"approvalId": approval_id,
                                                   "decision": "deny", "approver": "x"}),
            ]:  # fmt: skip
                assert (await check(name, args))["success"] is False

    anyio.run(run)
    assert checked == {t.name for t in admin.tools()}


async def _signed_votes_and_the_registry(check: Any, engine: PolicyEngine) -> None:
    from agentpolicy.signing import SigningKey

    key, later = SigningKey.generate(), SigningKey.generate()
    admin = "admin@company.com"
    registered = await check(
        "agent_policy_approvers_register", {"name": admin, "publicKey": key.public_key}
    )
    assert registered["data"]["version"] == 1
    held = await check("agent_policy_authorize", {**PAY, "amount": "600000000", "memo": "signed"})
    approval_id = held["data"]["approvalId"]
    listed = await check("agent_policy_approvers_list", {})
    assert [a["name"] for a in listed["data"]["approvers"]] == [admin]
    at = engine.clock()
    signature = key.sign(engine.vote_message(approval_id, admin, "approve", at))
    forged = await check("agent_policy_approvals_decide", {
        "approvalId": approval_id, "decision": "deny", "approver": admin,
        "signature": signature, "signedAt": at.isoformat()})  # fmt: skip
    assert forged["error"]["code"] == "APPROVER_NOT_AUTHORIZED"
    signed = await check("agent_policy_approvals_decide", {
        "approvalId": approval_id, "decision": "approve", "approver": admin,
        "signature": signature, "signedAt": at.isoformat()})  # fmt: skip
    assert signed["data"]["decisions"][0] == {"approver": admin, "decision": "approve",
                                              "timestamp": "2026-01-19T10:00:00Z",
                                              "via": "signature", "keyVersion": 1,
                                              "signature": signature,
                                              "signedAt": "2026-01-19T10:00:00Z"}  # fmt: skip
    rotated = await check(
        "agent_policy_approvers_rotate", {"name": admin, "publicKey": later.public_key}
    )
    assert [k.get("retiredBy") for k in rotated["data"]["keys"]] == ["rotation", None]
    removed = await check("agent_policy_approvers_remove", {"name": admin})
    assert removed["data"]["registered"] is False


async def _roll_out(check: Any) -> None:
    """Dry run, shadow, what-if, versions, diff and rollback, with results checked by schema."""
    dry = (await check("agent_policy_check", {**PAY, "amount": "1000"}))["data"]
    assert dry["dryRun"] is True
    assert {(h["kind"], h["window"]) for h in dry["headroom"]} >= {("amount", "24h"),
                                                                  ("count", "10m")}  # fmt: skip
    over = (await check("agent_policy_check", {**PAY, "amount": "100000000001"}))["data"]
    assert over["code"] == "PER_TRANSACTION_LIMIT" or not over["allowed"]
    tighter = {
        **APPROVAL_POLICY,
        "limits": {**APPROVAL_POLICY["limits"], "daily": {"value": "1000"}},
    }
    shadow = await check("agent_policy_shadow_set", {"agentId": "bot", "policy": tighter})
    assert shadow["data"]["policy"]["limits"]["daily"]["value"] == "1000"
    await check("agent_policy_authorize", {**PAY, "amount": "2000"})
    report = (await check("agent_policy_shadow_report", {"agentId": "bot"}))["data"]
    assert report["flips"] == {"allowed->denied": 1}
    assert report["differences"][0]["shadowCode"] == "DAILY_LIMIT"
    sim = (await check("agent_policy_simulate", {"agentId": "bot", "policy": tighter,
                                                  "since": "1d"}))["data"]  # fmt: skip
    assert sim["changed"]
    assert sim["windows"]
    assert (await check("agent_policy_shadow_promote", {"agentId": "bot"}))["data"]["version"] == 2
    page = (await check("agent_policy_versions", {"agentId": "bot", "limit": 1}))["data"]
    assert [v["version"] for v in page["versions"]] == [2]
    rest = await check("agent_policy_versions", {"agentId": "bot", "cursor": page["nextCursor"]})
    assert [v["version"] for v in rest["data"]["versions"]] == [1]
    diff = (await check("agent_policy_diff", {"agentId": "bot", "fromVersion": 1,
                                              "toVersion": 2}))["data"]  # fmt: skip
    assert [c["text"] for c in diff["changes"]] == ["limits.daily.value: 100000000000 -> 1000"]
    assert (await check("agent_policy_rollback", {"agentId": "bot", "version": 1}))["data"][
        "version"] == 3  # fmt: skip
    old = await check("agent_policy_get", {"agentId": "bot", "version": 2})
    assert old["data"]["policy"]["limits"]["daily"]["value"] == "1000"
    await check("agent_policy_shadow_set", {"agentId": "bot", "policy": tighter})
    cleared = await check("agent_policy_shadow_clear", {"agentId": "bot"})
    assert cleared["data"]["payments"] == 0
    for name, args, code in [
        ("agent_policy_shadow_report", {"agentId": "bot"}, "SHADOW_NOT_FOUND"),
        ("agent_policy_diff", {"agentId": "bot", "fromVersion": 1, "toVersion": 99},
         "POLICY_VERSION_NOT_FOUND"),
        ("agent_policy_simulate", {"agentId": "bot", "policy": tighter, "since": "soon"},
         "INVALID_INPUT"),
        ("agent_policy_rollback", {"agentId": "nobody", "version": 1}, "NO_POLICY"),
        ("agent_policy_shadow_promote", {"agentId": "bot"}, "SHADOW_NOT_FOUND"),
        ("agent_policy_versions", {"agentId": "bot", "cursor": "eyJ4Ijp9"}, "INVALID_INPUT"),
    ]:  # fmt: skip
        assert (await check(name, args))["error"]["code"] == code, name


async def _delegate_and_revoke(check: Any) -> None:
    sub = await check("agent_policy_delegate", {
        "parentId": "bot", "childId": "bot-sub", "expiresIn": "1h",
        "policy": {"limits": {"daily": {"value": "1000000"}}}})  # fmt: skip
    assert sub["data"]["parentId"] == "bot"
    assert sub["data"]["expiresAt"] == "2026-01-19T11:00:00Z"
    child = await check("agent_policy_authorize", {**PAY, "agentId": "bot-sub", "amount": "1000"})
    assert child["data"]["allowed"] is True
    nested = await check("agent_policy_budget", {"agentId": "bot-sub"})
    assert [a["agentId"] for a in nested["data"]["ancestors"]] == ["bot"]
    gone = await check("agent_policy_revoke", {"childId": "bot-sub"})
    assert gone["data"]["revokedAt"]


def test_a_long_listing_is_valid_json_and_pages_instead_of_being_cut() -> None:
    clock = ManualClock()
    agent = AgentPolicyMcpServer(storage=MemoryStorage(), role="admin", clock=clock)
    agent.call("agent_policy_set", {"agentId": "bot", "policy": APPROVAL_POLICY})
    for i in range(8):
        agent.call("agent_policy_authorize", {**PAY, "amount": str(200_000_000 + i)})
        clock.advance(seconds=1)

    async def run() -> None:
        async with Client(build_server(agent)) as client:
            result = await client.call_tool("agent_policy_approvals_list", {})
            text = result.content[0].text  # type: ignore[union-attr]
            assert len(text) > 2000
            assert len(json.loads(text)["approvals"]) == 8
            page = await client.call_tool("agent_policy_approvals_list", {"limit": 5})
            data = json.loads(page.content[0].text)  # type: ignore[union-attr]
            assert len(data["approvals"]) == 5
            assert data["nextCursor"]

    anyio.run(run)


class HangingStorage(MemoryStorage):
    """A memory store whose sessions, once ``hang`` is set, wait until ``release`` (a hung Redis)."""

    def __init__(self) -> None:
        super().__init__()
        self.hang = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.entered_at = 0.0

    def session(self, shard: str, *, write: bool = True) -> Any:
        if self.hang.is_set():
            self.entered_at = time.monotonic()
            self.entered.set()
            self.release.wait(60)  # until the test lets it go
        return super().session(shard, write=write)


def test_a_ping_is_answered_while_a_tool_call_waits_on_a_hung_storage() -> None:
    import warnings

    from mcp.shared.exceptions import MCPDeprecationWarning

    storage = HangingStorage()
    app = AgentPolicyMcpServer(storage=storage, role="admin", clock=ManualClock())
    app.call("agent_policy_set", {"agentId": "bot", "policy": {}})
    storage.hang.set()
    timings: dict[str, float] = {}

    async def run() -> None:
        # "legacy": the initialize handshake and JSON-RPC, as over stdio, where ping exists
        async with (
            Client(build_server(app), mode="legacy") as client,
            anyio.create_task_group() as tasks,
        ):

            async def slow_call() -> None:
                result = await client.call_tool("agent_policy_get", {"agentId": "bot"})
                timings["call"] = time.monotonic()
                assert result.is_error is False

            tasks.start_soon(slow_call)
            with anyio.fail_after(10):
                while not storage.entered.is_set():
                    await anyio.sleep(0.01)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MCPDeprecationWarning)  # gone after 2026-07-28
                await client.send_ping()
            # answered while the call still waited on the storage (it waits until released)
            assert "call" not in timings
            timings["released"] = time.monotonic()
            storage.release.set()

    anyio.run(run)
    assert timings["call"] - timings["released"] < 30  # the call finished once released


# -- the command --------------------------------------------------------------------------------

MCP_EXE = str(Path(sys.executable).with_name("agent-policy-mcp"))


@pytest.mark.parametrize(
    ("argv", "status", "stream", "start"),
    [
        (["--version"], 0, "stdout", "agent-policy-mcp "),
        (["--help"], 0, "stdout", "usage: agent-policy-mcp"),
        (["-h"], 0, "stdout", "usage: agent-policy-mcp"),
        (["--bogus"], 2, "stderr", "agent-policy-mcp: unrecognized arguments: --bogus"),
        (["serve"], 2, "stderr", "agent-policy-mcp: unrecognized arguments: serve"),
    ],
)
def test_help_and_version_print_and_exit_and_other_arguments_are_refused(
    tmp_path: Path, argv: list[str], status: int, stream: str, start: str
) -> None:
    from agentpolicy import __version__

    done = subprocess.run([MCP_EXE, *argv], check=False, input="", capture_output=True, text=True,
                          timeout=30, env={**os.environ, **_env(tmp_path, "agent")})  # fmt: skip
    assert done.returncode == status
    assert getattr(done, stream).startswith(start)
    if argv == ["--version"]:
        assert done.stdout.strip() == f"agent-policy-mcp {__version__}"
    assert not (tmp_path / "mcp.db").exists()  # nothing was served


CLI_EXE = str(Path(sys.executable).with_name("agentpolicy"))
SERVERS = [[MCP_EXE], [CLI_EXE, "serve-mcp"]]
POSIX_SHELL = pytest.mark.skipif(sys.platform == "win32", reason="closes descriptors with sh")


def _quiet_end(done: subprocess.CompletedProcess[str] | subprocess.Popen[str], err: str) -> None:
    """The server ended as a client going away should end it: 0, at most two log lines."""
    assert done.returncode == 0, err
    for word in ("Traceback", "ExceptionGroup", "BrokenPipeError", "INTERNAL", "Exception ignored"):
        assert word not in err, err
    assert len(err.strip().splitlines()) <= 2, err  # the start line, and one saying why it ended


@POSIX_SHELL
@pytest.mark.parametrize("command", SERVERS)
@pytest.mark.parametrize("closed", ["<&-", ">&-"])
def test_a_server_started_with_stdin_or_stdout_closed_ends_quietly(
    tmp_path: Path, command: list[str], closed: str
) -> None:
    done = subprocess.run(["sh", "-c", f'exec "$@" {closed}', "sh", *command], check=False,
                          input="{}\n", capture_output=True, text=True, timeout=30,
                          env={**os.environ, **_env(tmp_path, "agent")})  # fmt: skip
    _quiet_end(done, done.stderr)
    assert done.stdout == ""


@pytest.mark.parametrize("command", SERVERS)
def test_a_server_whose_client_stops_reading_ends_quietly(
    tmp_path: Path, command: list[str]
) -> None:

    server = Stdio(_env(tmp_path, "agent"), command)
    proc = server.proc
    try:
        server.initialize()
        assert proc.stdout is not None
        proc.stdout.close()  # the client goes away (as | head would): replies hit a broken pipe
        for n in range(3):
            # the server may end at its first reply that finds nobody reading: then writing to
            # it breaks too, and that is the quiet end this test wants
            with contextlib.suppress(BrokenPipeError):
                server._write({"jsonrpc": "2.0", "id": 100 + n, "method": "tools/list"})
            time.sleep(0.3)
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        proc.wait(timeout=20)
        assert proc.stderr is not None
        err = proc.stderr.read()
    finally:  # never leave the process or its pipes behind for a later test to trip over
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
    _quiet_end(proc, err)


DEEP = '{"a":' * 5000 + "1" + "}" * 5000
UNREADABLE = [  # a line the SDK cannot read, and the JSON-RPC error that answers it
    ("not json at all", None, -32700),
    ("[1,2,3]", None, -32600),
    ("42", None, -32600),
    ('{"jsonrpc":"2.0","id":41,"method":"tools/call",'
     '"params":{"name":"agent_policy_get","arguments":{"agentId":"\\ud800"}}}', 41, -32700),
    ('{"jsonrpc":"2.0","id":42,"method":"tools/call",'
     '"params":{"name":"agent_policy_set","arguments":{"agentId":"bot","policy":' + DEEP + "}}}",
     42, -32700),
    ('{"jsonrpc":"2.0","id":"forty-three","method":"tools/call","params":{'
     '"name":"agent_policy_check","arguments":{"decimals":' + "9" * 5000 + "}}}",
     "forty-three", -32700),
    ('{"jsonrpc":"1.0","id":44,"method":"tools/list"}', 44, -32600),
    ('{"jsonrpc":"2.0","id":45,"method":"tools/list","params":5}', 45, -32600),
    ('{"jsonrpc":"2.0","id":"\\ud800","method":"x","params":{"a":"\\udc00"}}', None, -32700),
    ('{"jsonrpc":"2.0","method":"notifications/x","params":[1}', None, -32700),
    ('{"jsonrpc":"2.0","id":46,"method":"tools/list","params":{"a":[1,}}', 46, -32700),
    # a string left open inside a nested value: it was read in time that doubled with each
    # character, and the server answered nothing more (a CPU loop)
    ('{"jsonrpc":"2.0","id":47,"method":"tools/call","params":{"arguments":{"a":"' + "a" * 5000,
     47, -32700),
    # one left open full of escaped quotes: each was taken for a string's start, and read to
    # the end of the line (time with the square of its length: 160 KB took 57 s)
    ('{"jsonrpc":"2.0","id":48,"method":"tools/call","params":{"a":["' + '\\"' * 100_000,
     48, -32700),
]  # fmt: skip


def test_each_unreadable_line_gets_the_json_rpc_error_with_its_id_where_it_shows_one(
    tmp_path: Path,
) -> None:
    import queue

    server = Stdio(_env(tmp_path, "agent"))
    server.initialize()
    assert server.proc.stdin is not None
    assert server.proc.stdout is not None
    replies: queue.Queue[str] = queue.Queue()
    out = server.proc.stdout

    def read() -> None:  # a line that got no answer fails the test instead of hanging it
        for reply in out:
            replies.put(reply)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for line, request_id, code in UNREADABLE:
            server.proc.stdin.write(line + "\n\n")  # a blank line is no message: no answer
            server.proc.stdin.flush()
            try:
                reply = json.loads(replies.get(timeout=30))
            except queue.Empty:
                pytest.fail(f"no answer to {line[:80]!r}")
            assert (reply["jsonrpc"], reply["id"], reply["error"]["code"]) == (
                "2.0", request_id, code)  # fmt: skip
            assert reply["error"]["message"].startswith(
                "Parse error" if code == -32700 else "Invalid Request"
            )
        server._write({"jsonrpc": "2.0", "id": 99, "method": "tools/list"})
        listed = json.loads(replies.get(timeout=30))  # and it goes on serving
        assert (listed["id"], len(listed["result"]["tools"])) == (99, 10)
    finally:
        server.proc.stdin.close()
        server.proc.wait(timeout=20)
        reader.join(timeout=20)
        out.close()
    assert server.proc.returncode == 0
    assert server.proc.stderr is not None
    assert "Traceback" not in server.proc.stderr.read()
    server.proc.stderr.close()


def test_unreadable_reply_reads_the_sdks_error() -> None:
    import mcp_types
    import pydantic

    from agentpolicy.mcp.stdio import unreadable_reply

    def reply(line: str) -> Any:
        try:
            mcp_types.jsonrpc_message_adapter.validate_json(line, by_name=False)
        except pydantic.ValidationError as error:
            answer = unreadable_reply(error)
            return None if answer is None else answer.model_dump(exclude_unset=True)
        raise AssertionError(f"the SDK reads {line!r}")

    assert reply("") is None
    assert reply("  \t") is None
    assert reply('{"id":7,"method":"x","params":{"deep":' + DEEP + "}}")["id"] == 7
    assert reply('{"id":7,"method":"x","params":[1]}')["error"]["message"] == (
        "Invalid Request: not a JSON-RPC 2.0 message (jsonrpc: Field required; "
        "params: Input should be an object)"
    )
    for line in ('{"jsonrpc":"2.0","id":true,"method":7}', '{"jsonrpc":"2.0","id":7}',
                 '{"jsonrpc":"2.0","id":1.5,"method":"x","params":1}',
                 '{"jsonrpc":"2.0","id":' + "9" * 5000 + ',"method":"x","x":\\ud800}'):  # fmt: skip
        assert reply(line)["id"] is None, line
    assert reply("{")["error"]["code"] == -32700
    assert reply("}")["error"]["code"] == -32700


BLOCK_MCP = """
import importlib.abc, sys

class NoMcp(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mcp", "mcp_types"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoMcp())
"""


@pytest.mark.parametrize(
    ("command", "start"),
    [
        ([MCP_EXE], "agent-policy-mcp: the MCP server needs the mcp extra"),
        ([sys.executable, "-m", "agentpolicy.mcp"], "agent-policy-mcp: the MCP server needs"),
        ([str(Path(sys.executable).with_name("agentpolicy")), "serve-mcp"],
         "agentpolicy: serve-mcp needs the mcp extra"),
    ],
)  # fmt: skip
def test_without_the_mcp_extra_the_commands_say_which_extra_to_install(
    tmp_path: Path, command: list[str], start: str
) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCK_MCP)
    env = {**os.environ, **_env(tmp_path, "agent"), "PYTHONPATH": str(tmp_path)}
    probe = subprocess.run([sys.executable, "-c", "import mcp"], env=env, capture_output=True,
                           text=True, check=False)  # fmt: skip
    assert "ModuleNotFoundError" in probe.stderr  # the blocker works
    done = subprocess.run(command, check=False, input="", capture_output=True, text=True,
                          timeout=30, env=env)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(start), done.stderr
    assert "pip install 'agentpolicy[mcp]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert "INTERNAL" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_python_m_agentpolicy_mcp_sends_webhooks_from_the_environment(tmp_path: Path) -> None:

    from tests.receiver import Receiver

    receiver = Receiver().start()
    try:
        server = Stdio({**_env(tmp_path, "admin"), "AGENT_POLICY_WEBHOOK_URL": receiver.url,
                        "AGENT_POLICY_WEBHOOK_SECRET": "s"},
                       [sys.executable, "-m", "agentpolicy.mcp"])  # fmt: skip
        server.initialize()
        server.call("agent_policy_set", {"agentId": "bot", "policy": APPROVAL_POLICY})
        held = server.call("agent_policy_authorize", {**PAY, "amount": "500000000"})
        assert held["structuredContent"]["data"]["requiresApproval"] is True
        deadline = time.monotonic() + 15
        while not receiver.received and time.monotonic() < deadline:
            time.sleep(0.05)  # real time: delivery runs on real time, not the engine's clock
        assert [json.loads(r.body)["event"] for r in receiver.received] == ["approval.created"]
        assert "Traceback" not in server.close()
    finally:
        receiver.stop()


# -- the Claude Desktop configuration of docs/mcp.md, as written -----------------------------------

DOCS_VENV = "/Users/you/agentpolicy/.venv"
DOCS_STATE = "/Users/you/Library/Application Support/agentpolicy"


def claude_desktop_config() -> dict[str, Any]:
    text = (ROOT / "docs" / "mcp.md").read_text()
    blocks = [b for b in re.findall(r"```json\n(.*?)```", text, re.DOTALL) if "mcpServers" in b]
    assert len(blocks) == 1
    config: dict[str, Any] = json.loads(blocks[0])
    return config


@pytest.mark.parametrize("name", ["agent-policy", "agent-policy-admin"])
def test_the_documented_claude_desktop_config_starts_on_a_new_machine(
    tmp_path: Path, name: str
) -> None:
    entry = claude_desktop_config()["mcpServers"][name]
    venv, state = str(Path(sys.executable).parent.parent), str(tmp_path / "App Support" / "ap")
    command = entry["command"].replace(DOCS_VENV, venv)
    assert Path(command).is_absolute()  # no PATH needed
    env = {key: value.replace(DOCS_STATE, state) for key, value in entry["env"].items()}
    assert not Path(state).exists()  # the folder of AGENT_POLICY_DB does not exist yet
    # Claude Desktop starts the server with a bare environment: no venv on PATH.
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env}
    server = Stdio(bare, [command, *entry.get("args", [])], inherit=False)
    assert server.initialize()["result"]["serverInfo"]["name"] == "agent-policy"
    tools = server.send("tools/list")["result"]["tools"]
    assert len(tools) == (25 if name == "agent-policy-admin" else 10)
    assert all("outputSchema" in t and "annotations" in t for t in tools)
    assert "Traceback" not in server.close()
    assert stat.S_IMODE(Path(state).stat().st_mode) == 0o700
    assert Path(env["AGENT_POLICY_DB"]).is_file()


def test_calls_under_way_when_stdin_ends_are_answered_before_the_server_exits(
    tmp_path: Path,
) -> None:
    """A client that writes its requests and closes stdin gets every answer.

    The server ended with stdin and dropped the answers of calls still under
    way, which had taken effect: payments were reserved and their ids never
    reported (docs/mcp.md: every line gets an answer).
    """
    env = {**os.environ, **_env(tmp_path, "admin")}
    policy = {"limits": {"daily": {"value": "1000000000"}}}
    lines = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "agent_policy_set", "arguments": {"agentId": "bot", "policy": policy}}},
    ] + [
        {"jsonrpc": "2.0", "id": 10 + i, "method": "tools/call", "params": {
            "name": "agent_policy_authorize", "arguments": {**PAY, "amount": "1"}}}
        for i in range(20)
    ]  # fmt: skip
    done = subprocess.run([MCP_EXE], input="".join(json.dumps(x) + "\n" for x in lines),
                          capture_output=True, text=True, env=env, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    answered = {json.loads(line)["id"] for line in done.stdout.splitlines()}
    assert answered == {1, 2, *range(10, 30)}
    engine = PolicyEngine(storage=SQLiteStorage(tmp_path / "mcp.db"))
    try:
        assert len(engine.history("bot", 100)) == 21  # the policy and 20 decisions
    finally:
        engine.close()


def _stdin_ends_during_a_hung_call(
    call_id: int | str, then: dict[str, Any], answered_first: int | str | None = None
) -> list[Any]:
    """The ids the stdio server answers: a tool call ``call_id`` hangs in the store, the client
    sends ``then`` and ends stdin (once ``answered_first`` is answered, if given), the store
    goes on; the server must have exited within 60 s (``DRAIN_SECONDS`` is 120)."""
    from mcp.shared.message import SessionMessage
    from mcp_types import JSONRPCMessage
    from pydantic import TypeAdapter

    from agentpolicy.mcp.stdio import _run

    storage = HangingStorage()
    app = AgentPolicyMcpServer(storage=storage, role="admin", clock=ManualClock())
    app.call("agent_policy_set", {"agentId": "bot", "policy": {}})
    storage.hang.set()
    answered: list[Any] = []

    async def run() -> None:
        to_server, read = anyio.create_memory_object_stream[Any](10)
        write, from_server = anyio.create_memory_object_stream[Any](10)

        async def send(message: dict[str, Any]) -> None:
            await to_server.send(
                SessionMessage(TypeAdapter(JSONRPCMessage).validate_python(message))
            )

        async def collect() -> None:
            async with from_server:
                async for item in from_server:
                    answered.append(item.message.id)

        ended = anyio.Event()

        async def serve() -> None:
            async with read:
                await _run(build_server(app), read, write)
            ended.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve)
            tasks.start_soon(collect)
            await send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": {"name": "test", "version": "1"}}})  # fmt: skip
            await send({"jsonrpc": "2.0", "method": "notifications/initialized"})
            await send({"jsonrpc": "2.0", "id": call_id, "method": "tools/call", "params": {
                "name": "agent_policy_get", "arguments": {"agentId": "bot"}}})  # fmt: skip
            with anyio.fail_after(10):
                while not storage.entered.is_set():
                    await anyio.sleep(0.01)
            await send(then)
            await to_server.aclose()  # stdin ends
            with anyio.fail_after(10):
                while answered_first is not None and answered_first not in answered:
                    await anyio.sleep(0.01)
            storage.release.set()
            with anyio.fail_after(60):  # DRAIN_SECONDS is 120
                await ended.wait()

    anyio.run(run)
    return answered


def test_two_calls_with_one_id_are_both_answered_before_the_server_exits() -> None:
    """A client that sent one id twice, then closed stdin, got one answer: the first answer
    ended the wait for that id while the other call (a payment reserved, say) was under way."""
    ping = {"jsonrpc": "2.0", "id": 12, "method": "ping"}  # answered at once
    answered = _stdin_ends_during_a_hung_call(12, ping, answered_first=12)
    assert sorted(answered) == [1, 12, 12]  # the ping's, then the tool call's


@pytest.mark.parametrize(("call_id", "cancel_id"), [(2, 2), (2, "2"), (2, "0_2"), ("7", 7)])
def test_a_call_the_client_cancelled_is_not_waited_for_once_stdin_ends(
    call_id: int | str, cancel_id: int | str
) -> None:
    """Waiting for answers after stdin ends skips requests the client cancelled.

    A cancelled request gets no answer, so waiting for one held the server
    for the whole ``DRAIN_SECONDS`` after its client had gone. The SDK reads
    an id ``"2"`` as ``2`` (as ``int()`` does) when it cancels; the wait
    compared the ids as sent, and waited the whole 120 s.
    """
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled",
              "params": {"requestId": cancel_id}}  # fmt: skip
    answered = _stdin_ends_during_a_hung_call(call_id, cancel)
    assert answered[0] == 1
