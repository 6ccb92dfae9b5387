"""A ``tools/call`` the MCP SDK would refuse gets the tools' structured error, on every transport.

``arguments`` that are not an object, and a ``name`` that is not a string
(or none at all), were answered by the SDK's bare JSON-RPC ``-32602 Invalid
request parameters`` before any tool saw them; every other bad input gets a
tool result with ``isError`` and ``{"success": false, "error": {"code": ...}}``,
and now these do too, nothing called: ``INVALID_INPUT`` for the arguments,
``UNKNOWN_TOOL`` for a name that names no tool (as an unknown string name
always was).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from mcp.shared.message import SessionMessage
from mcp_types import JSONRPCMessage
from pydantic import TypeAdapter

from agentpolicy.mcp import AgentPolicyMcpServer
from agentpolicy.mcp.stdio import _run, build_server
from agentpolicy.storage import MemoryStorage
from agentpolicy.testing import ManualClock
from tests.test_serve_errors import MCP, Env, _make

MODERN = "2026-07-28"
ENVELOPE = {"io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": {}}  # fmt: skip
PAY = {"amount": "1000000", "recipient": "0xv", "network": "eip155:8453"}

MISTYPED: list[tuple[dict[str, Any], str, str | None]] = [  # params, code, error path
    ({"name": "agent_policy_authorize", "arguments": [PAY]}, "INVALID_INPUT", "$"),
    ({"name": "agent_policy_authorize", "arguments": json.dumps(PAY)}, "INVALID_INPUT", "$"),
    ({"name": "agent_policy_authorize", "arguments": 5}, "INVALID_INPUT", "$"),
    ({"name": "agent_policy_authorize", "arguments": True}, "INVALID_INPUT", "$"),
    ({"name": 5, "arguments": PAY}, "UNKNOWN_TOOL", None),
    ({"name": None, "arguments": PAY}, "UNKNOWN_TOOL", None),
    ({"name": ["agent_policy_authorize"], "arguments": PAY}, "UNKNOWN_TOOL", None),
    ({"arguments": PAY}, "UNKNOWN_TOOL", None),
    ({"name": "agent_policy_nope", "arguments": PAY}, "UNKNOWN_TOOL", None),
]


def _structured(answer: dict[str, Any], code: str, path: str | None) -> dict[str, Any]:
    """The tool result of a JSON-RPC answer, checked: an error result with ``code``."""
    assert "error" not in answer, answer  # not a JSON-RPC error: a result, as for any bad input
    result = answer["result"]
    assert result["isError"] is True
    error = result["structuredContent"]["error"]
    assert result["structuredContent"]["success"] is False
    assert error["code"] == code, error
    assert error.get("path") == path, error
    assert f"Error {code}" in result["content"][0]["text"]
    assert "Traceback" not in json.dumps(answer)
    return dict(error)


def test_the_tools_say_a_name_that_is_no_string_names_no_tool() -> None:
    """It was ``unknown tool None`` (or ``5``, ``['agent_policy_budget']``): a list's repr."""
    app = AgentPolicyMcpServer(storage=MemoryStorage(), role="agent", clock=ManualClock())
    for name, kind in ((5, "integer"), (None, "null"), (["agent_policy_budget"], "array")):
        found = app.call(name, {})
        assert found["success"] is False
        assert found["error"] == {"code": "UNKNOWN_TOOL", "message": "a tool call's name must "
                                  f"be a string naming a tool, not {kind}"}  # fmt: skip
    assert app.call("agent_policy_nope", {})["error"]["code"] == "UNKNOWN_TOOL"
    # a name of a million characters was echoed whole (three times in the MCP answer)
    long = app.call("x" * 1_000_000, {})["error"]
    assert long["code"] == "UNKNOWN_TOOL"
    assert len(long["message"]) < 400
    assert "1000002 characters" in long["message"]  # its repr, quotes included


# -- over Streamable HTTP (agentpolicy serve) -----------------------------------------------


