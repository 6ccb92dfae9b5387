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


def environment(tmp_path: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_POLICY_")}
    return {**clean, "AGENT_POLICY_DB": str(tmp_path / "cli.db"), **(env or {})}


def run(
    tmp_path: Path, *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, *args], check=False, input=stdin, capture_output=True, text=True, timeout=60,
        env=environment(tmp_path, env),
    )  # fmt: skip


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(approval_example_policy()))
    return path


def test_policy_set_get_list(tmp_path: Path, policy_file: Path) -> None:
    # an empty store says so, as the other lists do (it printed nothing)
    assert run(tmp_path, "policy", "list").stdout == "no agent has a policy\n"
    done = run(tmp_path, "policy", "set", "acme:bot", str(policy_file))
    assert (done.returncode, done.stdout) == (0, "policy of acme:bot is now version 1\n")
    got = run(tmp_path, "--json", "policy", "get", "acme:bot")
    assert json.loads(got.stdout)["policy"]["limits"]["daily"]["value"] == "10000000000"
    assert "version 1" in run(tmp_path, "policy", "get", "acme:bot").stdout
    assert run(tmp_path, "policy", "set", "other", "-", stdin="{}").returncode == 0
    listed = json.loads(run(tmp_path, "--json", "policy", "list", "--org", "acme").stdout)
    assert listed == {"policies": [{"agentId": "acme:bot", "enabled": True, "version": 1}]}
    assert "other  v1  enabled" in run(tmp_path, "policy", "list").stdout
    none = run(tmp_path, "policy", "list", "--org", "nobody")
    assert none.stdout == "no agent under nobody: has a policy\n"


def test_an_operator_confirms_a_claimed_reservation_with_its_holder(
    tmp_path: Path, policy_file: Path
) -> None:
    """A payment block's confirm failed: the operator settles it with the block's holder."""
    from agentpolicy import PolicyEngine, open_storage
    from agentpolicy.testing import payment

    run(tmp_path, "policy", "set", "agent-123", str(policy_file))
    engine = PolicyEngine(storage=open_storage(f"sqlite:///{tmp_path / 'cli.db'}"))
    rid = engine.authorize(payment(20_000_000, agent_id="agent-123"), holder="guard_1")
    engine.close()
    refused = run(tmp_path, "confirm", rid.reservation_id or "")
    assert refused.stderr.startswith("agentpolicy: RESERVATION_CLAIMED")
    done = run(tmp_path, "confirm", rid.reservation_id or "", "--holder", "guard_1")
    assert done.stdout == f"{rid.reservation_id}: confirmed\n", done.stderr


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
        (("approvals", "approve", "apr_x"), 2, "agentpolicy: INVALID_INPUT: $.approver: give --as"),
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


# -- webhooks the CLI causes ------------------------------------------------------------------


def test_approving_from_the_cli_delivers_the_webhooks_before_it_exits(
    tmp_path: Path, policy_file: Path
) -> None:
    from agentpolicy.webhooks import verify
    from tests.receiver import Receiver

    receiver = Receiver().start()
    try:
        hooks = {"AGENT_POLICY_WEBHOOK_URL": receiver.url, "AGENT_POLICY_WEBHOOK_SECRET": "s3cret"}
        run(tmp_path, "policy", "set", "agent-123", str(policy_file), env=hooks)
        asked = run(tmp_path, "--json", "authorize", "agent-123", "500000000", "0xv", "eip155:1",
                    env=hooks)  # fmt: skip
        approval_id = json.loads(asked.stdout)["approvalId"]
        events = [json.loads(r.body)["event"] for r in receiver.received]
        assert events == ["approval.created"]  # delivered before authorize exited
        done = run(tmp_path, "approvals", "approve", approval_id, "--as", "admin@company.com",
                   env=hooks)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        events = [json.loads(r.body)["event"] for r in receiver.received]
        assert events == ["approval.created", "approval.decision_submitted", "approval.approved"]
        assert all(verify(r.body, r.headers, "s3cret") for r in receiver.received)
        listed = run(tmp_path, "webhooks", "list", env=hooks).stdout
        assert listed.count("delivered") == 3
        assert f"http://127.0.0.1:{receiver.port}/***" in listed  # a webhook URL's path: hidden
    finally:
        receiver.stop()


def test_undelivered_webhooks_are_reported_and_the_command_still_succeeds(
    tmp_path: Path, policy_file: Path
) -> None:
    from tests.receiver import Receiver

    down = Receiver().start()
    port = down.port
    down.stop()  # nobody listens there now
    hooks = {"AGENT_POLICY_WEBHOOK_URL": f"http://user:pw@127.0.0.1:{port}/h?token=t0k",
             "AGENT_POLICY_WEBHOOK_SECRET": "s"}  # fmt: skip
    run(tmp_path, "policy", "set", "agent-123", str(policy_file), env=hooks)
    asked = run(tmp_path, "authorize", "agent-123", "500000000", "0xv", "eip155:1",
                "--webhook-wait", "300ms", env=hooks)  # fmt: skip
    assert asked.returncode == 3  # waiting for approval, as always
    assert "1 webhook delivery(ies) still pending after 0.3s" in asked.stderr
    assert "t0k" not in asked.stderr
    listed = run(tmp_path, "webhooks", "list", "--status", "pending", env=hooks).stdout
    assert "approval.created" in listed
    assert f"http://user:***@127.0.0.1:{port}/***?token=***" in listed
    assert "pw@" not in listed
    assert "t0k" not in listed

    refusing = Receiver(default=400).start()
    try:
        hooks["AGENT_POLICY_WEBHOOK_URL"] = refusing.url
        asked = run(tmp_path, "authorize", "agent-123", "500000000", "0xv", "eip155:1", env=hooks)
        shown = f"http://127.0.0.1:{refusing.port}/***"
        assert f"webhook approval.created to {shown} failed: HTTP 400" in asked.stderr
        # one line, not also the delivery's own log record (WARNING:agentpolicy.webhooks:...)
        assert asked.stderr.count("\n") == 1, asked.stderr
    finally:
        refusing.stop()


