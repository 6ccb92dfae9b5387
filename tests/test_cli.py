"""The agentpolicy command, through real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentpolicy.examples import approval_example_policy

ROOT = Path(__file__).resolve().parent.parent
EXE = str(Path(sys.executable).with_name("agentpolicy"))


def run(tmp_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AGENT_POLICY_DB": str(tmp_path / "cli.db"), "AGENT_POLICY_REDIS_URL": ""}
    return subprocess.run(
        [EXE, *args], check=False, input=stdin, capture_output=True, text=True, timeout=60, env=env
    )


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(approval_example_policy()))
    return path


def test_policy_set_get_list(tmp_path: Path, policy_file: Path) -> None:
    done = run(tmp_path, "policy", "set", "acme:bot", str(policy_file))
    assert (done.returncode, done.stdout) == (0, "policy of acme:bot is now version 1\n")
    got = run(tmp_path, "--json", "policy", "get", "acme:bot")
    assert json.loads(got.stdout)["policy"]["limits"]["daily"]["value"] == "10000000000"
    assert "version 1" in run(tmp_path, "policy", "get", "acme:bot").stdout
    assert run(tmp_path, "policy", "set", "other", "-", stdin="{}").returncode == 0
    listed = json.loads(run(tmp_path, "--json", "policy", "list", "--org", "acme").stdout)
    assert listed == {"policies": [{"agentId": "acme:bot", "enabled": True, "version": 1}]}
    assert "other  v1  enabled" in run(tmp_path, "policy", "list").stdout


def test_authorize_confirm_release_budget_history(tmp_path: Path, policy_file: Path) -> None:
    run(tmp_path, "policy", "set", "agent-123", str(policy_file))
    allowed = run(tmp_path, "--json", "authorize", "agent-123", "20000000", "0xv", "eip155:8453")
    assert allowed.returncode == 0
    rid = json.loads(allowed.stdout)["reservationId"]
    assert run(tmp_path, "confirm", rid).stdout == f"{rid}: confirmed\n"
    second = run(tmp_path, "authorize", "agent-123", "30000000", "0xv", "eip155:8453")
    assert second.stdout.startswith("ALLOWED")
    rid2 = second.stdout.split()[2]
    assert run(tmp_path, "release", rid2).stdout == f"{rid2}: released\n"
    budget = run(tmp_path, "budget", "agent-123")
    assert "spent 20 + reserved 0 of 10000 USDT; 9980 left" in budget.stdout
    assert "[#" in budget.stdout or "[." in budget.stdout
    daily = json.loads(run(tmp_path, "--json", "budget", "agent-123", "--period", "daily").stdout)
    assert daily["periods"]["daily"]["spent"] == "20000000"
    denied = run(tmp_path, "authorize", "agent-123", "1", "0xv", "base")
    assert denied.returncode == 2
    assert denied.stderr.startswith("agentpolicy: INVALID_INPUT: $.network")
    history = run(tmp_path, "history", "agent-123").stdout.splitlines()
    assert [line.split()[1] for line in history] == [
        "release", "decision", "confirm", "decision", "policy_set",
    ]  # fmt: skip
    assert run(tmp_path, "sweep").stdout == "expired 0 reservations, 0 approvals\n"


def test_a_denied_payment_exits_3(tmp_path: Path) -> None:
    run(tmp_path, "policy", "set", "bot", "-", stdin='{"enabled": false}')
    done = run(tmp_path, "authorize", "bot", "1", "0xv", "eip155:1")
    assert (done.returncode, done.stdout.split()[:2]) == (3, ["DENIED", "POLICY_DISABLED:"])


@pytest.mark.parametrize(
    ("args", "status", "start"),
    [
        (("confirm", "res_nope"), 1, "agentpolicy: RESERVATION_NOT_FOUND"),
        (("approvals", "show", "apr_nope"), 1, "agentpolicy: APPROVAL_NOT_FOUND"),
        (("budget", "ghost"), 1, "agentpolicy: NO_POLICY"),
        (("policy", "get", "ghost"), 1, "agentpolicy: NO_POLICY"),
        (("policy", "set", "bot", "/does/not/exist.json"), 2, "agentpolicy: INVALID_INPUT: $.file"),
        (("authorize", "bot", "1.5", "0xv", "eip155:1"), 2, "agentpolicy: INVALID_INPUT: $.amount"),
        (("approvals", "approve", "apr_x"), 2, "agentpolicy: the following arguments"),
        (("frobnicate",), 2, "agentpolicy: argument command"),
        (("history", "bot", "--limit", "0"), 2, "agentpolicy: INVALID_INPUT: $.limit"),
    ],
)
def test_errors_are_one_line_on_stderr_without_a_traceback(
    tmp_path: Path, args: tuple[str, ...], status: int, start: str
) -> None:
    done = run(tmp_path, *args)
    assert done.returncode == status
    assert done.stderr.startswith(start), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_invalid_policy_json_reports_every_path(tmp_path: Path) -> None:
    done = run(
        tmp_path, "policy", "set", "bot", "-", stdin='{"limits": {"daily": {"value": "x"}}, "z": 1}'
    )
    assert done.returncode == 2
    assert "$.policy.limits.daily.value" in done.stderr
    assert "$.policy.z" in done.stderr
    assert run(tmp_path, "policy", "set", "bot", "-", stdin="{not json").stderr.startswith(
        "agentpolicy: INVALID_INPUT: $.file"
    )


def test_approval_walk_from_one_terminal_while_another_process_holds_the_payment(
    tmp_path: Path, policy_file: Path
) -> None:
    run(tmp_path, "policy", "set", "agent-123", str(policy_file))
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.workers", "hold", str(tmp_path / "cli.db")],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert holder.stdout is not None
    assert holder.stdin is not None
    approval_id = holder.stdout.readline().strip()
    assert approval_id.startswith("apr_")

    listed = run(tmp_path, "approvals", "list").stdout
    assert approval_id in listed
    assert "pending  500 USDT to 0xvendor" in listed
    assert "needs 1 of admin@company.com" in run(tmp_path, "approvals", "show", approval_id).stdout
    held = json.loads(run(tmp_path, "--json", "budget", "agent-123").stdout)
    assert held["periods"]["daily"]["reserved"] == "500000000"

    refused = run(tmp_path, "approvals", "approve", approval_id, "--as", "mallory@evil.com")
    assert refused.returncode == 1
    assert refused.stderr.startswith("agentpolicy: APPROVER_NOT_AUTHORIZED")
    approved = run(tmp_path, "approvals", "approve", approval_id, "--as", "admin@company.com",
                   "--comment", "ok")  # fmt: skip
    assert approved.returncode == 0
    assert "approved" in approved.stdout
    assert "admin@company.com: approve (ok)" in approved.stdout

    holder.stdin.write("go\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "confirmed"
    holder.wait(timeout=30)
    holder.stdin.close()
    holder.stdout.close()
    spent = json.loads(run(tmp_path, "--json", "budget", "agent-123").stdout)
    assert (spent["periods"]["daily"]["spent"], spent["periods"]["daily"]["reserved"]) == (
        "500000000", "0",
    )  # fmt: skip
    assert run(tmp_path, "approvals", "list").stdout == "no pending approvals\n"


def test_deny_with_a_comment(tmp_path: Path, policy_file: Path) -> None:
    run(tmp_path, "policy", "set", "agent-123", str(policy_file))
    d = json.loads(
        run(tmp_path, "--json", "authorize", "agent-123", "500000000", "0xv", "eip155:1").stdout
    )
    done = run(tmp_path, "--json", "approvals", "deny", d["approvalId"], "--as", "ADMIN@company.com",
               "--comment", "no")  # fmt: skip
    assert json.loads(done.stdout)["status"] == "denied"


def test_demo_walks_through_the_approval_example(tmp_path: Path) -> None:
    done = run(tmp_path, "demo")
    assert done.returncode == 0, done.stderr
    for step in (
        "APPROVAL_REQUIRED",
        "approved",
        ": confirmed",
        "spent 500 + reserved 0",
        "ALLOWED",
    ):
        assert step in done.stdout
    assert not (tmp_path / "cli.db").exists()  # the demo uses its own temporary database


def test_version_and_help(tmp_path: Path) -> None:
    assert run(tmp_path, "--version").stdout.startswith("agentpolicy ")
    assert "approvals" in run(tmp_path, "--help").stdout


def test_webhook_deliveries_are_visible(tmp_path: Path) -> None:
    from agentpolicy import PolicyEngine
    from agentpolicy.storage import SQLiteStorage
    from agentpolicy.testing import ManualClock, payment
    from tests.receiver import Receiver

    receiver = Receiver(default=400).start()
    engine = PolicyEngine(
        storage=SQLiteStorage(tmp_path / "cli.db"), clock=ManualClock(),
        webhook_endpoints=[{"url": receiver.url, "secret": "s"}],
    )  # fmt: skip
    engine.set_policy("agent-123", approval_example_policy())
    engine.authorize(payment(500_000_000, agent_id="agent-123"))
    assert engine.flush_webhooks(10)
    engine.close()
    receiver.stop()
    listed = run(tmp_path, "webhooks", "list", "--status", "failed").stdout
    assert listed.startswith("failed    approval.created")
    assert "(HTTP 400)" in listed
    assert (
        run(tmp_path, "webhooks", "list", "--status", "pending").stdout == "no webhook deliveries\n"
    )


def test_a_closed_pipe_is_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    from agentpolicy import cli

    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError

    monkeypatch.setenv("AGENT_POLICY_DB", str(tmp_path / "cli.db"))
    monkeypatch.delenv("AGENT_POLICY_REDIS_URL", raising=False)
    assert cli.main(["sweep"], out=ClosedPipe()) == 0  # sweep always prints a line
    assert capsys.readouterr().err == ""
