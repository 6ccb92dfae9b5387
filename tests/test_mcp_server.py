"""AgentPolicyMcpServer.handle_tool_call: every tool with valid, invalid and forbidden input."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from agentpolicy import ErrorCode, PolicyError
from agentpolicy.mcp import TOOLS, AgentPolicyMcpServer, create_server_with_redis
from agentpolicy.storage import MemoryStorage
from agentpolicy.testing import ManualClock

USDT = 1_000_000
POLICY = {
    "limits": {"daily": {"value": str(1000 * USDT)}},
    "approvalConfig": {
        "thresholds": [
            {"amount": {"value": str(100 * USDT)}, "requiredApprovers": 1,
             "approvers": ["admin@company.com"]}
        ]
    },
}  # fmt: skip
PAY = {"agentId": "acme:bot", "amount": str(5 * USDT), "recipient": "0xv", "network": "eip155:8453"}


def call(server: AgentPolicyMcpServer, name: str, args: Any = None) -> dict[str, Any]:
    return asyncio.run(server.handle_tool_call(name, args))


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert result["success"] is True, result
    data: dict[str, Any] = result["data"]
    return data


def err(result: dict[str, Any]) -> dict[str, Any]:
    assert result["success"] is False, result
    error: dict[str, Any] = result["error"]
    return error


@pytest.fixture
def storage() -> MemoryStorage:
    return MemoryStorage()


@pytest.fixture
def admin(storage: MemoryStorage) -> AgentPolicyMcpServer:
    server = AgentPolicyMcpServer(storage=storage, role="admin", clock=ManualClock())
    ok(call(server, "agent_policy_set", {"agentId": "acme:bot", "policy": POLICY}))
    return server


@pytest.fixture
def agent(storage: MemoryStorage, admin: AgentPolicyMcpServer) -> AgentPolicyMcpServer:
    return AgentPolicyMcpServer(storage=storage, clock=admin.engine.clock)


def test_tool_names_follow_the_mcp_pattern_and_seed_names_map() -> None:
    import re

    assert len(TOOLS) == 10
    for tool in TOOLS:
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", tool.name)
        assert tool.seed_name.startswith("agent-policy/")
        assert tool.input_schema["additionalProperties"] is False
        assert len(tool.description) > 60


def test_roles_list_their_tools(admin: AgentPolicyMcpServer, agent: AgentPolicyMcpServer) -> None:
    assert len(admin.tools()) == 10
    assert [t.seed_name.removeprefix("agent-policy/") for t in agent.tools()] == [
        "authorize", "budget", "get", "confirm", "release", "approvals/list", "approvals/get",
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["agent_policy_set", "agent-policy/set", "agent_policy_list",
                                  "agent-policy/approvals/decide", "agent_policy_approvals_decide"])  # fmt: skip
def test_the_agent_role_cannot_raise_limits_or_approve(
    agent: AgentPolicyMcpServer, name: str
) -> None:
    result = call(agent, name, {"agentId": "acme:bot", "policy": {}})
    assert err(result)["code"] == "FORBIDDEN"


def test_unknown_tool(agent: AgentPolicyMcpServer) -> None:
    assert err(call(agent, "agent_policy_pay", {}))["code"] == "UNKNOWN_TOOL"
    assert err(call(agent, 5, {}))["code"] == "UNKNOWN_TOOL"  # type: ignore[arg-type]


def test_authorize_confirm_release_and_budget(agent: AgentPolicyMcpServer) -> None:
    d = ok(call(agent, "agent-policy/authorize", PAY))
    assert (d["allowed"], d["code"], d["requiresApproval"]) == (True, "ALLOWED", False)
    assert d["evaluations"][0]["name"] == "policy"
    assert ok(call(agent, "agent_policy_confirm", {"reservationId": d["reservationId"]}))[
        "status"] == "confirmed"  # fmt: skip
    d2 = ok(call(agent, "agent_policy_authorize", PAY))
    released = ok(call(agent, "agent_policy_release", {"reservationId": d2["reservationId"]}))
    assert released["status"] == "released"
    budget = ok(call(agent, "agent_policy_budget", {"agentId": "acme:bot"}))
    assert budget["periods"]["daily"] == {
        **budget["periods"]["daily"],
        "limit": str(1000 * USDT), "spent": str(5 * USDT), "reserved": "0",
        "remaining": str(995 * USDT),
    }  # fmt: skip
    daily_only = ok(call(agent, "agent_policy_budget", {"agentId": "acme:bot", "period": "daily"}))
    assert list(daily_only["periods"]) == ["daily"]


def test_a_denial_is_a_success_whose_data_says_not_allowed(agent: AgentPolicyMcpServer) -> None:
    d = ok(call(agent, "agent_policy_authorize", {**PAY, "amount": str(2000 * USDT)}))
    assert (d["allowed"], d["code"]) == (False, "DAILY_LIMIT")
    assert "reservationId" not in d


def test_approval_flow_across_roles(
    agent: AgentPolicyMcpServer, admin: AgentPolicyMcpServer
) -> None:
    d = ok(call(agent, "agent_policy_authorize", {**PAY, "amount": str(500 * USDT)}))
    assert (d["requiresApproval"], d["code"]) == (True, "APPROVAL_REQUIRED")
    listed = ok(call(agent, "agent_policy_approvals_list", {}))["approvals"]
    assert [a["id"] for a in listed] == [d["approvalId"]]
    got = ok(call(agent, "agent-policy/approvals/get", {"approvalId": d["approvalId"]}))
    assert (got["amount"], got["amountRaw"], got["status"]) == (
        "500 USDT",
        str(500 * USDT),
        "pending",
    )
    assert set(got) >= {"id", "agentId", "recipient", "network", "requiredApprovers", "approvers",
                        "decisions", "createdAt", "expiresAt"}  # fmt: skip
    decided = ok(call(admin, "agent_policy_approvals_decide", {
        "approvalId": d["approvalId"], "decision": "approve", "approver": "admin@company.com",
        "comment": "fine"}))  # fmt: skip
    assert decided["status"] == "approved"
    assert decided["decisions"][0]["comment"] == "fine"
    confirmed = ok(call(agent, "agent_policy_confirm", {"reservationId": decided["reservationId"]}))
    assert confirmed["status"] == "confirmed"
    again = err(call(admin, "agent_policy_approvals_decide", {
        "approvalId": d["approvalId"], "decision": "deny", "approver": "admin@company.com"}))  # fmt: skip
    assert again["code"] == "APPROVAL_NOT_PENDING"


def test_get_set_and_list(admin: AgentPolicyMcpServer) -> None:
    got = ok(call(admin, "agent_policy_get", {"agentId": "acme:bot"}))
    assert (got["version"], got["policy"]["limits"]["daily"]["value"]) == (1, str(1000 * USDT))
    assert ok(call(admin, "agent_policy_set", {"agentId": "other", "policy": {}}))["version"] == 1
    assert ok(call(admin, "agent_policy_list", {}))["policies"] == [
        {"agentId": "acme:bot", "enabled": True, "version": 1},
        {"agentId": "other", "enabled": True, "version": 1},
    ]
    assert len(ok(call(admin, "agent_policy_list", {"orgId": "acme"}))["policies"]) == 1
    assert err(call(admin, "agent_policy_get", {"agentId": "nobody"}))["code"] == "NO_POLICY"
    assert err(call(admin, "agent_policy_budget", {"agentId": "nobody"}))["code"] == "NO_POLICY"


@pytest.mark.parametrize(
    ("name", "args", "path"),
    [
        ("agent_policy_authorize", {**PAY, "amount": "1.5"}, "$.amount"),
        ("agent_policy_authorize", {**PAY, "amount": 5}, "$.amount"),
        ("agent_policy_authorize", {**PAY, "amount": "0"}, "$.amount"),
        ("agent_policy_authorize", {**PAY, "network": "base"}, "$.network"),
        ("agent_policy_authorize", {**PAY, "decimals": "6"}, "$.decimals"),
        ("agent_policy_authorize", {**PAY, "decimals": True}, "$.decimals"),
        ("agent_policy_authorize", {**PAY, "surprise": 1}, "$.surprise"),
        ("agent_policy_authorize", {"agentId": "acme:bot"}, "$.amount"),
        ("agent_policy_budget", {"agentId": "acme:bot", "period": "yearly"}, "$.period"),
        ("agent_policy_budget", {"agentId": ""}, "$.agentId"),
        ("agent_policy_get", {}, "$.agentId"),
        (
            "agent_policy_set",
            {"agentId": "x", "policy": {"limits": {"daily": {"value": "-1"}}}},
            "$.policy.limits.daily.value",
        ),
        ("agent_policy_set", {"agentId": "x", "policy": "{}"}, "$.policy"),
        ("agent_policy_list", {"orgId": 5}, "$.orgId"),
        ("agent_policy_confirm", {"reservationId": None}, "$.reservationId"),
        ("agent_policy_release", {}, "$.reservationId"),
        ("agent_policy_approvals_list", {"agentId": [1]}, "$.agentId"),
        ("agent_policy_approvals_get", {"approvalId": ""}, "$.approvalId"),
        (
            "agent_policy_approvals_decide",
            {"approvalId": "a", "decision": "yes", "approver": "b"},
            "$.decision",
        ),
        ("agent_policy_approvals_decide", {"approvalId": "a", "decision": "deny"}, "$.approver"),
    ],
)
def test_invalid_input_is_refused_with_a_path_and_changes_nothing(
    admin: AgentPolicyMcpServer, name: str, args: dict[str, Any], path: str
) -> None:
    before = admin.engine.history("acme:bot", 1000)
    e = err(call(admin, name, args))
    assert e["code"] == "INVALID_INPUT"
    assert e["path"] == path, e
    assert admin.engine.history("acme:bot", 1000) == before


@pytest.mark.parametrize("args", [None, [], "x"])
def test_arguments_must_be_an_object(admin: AgentPolicyMcpServer, args: Any) -> None:
    code = err(call(admin, "agent_policy_get", args))["code"] if args is not None else None
    if args is None:
        assert err(call(admin, "agent_policy_get", None))["path"] == "$.agentId"
    else:
        assert code == "INVALID_INPUT"


def test_not_found_errors(agent: AgentPolicyMcpServer) -> None:
    assert err(call(agent, "agent_policy_confirm", {"reservationId": "res_x"}))["code"] == (
        "RESERVATION_NOT_FOUND"
    )
    assert err(call(agent, "agent_policy_approvals_get", {"approvalId": "apr_x"}))["code"] == (
        "APPROVAL_NOT_FOUND"
    )


def test_a_bound_server_serves_nothing_of_other_agents(storage: MemoryStorage) -> None:
    clock = ManualClock()
    admin = AgentPolicyMcpServer(storage=storage, role="admin", clock=clock)
    for agent_id in ("acme:bot", "acme:crawler", "evil"):
        ok(call(admin, "agent_policy_set", {"agentId": agent_id, "policy": POLICY}))
    theirs = ok(call(admin, "agent_policy_authorize", {**PAY, "agentId": "evil"}))
    their_approval = ok(call(admin, "agent_policy_authorize",
                             {**PAY, "agentId": "evil", "amount": str(200 * USDT)}))  # fmt: skip
    bound = AgentPolicyMcpServer(storage=storage, clock=clock, agent_id="acme:bot")
    assert ok(call(bound, "agent_policy_authorize", PAY))["allowed"]
    for name, args in [
        ("agent_policy_authorize", {**PAY, "agentId": "evil"}),
        ("agent_policy_budget", {"agentId": "evil"}),
        ("agent_policy_get", {"agentId": "acme:crawler"}),
        ("agent_policy_confirm", {"reservationId": theirs["reservationId"]}),
        ("agent_policy_release", {"reservationId": theirs["reservationId"]}),
        ("agent_policy_approvals_get", {"approvalId": their_approval["approvalId"]}),
        ("agent_policy_approvals_list", {"agentId": "evil"}),
    ]:
        assert err(call(bound, name, args))["code"] == "FORBIDDEN", name
    assert ok(call(bound, "agent_policy_approvals_list", {}))["approvals"] == []
    org = AgentPolicyMcpServer(storage=storage, clock=clock, org_id="acme")
    assert ok(call(org, "agent_policy_budget", {"agentId": "acme:crawler"}))
    assert err(call(org, "agent_policy_budget", {"agentId": "evil"}))["code"] == "FORBIDDEN"
    org_admin = AgentPolicyMcpServer(storage=storage, role="admin", clock=clock, org_id="acme")
    assert [p["agentId"] for p in ok(call(org_admin, "agent_policy_list", {}))["policies"]] == [
        "acme:bot", "acme:crawler",
    ]  # fmt: skip


def test_demo_mode_is_admin_in_memory_with_the_seed_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_POLICY_DB", str(tmp_path / "must-not-exist.db"))
    demo = AgentPolicyMcpServer(demo_mode=True, role="agent", clock=ManualClock())
    assert demo.role == "admin"
    result = call(demo, "agent_policy_get", {"agentId": "demo-agent"})
    assert result["demoMode"] is True
    assert ok(result)["policy"]["limits"]["daily"]["value"] == "1000000000"
    decision = ok(call(demo, "agent_policy_authorize", {
        "agentId": "demo-agent", "amount": "5000000", "recipient": "0xaddr1",
        "network": "eip155:8453", "category": "api_usage"}))  # fmt: skip
    assert decision["allowed"]
    assert not (tmp_path / "must-not-exist.db").exists()


def test_storage_none_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENT_POLICY_REDIS_URL", raising=False)
    monkeypatch.setenv("AGENT_POLICY_DB", str(tmp_path / "env.db"))
    server = AgentPolicyMcpServer(role="admin")
    ok(call(server, "agent_policy_set", {"agentId": "a", "policy": {}}))
    server.close()
    assert (tmp_path / "env.db").exists()
    monkeypatch.delenv("AGENT_POLICY_DB")
    private = AgentPolicyMcpServer(role="admin")
    assert isinstance(private.engine.storage, MemoryStorage)


def test_an_internal_error_is_reported_without_a_traceback(
    agent: AgentPolicyMcpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: object) -> None:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(agent.engine, "budget", boom)
    e = err(call(agent, "agent_policy_budget", {"agentId": "acme:bot"}))
    assert e["code"] == "INTERNAL"
    assert "Traceback" not in e["message"]
    assert "secret detail" not in e["message"]
    assert "nothing was changed" in e["message"]


def test_bad_constructor_arguments_are_invalid_input() -> None:
    with pytest.raises(PolicyError) as caught:
        AgentPolicyMcpServer(role="root")
    assert caught.value.code == ErrorCode.INVALID_INPUT
    with pytest.raises(PolicyError):
        AgentPolicyMcpServer(agent_id=" x")


def test_without_the_redis_extra_the_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "agentpolicy.storage.redis", None)  # as if not installed
    with pytest.raises(PolicyError, match=r"agentpolicy\[redis\]") as caught:
        create_server_with_redis("redis://user:secret@localhost:6379/0")
    assert caught.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "secret" not in caught.value.message