# -- flags, validation, history, where --------------------------------------------------------


def test_global_flags_are_accepted_after_the_subcommand(tmp_path: Path, policy_file: Path) -> None:
    other = tmp_path / "other.db"
    assert (
        run(tmp_path, "policy", "set", "bot", str(policy_file), "--db", str(other)).returncode == 0
    )
    got = run(tmp_path, "policy", "get", "bot", "--json", "--db", str(other))
    assert json.loads(got.stdout)["version"] == 1
    assert run(tmp_path, "policy", "get", "bot").returncode == 1  # not in the default file
    assert json.loads(run(tmp_path, "--json", "policy", "list", "--db", str(other)).stdout) == {
        "policies": [{"agentId": "bot", "enabled": True, "version": 1}]
    }
    assert json.loads(run(tmp_path, "where", "--json").stdout)["sqlitePath"] == str(
        tmp_path / "cli.db"
    )


def test_policy_validate_prints_every_problem_and_touches_no_store(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(approval_example_policy()))
    bad = tmp_path / "bad.json"
    bad.write_text('{"limits": {"daily": {"value": "1.5"}}, "timeRules": {"timezone": "America"},'
                   ' "extra": 1}')  # fmt: skip
    env = {"AGENT_POLICY_DB": str(tmp_path / "missing" / "x.db")}
    ok = run(tmp_path, "policy", "validate", str(good), env=env)
    assert (ok.returncode, ok.stdout) == (0, f"{good}: valid\n")
    invalid = run(tmp_path, "policy", "validate", str(bad), env=env)
    assert invalid.returncode == 2
    assert invalid.stdout.splitlines() == [
        f"{bad}: 3 problem(s)",
        "  $.extra: is not a known key",
        "  $.limits.daily.value: must be a string of ASCII digits (base units), got '1.5'",
        "  $.timeRules.timezone: unknown IANA timezone 'America' (use a zone such as "
        "'Europe/Berlin')",
    ]
    as_json = json.loads(run(tmp_path, "--json", "policy", "validate", str(bad), env=env).stdout)
    assert [p["path"] for p in as_json["problems"]] == [
        "$.extra", "$.limits.daily.value", "$.timeRules.timezone",
    ]  # fmt: skip
    assert run(tmp_path, "policy", "validate", "-", stdin="[]", env=env).returncode == 2
    assert run(tmp_path, "policy", "validate", str(tmp_path / "nope.json"), env=env).returncode == 2
    assert not (tmp_path / "missing").exists()


def test_history_shows_amount_recipient_and_approver(tmp_path: Path, policy_file: Path) -> None:
    run(tmp_path, "policy", "set", "agent-123", str(policy_file))
    d = json.loads(run(tmp_path, "--json", "authorize", "agent-123", "500.25 USDT", "0xvendor",
                       "eip155:1").stdout)  # fmt: skip
    run(tmp_path, "approvals", "approve", d["approvalId"], "--as", "admin@company.com",
        "--comment", "invoice 42")  # fmt: skip
    lines = run(tmp_path, "history", "agent-123").stdout.splitlines()
    assert [line.split()[1] for line in lines] == [
        "approval_approved", "vote", "decision", "policy_set",
    ]  # fmt: skip
    assert lines[0].endswith("500.25 USDT  to 0xvendor  by admin@company.com")
    assert lines[1].endswith("500.25 USDT  to 0xvendor  by admin@company.com  (invoice 42)")
    assert "APPROVAL_REQUIRED" in lines[2]
    assert lines[2].endswith("500.25 USDT  to 0xvendor")
    rows = json.loads(run(tmp_path, "--json", "history", "agent-123").stdout)["history"]
    assert rows[1]["approver"] == "admin@company.com"
    assert (rows[2]["amount"], rows[2]["decimals"], rows[2]["symbol"]) == ("500250000", 6, "USDT")


def test_an_unknown_agent_is_no_policy_not_empty_output(tmp_path: Path) -> None:
    for args in (("history", "ghost"), ("budget", "ghost"), ("policy", "get", "ghost")):
        done = run(tmp_path, *args)
        assert (done.returncode, done.stdout) == (1, ""), args
        assert done.stderr.startswith("agentpolicy: NO_POLICY: no policy is set for agent ghost")


