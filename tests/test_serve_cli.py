"""``agentpolicy token`` and ``agentpolicy serve`` as real commands; bind rules; pure helpers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx2
import pytest

from agentpolicy import cli
from agentpolicy.amounts import Amount
from agentpolicy.serve.binding import bind_problem, is_loopback
from agentpolicy.serve.command import redact_links
from agentpolicy.serve.pages import bar_view, moment, when
from tests.serve_helpers import mcp
from tests.test_cli import EXE, run


def test_token_create_prints_it_once_list_never_shows_it_revoke_ends_it(tmp_path: Path) -> None:
    made = run(tmp_path, "token", "create", "--role", "agent", "--agent", "agent-123",
               "--label", "crawler on host 7")  # fmt: skip
    assert made.returncode == 0, made.stderr
    record, secret, note = made.stdout.splitlines()
    token_id = record.split()[0]
    assert secret.startswith(f"apt_{token_id}_")
    assert record == (f"{token_id}  agent    agent agent-123  active, no expiry  "
                      "(crawler on host 7)")  # fmt: skip
    assert "shown only this once" in note
    listed = run(tmp_path, "token", "list")
    assert token_id in listed.stdout
    assert secret not in listed.stdout
    assert secret not in (tmp_path / "cli.db").read_bytes().decode("latin-1")
    as_json = json.loads(run(tmp_path, "--json", "token", "create", "--role", "approver",
                             "--approver", "alice", "--expires-in", "7d").stdout)  # fmt: skip
    assert as_json["role"] == "approver"
    assert as_json["approver"] == "alice"
    assert as_json["token"].startswith("apt_")
    assert "expiresAt" in as_json
    revoked = run(tmp_path, "token", "revoke", token_id)
    assert revoked.returncode == 0
    assert "revoked" in revoked.stdout
    assert token_id not in run(tmp_path, "token", "list").stdout
    assert f"{token_id}  agent" in run(tmp_path, "token", "list", "--all").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--role", "agent"], "$.agentId: an agent token is bound to one agent or one org"),
        (["--role", "approver"], "$.approver: an approver token names its approver"),
        (["--role", "admin", "--expires-in", "0s"], "$.expiresIn"),
        (["--role", "admin", "--expires-at", "2000-01-01T00:00:00Z"], "$.expiresAt"),
    ],
)
def test_token_create_refuses_bad_bindings_in_one_line(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "t.db")
    assert cli.main(["token", "create", "--db", db, *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.splitlines()) == 1
    assert cli.main(["--json", "token", "list", "--all", "--db", db]) == 0
    assert json.loads(capsys.readouterr().out) == {"tokens": []}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "0.0.0.0"], "refusing to serve plain HTTP on 0.0.0.0"),
        (["--host", "192.0.2.7"], "refusing to serve plain HTTP on 192.0.2.7"),
        (["--host", "example.internal"], "refusing to serve plain HTTP on example.internal"),
        (["--tls-cert", "cert.pem"], "give both --tls-cert and --tls-key"),
        (["--tls-cert", "nope.pem", "--tls-key", "nope.key"], "--tls-cert nope.pem: no such file"),
        (["--port", "70000"], "$.port"),
        (["--session-ttl", "soon"], "$.sessionTtl"),
    ],
)
def test_serve_refuses_what_it_must_in_one_line_with_status_2(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--db", str(tmp_path / "s.db"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert not (tmp_path / "s.db").exists()  # refused before anything was opened


def test_bind_rules() -> None:
    assert [is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost")] == [
        True] * 5  # fmt: skip
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com")] == [False] * 4
    for flags in ({"tls": True}, {"behind_tls_proxy": True}, {"insecure_bind": True}):
        options = {"tls": False, "behind_tls_proxy": False, "insecure_bind": False, **flags}
        assert bind_problem("0.0.0.0", **options) is None
    assert bind_problem("127.0.0.1", tls=False, behind_tls_proxy=False, insecure_bind=False) is None


def test_agentpolicy_serve_runs_answers_and_stops(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_POLICY_")}
    env["AGENT_POLICY_DB"] = str(tmp_path / "cli.db")
    policy = tmp_path / "p.json"
    policy.write_text('{"limits": {"daily": {"value": "1000000"}}}')
    assert run(tmp_path, "policy", "set", "bot", str(policy)).returncode == 0
    made = run(tmp_path, "token", "create", "--role", "agent", "--agent", "bot")
    secret = made.stdout.splitlines()[1]
    proc = subprocess.Popen(
        [EXE, "serve", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("agentpolicy serve: listening on http://127.0.0.1:")
        url = line.split()[4]
        assert httpx2.get(url + "/healthz", timeout=30).json() == {"status": "ok"}

        async def pay(client: object) -> object:
            result = await client.call_tool(  # type: ignore[attr-defined]
                "agent_policy_authorize",
                {"amount": "600000", "recipient": "0xv", "network": "eip155:8453"},
            )
            return result.structured_content["data"]["code"]

        assert mcp(url, secret, pay) == "ALLOWED"
        assert mcp(url, secret, pay) == "DAILY_LIMIT"  # the same budget, in the SQLite file
        link = httpx2.get(url + "/approvals/apr_1?t=secret-link", timeout=30)
        assert link.status_code == 403  # not a valid link: refused, and not logged
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "Traceback" not in err
    assert "secret-link" not in out + err  # the access log writes t=***
    assert "t=***" in out


def test_redact_links() -> None:
    assert redact_links("GET /approvals/apr_1?t=apl1.abc.def HTTP/1.1") == (
        "GET /approvals/apr_1?t=*** HTTP/1.1")  # fmt: skip
    assert redact_links("/a?x=1&t=apl1.x&y=2") == "/a?x=1&t=***&y=2"


def test_bars_are_exact_integer_shares() -> None:
    limit = Amount(1000_000000)
    bar = bar_view("daily", limit, Amount(125_000000), Amount(300_000001), Amount(574_999999))
    assert (bar["spent_w"], bar["reserved_w"], bar["remaining_w"]) == ("12.5", "30.0", "57.5")
    assert bar["remaining_x"] == "42.5"
    over = bar_view("daily", limit, Amount(900_000000), Amount(500_000000), Amount(0))
    assert (over["spent_w"], over["reserved_w"], over["remaining_w"]) == ("90.0", "10.0", "0.0")
    assert over["full"]
    zero = bar_view("x", Amount(0), Amount(0), Amount(0), Amount(0))
    assert zero["remaining_w"] == "100.0"
    huge = Amount(10**80, 18)
    big = bar_view("y", huge, Amount(10**79, 18), Amount(0, 18), Amount(9 * 10**79, 18))
    assert big["spent_w"] == "10.0"


def test_instants_for_people() -> None:
    now = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)
    assert when(now) == "2026-01-19 10:00 UTC"
    assert when(now + timedelta(seconds=5)) == "2026-01-19 10:00:05 UTC"
    assert moment(now + timedelta(minutes=58), now) == "in 58 min"
    assert moment(now - timedelta(hours=3), now) == "3 h 0 min ago"
    assert moment(now + timedelta(days=3), now) == "in 3 days"
    assert moment(now, now) == "in 0 s"


def test_the_serve_extra_is_named_when_it_is_missing(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['uvicorn'] = None; from agentpolicy import cli; "
            "sys.exit(cli.main(['serve', '--db', sys.argv[1]]))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.db")],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 1
    assert "pip install 'agentpolicy[serve]'" in done.stderr


def test_the_service_socket_is_tcp_so_answers_are_not_held_back() -> None:
    import socket

    from agentpolicy.serve.command import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    try:  # asyncio sets TCP_NODELAY on accepted sockets only when the listener says IPPROTO_TCP
        assert sock.proto == socket.IPPROTO_TCP
        client = socket.create_connection(sock.getsockname())
        accepted, _ = sock.accept()
        assert accepted.proto == socket.IPPROTO_TCP
        client.close()
        accepted.close()
    finally:
        sock.close()