@pytest.fixture
def env() -> Iterator[Env]:
    made = _make()  # test_serve_errors' service: policy "bot"
    try:
        yield made
    finally:
        made.engine.close()


def _post(c: Any, token: str, params: dict[str, Any], modern: bool) -> dict[str, Any]:
    headers = {**MCP, "Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if modern:  # the 2026-07-28 protocol: no handshake, an envelope in every request
        params = {**params, "_meta": ENVELOPE}
        headers.update({"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call"})
        if isinstance(params.get("name"), str):
            headers["Mcp-Name"] = params["name"]
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params}
    r = c.post("/mcp", content=json.dumps(body), headers=headers)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    assert answer["id"] == 7
    return answer


@pytest.mark.parametrize("modern", [False, True], ids=["2025-06-18", MODERN])
def test_a_mistyped_call_over_http_is_the_tools_structured_error_and_changes_nothing(
    env: Env, modern: bool
) -> None:
    token = env.token("agent", agent_id="bot")
    with env.client() as c:  # the lifespan runs the MCP transport
        for params, code, path in MISTYPED:
            if modern and not isinstance(params.get("name"), str | None):
                continue  # Mcp-Name must equal a name: the transport refuses it first (-32020)
            _structured(_post(c, token, params, modern), code, path)
        budget = _post(c, token, {"name": "agent_policy_budget", "arguments": {}}, modern)
    assert budget["result"]["structuredContent"]["data"]["periods"]["daily"]["reserved"] == "0"
    assert env.engine.open_reservations() == 0


def test_an_org_bound_token_is_still_refused_the_registry_when_the_arguments_are_mistyped(
    env: Env,
) -> None:
    token = env.token("admin", org_id="acme")
    params = {"name": "agent_policy_approvers_remove", "arguments": ["mallory"]}
    with env.client() as c:
        _structured(_post(c, token, params, False), "FORBIDDEN", None)


# -- over stdio (agent-policy-mcp) ------------------------------------------------------------