@pytest.mark.parametrize(
    ("amount", "flags", "units", "symbol"),
    [
        ("500250000", (), 500_250_000, "USDT"),
        ("500.25", ("--units",), 500_250_000, "USDT"),
        ("0.5", ("--units", "--decimals", "18", "--symbol", "USDT"), 5 * 10**17, "USDT"),
        ("500.25 USDT", (), 500_250_000, "USDT"),
        ("1.5 usdt", (), 1_500_000, "usdt"),
    ],
)
def test_authorize_reads_base_units_or_human_units(
    tmp_path: Path, policy_file: Path, amount: str, flags: tuple[str, ...], units: int, symbol: str
) -> None:
    run(tmp_path, "policy", "set", "agent-123", str(policy_file))
    done = run(tmp_path, "--json", "authorize", "agent-123", amount, "0xv", "eip155:1", *flags)
    decision = json.loads(done.stdout)
    approval_or_reservation = decision.get("approvalId") or decision["reservationId"]
    assert approval_or_reservation
    history = json.loads(run(tmp_path, "--json", "history", "agent-123", "--limit", "1").stdout)
    assert (history["history"][0]["amount"], history["history"][0]["symbol"]) == (
        str(units), symbol,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("amount", "flags", "path"),
    [
        ("500.25", (), "$.amount"),
        ("500.1234567", ("--units",), "$.amount"),
        ("5 DAI", (), "$.amount"),  # the policy names no DAI amount: decimals unknown
        ("5 USDT", ("--symbol", "DAI"), "$.symbol"),
        ("-5", ("--units",), "$.amount"),
    ],
)
def test_authorize_refuses_amounts_it_cannot_read_exactly(
    tmp_path: Path, policy_file: Path, amount: str, flags: tuple[str, ...], path: str
) -> None:
    run(tmp_path, "policy", "set", "agent-123", str(policy_file))
    done = run(tmp_path, "authorize", "agent-123", amount, "0xv", "eip155:1", *flags)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"agentpolicy: INVALID_INPUT: {path}")


@pytest.mark.parametrize(
    "args", [("history", "bot", "--limit", str(10**30)), ("webhooks", "list", "--limit", str(10**30)),
             ("webhooks", "list", "--limit", "0")],
)  # fmt: skip
def test_a_huge_limit_is_invalid_input(tmp_path: Path, args: tuple[str, ...]) -> None:
    done = run(tmp_path, *args)
    assert done.returncode == 2
    assert (
        done.stderr == "agentpolicy: INVALID_INPUT: $.limit: must be an integer from 1 to 10000\n"
    )


def test_where_names_the_store_without_its_password(tmp_path: Path) -> None:
    here = json.loads(run(tmp_path, "--json", "where").stdout)
    assert here == {"storage": f"sqlite:///{tmp_path / 'cli.db'}",
                    "sqlitePath": str(tmp_path / "cli.db"), "exists": False, "keyPrefix": None,
                    "webhookEndpoints": []}  # fmt: skip
    assert not (tmp_path / "cli.db").exists()  # where creates nothing
    run(tmp_path, "sweep")
    assert f"sqlite file: {tmp_path / 'cli.db'} (exists)" in run(tmp_path, "where").stdout
    redis = run(
        tmp_path, "where", env={"AGENT_POLICY_REDIS_URL": "redis://app:hunter2@r.example:6379/0"}
    )
    assert redis.stdout.splitlines() == [
        "storage: redis://app:***@r.example:6379/0",
        "key prefix: agent-policy:",
    ]
    bad = run(tmp_path, "--redis-url", "memcached://u:hunter2@h", "where")
    assert bad.returncode == 2
    assert "hunter2" not in bad.stderr


def test_verbose_shows_the_traceback_of_an_internal_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    from agentpolicy import PolicyEngine, cli

    def boom(*_: object) -> None:
        raise RuntimeError("kaput")

    monkeypatch.setenv("AGENT_POLICY_DB", str(tmp_path / "cli.db"))
    monkeypatch.delenv("AGENT_POLICY_REDIS_URL", raising=False)
    monkeypatch.setattr(PolicyEngine, "sweep", boom)
    assert cli.main(["sweep"], out=io.StringIO()) == 1
    quiet = capsys.readouterr().err
    assert quiet == "agentpolicy: INTERNAL: RuntimeError: kaput (a bug; -v shows where)\n"
    assert cli.main(["sweep", "-v"], out=io.StringIO()) == 1
    loud = capsys.readouterr().err
    assert loud.startswith("Traceback (most recent call last):")
    assert "in boom" in loud


def test_the_demo_removes_its_folder_even_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import tempfile

    from agentpolicy import PolicyEngine, cli

    folder = tmp_path / "demo"

    def make_folder(**_: object) -> str:
        folder.mkdir()
        return str(folder)

    def boom(*_: object) -> None:
        raise RuntimeError("the payment rail fell over")

    monkeypatch.setattr(tempfile, "mkdtemp", make_folder)
    monkeypatch.setattr(PolicyEngine, "confirm", boom)
    assert cli.main(["demo"], out=io.StringIO()) == 1
    assert not folder.exists()


def test_budget_shows_rolling_count_and_scoped_limits(tmp_path: Path) -> None:
    policy = {
        "limits": {"daily": {"value": "100000000"},
                   "rolling": [{"window": "24h", "amount": {"value": "50000000"}}],
                   "counts": [{"window": "10m", "max": 5}]},
        "scopedLimits": [{"name": "vendors", "match": {"recipients": ["0xvendor"]},
                          "groupBy": "recipient", "limits": {"daily": {"value": "9000000"}}}],
    }  # fmt: skip
    path = tmp_path / "p.json"
    path.write_text(json.dumps(policy))
    assert run(tmp_path, "policy", "set", "bot", str(path)).returncode == 0
    assert run(tmp_path, "authorize", "bot", "2000000", "0xvendor", "eip155:8453").returncode == 0
    shown = run(tmp_path, "budget", "bot").stdout
    assert "daily" in shown
    assert "24h" in shown
    assert "spent 0 + reserved 2 of 50 USDT; 48 left" in shown
    assert "1 of 5 USDT payments; 4 left" in shown  # a count in the block of USDT
    assert "vendors (0xvendor) daily" in shown
    assert "of 9 USDT; 7 left" in shown
    data = json.loads(run(tmp_path, "--json", "budget", "bot").stdout)
    assert {x["window"] for x in data["limits"]} == {"daily", "24h", "10m"}
    # --period: that window alone (the daily limit showed again under --period hourly, as
    # an extra line worded "frees", with the rolling, count and scoped limits)
    hourly = run(tmp_path, "budget", "bot", "--period", "hourly").stdout.splitlines()
    assert len(hourly) == 2, hourly
    assert hourly[1].split()[:3] == ["hourly", "no", "limit"]
    daily = run(tmp_path, "budget", "bot", "--period", "daily").stdout
    assert "vendors (0xvendor) daily" in daily
    assert daily.count("of 100 USDT; 98 left") == 1  # once, as its bar ("until")
    assert "of 100 USDT; 98 left (until " in daily
    for elsewhere in ("24h", "10m"):
        assert elsewhere not in daily


