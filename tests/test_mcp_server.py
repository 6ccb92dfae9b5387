"""AgentPolicyMcpServer.handle_tool_call: every tool with valid, invalid and forbidden input."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from agentpolicy import ErrorCode, PolicyError
from agentpolicy.mcp import TOOLS, AgentPolicyMcpServer, create_server_with_redis
from agentpolicy.mcp.tools import find_tool
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
    """Call a tool; a known tool's result must match its declared output schema."""
    result: dict[str, Any] = asyncio.run(server.handle_tool_call(name, args))
    tool = find_tool(name)
    if tool is not None:
        Draft202012Validator(tool.output_schema).validate(result)
    return result


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


def test_tool_names_follow_the_mcp_pattern_and_slash_names_map() -> None:
    import re

    assert len(TOOLS) == 25
    for tool in TOOLS:
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", tool.name)
        assert tool.slash_name.startswith("agent-policy/")
        assert tool.input_schema["additionalProperties"] is False
        assert len(tool.description) > 60


def test_roles_list_their_tools(admin: AgentPolicyMcpServer, agent: AgentPolicyMcpServer) -> None:
    assert len(admin.tools()) == 25
    assert [t.slash_name.removeprefix("agent-policy/") for t in agent.tools()] == [
        "authorize", "budget", "get", "confirm", "release", "approvals/list", "approvals/get",
        "delegate", "revoke", "check",
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


def test_the_agent_cannot_settle_a_reservation_its_framework_is_paying_with(
    agent: AgentPolicyMcpServer,
) -> None:
    d = ok(call(agent, "agent_policy_authorize", {**PAY, "idempotencyKey": "order-1"}))
    agent.engine.claim(d["reservationId"], "guard_1")  # a payment block is paying with it
    for tool in ("agent_policy_release", "agent_policy_confirm"):
        refused = err(call(agent, tool, {"reservationId": d["reservationId"]}))
        assert refused["code"] == "RESERVATION_CLAIMED"
        guessed = err(call(agent, tool, {"reservationId": d["reservationId"], "holder": "guard_1"}))
        assert (guessed["code"], guessed["path"]) == ("INVALID_INPUT", "$.holder")  # admins only
    offered = {t.name: t.input_schema["properties"] for t in agent.tools()}
    assert "holder" not in offered["agent_policy_release"]
    assert agent.engine.get_reservation(d["reservationId"]).status == "reserved"
    admin = AgentPolicyMcpServer(engine=agent.engine, role="admin")  # settling a block's by hand
    assert "holder" in {t.name: t for t in admin.tools()}["agent_policy_confirm"].input_schema[
        "properties"]  # fmt: skip
    done = ok(call(admin, "agent_policy_confirm",
                   {"reservationId": d["reservationId"], "holder": "guard_1"}))  # fmt: skip
    assert done["status"] == "confirmed"


def test_the_agent_cannot_give_back_a_payment_marked_sent(agent: AgentPolicyMcpServer) -> None:
    """Its framework marked the payment sent without claiming it: the payee may be paid."""
    d = ok(call(agent, "agent_policy_authorize", PAY))
    agent.engine.mark_sent(d["reservationId"])
    refused = err(call(agent, "agent_policy_release", {"reservationId": d["reservationId"]}))
    assert refused["code"] == "FORBIDDEN"
    assert "marked sent" in refused["message"]
    assert agent.engine.get_reservation(d["reservationId"]).status == "reserved"
    daily = ok(call(agent, "agent_policy_budget", {"agentId": "acme:bot", "period": "daily"}))
    assert daily["periods"]["daily"]["reserved"] == str(5 * USDT)  # nothing given back
    # an unsent one is still the agent's to give back; a sent one its own to confirm
    d2 = ok(call(agent, "agent_policy_authorize", PAY))
    assert ok(call(agent, "agent_policy_release", {"reservationId": d2["reservationId"]}))[
        "status"] == "released"  # fmt: skip
    assert ok(call(agent, "agent_policy_confirm", {"reservationId": d["reservationId"]}))[
        "status"] == "confirmed"  # fmt: skip
    # the framework (in process) or an administrator still releases one the payee refused
    d3 = ok(call(agent, "agent_policy_authorize", PAY))
    agent.engine.mark_sent(d3["reservationId"])
    admin = AgentPolicyMcpServer(engine=agent.engine, role="admin")
    assert ok(call(admin, "agent_policy_release", {"reservationId": d3["reservationId"]}))[
        "status"] == "released"  # fmt: skip
    # releasing again, or after expiry, stays harmless for the agent
    assert ok(call(agent, "agent_policy_release", {"reservationId": d3["reservationId"]}))[
        "status"] == "released"  # fmt: skip


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
    assert "reservation" not in got  # pending: nothing reserved for the agent to pay with yet
    approved = ok(call(agent, "agent_policy_approvals_get", {"approvalId": d["approvalId"]}))
    assert approved["reservation"] == {"status": "reserved", "expiresAt": "2026-01-19T10:05:00Z"}
    confirmed = ok(call(agent, "agent_policy_confirm", {"reservationId": decided["reservationId"]}))
    assert confirmed["status"] == "confirmed"
    paid = ok(call(agent, "agent_policy_approvals_get", {"approvalId": d["approvalId"]}))
    assert paid["reservation"]["status"] == "confirmed"
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
        ("agent_policy_budget", {"agentId": "acme:bot", "period": "quarterly"}, "$.period"),
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
    for name, args, code in [
        ("agent_policy_authorize", {**PAY, "agentId": "evil"}, "FORBIDDEN"),
        ("agent_policy_budget", {"agentId": "evil"}, "FORBIDDEN"),
        ("agent_policy_get", {"agentId": "acme:crawler"}, "FORBIDDEN"),
        # another agent's record is as unknown to a bound server as a missing one
        ("agent_policy_confirm", {"reservationId": theirs["reservationId"]},
         "RESERVATION_NOT_FOUND"),
        ("agent_policy_release", {"reservationId": theirs["reservationId"]},
         "RESERVATION_NOT_FOUND"),
        ("agent_policy_approvals_get", {"approvalId": their_approval["approvalId"]},
         "APPROVAL_NOT_FOUND"),
        ("agent_policy_approvals_list", {"agentId": "evil"}, "FORBIDDEN"),
    ]:  # fmt: skip
        assert err(call(bound, name, args))["code"] == code, name
    assert admin.engine.get_reservation(theirs["reservationId"]).status.value == "reserved"
    assert ok(call(bound, "agent_policy_approvals_list", {}))["approvals"] == []
    org = AgentPolicyMcpServer(storage=storage, clock=clock, org_id="acme")
    assert ok(call(org, "agent_policy_budget", {"agentId": "acme:crawler"}))
    assert err(call(org, "agent_policy_budget", {"agentId": "evil"}))["code"] == "FORBIDDEN"
    org_admin = AgentPolicyMcpServer(storage=storage, role="admin", clock=clock, org_id="acme")
    assert [p["agentId"] for p in ok(call(org_admin, "agent_policy_list", {}))["policies"]] == [
        "acme:bot", "acme:crawler",
    ]  # fmt: skip


def test_demo_mode_is_admin_in_memory_with_the_example_policy(
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


# -- pages ------------------------------------------------------------------------------------


def _eight_approvals(agent: AgentPolicyMcpServer) -> list[str]:
    """Eight pending approvals, a second apart: oldest first is the order they were made in."""
    clock = agent.engine.clock
    assert isinstance(clock, ManualClock)
    ids = []
    for i in range(8):
        d = ok(call(agent, "agent_policy_authorize",
                    {**PAY, "amount": str((100 + i) * USDT), "memo": "x" * 200}))  # fmt: skip
        ids.append(d["approvalId"])
        clock.advance(seconds=1)
    return ids


def test_long_approval_lists_come_in_pages(agent: AgentPolicyMcpServer) -> None:
    ids = _eight_approvals(agent)
    first = ok(call(agent, "agent_policy_approvals_list", {"limit": 3}))
    assert [a["id"] for a in first["approvals"]] == ids[:3]
    second = ok(call(agent, "agent_policy_approvals_list",
                     {"limit": 3, "cursor": first["nextCursor"]}))  # fmt: skip
    assert [a["id"] for a in second["approvals"]] == ids[3:6]
    third = ok(call(agent, "agent_policy_approvals_list",
                    {"limit": 3, "cursor": second["nextCursor"]}))  # fmt: skip
    assert [a["id"] for a in third["approvals"]] == ids[6:]
    assert "nextCursor" not in third
    everything = ok(call(agent, "agent_policy_approvals_list", {}))
    assert [a["id"] for a in everything["approvals"]] == ids  # the default page holds 20
    assert "nextCursor" not in everything


def test_a_page_does_not_shift_when_an_entry_is_decided_meanwhile(
    agent: AgentPolicyMcpServer, admin: AgentPolicyMcpServer
) -> None:
    ids = _eight_approvals(agent)
    first = ok(call(agent, "agent_policy_approvals_list", {"limit": 4}))
    ok(call(admin, "agent_policy_approvals_decide",
            {"approvalId": ids[0], "decision": "deny", "approver": "admin@company.com"}))  # fmt: skip
    rest = ok(call(agent, "agent_policy_approvals_list", {"cursor": first["nextCursor"]}))
    assert [a["id"] for a in rest["approvals"]] == ids[4:]


@pytest.mark.parametrize(
    ("args", "path"),
    [({"limit": 0}, "$.limit"), ({"limit": 101}, "$.limit"), ({"limit": 10**30}, "$.limit"),
     ({"limit": "5"}, "$.limit"), ({"cursor": "nonsense"}, "$.cursor"), ({"cursor": ""}, "$.cursor"),
     ({"cursor": "WzFd"}, "$.cursor")],
)  # fmt: skip
def test_bad_page_arguments_are_invalid_input(
    agent: AgentPolicyMcpServer, args: dict[str, Any], path: str
) -> None:
    e = err(call(agent, "agent_policy_approvals_list", args))
    assert (e["code"], e["path"]) == ("INVALID_INPUT", path)


def _cursor(key: list[str]) -> str:
    import base64

    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode()


@pytest.mark.parametrize("key", [
    ["\u00b2"], ["1\u00b2"], ["\u0663"], ["\uff11"], ["\u0661\u0662"],  # digits, not ASCII ones
    ["0"], ["007"], ["-1"], ["+1"], [" 1"], ["1_0"], ["9" * 300], [str(2**62 + 1)], ["1", "2"], [],
])  # fmt: skip
def test_a_versions_cursor_that_is_no_version_number_is_invalid_input(
    admin: AgentPolicyMcpServer, key: list[str]
) -> None:
    e = err(call(admin, "agent_policy_versions", {"agentId": "acme:bot", "cursor": _cursor(key)}))
    assert (e["code"], e["path"]) == ("INVALID_INPUT", "$.cursor")


def test_versions_come_in_pages_by_their_cursor(admin: AgentPolicyMcpServer) -> None:
    for _ in range(4):
        ok(call(admin, "agent_policy_set", {"agentId": "acme:bot", "policy": POLICY}))
    first = ok(call(admin, "agent_policy_versions", {"agentId": "acme:bot", "limit": 3}))
    assert [v["version"] for v in first["versions"]] == [5, 4, 3]
    assert first["nextCursor"] == _cursor(["3"])
    rest = ok(call(admin, "agent_policy_versions",
                   {"agentId": "acme:bot", "cursor": first["nextCursor"]}))  # fmt: skip
    assert [v["version"] for v in rest["versions"]] == [2, 1]
    assert "nextCursor" not in rest


def test_policy_lists_come_in_pages_too(admin: AgentPolicyMcpServer) -> None:
    for i in range(5):
        ok(call(admin, "agent_policy_set", {"agentId": f"acme:a{i}", "policy": {}}))
    first = ok(call(admin, "agent_policy_list", {"orgId": "acme", "limit": 4}))
    assert [p["agentId"] for p in first["policies"]] == ["acme:a0", "acme:a1", "acme:a2", "acme:a3"]
    rest = ok(call(admin, "agent_policy_list", {"orgId": "acme", "cursor": first["nextCursor"]}))
    assert [p["agentId"] for p in rest["policies"]] == ["acme:a4", "acme:bot"]


# -- descriptions and binding -------------------------------------------------------------------


def test_a_bound_server_defaults_agent_id_to_its_agent_and_says_so(storage: MemoryStorage) -> None:
    clock = ManualClock()
    admin = AgentPolicyMcpServer(storage=storage, role="admin", clock=clock)
    ok(call(admin, "agent_policy_set", {"agentId": "acme:bot", "policy": POLICY}))
    bound = AgentPolicyMcpServer(storage=storage, clock=clock, agent_id="acme:bot")
    pay = {k: v for k, v in PAY.items() if k != "agentId"}
    assert ok(call(bound, "agent_policy_authorize", pay))["allowed"] is True
    assert ok(call(bound, "agent_policy_budget", {}))["agentId"] == "acme:bot"
    assert ok(call(bound, "agent_policy_get", {}))["agentId"] == "acme:bot"
    for tool in bound.tools():
        if "agentId" in tool.input_schema["properties"]:
            assert "agentId" not in tool.input_schema["required"], tool.name
            assert "acme:bot" in tool.description
            assert "acme:bot" in tool.input_schema["properties"]["agentId"]["description"]
    unbound = AgentPolicyMcpServer(storage=storage, clock=clock)
    assert err(call(unbound, "agent_policy_budget", {}))["path"] == "$.agentId"
    assert "agentId" in next(t for t in unbound.tools()
                             if t.name == "agent_policy_budget").input_schema["required"]  # fmt: skip


def test_descriptions_speak_to_the_model_and_limits_are_the_enforced_ones(
    agent: AgentPolicyMcpServer,
) -> None:
    from agentpolicy._checks import MAX_TEXT

    for tool in TOOLS:
        text = json.dumps([tool.description, tool.input_schema]).lower()
        assert "seed" not in text, tool.name
        assert "semantics" not in text, tool.name
        for key, spec in tool.input_schema["properties"].items():
            assert spec.get("type") in ("string", "integer", "object", "boolean"), (tool.name, key)
    authorize = next(t for t in TOOLS if t.name == "agent_policy_authorize")
    memo_limit = authorize.input_schema["properties"]["memo"]["maxLength"]
    assert memo_limit == MAX_TEXT == 1024
    assert ok(call(agent, "agent_policy_authorize", {**PAY, "memo": "m" * memo_limit}))
    too_long = err(call(agent, "agent_policy_authorize", {**PAY, "memo": "m" * (memo_limit + 1)}))
    assert (too_long["code"], too_long["path"]) == ("INVALID_INPUT", "$.memo")
    for tool in TOOLS:
        a = tool.annotations
        assert a.title
        readers = ("budget", "get", "list", "check", "versions", "diff", "report", "simulate")
        assert a.read_only == (tool.name.split("_")[-1] in readers), tool.name


def test_the_storage_folder_of_agent_policy_db_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENT_POLICY_REDIS_URL", raising=False)
    monkeypatch.setenv("AGENT_POLICY_DB", str(tmp_path / "new" / "folder" / "p.db"))
    server = AgentPolicyMcpServer(role="admin")
    ok(call(server, "agent_policy_set", {"agentId": "a", "policy": {}}))
    server.close()
    assert (tmp_path / "new" / "folder" / "p.db").is_file()


# -- delegation from an agent-role server ----------------------------------------------------


def test_a_bound_agent_delegates_from_its_own_budget_only_when_its_policy_allows(
    storage: MemoryStorage, admin: AgentPolicyMcpServer
) -> None:
    bot = AgentPolicyMcpServer(storage=storage, clock=admin.engine.clock, agent_id="acme:bot")
    sub = {"childId": "acme:bot/browse", "expiresIn": "1h",
           "policy": {"limits": {"daily": {"value": str(5 * USDT)}}}}  # fmt: skip
    refused = err(call(bot, "agent_policy_delegate", sub))
    assert refused["code"] == "FORBIDDEN"
    assert "delegation" in refused["message"]
    ok(call(admin, "agent_policy_set", {"agentId": "acme:bot", "policy": {
        **POLICY, "delegation": {"allowed": True}}}))  # fmt: skip
    made = ok(call(bot, "agent_policy_delegate", sub))
    assert (made["parentId"], made["version"]) == ("acme:bot", 1)
    assert made["expiresAt"] == "2026-01-19T11:00:00Z"
    too_much = {**sub, "policy": {"limits": {"daily": {"value": str(5000 * USDT)}}}}
    assert err(call(bot, "agent_policy_delegate", too_much))["path"] == "$.policy.limits.daily"
    other = err(call(bot, "agent_policy_delegate", {**sub, "parentId": "acme:other"}))
    assert other["code"] == "FORBIDDEN"  # a bound server serves no other budget
    both = err(call(bot, "agent_policy_delegate", {**sub, "expiresAt": "2026-01-19T12:00:00Z"}))
    assert both["path"] == "$.expiresIn"
    child = AgentPolicyMcpServer(
        storage=storage, clock=admin.engine.clock, agent_id="acme:bot/browse"
    )
    paid = ok(call(child, "agent_policy_authorize", {**PAY, "agentId": "acme:bot/browse"}))
    assert paid["allowed"] is True
    assert err(call(child, "agent_policy_revoke", {"childId": "acme:bot/browse"}))["code"] == (
        "FORBIDDEN"
    )  # a budget cannot revoke itself (nor its parent)
    revoked = ok(call(bot, "agent_policy_revoke", {"childId": "acme:bot/browse"}))
    assert revoked["revokedAt"] == "2026-01-19T10:00:00Z"
    denied = ok(call(child, "agent_policy_authorize", {**PAY, "agentId": "acme:bot/browse"}))
    assert (denied["code"], denied["budgetId"]) == ("DELEGATION_REVOKED", "acme:bot/browse")


def test_an_unbound_agent_server_must_say_which_budget_it_delegates_from(
    agent: AgentPolicyMcpServer,
) -> None:
    result = err(call(agent, "agent_policy_delegate", {"childId": "x", "policy": {}}))
    assert (result["code"], result["path"]) == ("INVALID_INPUT", "$.parentId")


# -- a bound server is no oracle of other agents ---------------------------------------------------

FOREIGN_CALLS: list[tuple[str, dict[str, Any]]] = [  # X: an agent id, R: a reservation, A: an approval
    ("agent_policy_authorize", {**PAY, "agentId": "X"}),
    ("agent_policy_check", {**PAY, "agentId": "X"}),
    ("agent_policy_budget", {"agentId": "X"}),
    ("agent_policy_get", {"agentId": "X"}),
    ("agent_policy_get", {"agentId": "X", "version": 2}),
    ("agent_policy_confirm", {"reservationId": "R"}),
    ("agent_policy_release", {"reservationId": "R"}),
    ("agent_policy_approvals_list", {"agentId": "X"}),
    ("agent_policy_approvals_get", {"approvalId": "A"}),
    ("agent_policy_approvals_decide",
     {"approvalId": "A", "decision": "approve", "approver": "admin@company.com"}),
    ("agent_policy_delegate", {"childId": "X", "policy": {}}),
    ("agent_policy_delegate", {"childId": "X/kid", "policy": {}}),
    ("agent_policy_delegate", {"parentId": "X", "childId": "X/new", "policy": {}}),
    ("agent_policy_revoke", {"childId": "X"}),
    ("agent_policy_revoke", {"childId": "X/kid"}),
    ("agent_policy_revoke", {"parentId": "X", "childId": "X/kid"}),
    ("agent_policy_set", {"agentId": "X", "policy": {}}),
    ("agent_policy_list", {"orgId": "X"}),
    ("agent_policy_versions", {"agentId": "X"}),
    ("agent_policy_diff", {"agentId": "X", "fromVersion": 1, "toVersion": 2}),
    ("agent_policy_rollback", {"agentId": "X", "version": 1}),
    ("agent_policy_shadow_set", {"agentId": "X", "policy": {}}),
    ("agent_policy_shadow_report", {"agentId": "X"}),
    ("agent_policy_shadow_promote", {"agentId": "X"}),
    ("agent_policy_shadow_clear", {"agentId": "X"}),
    ("agent_policy_simulate", {"agentId": "X", "policy": {}, "since": "30d"}),
]  # fmt: skip


def _fill(args: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
    filled = {}
    for key, value in args.items():
        head, slash, rest = value.partition("/") if isinstance(value, str) else ("", "", "")
        filled[key] = ids[head] + slash + rest if head in ids else value
    return filled


@pytest.mark.parametrize(("role", "binding"), [
    ("agent", {"agent_id": "acme:bot"}), ("admin", {"agent_id": "acme:bot"}),
    ("agent", {"org_id": "acme"}), ("admin", {"org_id": "acme"}),
])  # fmt: skip
def test_a_bound_server_answers_alike_for_another_agents_ids_that_exist_and_that_do_not(
    storage: MemoryStorage, admin: AgentPolicyMcpServer, role: str, binding: dict[str, str]
) -> None:
    delegating = {**POLICY, "delegation": {"allowed": True}}
    ok(call(admin, "agent_policy_set", {"agentId": "acme:bot", "policy": delegating}))
    for version in (delegating, POLICY):  # evil has two versions, a delegated kid, a shadow
        ok(call(admin, "agent_policy_set", {"agentId": "evil", "policy": version}))
    ok(call(admin, "agent_policy_set", {"agentId": "evil", "policy": delegating}))
    ok(call(admin, "agent_policy_delegate", {"parentId": "evil", "childId": "evil/kid",
                                             "policy": {}}))  # fmt: skip
    ok(call(admin, "agent_policy_shadow_set", {"agentId": "evil", "policy": POLICY}))
    held = ok(call(admin, "agent_policy_authorize", {**PAY, "agentId": "evil"}))["reservationId"]
    asked = ok(call(admin, "agent_policy_authorize",
                    {**PAY, "agentId": "evil", "amount": str(200 * USDT)}))["approvalId"]  # fmt: skip
    before = (admin.engine.get_policy("evil"), admin.engine.get_policy("evil/kid"))
    theirs = {"X": "evil", "R": held, "A": asked}
    missing = {"X": "ghost", "R": held[:-1] + ("y" if held[-1] != "y" else "z"),
               "A": asked[:-1] + ("y" if asked[-1] != "y" else "z")}  # fmt: skip
    bound = AgentPolicyMcpServer(storage=storage, role=role, clock=admin.engine.clock,
                                 agent_id=binding.get("agent_id"), org_id=binding.get("org_id"))  # fmt: skip
    offered = {t.name for t in bound.tools()}
    compared = 0
    for name, args in FOREIGN_CALLS:
        if name not in offered:
            continue
        answers = []
        for ids in (theirs, missing):
            answer = json.dumps(call(bound, name, _fill(args, ids)))
            for key in ("R", "A", "X"):  # the one id that differs, where the answer repeats it
                answer = answer.replace(ids[key], key)
            answers.append(answer)
        assert answers[0] == answers[1], (name, args)
        assert '"success": false' in answers[0] or '"policies": []' in answers[0], answers[0]
        compared += 1
    assert compared == len([c for c in FOREIGN_CALLS if c[0] in offered])
    assert (admin.engine.get_policy("evil"), admin.engine.get_policy("evil/kid")) == before
    assert admin.engine.get_policy("ghost") is None
    assert admin.engine.get_reservation(held).status.value == "reserved"
    assert admin.engine.get_approval(asked).status.value == "pending"


def test_a_bound_agent_revokes_only_below_itself_and_never_reads_another_agents_budget(
    storage: MemoryStorage, admin: AgentPolicyMcpServer
) -> None:
    for agent_id in ("bot", "secret-agent"):
        ok(call(admin, "agent_policy_set", {"agentId": agent_id,
                                            "policy": {"delegation": {"allowed": True}}}))  # fmt: skip
    ok(call(admin, "agent_policy_delegate", {"parentId": "secret-agent",
                                             "childId": "secret-agent/kid", "policy": {}}))  # fmt: skip
    bot = AgentPolicyMcpServer(storage=storage, clock=admin.engine.clock, agent_id="bot")
    answers = []
    for child in ("secret-agent", "nobody", "secret-agent/kid", "nobody/kid"):
        error = err(call(bot, "agent_policy_revoke", {"childId": child}))
        assert error["code"] == "FORBIDDEN", child
        answers.append(error["message"].replace(child, "<child>"))
    assert len(set(answers)) == 1
    assert answers[0] == "this server may revoke only the budgets below bot, named bot/<name>, " \
        "not <child>"  # fmt: skip
    kid = admin.engine.get_policy("secret-agent/kid")
    assert kid is not None
    assert ok(call(admin, "agent_policy_budget", {"agentId": "secret-agent/kid"}))
    ok(call(bot, "agent_policy_delegate", {"childId": "bot/kid", "policy": {}}))
    assert ok(call(bot, "agent_policy_revoke", {"childId": "bot/kid"}))["agentId"] == "bot/kid"


def test_an_admin_server_bound_to_one_agent_gives_budgets_only_below_it(
    storage: MemoryStorage, admin: AgentPolicyMcpServer
) -> None:
    ok(call(admin, "agent_policy_set", {"agentId": "bot", "policy": {
        "delegation": {"allowed": True}}}))  # fmt: skip
    bound = AgentPolicyMcpServer(storage=storage, role="admin", clock=admin.engine.clock,
                                 agent_id="bot")  # fmt: skip
    refused = err(call(bound, "agent_policy_delegate", {"childId": "outsider", "policy": {}}))
    assert refused["code"] == "FORBIDDEN"
    assert admin.engine.get_policy("outsider") is None  # no budget outside its binding
    made = ok(call(bound, "agent_policy_delegate", {"childId": "bot/sub", "policy": {}}))
    assert made["parentId"] == "bot"


# -- an admin server bound to one approver --------------------------------------------------------

TWO_APPROVERS = {
    "approvalConfig": {"thresholds": [{"amount": {"value": "1"}, "requiredApprovers": 2,
                                       "approvers": ["alice", "bob", "ops"]}]},
}  # fmt: skip


def test_a_server_bound_to_an_approver_votes_only_as_it_and_signs_with_its_key(
    storage: MemoryStorage, tmp_path: Path
) -> None:
    from agentpolicy.signing import SigningKey, verify_vote

    clock = ManualClock()
    setup = AgentPolicyMcpServer(storage=storage, role="admin", clock=clock)
    key = SigningKey.generate()
    ok(
        call(
            setup, "agent_policy_approvers_register", {"name": "alice", "publicKey": key.public_key}
        )
    )
    ok(call(setup, "agent_policy_set", {"agentId": "bot", "policy": TWO_APPROVERS}))
    key.save(tmp_path / "alice.key")
    bound = AgentPolicyMcpServer(storage=storage, role="admin", clock=clock, approver="alice",
                                 approver_key=tmp_path / "alice.key")  # fmt: skip
    names = {t.name for t in bound.tools()}
    assert "agent_policy_approvers_list" in names
    assert not names & {"agent_policy_approvers_register", "agent_policy_approvers_rotate",
                        "agent_policy_approvers_remove"}  # fmt: skip
    decide = next(t for t in bound.tools() if t.name == "agent_policy_approvals_decide")
    assert decide.input_schema["required"] == ["approvalId", "decision"]
    assert "signature" not in decide.input_schema["properties"]
    asked = ok(call(bound, "agent_policy_authorize", {**PAY, "agentId": "bot"}))
    aid = asked["approvalId"]
    assert ok(call(bound, "agent_policy_approvals_get", {"approvalId": aid}))["requestedBy"] == (
        "alice"
    )  # it asked, so it may not approve this one
    assert err(call(bound, "agent_policy_approvals_decide", {
        "approvalId": aid, "decision": "approve"}))["code"] == "APPROVER_NOT_AUTHORIZED"  # fmt: skip
    other = setup.engine.authorize(payment_for("bot")).approval_id
    for name in ("bob", "BOB", "ops"):
        refused = call(bound, "agent_policy_approvals_decide",
                       {"approvalId": other, "decision": "approve", "approver": name})  # fmt: skip
        assert err(refused)["code"] == "FORBIDDEN"
    assert setup.engine.get_approval(other or "").votes == ()
    assert (
        err(
            call(
                bound,
                "agent_policy_approvers_rotate",
                {"name": "alice", "publicKey": SigningKey.generate().public_key},
            )
        )["code"]
        == "FORBIDDEN"
    )
    voted = ok(
        call(
            bound,
            "agent_policy_approvals_decide",
            {"approvalId": other, "decision": "approve", "approver": "Alice", "comment": "fine"},
        )
    )
    vote = voted["decisions"][0]
    assert vote == {"approver": "alice", "decision": "approve", "comment": "fine",
                    "timestamp": "2026-01-19T10:00:00Z", "via": "signature", "keyVersion": 1,
                    "signature": vote["signature"], "signedAt": "2026-01-19T10:00:00Z"}  # fmt: skip
    message = setup.engine.vote_message(other or "", "alice", "approve", clock(), "fine")
    assert verify_vote(key.public_key, message, vote["signature"])  # signed by the server's key
    assert (
        err(
            call(
                bound,
                "agent_policy_approvals_decide",
                {
                    "approvalId": other,
                    "decision": "approve",
                    "signature": "x" * 86,
                    "signedAt": "2026-01-19T10:00:00Z",
                },
            )
        )["code"]
        == "INVALID_INPUT"
    )  # not offered here


def payment_for(agent: str) -> Any:
    from agentpolicy.testing import payment

    return payment(5 * USDT, agent_id=agent)


def test_binding_an_approver_needs_the_admin_role_and_a_readable_private_key(
    storage: MemoryStorage, tmp_path: Path
) -> None:
    with pytest.raises(PolicyError) as agent_role:
        AgentPolicyMcpServer(storage=storage, approver="alice")
    assert agent_role.value.path == "$.approver"
    with pytest.raises(PolicyError) as keyless:
        AgentPolicyMcpServer(storage=storage, role="admin", approver_key=tmp_path / "k")
    assert keyless.value.path == "$.approverKey"
    with pytest.raises(PolicyError) as missing:
        AgentPolicyMcpServer(storage=storage, role="admin", approver="alice",
                             approver_key=tmp_path / "missing.key")  # fmt: skip
    assert missing.value.path == "$.approverKey"
    unsigned = AgentPolicyMcpServer(storage=storage, role="admin", approver="bob")
    unsigned.engine.set_policy("bot", TWO_APPROVERS)
    aid = unsigned.engine.authorize(payment_for("bot")).approval_id
    voted = ok(call(unsigned, "agent_policy_approvals_decide",
                    {"approvalId": aid, "decision": "deny"}))  # fmt: skip
    assert voted["status"] == "denied"
    assert voted["decisions"][0]["approver"] == "bob"


def test_the_stdio_app_binds_the_approver_of_the_settings(tmp_path: Path) -> None:
    from agentpolicy.config import read_settings
    from agentpolicy.mcp.stdio import make_app
    from agentpolicy.signing import SigningKey

    SigningKey.generate().save(tmp_path / "a.key")
    env = {"AGENT_POLICY_DB": str(tmp_path / "s.db"), "AGENT_POLICY_ROLE": "admin",
           "AGENT_POLICY_APPROVER": "alice",
           "AGENT_POLICY_APPROVER_KEY_FILE": str(tmp_path / "a.key")}  # fmt: skip
    app = make_app(read_settings(env))
    assert (app.bound_approver, app.approver_key is not None) == ("alice", True)
    app.close()
    (tmp_path / "a.key").chmod(0o644)
    with pytest.raises(PolicyError) as open_key:
        make_app(read_settings(env))
    assert open_key.value.path == "$AGENT_POLICY_APPROVER_KEY_FILE"


def test_an_org_bound_agent_server_gives_budgets_only_to_agents_of_its_org(
    storage: MemoryStorage, admin: AgentPolicyMcpServer
) -> None:
    ok(call(admin, "agent_policy_set", {"agentId": "acme:bot", "policy": {
        **POLICY, "delegation": {"allowed": True}}}))  # fmt: skip
    org = AgentPolicyMcpServer(storage=storage, clock=admin.engine.clock, org_id="acme")
    sub = {"parentId": "acme:bot", "policy": {"limits": {"daily": {"value": str(USDT)}}}}
    refused = err(call(org, "agent_policy_delegate", {**sub, "childId": "other:x"}))
    assert refused["code"] == "FORBIDDEN"
    assert err(call(admin, "agent_policy_get", {"agentId": "other:x"}))["code"] == "NO_POLICY"
    squat = err(call(org, "agent_policy_delegate", {**sub, "childId": "acme:x"}))
    assert squat["code"] == "FORBIDDEN"  # an agent delegates only below its own id
    assert ok(call(org, "agent_policy_delegate", {**sub, "childId": "acme:bot/x"}))[
        "parentId"] == "acme:bot"  # fmt: skip


def test_the_agent_may_check_a_payment_of_its_own_and_nothing_is_reserved(
    storage: MemoryStorage, admin: AgentPolicyMcpServer
) -> None:
    bound = AgentPolicyMcpServer(storage=storage, clock=admin.engine.clock, agent_id="acme:bot")
    check = next(t for t in bound.tools() if t.name == "agent_policy_check")
    assert "agentId" not in check.input_schema["required"]
    d = ok(call(bound, "agent-policy/check", {k: v for k, v in PAY.items() if k != "agentId"}))
    assert (d["allowed"], d["dryRun"], d["code"]) == (True, True, "ALLOWED")
    assert "reservationId" not in d
    assert d["headroom"] == [{
        "budgetId": "acme:bot", "kind": "amount", "window": "daily", "limit": str(1000 * USDT),
        "used": "0", "remaining": str(995 * USDT), "decimals": 6, "symbol": "USDT", "fits": True,
        "windowStart": "2026-01-19T00:00:00Z", "windowEnd": "2026-01-20T00:00:00Z"}]  # fmt: skip
    held = ok(call(bound, "agent_policy_check", {**PAY, "amount": str(500 * USDT)}))
    assert (held["code"], held["requiresApproval"], "approvalId" in held) == (
        "APPROVAL_REQUIRED", True, False)  # fmt: skip
    assert ok(call(admin, "agent_policy_approvals_list", {}))["approvals"] == []
    assert ok(call(bound, "agent_policy_budget", {}))["periods"]["daily"]["reserved"] == "0"
    assert err(call(bound, "agent_policy_check", {**PAY, "agentId": "acme:other"}))[
        "code"] == "FORBIDDEN"  # fmt: skip


@pytest.mark.parametrize("name", [
    "agent_policy_versions", "agent_policy_diff", "agent_policy_rollback",
    "agent_policy_shadow_set", "agent_policy_shadow_report", "agent_policy_shadow_promote",
    "agent_policy_shadow_clear", "agent_policy_simulate", "agent-policy/shadow/promote",
])  # fmt: skip
def test_the_agent_role_cannot_see_or_change_versions_shadows_or_simulations(
    agent: AgentPolicyMcpServer, name: str
) -> None:
    assert name not in [t.name for t in agent.tools()]
    assert err(call(agent, name, {"agentId": "acme:bot"}))["code"] == "FORBIDDEN"


def test_promoting_a_shadow_beside_an_older_version_needs_force(
    admin: AgentPolicyMcpServer,
) -> None:
    tighter = {**POLICY, "limits": {"daily": {"value": str(10 * USDT)}}}
    ok(call(admin, "agent_policy_shadow_set", {"agentId": "acme:bot", "policy": tighter}))
    ok(call(admin, "agent_policy_set", {"agentId": "acme:bot",
                                        "policy": {**POLICY, "enabled": False}}))  # fmt: skip
    refused = err(call(admin, "agent_policy_shadow_promote", {"agentId": "acme:bot"}))
    assert refused["code"] == "SHADOW_OUTDATED"
    assert ok(call(admin, "agent_policy_get", {"agentId": "acme:bot"}))["version"] == 2
    bad = err(call(admin, "agent_policy_shadow_promote", {"agentId": "acme:bot", "force": 1}))
    assert (bad["code"], bad["path"]) == ("INVALID_INPUT", "$.force")
    forced = {"agentId": "acme:bot", "force": True}
    assert ok(call(admin, "agent_policy_shadow_promote", forced))["version"] == 3
    assert ok(call(admin, "agent_policy_get", {"agentId": "acme:bot"}))["policy"]["enabled"]


def test_rollout_tools_through_the_server(admin: AgentPolicyMcpServer) -> None:
    tighter = {**POLICY, "limits": {"daily": {"value": str(10 * USDT)}}}
    shadow = ok(call(admin, "agent_policy_shadow_set", {"agentId": "acme:bot", "policy": tighter}))
    assert shadow["liveVersion"] == 1
    for _ in range(3):
        ok(call(admin, "agent_policy_authorize", PAY))
    report = ok(call(admin, "agent_policy_shadow_report", {"agentId": "acme:bot", "limit": 1}))
    assert (report["payments"], report["flips"], len(report["differences"])) == (
        3, {"allowed->denied": 1}, 1)  # fmt: skip
    assert report["differences"][0]["flip"] == "allowed->denied"
    sim = ok(call(admin, "agent_policy_simulate", {"agentId": "acme:bot", "policy": tighter,
                                                   "since": "2026-01-19T00:00:00Z"}))  # fmt: skip
    assert (sim["changedTotal"], sim["windows"][0]["candidate"]) == (1, str(10 * USDT))
    bad = err(call(admin, "agent_policy_simulate", {"agentId": "acme:bot", "policy": tighter,
                                                    "since": "last week"}))  # fmt: skip
    assert (bad["code"], bad["path"]) == ("INVALID_INPUT", "$.since")
    assert ok(call(admin, "agent_policy_shadow_promote", {"agentId": "acme:bot"}))["version"] == 2
    old = ok(call(admin, "agent_policy_get", {"agentId": "acme:bot", "version": 1}))
    assert old["policy"]["limits"]["daily"]["value"] == str(1000 * USDT)
    back = ok(call(admin, "agent_policy_rollback", {"agentId": "acme:bot", "version": 1}))
    assert back == {"agentId": "acme:bot", "version": 3, "fromVersion": 1}
    listed = ok(call(admin, "agent_policy_versions", {"agentId": "acme:bot"}))
    assert [(v["version"], v["origin"], v["current"]) for v in listed["versions"]] == [
        (3, "rollback", True), (2, "promote", False), (1, "set", False)]  # fmt: skip
    assert listed["currentVersion"] == 3
    diff = ok(call(admin, "agent_policy_diff", {"agentId": "acme:bot", "fromVersion": 2,
                                                "toVersion": 3}))  # fmt: skip
    assert [c["text"] for c in diff["changes"]] == ["limits.daily.value: 10000000 -> 1000000000"]
    assert err(call(admin, "agent_policy_diff", {"agentId": "acme:bot", "fromVersion": 0,
                                                 "toVersion": 1}))["path"] == "$.fromVersion"  # fmt: skip


def test_an_org_bound_admin_stays_in_its_org_for_parents_and_never_touches_the_registry(
    storage: MemoryStorage, admin: AgentPolicyMcpServer
) -> None:
    ok(call(admin, "agent_policy_set", {"agentId": "globex:fleet", "policy": POLICY}))
    acme = AgentPolicyMcpServer(storage=storage, clock=admin.engine.clock, role="admin",
                                org_id="acme")  # fmt: skip
    under = {"agentId": "acme:new", "policy": {**POLICY, "parent": "globex:fleet"}}
    assert err(call(acme, "agent_policy_set", under))["code"] == "FORBIDDEN"
    assert err(call(admin, "agent_policy_get", {"agentId": "acme:new"}))["code"] == "NO_POLICY"
    assert err(call(acme, "agent_policy_shadow_set", under))["code"] == "FORBIDDEN"
    ok(call(acme, "agent_policy_set", {"agentId": "acme:fleet", "policy": POLICY}))
    ok(call(acme, "agent_policy_set", {"agentId": "acme:new", "policy": {
        **POLICY, "parent": "acme:fleet"}}))  # fmt: skip
    ok(call(admin, "agent_policy_set", {**under, "agentId": "acme:b2"}))  # an unbound admin may
    ok(call(admin, "agent_policy_set", {"agentId": "acme:b2", "policy": POLICY}))
    assert err(call(acme, "agent_policy_rollback", {"agentId": "acme:b2", "version": 1}))[
        "code"] == "FORBIDDEN"  # version 1 hangs below another org  # fmt: skip
    names = {t.name for t in acme.tools()}
    assert not names & {"agent_policy_approvers_list", "agent_policy_approvers_register",
                        "agent_policy_approvers_rotate", "agent_policy_approvers_remove"}  # fmt: skip
    for tool in ("agent_policy_approvers_list", "agent_policy_approvers_remove"):
        assert err(call(acme, tool, {"name": "cfo"}))["code"] == "FORBIDDEN"


@pytest.mark.parametrize(("tool", "args", "path"), [
    ("agent_policy_delegate", {"parentId": "acme:bot", "childId": "acme:bot/c", "policy": {},
                               "expiresIn": "99999999d"}, "$.expiresIn"),
    ("agent_policy_delegate", {"parentId": "acme:bot", "childId": "acme:bot/c", "policy": {},
                               "expiresAt": "9999-12-31T23:59:59-23:59"}, "$.expiresAt"),
    ("agent_policy_simulate", {"agentId": "acme:bot", "policy": {}, "since": "99999999d"},
     "$.since"),
])  # fmt: skip
def test_dates_and_durations_past_the_calendar_are_invalid_input_and_change_nothing(
    admin: AgentPolicyMcpServer, tool: str, args: dict[str, Any], path: str
) -> None:
    ok(call(admin, "agent_policy_set", {"agentId": "acme:bot", "policy": POLICY}))
    refused = err(call(admin, tool, args))
    assert (refused["code"], refused["path"]) == ("INVALID_INPUT", path)
    assert err(call(admin, "agent_policy_get", {"agentId": "acme:bot/c"}))["code"] == "NO_POLICY"


def test_the_longest_agent_ids_get_reservations_and_approvals_that_can_be_settled() -> None:
    """An id of 256 four-byte characters is tagged as 2,049 characters: its ids still work."""
    from agentpolicy._checks import MAX_ID, MAX_RECORD_ID

    clock = ManualClock()
    admin = AgentPolicyMcpServer(storage=MemoryStorage(), role="admin", clock=clock)
    for agent_id in ("\U0001f4b0" * MAX_ID, "支払い" * (MAX_ID // 3), "a" * MAX_ID):
        ok(call(admin, "agent_policy_set", {"agentId": agent_id, "policy": POLICY}))
        agent = AgentPolicyMcpServer(engine=admin.engine, agent_id=agent_id)
        d = ok(call(agent, "agent_policy_authorize", {**PAY, "agentId": agent_id}))
        assert len(d["reservationId"]) <= MAX_RECORD_ID
        confirmed = ok(call(agent, "agent_policy_confirm", {"reservationId": d["reservationId"]}))
        assert confirmed["status"] == "confirmed"
        big = {**PAY, "agentId": agent_id, "amount": str(500 * USDT)}
        aid = ok(call(agent, "agent_policy_authorize", big))["approvalId"]
        assert ok(call(agent, "agent_policy_approvals_get", {"approvalId": aid}))["id"] == aid
        decided = ok(call(admin, "agent_policy_approvals_decide", {
            "approvalId": aid, "decision": "approve", "approver": "admin@company.com"}))  # fmt: skip
        paid = ok(call(agent, "agent_policy_confirm", {"reservationId": decided["reservationId"]}))
        assert paid["status"] == "confirmed"
        budget = ok(call(agent, "agent_policy_budget", {"agentId": agent_id}))
        assert budget["periods"]["daily"]["spent"] == str(505 * USDT)
    longest = "res_" + "0" * 32 + "_~" + ("\U0001f4b0" * MAX_ID).encode().hex()
    assert len(longest) == MAX_RECORD_ID


def test_a_budget_with_groups_left_out_matches_its_output_schema(
    admin: AgentPolicyMcpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentpolicy.ledger import operations

    monkeypatch.setattr(operations, "MAX_GROUPS_LISTED", 1)
    scope = {"name": "vendors", "groupBy": "recipient", "limits": {"daily": {"value": "10"}}}
    ok(
        call(
            admin, "agent_policy_set", {"agentId": "acme:bot", "policy": {"scopedLimits": [scope]}}
        )
    )
    for recipient in ("0xv1", "0xv2"):
        ok(call(admin, "agent_policy_authorize", {**PAY, "amount": "1", "recipient": recipient}))
    data = ok(call(admin, "agent_policy_budget", {"agentId": "acme:bot"}))  # schema checked
    assert data["moreGroups"] == ["vendors"]
    assert [x["group"] for x in data["limits"] if "scope" in x] == ["0xv1"]