def _over_stdio(app: AgentPolicyMcpServer, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each ``tools/call`` params in turn to :func:`build_server` on in-memory stdio streams."""
    answers: list[dict[str, Any]] = []

    async def run() -> None:
        to_server, read = anyio.create_memory_object_stream[Any](10)
        write, from_server = anyio.create_memory_object_stream[Any](10)

        async def ask(message: dict[str, Any]) -> dict[str, Any] | None:
            await to_server.send(
                SessionMessage(TypeAdapter(JSONRPCMessage).validate_python(message))
            )
            if "id" not in message:
                return None
            reply = await from_server.receive()
            dumped: dict[str, Any] = reply.message.model_dump(by_alias=True, exclude_none=True)
            return dumped

        async def serve() -> None:
            async with read:
                await _run(build_server(app), read, write)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve)
            with anyio.fail_after(60):
                await ask({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                    "protocolVersion": "2025-06-18", "capabilities": {},
                    "clientInfo": {"name": "test", "version": "1"}}})  # fmt: skip
                await ask({"jsonrpc": "2.0", "method": "notifications/initialized"})
                for n, params in enumerate(calls, 1):
                    answer = await ask({"jsonrpc": "2.0", "id": n, "method": "tools/call",
                                        "params": params})  # fmt: skip
                    assert answer is not None
                    answers.append(answer)
                await to_server.aclose()  # stdin ends: the server stops
            async with from_server:
                pass

    anyio.run(run)
    return answers


def test_a_mistyped_call_over_stdio_is_the_tools_structured_error_and_changes_nothing() -> None:
    app = AgentPolicyMcpServer(storage=MemoryStorage(), role="agent", agent_id="bot",
                               clock=ManualClock())  # fmt: skip
    admin = AgentPolicyMcpServer(storage=app.engine.storage, role="admin", clock=ManualClock())
    assert admin.call("agent_policy_set", {"agentId": "bot", "policy": {}})["success"]
    answers = _over_stdio(app, [p for p, _, _ in MISTYPED])
    for answer, (_, code, path) in zip(answers, MISTYPED, strict=True):
        _structured(answer, code, path)
    assert app.engine.open_reservations() == 0


def test_a_token_refused_at_mcp_is_named_with_its_article(env: Env) -> None:
    headers = {**MCP, "Authorization": f"Bearer {env.token('approver', approver='alice')}",
               "Content-Type": "application/json"}  # fmt: skip
    with env.client() as c:
        r = c.post("/mcp", content=b"{}", headers=headers)
    assert r.status_code == 403
    assert r.json()["error"]["message"].startswith("an approver token may not call /mcp")


@pytest.mark.parametrize(
    "body",
    [b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}]', b"null", b"42",
     b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": ["agent_policy_budget"]}',
     b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": "agent_policy_budget"}'],
)  # fmt: skip
def test_a_body_that_is_no_one_json_rpc_message_is_a_clear_invalid_request(
    env: Env, body: bytes
) -> None:
    """It was ``-32602`` with pydantic's dump of four union members (input echoed, doc links)."""
    headers = {**MCP, "Authorization": f"Bearer {env.token('agent', agent_id='bot')}",
               "Content-Type": "application/json"}  # fmt: skip
    with env.client() as c:
        r = c.post("/mcp", content=body, headers=headers)
        assert (r.status_code, r.headers["content-type"]) == (400, "application/json")
        assert r.json()["id"] is None
        assert r.json()["error"]["code"] == -32600
        assert r.json()["error"]["message"].startswith("Invalid Request: the body must be one ")
        assert "pydantic" not in r.text
        r = c.post("/mcp", content=b"{not json", headers=headers)  # the SDK's clear errors stay
        assert (r.status_code, r.json()["error"]["code"]) == (400, -32700)
        assert r.json()["error"]["message"].startswith("Parse error")


def test_a_refusal_names_a_bounded_number_of_problems_and_echoes_no_long_key() -> None:
    """100,000 bad keys in a delegated policy were 100,000 problems: a 3.7 MB error to the agent.

    The agent role's own tools take objects (``delegate``'s ``policy``) and
    arguments by name, so a 4 MiB call could fill the model's context with
    its own keys, three times over (summary, JSON, structured content).
    """
    storage = MemoryStorage()
    admin = AgentPolicyMcpServer(storage=storage, role="admin", clock=ManualClock())
    assert admin.call("agent_policy_set", {"agentId": "bot", "policy": {}})["success"]
    agent = AgentPolicyMcpServer(storage=storage, role="agent", agent_id="bot",
                                 clock=ManualClock())  # fmt: skip
    many = {f"k{i:06d}": 1 for i in range(100_000)}
    for name, arguments, path in (
        ("agent_policy_delegate", {"childId": "bot/c", "policy": many}, "$.policy.k000000"),
        ("agent_policy_budget", many, "$.k000000"),
    ):
        found = agent.call(name, arguments)
        error = found["error"]
        assert (error["code"], error["path"]) == ("INVALID_INPUT", path)
        assert error["message"].startswith(f"100000 problems: {path}: is not a known ")
        assert error["message"].endswith("; and 99980 more")
        assert error["message"].count(": is not a known") == 20
        assert len(json.dumps(found)) < 2000
    long = "x" * 1_000_000
    found = agent.call("agent_policy_delegate", {"childId": "bot/c", "policy": {long: 1}})
    error = found["error"]
    assert error["path"] == f"$.policy.{long[:291]}... (1000009 characters)"
    assert error["message"].startswith("$.policy.xxx")
    assert len(json.dumps(found)) < 2000
    assert agent.engine.get_policy("bot/c") is None
    small = agent.call("agent_policy_budget", {"a": 1, "b": 2})["error"]  # as it always was
    assert (
        small["message"] == "2 problems: $.a: is not a known argument; $.b: is not a known argument"
    )