def test_delegate_revoke_and_a_budget_within_its_parents(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.json"
    fleet.write_text(json.dumps({"limits": {"daily": {"value": "100000000"}}}))
    sub = tmp_path / "sub.json"
    sub.write_text(json.dumps({"limits": {"daily": {"value": "5000000"}}}))
    assert run(tmp_path, "policy", "set", "fleet", str(fleet)).returncode == 0
    made = run(tmp_path, "delegate", "fleet", "helper", str(sub), "--expires-in", "2h")
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("helper: delegated by fleet until ")
    assert run(tmp_path, "authorize", "helper", "2000000", "0xv", "eip155:8453").returncode == 0
    shown = run(tmp_path, "budget", "helper").stdout
    assert "delegated by fleet" in shown
    assert "within the budget of fleet:" in shown
    assert "spent 0 + reserved 2 of 100 USDT; 98 left" in shown
    data = json.loads(run(tmp_path, "--json", "budget", "helper").stdout)
    assert data["ancestors"][0]["agentId"] == "fleet"
    over = run(tmp_path, "delegate", "fleet", "greedy", "-", stdin=json.dumps(
        {"limits": {"daily": {"value": "900000000"}}}))  # fmt: skip
    assert over.returncode != 0
    assert "$.policy.limits.daily: exceeds the parent's limit" in over.stderr
    revoked = run(tmp_path, "--json", "revoke", "helper", "--by", "fleet")
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["revokedAt"]
    denied = run(tmp_path, "--json", "authorize", "helper", "1", "0xv", "eip155:8453")
    assert json.loads(denied.stdout)["code"] == "DELEGATION_REVOKED"
    assert "Traceback" not in denied.stderr + over.stderr


def test_approvers_sign_their_votes_from_the_command_line(tmp_path: Path) -> None:
    import stat

    key_file = tmp_path / "alice.key"
    made = run(tmp_path, "approver", "keygen", str(key_file))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    public = made.stdout.split("public key: ")[1].strip()
    assert public.startswith("ed25519:")
    again = run(tmp_path, "approver", "keygen", str(key_file))
    assert (again.returncode, again.stderr.split(":")[1].strip()) == (2, "INVALID_INPUT")
    assert run(tmp_path, "approver", "register", "alice", public).returncode == 0
    bob_key = tmp_path / "bob.key"
    bob = json.loads(run(tmp_path, "--json", "approver", "keygen", str(bob_key)).stdout)
    listed = run(tmp_path, "--json", "approver", "register", "bob", bob["publicKey"])
    assert json.loads(listed.stdout)["version"] == 1
    policy = {"approvalConfig": {"requireSignedVotes": True, "thresholds": [
        {"amount": {"value": "1"}, "groups": [
            {"name": "finance", "approvers": ["alice"], "required": 1},
            {"name": "ops", "approvers": ["bob", "carol"], "required": 1}]}]}}  # fmt: skip
    run(tmp_path, "policy", "set", "bot", "-", stdin=json.dumps(policy))
    asked = run(tmp_path, "--json", "authorize", "bot", "5", "0xv", "eip155:1",
                "--requested-by", "bob")  # fmt: skip
    aid = json.loads(asked.stdout)["approvalId"]
    unsigned = run(tmp_path, "approvals", "approve", aid, "--as", "alice")
    assert unsigned.returncode == 1
    assert unsigned.stderr.startswith("agentpolicy: APPROVER_NOT_AUTHORIZED: alice is a registered")
    wrong_key = run(tmp_path, "approvals", "approve", aid, "--as", "alice", "--key", str(bob_key))
    assert wrong_key.stderr.startswith("agentpolicy: APPROVER_NOT_AUTHORIZED: the signature")
    requester = run(tmp_path, "approvals", "approve", aid, "--as", "bob", "--key", str(bob_key))
    assert "asked for the payment" in requester.stderr
    signed = run(tmp_path, "approvals", "approve", aid, "--key", str(key_file), "--comment", "ok",
                 env={"AGENT_POLICY_APPROVER": "alice"})  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    assert "alice: approve (ok) [signed, key version 1]" in signed.stdout
    assert "group finance: 1 of alice" in signed.stdout
    assert "requested by bob for bot" in signed.stdout
    shown = json.loads(run(tmp_path, "--json", "approvals", "show", aid).stdout)
    assert shown["decisions"][0]["via"] == "signature"
    history = run(tmp_path, "history", "bot")
    assert "by alice  (ok)  [signed, key version 1]" in history.stdout
    assert shown["status"] == "pending"
    carol_key = tmp_path / "carol.key"
    carol = json.loads(run(tmp_path, "--json", "approver", "keygen", str(carol_key)).stdout)
    run(tmp_path, "approver", "register", "carol", carol["publicKey"])
    by_env = run(
        tmp_path,
        "--json",
        "approvals",
        "approve",
        aid,
        env={"AGENT_POLICY_APPROVER": "carol", "AGENT_POLICY_APPROVER_KEY_FILE": str(carol_key)},
    )
    assert json.loads(by_env.stdout)["status"] == "approved", by_env.stderr
    rotated = run(tmp_path, "approver", "rotate", "carol", public)
    assert rotated.stderr.startswith("agentpolicy: APPROVER_CONFLICT")
    run(tmp_path, "approver", "remove", "bob")
    text = run(tmp_path, "approver", "list").stdout
    assert f"alice  {public}  key version 1" in text
    assert "bob  -  removed" in text
    assert "(removal)" in text


# -- safe rollout -----------------------------------------------------------------------------------

DAILY_100 = '{"limits": {"daily": {"value": "100000000"}}}'
DAILY_50 = '{"limits": {"daily": {"value": "50000000"}, "counts": [{"window": "daily", "max": 2}]}}'


def test_authorize_dry_run_reserves_and_records_nothing(tmp_path: Path) -> None:
    run(tmp_path, "policy", "set", "bot", "-", stdin=DAILY_100)
    run(tmp_path, "authorize", "bot", "40000000", "0xv", "eip155:1")
    done = run(tmp_path, "authorize", "bot", "50 USDT", "0xv", "eip155:1", "--dry-run")
    assert (done.returncode, done.stdout) == (0, (
        "WOULD BE ALLOWED (dry run: nothing reserved or recorded)\n"
        "  daily    used 40 of 100 USDT; 10 left after this payment\n"))  # fmt: skip
    data = json.loads(run(tmp_path, "--json", "authorize", "bot", "70000000", "0xv", "eip155:1",
                          "--dry-run").stdout)  # fmt: skip
    assert (data["dryRun"], data["code"], data["headroom"][0]["fits"]) == (True, "DAILY_LIMIT",
                                                                           False)  # fmt: skip
    denied = run(tmp_path, "authorize", "bot", "70000000", "0xv", "eip155:1", "--dry-run")
    assert denied.returncode == 3
    assert denied.stdout.startswith("WOULD BE DENIED DAILY_LIMIT (dry run): daily limit")
    assert "DOES NOT FIT" in denied.stdout
    history = run(tmp_path, "history", "bot").stdout.splitlines()
    assert [line.split()[1] for line in history] == ["decision", "policy_set"]  # the real one


def test_policy_versions_diff_rollback_and_history_by_version(tmp_path: Path) -> None:
    run(tmp_path, "policy", "set", "bot", "-", stdin=DAILY_100)
    run(tmp_path, "authorize", "bot", "1", "0xv", "eip155:1")
    run(tmp_path, "policy", "set", "bot", "-", stdin=DAILY_50)
    back = run(tmp_path, "policy", "rollback", "bot", "1")
    assert back.stdout == "policy of bot is now version 3 (equal to version 1)\n"
    listed = run(tmp_path, "policy", "versions", "bot").stdout.splitlines()
    assert [line.split()[0] for line in listed if line.startswith("v")] == ["v3", "v2", "v1"]
    assert "rollback of v1  (live)" in listed[0]
    assert "    limits.daily.value: 50000000 -> 100000000" in listed
    diff = run(tmp_path, "policy", "diff", "bot", "1", "2")
    assert diff.stdout == ("limits.daily.value: 100000000 -> 50000000\n"
                           'limits.counts: (none) -> [{"window": "daily", "max": 2}]\n')  # fmt: skip
    same = run(tmp_path, "policy", "diff", "bot", "1", "3")
    assert same.stdout == "versions 1 and 3 are the same\n"
    old = json.loads(run(tmp_path, "--json", "policy", "get", "bot", "--version", "2").stdout)
    assert old["policy"]["limits"]["daily"]["value"] == "50000000"
    v1 = run(tmp_path, "history", "bot", "--version", "1").stdout.splitlines()
    assert [line.split()[1] for line in v1] == ["decision", "policy_set"]
    missing = run(tmp_path, "policy", "rollback", "bot", "9")
    assert (missing.returncode, missing.stderr.split(":")[1].strip()) == (
        1, "POLICY_VERSION_NOT_FOUND")  # fmt: skip


def test_policy_shadow_promote_over_a_later_version_needs_force(tmp_path: Path) -> None:
    run(tmp_path, "policy", "set", "bot", "-", stdin=DAILY_100)
    run(tmp_path, "policy", "shadow", "set", "bot", "-", stdin=DAILY_50)
    stop = '{"enabled": false, "limits": {"daily": {"value": "100000000"}}}'
    run(tmp_path, "policy", "set", "bot", "-", stdin=stop)
    refused = run(tmp_path, "policy", "shadow", "promote", "bot")
    assert refused.returncode == 1
    assert refused.stderr.startswith(
        "agentpolicy: SHADOW_OUTDATED: the shadow policy of agent "
        "bot was set beside version 1, and version 2 is live now"
    )
    forced = run(tmp_path, "policy", "shadow", "promote", "bot", "--force")
    assert forced.stdout == "shadow policy of bot promoted: it is now version 3\n"


def test_policy_shadow_set_report_promote_clear_and_simulate(tmp_path: Path) -> None:
    run(tmp_path, "policy", "set", "bot", "-", stdin=DAILY_100)
    shadow = run(tmp_path, "policy", "shadow", "set", "bot", "-", stdin=DAILY_50)
    assert shadow.stdout.startswith("shadow policy of bot set beside version 1 at ")
    for _ in range(3):
        assert run(tmp_path, "authorize", "bot", "20000000", "0xv", "eip155:1").returncode == 0
    report = run(tmp_path, "policy", "shadow", "report", "bot").stdout.splitlines()
    assert report[1:4] == [
        "  live:   3 allowed, 0 approval, 0 denied  (ALLOWED 3)",
        "  shadow: 2 allowed, 0 approval, 1 denied  (ALLOWED 2, DAILY_LIMIT 1)",
        "  flips:  allowed->denied 1",
    ]
    assert report[5].endswith("bot  20 USDT to 0xv  ALLOWED -> DAILY_LIMIT")
    candidate = tmp_path / "candidate.json"
    candidate.write_text(DAILY_50)
    sim = run(tmp_path, "policy", "simulate", "bot", str(candidate), "--since", "7d")
    lines = sim.stdout.splitlines()
    assert lines[0].endswith(": 3 payment(s) replayed")
    assert "  flips:     allowed->denied 1" in lines
    assert any("daily" in line and "60 -> 40 USDT of 50 USDT  (3 -> 2 payments)" in line
               for line in lines)  # fmt: skip
    data = json.loads(run(tmp_path, "--json", "policy", "simulate", "bot", str(candidate)).stdout)
    assert data["candidateCodes"] == {"ALLOWED": 2, "DAILY_LIMIT": 1}
    bad = run(tmp_path, "policy", "simulate", "bot", str(candidate), "--since", "lately")
    assert (bad.returncode, bad.stderr.split(":")[1].strip()) == (2, "INVALID_INPUT")
    promoted = run(tmp_path, "policy", "shadow", "promote", "bot")
    assert promoted.stdout == "shadow policy of bot promoted: it is now version 2\n"
    gone = run(tmp_path, "policy", "shadow", "clear", "bot")
    assert (gone.returncode, gone.stderr) == (
        1, "agentpolicy: SHADOW_NOT_FOUND: agent bot has no shadow policy\n")  # fmt: skip
    run(tmp_path, "policy", "shadow", "set", "bot", "-", stdin=DAILY_100)
    cleared = run(tmp_path, "policy", "shadow", "clear", "bot")
    assert "0 payment(s) judged" in cleared.stdout


# -- what the terminal, the pipes and the files may do --------------------------------------------

UNSAFE = "\x1b[2J\x1b]0;t\x07\r\nFAKE\t\x7f\x9b\u2028\u202e\u2066"
SHOWN = "\\x1b[2J\\x1b]0;t\\x07\\x0d\\x0aFAKE\\x09\\x7f\\x9b\\u2028\\u202e\\u2066"


def raw_controls(text: str) -> list[str]:
    """The characters of ``text`` a terminal could act on, but the newlines ending its lines."""
    return [c for c in text if c != "\n" and not c.isprintable()]


def test_escape_shows_every_control_character_and_nothing_else() -> None:
    from agentpolicy.cli_output import escape, printable

    assert escape("ok " + UNSAFE + " é ₮ \u200b") == "ok " + SHOWN + " é ₮ \u200b"
    assert escape("".join(map(chr, range(0x20)))) == "".join(f"\\x{c:02x}" for c in range(0x20))
    assert escape("\u2029\u202a\u2069") == "\\u2029\\u202a\\u2069"
    data = {"a\n": ["x\x1b", 1, None, {"k": "\r"}], "policy": {"reason": "\x1b"}}
    assert printable(data) == {"a\\x0a": ["x\\x1b", 1, None, {"k": "\\x0d"}],
                               "policy": {"reason": "\x1b"}}  # fmt: skip


def test_control_characters_of_stored_data_and_input_are_shown_escaped(tmp_path: Path) -> None:
    """A governed agent's reason or an approver's comment cannot act on the operator's terminal."""

    def blocked(reason: str) -> str:
        period = {"start": "2020-01-01T00:00:00Z", "end": "2099-01-01T00:00:00Z", "reason": reason}
        return json.dumps({"timeRules": {"blockedPeriods": [period]}})

    run(tmp_path, "policy", "set", "bot", "-", stdin=blocked("a"))
    run(tmp_path, "policy", "set", "bot", "-", stdin=blocked("maint" + UNSAFE))
    diff = run(tmp_path, "policy", "diff", "bot", "1", "2")
    assert diff.stdout == f"timeRules.blockedPeriods[0].reason: a -> maint{SHOWN}\n"
    versions = run(tmp_path, "policy", "versions", "bot").stdout
    denied = run(tmp_path, "authorize", "bot", "1", "0xv", "eip155:1")
    assert denied.returncode == 3
    assert denied.stdout.startswith("DENIED BLOCKED_PERIOD: ")
    assert denied.stdout.endswith(f"(maint{SHOWN})\n")
    data = json.loads(run(tmp_path, "--json", "policy", "diff", "bot", "1", "2").stdout)
    assert data["changes"][0]["after"] == "maint" + UNSAFE  # JSON escapes them itself
    needs_a = {"thresholds": [{"amount": {"value": "1"}, "requiredApprovers": 1,
                               "approvers": ["a"]}]}  # fmt: skip
    run(tmp_path, "policy", "set", "pay", "-", stdin=json.dumps({"approvalConfig": needs_a}))
    asked = json.loads(run(tmp_path, "--json", "authorize", "pay", "5", "0xv", "eip155:1").stdout)
    voted = run(tmp_path, "approvals", "approve", asked["approvalId"], "--as", "a",
                "--comment", "fine" + UNSAFE)  # fmt: skip
    shown = run(tmp_path, "approvals", "show", asked["approvalId"]).stdout
    history = run(tmp_path, "history", "pay").stdout
    missing = run(tmp_path, "policy", "set", "bot", "/no/such" + UNSAFE)
    assert missing.stderr == ("agentpolicy: INVALID_INPUT: $.file: cannot read "
                              f"/no/such{SHOWN}: No such file or directory\n")  # fmt: skip
    for text in (diff.stdout, versions, denied.stdout, voted.stdout, shown, history,
                 missing.stderr):  # fmt: skip
        assert raw_controls(text) == [], text
    assert f"a: approve (fine{SHOWN})" in shown
    assert f"by a  (fine{SHOWN})" in history
    assert f"    timeRules.blockedPeriods[0].reason: a -> maint{SHOWN}" in versions.splitlines()


def test_a_closed_pipe_keeps_the_exit_status_of_the_command(tmp_path: Path) -> None:
    """`agentpolicy authorize ... | true` of a denied payment exits 3, not 0."""
    run(tmp_path, "policy", "set", "bot", "-", stdin='{"enabled": false}')
    read, write = os.pipe()
    os.close(read)  # the reader has gone
    try:
        done = subprocess.run(
            [EXE, "authorize", "bot", "1", "0xv", "eip155:1"], stdout=write,
            capture_output=False, stderr=subprocess.PIPE, text=True, timeout=60,
            env=environment(tmp_path), check=False,
        )  # fmt: skip
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (3, "")


def test_output_lost_after_the_command_was_carried_out_says_so_and_exits_4(
    tmp_path: Path,
) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [EXE, "policy", "set", "bot", "-"], input=DAILY_100, stdout=full,
            stderr=subprocess.PIPE, text=True, timeout=60, env=environment(tmp_path),
            check=False,
        )  # fmt: skip
    assert (done.returncode, done.stderr) == (4, (
        "agentpolicy: the command was carried out (policy of bot is now version 1), but its "
        "output could not be written: No space left on device\n"))  # fmt: skip
    closed = subprocess.run(
        ["sh", "-c", 'exec "$0" "$@" >&-', EXE, "authorize", "bot", "1", "0xv", "eip155:1"],
        capture_output=True, text=True, timeout=60, env=environment(tmp_path), check=False,
    )  # fmt: skip
    assert closed.returncode == 4
    assert closed.stderr.startswith(
        "agentpolicy: the command was carried out (ALLOWED  reservation res_"
    )
    assert closed.stderr.endswith("), but its output could not be written: stdout is closed\n")
    reserved = json.loads(run(tmp_path, "--json", "budget", "bot").stdout)
    assert reserved["periods"]["daily"]["reserved"] == "1"


