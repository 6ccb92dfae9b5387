"""Found by probing the MCP tools from the governed agent's side: each test is one defect."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from agentpolicy.cli import main
from agentpolicy.mcp import AgentPolicyMcpServer
from agentpolicy.storage import MemoryStorage
from agentpolicy.testing import ManualClock

USDT = 1_000_000
NEEDS_APPROVAL = {
    "approvalConfig": {
        "thresholds": [{"amount": {"value": "1"}, "requiredApprovers": 1,
                        "approvers": ["admin@company.com"]}]
    }
}  # fmt: skip


def _cursor(key: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode()


@pytest.fixture
def admin() -> AgentPolicyMcpServer:
    server = AgentPolicyMcpServer(storage=MemoryStorage(), role="admin", clock=ManualClock())
    for agent in ("acme:a", "acme:b", "acme:c"):
        assert server.call("agent_policy_set", {"agentId": agent, "policy": NEEDS_APPROVAL})[
            "success"
        ]
        pay = {"agentId": agent, "amount": str(5 * USDT), "recipient": "0xv",
               "network": "eip155:8453"}  # fmt: skip
        assert server.call("agent_policy_authorize", pay)["data"]["requiresApproval"]
    return server


# A cursor names the last entry of its page: [createdAt, approval id] for approvals_list,
# [agent id] for list. Any JSON list of strings passed before: [] answered the first page
# again, ["zz"] an empty last page, as if they were cursors of the listing.
APPROVAL_KEYS: list[Any] = [
    [], ["zz"], ["", ""], ["a", "b", "c"], ["2026-01-19T10:00:00+00:00"],
    ["not an instant", "apr_x"], ["2026-01-19T10:00:00", "apr_x"],  # no offset
    ["2026-01-19 10:00:00+00:00", "apr_x"], ["2026-01-19T10:00:00Z", "apr_x"],  # not as written
    ["2026-01-19T10:00:00+00:00", ""], ["2026-01-19T10:00:00+00:00", "apr_\x00"],
]  # fmt: skip
POLICY_KEYS: list[Any] = [[], ["acme:a", "acme:b"], [""], [" acme:a"], ["acme:\x00"], ["x" * 300]]


@pytest.mark.parametrize(
    ("tool", "key"),
    [("agent_policy_approvals_list", k) for k in APPROVAL_KEYS]
    + [("agent_policy_list", k) for k in POLICY_KEYS],
)
def test_a_listing_cursor_shaped_unlike_the_listings_keys_is_invalid_input(
    admin: AgentPolicyMcpServer, tool: str, key: Any
) -> None:
    found = admin.call(tool, {"cursor": _cursor(key)})
    assert found["success"] is False, found
    assert (found["error"]["code"], found["error"]["path"]) == ("INVALID_INPUT", "$.cursor")


def test_the_cursors_the_listings_hand_out_still_page_and_name_no_entry_that_must_exist(
    admin: AgentPolicyMcpServer,
) -> None:
    first = admin.call("agent_policy_approvals_list", {"limit": 2})["data"]
    rest = admin.call("agent_policy_approvals_list", {"cursor": first["nextCursor"]})["data"]
    assert [a["agentId"] for a in first["approvals"] + rest["approvals"]] == [
        "acme:a", "acme:b", "acme:c"]  # fmt: skip
    last = first["approvals"][-1]
    gone = admin.call("agent_policy_approvals_list", {"cursor": _cursor(
        [last["createdAt"].replace("Z", "+00:00"), last["id"][:-1] + "0"])})  # fmt: skip
    assert gone["success"] is True  # a well-shaped key of an entry since decided still pages
    page = admin.call("agent_policy_list", {"limit": 1})["data"]
    assert page["nextCursor"] == _cursor(["acme:a"])
    after = admin.call("agent_policy_list", {"cursor": _cursor(["acme:aa"])})["data"]
    assert [p["agentId"] for p in after["policies"]] == ["acme:b", "acme:c"]


# -- the command line -----------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_voting_as_another_approver_does_not_sign_with_the_configured_approvers_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # AGENT_POLICY_APPROVER_KEY_FILE is the key of AGENT_POLICY_APPROVER only (docs/cli.md):
    # `--as alice` signed alice's vote with cfo's key, refused as alice has no registered key
    for name in [k for k in os.environ if k.startswith("AGENT_POLICY_")]:
        monkeypatch.delenv(name)
    db = ["--db", str(tmp_path / "cli.db")]
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"approvalConfig": {"thresholds": [{
        "amount": {"value": "1"}, "requiredApprovers": 1, "approvers": ["cfo", "alice"]}]}}))  # fmt: skip
    assert _cli(capsys, *db, "policy", "set", "bot", str(policy))[0] == 0
    key = tmp_path / "cfo.key"
    _, out, _ = _cli(capsys, *db, "--json", "approver", "keygen", str(key))
    assert _cli(capsys, *db, "approver", "register", "cfo", json.loads(out)["publicKey"])[0] == 0
    monkeypatch.setenv("AGENT_POLICY_APPROVER", "cfo")
    monkeypatch.setenv("AGENT_POLICY_APPROVER_KEY_FILE", str(key))
    _, out, _ = _cli(capsys, *db, "--json", "authorize", "bot", "5", "0xv", "eip155:8453")
    approval = json.loads(out)["approvalId"]
    status, out, err = _cli(
        capsys, *db, "--json", "approvals", "approve", approval, "--as", "alice"
    )
    assert (status, err) == (0, "")
    vote = json.loads(out)["decisions"][0]
    assert (vote["approver"], "signature" in vote) == ("alice", False)
    _, out, _ = _cli(capsys, *db, "--json", "authorize", "bot", "6", "0xv", "eip155:8453")
    approval = json.loads(out)["approvalId"]  # the configured approver, however spelt, still signs
    status, out, err = _cli(capsys, *db, "--json", "approvals", "approve", approval, "--as", "CFO")
    assert (status, err) == (0, "")
    assert json.loads(out)["decisions"][0]["via"] == "signature"


@pytest.mark.parametrize(("flag", "path"), [("--agent-id", "$.agentId"), ("--org-id", "$.orgId")])
def test_serve_mcp_refuses_an_empty_binding_flag_instead_of_serving_every_agent(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flag: str,
    path: str,
) -> None:
    # `--agent-id "$AGENT"` with AGENT unset read as no flag: an agent-role server bound to
    # nobody, which acts for every agent id of the store (AgentPolicyMcpServer refuses "")
    from agentpolicy.mcp import stdio

    for name in [k for k in os.environ if k.startswith("AGENT_POLICY_")]:
        monkeypatch.delenv(name)
    served: list[AgentPolicyMcpServer] = []

    async def serve(app: AgentPolicyMcpServer) -> None:
        served.append(app)

    monkeypatch.setattr(stdio, "serve", serve)
    db = tmp_path / "mcp.db"
    status, out, err = _cli(capsys, "--db", str(db), "serve-mcp", flag, "")
    assert [(s.bound_agent, s.bound_org) for s in served] == []
    assert (status, out) == (2, "")
    assert err == f"agentpolicy: INVALID_INPUT: {path}: must not be empty\n"
    assert not db.exists()  # refused before the store was opened
    status, _, err = _cli(capsys, "--db", str(db), "serve-mcp", flag, "acme")
    assert (status, err) == (0, "")
    assert [(s.bound_agent, s.bound_org) for s in served] == [
        ("acme", None) if flag == "--agent-id" else (None, "acme")]  # fmt: skip


# -- a bound server and the budgets above its agent -----------------------------------------------


def test_the_budgets_above_a_bound_agent_do_not_list_the_groups_its_siblings_paid() -> None:
    # ancestors listed every group of a scoped limit with groupBy: bot/me read that its
    # sibling had reserved 7 USDT to 0xsecret-vendor ("nothing of a sibling itself is told")
    storage, clock = MemoryStorage(), ManualClock()
    admin = AgentPolicyMcpServer(storage=storage, role="admin", clock=clock)
    per_vendor = {"name": "vendors", "groupBy": "recipient", "limits": {"daily": {
        "value": str(50 * USDT)}}}  # fmt: skip
    assert admin.call("agent_policy_set", {"agentId": "bot", "policy": {
        "limits": {"daily": {"value": str(1000 * USDT)}}, "scopedLimits": [per_vendor],
        "delegation": {"allowed": True}}})["success"]  # fmt: skip
    for child in ("bot/sibling", "bot/me"):
        assert admin.call("agent_policy_delegate", {"parentId": "bot", "childId": child,
                                                    "policy": {}})["success"]  # fmt: skip
    sibling = AgentPolicyMcpServer(storage=storage, clock=clock, agent_id="bot/sibling")
    me = AgentPolicyMcpServer(storage=storage, clock=clock, agent_id="bot/me")
    pay = {"amount": str(7 * USDT), "recipient": "0xsecret-vendor", "network": "eip155:8453"}
    assert sibling.call("agent_policy_authorize", pay)["data"]["allowed"]
    budget = me.call("agent_policy_budget", {})["data"]
    assert "secret" not in json.dumps(budget)
    (above,) = budget["ancestors"]
    assert [(x["window"], x["reserved"]) for x in above["limits"]] == [("daily", str(7 * USDT))]
    assert above["periods"]["daily"]["reserved"] == str(7 * USDT)  # what is left, as before
    mine = me.call("agent_policy_check", {**pay, "recipient": "0xmine"})["data"]["headroom"]
    assert [x.get("group") for x in mine] == [None, "0xmine"]  # its own payment's group
    whole = admin.call("agent_policy_budget", {"agentId": "bot/me"})["data"]["ancestors"][0]
    assert [x.get("group") for x in whole["limits"]] == [None, "0xsecret-vendor"]  # admin: all


def test_a_child_id_with_an_empty_name_below_its_parent_is_refused() -> None:
    # "bot/" read as a budget below bot (its name empty): delegated, a budget nobody named
    storage, clock = MemoryStorage(), ManualClock()
    admin = AgentPolicyMcpServer(storage=storage, role="admin", clock=clock)
    assert admin.call("agent_policy_set", {"agentId": "bot", "policy": {
        "limits": {"daily": {"value": str(1000 * USDT)}},
        "delegation": {"allowed": True}}})["success"]  # fmt: skip
    bot = AgentPolicyMcpServer(storage=storage, clock=clock, agent_id="bot")
    empty = bot.call("agent_policy_delegate", {"childId": "bot/", "policy": {}})
    assert empty["error"]["code"] == "FORBIDDEN"
    assert admin.call("agent_policy_get", {"agentId": "bot/"})["error"]["code"] == "NO_POLICY"
    assert bot.call("agent_policy_delegate", {"childId": "bot/x", "policy": {}})["success"]