@pytest.mark.parametrize(
    "args",
    [
        ("policy", "set", "bot"),
        ("policy", "validate"),
        ("policy", "shadow", "set", "bot"),
        ("delegate", "bot", "bot/sub"),
        ("policy", "simulate", "bot"),
    ],
)
def test_json_nested_too_deeply_is_invalid_input(tmp_path: Path, args: tuple[str, ...]) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text('{"limits": ' + "[" * 100_000 + "]" * 100_000 + "}")
    done = run(tmp_path, "--json", *args, str(deep))
    assert done.returncode == 2
    said = json.loads(done.stdout)["problems"][0]["message"] if done.stdout else done.stderr
    assert said.endswith(f"{deep} is nested too deeply" + ("" if done.stdout else "\n")), said
    assert "INTERNAL" not in done.stderr


def test_a_closed_stdin_cannot_be_read(tmp_path: Path) -> None:
    done = subprocess.run(
        ["sh", "-c", 'exec "$0" "$@" <&-', EXE, "policy", "set", "bot", "-"],
        capture_output=True, text=True, timeout=60, env=environment(tmp_path), check=False,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (
        2, "agentpolicy: INVALID_INPUT: $.file: cannot read -: stdin is closed\n")  # fmt: skip


def test_policy_and_key_files_are_read_up_to_a_bound(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_text(" " * (1 << 20) + "{}")
    too_big = "is larger than 1048576 bytes (1 MiB): not a policy\n"
    assert run(tmp_path, "policy", "set", "bot", str(big)).stderr.endswith(too_big)
    assert run(tmp_path, "policy", "set", "bot", "-", stdin=big.read_text()).stderr == (
        f"agentpolicy: INVALID_INPUT: $.file: stdin {too_big}")  # fmt: skip
    big.write_text(" " * ((1 << 20) - 2) + "{}")  # exactly 1 MiB
    assert run(tmp_path, "policy", "set", "bot", str(big)).returncode == 0
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    huge = tmp_path / "huge.key"
    huge.write_bytes(b"-" * (64 * 1024 + 1))
    huge.chmod(0o600)
    for key, why in ((fifo, "is not a regular file"),
                     (huge, "is larger than 65536 bytes: not a key")):  # fmt: skip
        done = run(tmp_path, "approvals", "approve", "apr_x", "--as", "a", "--key", str(key))
        assert (done.returncode, done.stderr) == (
            2, f"agentpolicy: INVALID_INPUT: $.key: the key file {key} {why}\n")  # fmt: skip


def test_os_errors_are_one_line_with_their_code(tmp_path: Path) -> None:
    import socket

    pytest.importorskip("uvicorn")
    for command in (("budget", "bot"), ("serve", "--port", "0"), ("serve-mcp",)):
        long_db = run(tmp_path, "--db", str(tmp_path / ("a" * 5000)), *command)
        assert long_db.returncode == 1
        assert long_db.stderr.startswith(
            "agentpolicy: STORAGE_UNAVAILABLE: cannot open SQLite database "
        ), long_db.stderr
        assert long_db.stderr.endswith(": File name too long\n"), long_db.stderr
        assert len(long_db.stderr.splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        in_use = run(tmp_path, "serve", "--port", str(port))
    assert (in_use.returncode, in_use.stderr) == (2, (
        f"agentpolicy: INVALID_INPUT: $.port: cannot listen on 127.0.0.1:{port}: "
        "Address already in use\n"))  # fmt: skip
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    tls = run(tmp_path, "serve", "--port", "0", "--tls-cert", str(tmp_path / "cert.pem"),
              "--tls-key", str(tmp_path / "key.pem"))  # fmt: skip
    assert tls.returncode == 2
    assert tls.stderr.startswith(f"agentpolicy: INVALID_INPUT: $.tls-cert: cannot use --tls-cert "
                                 f"{tmp_path / 'cert.pem'} with --tls-key")  # fmt: skip
    assert len(tls.stderr.splitlines()) == 1  # and never "listening on"


def test_ctrl_c_exits_130_with_one_line(tmp_path: Path) -> None:
    import signal
    import time

    fifo = tmp_path / "policy.fifo"
    os.mkfifo(fifo)
    child = subprocess.Popen(
        [EXE, "policy", "set", "bot", str(fifo)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=environment(tmp_path),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:  # a writer can open the FIFO once the command has opened it to read
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    try:
        _wait_until_blocked_reading(child.pid)
        child.send_signal(signal.SIGINT)  # while it waits for the policy
        out, err = child.communicate(timeout=30)
    finally:
        os.close(writer)
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert (child.returncode, out, err) == (130, "", "agentpolicy: interrupted\n")


def _wait_until_blocked_reading(pid: int) -> None:
    """Wait until ``pid`` sleeps in a read of a pipe (Linux; elsewhere half a second).

    A SIGINT that lands after ``open`` returns but before ``read`` starts is seen by
    Python only when the read returns: sent as soon as the FIFO is open, the signal
    was lost about one time in forty and the command waited for ever.
    """
    import time

    wchan = Path(f"/proc/{pid}/wchan")
    if not wchan.exists():
        time.sleep(0.5)
        return
    deadline = time.monotonic() + 30
    while "pipe" not in wchan.read_text():
        assert time.monotonic() < deadline, wchan.read_text()
        time.sleep(0.01)


def test_an_empty_symbol_is_invalid_input(tmp_path: Path) -> None:
    run(tmp_path, "policy", "set", "bot", "-", stdin=DAILY_100)
    done = run(tmp_path, "authorize", "bot", "1", "0xv", "eip155:1", "--symbol", "", "--dry-run")
    assert (done.returncode, done.stderr) == (
        2, "agentpolicy: INVALID_INPUT: $.symbol: must not be empty\n")  # fmt: skip


def test_a_ctrl_c_as_the_demo_makes_its_folder_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C between the folder being made and the try that removes it left it behind."""
    import io
    import signal
    import tempfile
    import threading

    from agentpolicy import cli

    folder = tmp_path / "demo"

    def make_folder(**_: object) -> str:
        folder.mkdir()
        # as the folder is made: Ctrl-C (to this thread: the command has no other, where a
        # test worker's threads would take a signal sent to the process)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        return str(folder)

    monkeypatch.setattr(tempfile, "mkdtemp", make_folder)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # xdist's workers ignore it
    try:
        assert cli.main(["demo"], out=io.StringIO()) == 130
    finally:
        signal.signal(signal.SIGINT, before)
    assert not folder.exists()


def test_a_db_name_with_spaces_at_either_end_is_refused(tmp_path: Path) -> None:
    """' /srv/ap.db' named './ /srv/ap.db', a new and empty store; '   ' a file named by spaces."""
    for env, args in (
        ({"AGENT_POLICY_DB": "   "}, ()),
        ({"AGENT_POLICY_DB": f" {tmp_path}/c.db"}, ()),
        ({}, ("--db", f" {tmp_path}/c.db")),
        ({}, ("--db", f"{tmp_path}/c.db ")),
    ):
        done = run(tmp_path, *args, "policy", "list", env=env)
        assert done.returncode == 2, done.stderr
        assert "must not have whitespace at either end" in done.stderr
        assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.strip() != p.name) == []
    assert not (tmp_path / " ").exists()


def test_a_redis_url_with_an_unbalanced_bracket_is_bad_input(tmp_path: Path) -> None:
    for url in ("redis://u:S3CRET@[::1/0", "redis://h]:1/0"):
        for args, env in ((("--redis-url", url), {}), ((), {"AGENT_POLICY_REDIS_URL": url})):
            done = run(tmp_path, *args, "policy", "list", env=env)
            assert done.returncode == 2, done.stderr
            assert "INVALID_INPUT" in done.stderr
            assert "unbalanced [ or ]" in done.stderr
            assert "S3CRET" not in done.stderr


def test_keygen_on_a_full_disk_says_so_and_leaves_no_empty_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import io
    import os

    from agentpolicy import cli

    real = os.fdopen

    class Full(io.RawIOBase):
        def __init__(self, fd: int) -> None:
            self.file = real(fd, "wb")

        def fileno(self) -> int:
            return self.file.fileno()

        def write(self, data: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            self.file.close()
            super().close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(fd))
    key = tmp_path / "a.key"
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    assert cli.main(["approver", "keygen", str(key)], out=io.StringIO()) == 2
    assert "cannot write" in err.getvalue()
    assert "No space left on device" in err.getvalue()
    assert "INTERNAL" not in err.getvalue()
    assert not key.exists()  # a retry is not refused for an empty file
