"""An adversarial probe of the agentpolicy command (not serve, not the MCP server).

Bad input anywhere is one structured line (or a listed problem) and changes
nothing; no traceback or Python message reaches the user; exit codes are the
documented ones; amounts are exact strings in JSON. Most cases run the command
as a real subprocess; the ones only about parsing run ``cli.main`` in process.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentpolicy import cli
from agentpolicy.examples import approval_example_policy

EXE = str(Path(sys.executable).with_name("agentpolicy"))
DAILY = '{"enabled": true, "limits": {"daily": {"value": "100000000", "decimals": 6}}}'


def environment(tmp_path: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_POLICY_", "PYTHONIO"))}
    return {**clean, "AGENT_POLICY_DB": str(tmp_path / "cli.db"), **(env or {})}


def run(
    tmp_path: Path, *args: str, stdin: str | bytes = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    done = subprocess.run(
        [EXE, *args], check=False, input=data, capture_output=True, timeout=60,
        env=environment(tmp_path, env),
    )  # fmt: skip
    out = done.stdout.decode("utf-8", "surrogateescape")
    err = done.stderr.decode("utf-8", "surrogateescape")
    assert "Traceback" not in err, err
    assert "Exception ignored" not in err, err
    return subprocess.CompletedProcess(done.args, done.returncode, out, err)


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """For ``cli.main`` in process: the store is tmp_path/cli.db, whatever the environment."""
    for name in list(os.environ):
        if name.startswith("AGENT_POLICY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AGENT_POLICY_DB", str(tmp_path / "cli.db"))
    return tmp_path


def main(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    return cli.main(list(args), out=out), out.getvalue()


def validate(path: Path) -> list[dict[str, str]]:
    status, out = main("--json", "policy", "validate", str(path))
    problems: list[dict[str, str]] = json.loads(out)["problems"]
    assert status == (0 if not problems else 2)
    return problems


# -- policy files -----------------------------------------------------------------------------


def test_a_key_given_twice_is_refused_with_its_path_and_sets_nothing(tmp_path: Path) -> None:
    """`"limits"` twice was read as the last one: `"limits": {}` quietly dropped the limit."""
    twice = '{"enabled": true, "limits": {"daily": {"value": "100", "decimals": 6}}, "limits": {}}'
    for args in (("policy", "set", "bot", "-"), ("policy", "shadow", "set", "bot", "-"),
                 ("delegate", "bot", "bot/sub", "-")):  # fmt: skip
        done = run(tmp_path, *args, stdin=twice)
        assert (done.returncode, done.stdout, done.stderr) == (2, "", (
            "agentpolicy: INVALID_INPUT: $.limits: is given more than once in the same object: "
            "which one was meant is not clear\n"))  # fmt: skip
    got = run(tmp_path, "policy", "get", "bot")
    assert (got.returncode, got.stderr) == (1, "agentpolicy: NO_POLICY: no policy is set for "
                                               "agent bot\n")  # fmt: skip


def test_every_key_given_twice_is_listed_by_validate(here: Path) -> None:
    file = here / "twice.json"
    file.write_text('{"enabled": true, "enabled": false, "limits": {"daily": {"value": "1", '
                    '"value": "9", "decimals": 6}}, "merchantRules": [{"x-y": 1, "x-y": 2, '
                    '"x-y": 3}]}')  # fmt: skip
    assert [p["path"] for p in validate(file)] == [
        "$.enabled", "$.limits.daily.value", "$.merchantRules[0]['x-y']"]  # fmt: skip


def test_nan_infinity_and_endless_numbers_are_not_json(here: Path) -> None:
    file = here / "p.json"
    for literal in ("NaN", "Infinity", "-Infinity"):
        file.write_text('{"enabled": true, "approvalConfig": {"timeout": ' + literal + "}}")
        assert validate(file) == [
            {"path": "$.file", "message": f"{file} is not JSON: {literal} is not a JSON value"}
        ]
    file.write_text('{"limits": {"daily": {"value": 1' + "0" * 5000 + ', "decimals": 6}}}')
    assert validate(file) == [  # Python's own "use sys.set_int_max_str_digits()" is no help
        {"path": "$.file", "message": f"{file} has a number of more than 100 digits: not a policy"}
    ]
    file.write_text('{"limits": {"daily": {"value": 1' + "0" * 99 + ', "decimals": 6}}}')
    assert validate(file) == [
        {"path": "$.limits.daily.value", "message": "must have at most 96 digits"}
    ]
    file.write_text('{"limits": {"daily": {"value": 100.0, "decimals": 6}}}')
    assert validate(file) == [{"path": "$.limits.daily.value",
                               "message": "must be an integer or a string of digits, not number"}]  # fmt: skip


def test_a_byte_order_mark_is_skipped(here: Path) -> None:
    file = here / "bom.json"
    file.write_bytes(b"\xef\xbb\xbf" + DAILY.encode())
    assert validate(file) == []
    assert main("policy", "set", "bot", str(file)) == (0, "policy of bot is now version 1\n")


def test_what_is_not_a_policy_file_is_one_problem(here: Path) -> None:
    (here / "dir").mkdir()
    (here / "latin1.json").write_bytes(b'{"enabled": true, "x": "\xe9"}')
    (here / "empty.json").write_text("")
    (here / "nul.json").write_bytes(b'{"enabled": true,\x00}')
    (here / "list.json").write_text("[]")
    (here / "deep.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    cases = {
        "dir": "cannot read {f}: Is a directory",
        "latin1.json": "cannot read {f}: not UTF-8 text",
        "empty.json": "{f} is not JSON: Expecting value: line 1 column 1 (char 0)",
        "nul.json": "{f} is not JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 18 (char 17)",
        "missing.json": "cannot read {f}: No such file or directory",
        "deep.json": "{f} is nested too deeply",
    }
    for name, message in cases.items():
        f = here / name
        assert validate(f) == [{"path": "$.file", "message": message.format(f=f)}], name
    assert validate(here / "list.json") == [
        {"path": "$", "message": "a policy must be a JSON object"}
    ]
    if Path("/dev/zero").exists():
        assert validate(Path("/dev/zero")) == [{"path": "$.file", "message":
                                                "/dev/zero is larger than 1048576 bytes (1 MiB): "
                                                "not a policy"}]  # fmt: skip
    assert not (here / "cli.db").exists()  # validate touches no store


# -- what the terminal cannot show -------------------------------------------------------------


def test_a_stdout_that_cannot_encode_the_result_gets_it_escaped_not_internal(
    tmp_path: Path,
) -> None:
    """With an ASCII stdout, `policy set bøt` set the policy, then said INTERNAL and exited 1."""
    ascii_out = {"PYTHONIOENCODING": "ascii:strict"}
    done = run(tmp_path, "policy", "set", "bøt", "-", stdin=DAILY, env=ascii_out)
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "policy of b\\xf8t is now version 1\n", "")  # fmt: skip
    shown = run(tmp_path, "policy", "validate", "nø.json", env=ascii_out)
    assert (shown.returncode, shown.stdout) == (2, (
        "n\\xf8.json: 1 problem(s)\n  $.file: cannot read n\\xf8.json: No such file or directory\n"))  # fmt: skip
    listed = run(tmp_path, "--json", "policy", "list", env=ascii_out)
    assert json.loads(listed.stdout) == {"policies": [{"agentId": "bøt", "enabled": True,
                                                       "version": 1}]}  # fmt: skip


def test_a_file_name_that_is_not_utf8_is_shown_and_refused(tmp_path: Path) -> None:
    name = os.fsdecode(b"x\xff.json")
    strict = {"PYTHONIOENCODING": "utf-8:strict"}
    done = run(tmp_path, "policy", "validate", name, env=strict)
    assert (done.returncode, done.stdout.splitlines()[0]) == (2, "x\\udcff.json: 1 problem(s)")
    agent = run(tmp_path, "policy", "set", os.fsdecode(b"b\xfft"), "-", stdin=DAILY)
    assert (agent.returncode, agent.stderr) == (2, (
        "agentpolicy: INVALID_INPUT: $.agentId: must not contain invisible or control characters "
        "(found U+DCFF)\n"))  # fmt: skip


# -- options --------------------------------------------------------------------------------------


def test_an_empty_store_option_is_refused_not_read_as_absent(tmp_path: Path) -> None:
    """`--postgres-url "$UNSET"` wrote to the SQLite file of the environment (or the state dir)."""
    for flag, path in (("--db", "$.db"), ("--redis-url", "$.redisUrl"),
                       ("--postgres-url", "$.postgresUrl")):  # fmt: skip
        done = run(tmp_path, flag, "", "policy", "set", "bot", "-", stdin=DAILY)
        assert (done.returncode, done.stdout, done.stderr) == (2, "", (
            f"agentpolicy: INVALID_INPUT: {path}: {flag} must not be empty: name the store, or "
            f"leave {flag} out to use the environment's\n"))  # fmt: skip
    assert not (tmp_path / "cli.db").exists()  # the environment's store was not touched
    after = run(tmp_path, "policy", "list", "--db", " ")
    assert after.returncode == 2


def test_integer_options_are_ascii_digits(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """int() read `--limit 1_0` as 10, `--decimals` FULLWIDTH SIX as 6 and ` 3` as 3."""
    for args in (("history", "bot", "--limit", "1_0"), ("history", "bot", "--limit", "٣"),
                 ("history", "bot", "--limit", " 3"), ("policy", "get", "bot", "--version", "+1"),
                 ("policy", "diff", "bot", "1", "\uff12"), ("policy", "rollback", "bot", ""),
                 ("authorize", "bot", "1", "0xv", "eip155:1", "--decimals", "\uff16")):  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            main(*args)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("agentpolicy: argument "), err
        assert "invalid integer value: " in err, err
    status, _ = main("history", "bot", "--limit", "-1")
    assert (status, capsys.readouterr().err) == (
        2, "agentpolicy: INVALID_INPUT: $.limit: must be an integer from 1 to 10000\n")  # fmt: skip


def test_help_that_cannot_be_written_says_so_and_exits_4(tmp_path: Path) -> None:
    """`--help > /dev/full`: Python's "Exception ignored ... OSError" and exit 120 (0 unbuffered)."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    for buffering in ({"PYTHONUNBUFFERED": ""}, {"PYTHONUNBUFFERED": "1"}):
        for args in (("--help",), ("--version",), ("policy", "shadow", "set", "--help")):
            with open("/dev/full", "w") as full:
                done = subprocess.run(
                    [EXE, *args], stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
                    env=environment(tmp_path, buffering), check=False,
                )  # fmt: skip
            assert (done.returncode, done.stderr) == (4, (
                "agentpolicy: its output could not be written: No space left on device\n"))  # fmt: skip
    read, write = os.pipe()
    os.close(read)  # the reader has gone: its choice, said nothing
    try:
        gone = subprocess.run([EXE, "--help"], stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=60, env=environment(tmp_path), check=False)  # fmt: skip
    finally:
        os.close(write)
    assert (gone.returncode, gone.stderr) == (0, "")


@pytest.mark.parametrize(
    "command",
    [
        (),
        ("policy",),
        ("policy", "set"),
        ("policy", "shadow", "promote"),
        ("authorize",),
        ("approvals", "approve"),
        ("approver", "keygen"),
        ("token", "create"),
        ("webhooks", "list"),
        ("where",),
        ("demo",),
    ],
)
def test_help_of_a_command_runs(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main([*command, "--help"])
    assert stop.value.code == 0
    shown = capsys.readouterr()
    assert shown.out.startswith("usage: agentpolicy")
    assert shown.err == ""
    if "--limit" in shown.out:
        assert "1 to 10000 (default " in shown.out


# -- Ctrl-C ------------------------------------------------------------------------------------


def test_ctrl_c_while_delivering_webhooks_keeps_the_status_of_the_command(
    tmp_path: Path,
) -> None:
    """It exited 130, "interrupted", when the approval was already asked for and 500 held."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(approval_example_policy()))
    with socket.socket() as receiver:  # accepts connections, never answers
        receiver.bind(("127.0.0.1", 0))
        receiver.listen()
        receiver.settimeout(30)
        hooks = {"AGENT_POLICY_WEBHOOK_URL": f"http://127.0.0.1:{receiver.getsockname()[1]}/h",
                 "AGENT_POLICY_WEBHOOK_SECRET": "s3cret", "AGENT_POLICY_WEBHOOK_TIMEOUT": "1s"}  # fmt: skip
        assert run(tmp_path, "policy", "set", "bot", str(policy), env=hooks).returncode == 0
        child = subprocess.Popen(
            [EXE, "authorize", "bot", "500 USDT", "0xv", "eip155:1", "--webhook-wait", "60s"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=environment(tmp_path, hooks),
        )  # fmt: skip
        try:
            assert child.stdout is not None
            line = child.stdout.readline()  # the command is carried out and said so
            connection, _ = receiver.accept()  # it is delivering the webhook now
            connection.close()
            child.send_signal(signal.SIGINT)
            _, err = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
    assert line.startswith("APPROVAL_REQUIRED  approval apr_")
    assert child.returncode == 3, err  # not allowed (waiting for approval), as without webhooks
    # the webhook may be sent by the engine's own thread as the result is printed: the Ctrl-C
    # lands in the wait for it, or (rarely) just before, where it is said as after any command
    assert err in (
        "agentpolicy: interrupted while delivering webhooks; the command was carried out, and the "
        "next agentpolicy command or MCP server on this storage with the same endpoints delivers "
        "what is pending (agentpolicy webhooks list --status pending)\n",
        f"agentpolicy: interrupted after the command was carried out ({line.rstrip()})\n",
    ), err
    budget = json.loads(run(tmp_path, "--json", "budget", "bot").stdout)
    assert budget["periods"]["daily"]["reserved"] == "500000000"


# -- what held: storage, secrets, exact amounts --------------------------------------------------


def test_stores_that_cannot_be_used_are_one_line_without_their_password(tmp_path: Path) -> None:
    (tmp_path / "notdb.db").write_bytes(b"this is not an SQLite database" * 10)
    (tmp_path / "dir.db").mkdir()
    cases: list[tuple[tuple[str, ...], int, str]] = [
        (("--db", str(tmp_path / "notdb.db")), 1, "file is not a database"),
        (("--db", str(tmp_path / "dir.db")), 1, "unable to open database file"),
        (("--postgres-url", "postgresql://u:s3cretpw@127.0.0.1:1/test?password=s3cretpw"), 1,
         "PostgreSQL at postgresql://u:***@127.0.0.1:1/test?password=*** is unavailable"),
        (("--postgres-url", "postgresql://u:s3cretpw@[::1/test"), 2, "INVALID_INPUT"),
        (("--redis-url", "redis://u:s3cretpw@127.0.0.1:1/0"), 1, "STORAGE_UNAVAILABLE"),
        (("--redis-url", "redis://u:s3cretpw@127.0.0.1:notaport/0"), 2, "INVALID_INPUT"),
    ]  # fmt: skip
    for store, status, said in cases:
        done = run(tmp_path, *store, "policy", "set", "bot", "-", stdin=DAILY)
        assert done.returncode == status, (store, done.stderr)
        assert said in done.stderr, (store, done.stderr)
        assert "s3cretpw" not in done.stderr
        assert len(done.stderr.splitlines()) == 1, done.stderr
    assert (tmp_path / "notdb.db").read_bytes() == b"this is not an SQLite database" * 10


def test_json_amounts_are_exact_strings(here: Path) -> None:
    eth = {"value": "10000000000000000000000000000001", "decimals": 18, "symbol": "ETH"}
    policy = here / "eth.json"
    policy.write_text(json.dumps({"enabled": True, "limits": {"daily": eth}}))
    assert main("policy", "set", "bot", str(policy))[0] == 0
    status, out = main(
        "--json", "authorize", "bot", "123.456789012345678901 ETH", "0xv", "eip155:1"
    )
    assert status == 0
    status, human = main("budget", "bot")
    assert (
        "spent 0 + reserved 123.456789012345678901 of 10000000000000.000000000000000001 ETH; "
        "9999999999876.5432109876543211 left" in human
    ), human
    for args in (("budget", "bot"), ("history", "bot"), ("policy", "get", "bot"),
                 ("authorize", "bot", "1", "0xv", "eip155:1", "--dry-run", "--symbol", "ETH",
                  "--decimals", "18")):  # fmt: skip
        status, out = main("--json", *args)
        floats: list[str] = []
        json.loads(out, parse_float=floats.append)
        assert floats == [], (args, floats)
    budget: dict[str, Any] = json.loads(main("--json", "budget", "bot")[1])
    assert budget["periods"]["daily"]["reserved"] == "123456789012345678901"
    assert budget["periods"]["daily"]["remaining"] == "9999999999876543210987654321100"


# -- empty options, ~user, output lost ------------------------------------------------------------


def test_an_empty_as_or_key_is_refused_not_the_configured_approver(tmp_path: Path) -> None:
    """`--as "$UNSET"` voted as $AGENT_POLICY_APPROVER; `--key ""` said ". is not a regular file"."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(approval_example_policy()))
    run(tmp_path, "policy", "set", "bot", str(policy))
    asked = run(tmp_path, "--json", "authorize", "bot", "500 USDT", "0xv", "eip155:1")
    approval = json.loads(asked.stdout)["approvalId"]
    me = {"AGENT_POLICY_APPROVER": "admin@company.com"}
    for flags, said in (
        (("--as", ""), "$.approver: --as must not be empty"),
        (("--as", "admin@company.com", "--key", ""), "$.key: --key must not be empty"),
    ):
        done = run(tmp_path, "approvals", "deny", approval, *flags, env=me)
        assert (done.returncode, done.stdout, done.stderr) == (
            2, "", f"agentpolicy: INVALID_INPUT: {said}\n")  # fmt: skip
    shown = json.loads(run(tmp_path, "--json", "approvals", "show", approval).stdout)
    assert (shown["status"], shown["decisions"]) == ("pending", [])


def test_other_empty_values_are_refused(tmp_path: Path) -> None:
    """`--webhook-wait ""` was the default 10s; `approver keygen ""` said ". exists"."""
    wait = run(tmp_path, "--webhook-wait", "", "sweep")
    assert (wait.returncode, wait.stdout) == (2, "")
    assert wait.stderr.startswith("agentpolicy: INVALID_INPUT: $.webhookWait: must be a positive ")
    keygen = run(tmp_path, "approver", "keygen", "")
    assert (keygen.returncode, keygen.stderr) == (
        2, "agentpolicy: INVALID_INPUT: $.file: must not be empty: name the key file\n")  # fmt: skip


def test_a_db_under_the_home_of_an_unknown_user_is_invalid_input(tmp_path: Path) -> None:
    """`~nouser/x.db` was INTERNAL: RuntimeError: Could not determine home directory."""
    unknown = "~agentpolicy-no-such-user/x.db"
    for args, env, path in ((("--db", unknown), {}, "$.db"),
                            ((), {"AGENT_POLICY_DB": unknown}, "$AGENT_POLICY_DB")):  # fmt: skip
        for command in (("where",), ("policy", "list")):
            done = run(tmp_path, *args, *command, env=env)
            assert (done.returncode, done.stderr) == (2, (
                f"agentpolicy: INVALID_INPUT: {path}: {unknown}: the home folder of "
                "agentpolicy-no-such-user is not known\n"))  # fmt: skip


def test_output_lost_keeps_the_status_of_a_payment_not_allowed(tmp_path: Path) -> None:
    """A denied payment whose output could not be written exited 4, "carried out", like an allowed one."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    run(tmp_path, "policy", "set", "bot", "-", stdin=DAILY)
    bad = tmp_path / "bad.json"
    bad.write_text('{"enabled": "yes"}')
    for args, status in ((("authorize", "bot", "100000001", "0xv", "eip155:1"), 3),
                         (("policy", "validate", str(bad)), 2),
                         (("authorize", "bot", "1", "0xv", "eip155:1"), 4)):  # fmt: skip
        with open("/dev/full", "w") as full:
            done = subprocess.run(
                [EXE, *args], stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
                env=environment(tmp_path), check=False,
            )  # fmt: skip
        assert done.returncode == status, done.stderr
        assert done.stderr.startswith("agentpolicy: the command was carried out (")
        assert done.stderr.endswith(
            "but its output could not be written: No space left on device\n"
        )


def test_a_redis_password_with_a_slash_is_not_shown_in_the_error(tmp_path: Path) -> None:
    """redis://:S3CRET/pw@host said "Port could not be cast to integer value as 'S3CRET'"."""
    said = ("the user name or password of the Redis URL holds a /, ? or #, which ends it early: "
            "write them as %2F, %3F, %23 (the URL is not shown: it holds a password)\n")  # fmt: skip
    for url in ("redis://:S3CRET/pw@127.0.0.1:1/0", "rediss+cluster://u:S3CRET#x@127.0.0.1:1"):
        flag = run(tmp_path, "--redis-url", url, "policy", "list")
        assert (flag.returncode, flag.stderr) == (
            2,
            f"agentpolicy: INVALID_INPUT: $.redisUrl: {said}",
        )
        env = run(tmp_path, "policy", "list", env={"AGENT_POLICY_REDIS_URL": url})
        assert (env.returncode, env.stderr) == (
            2, f"agentpolicy: INVALID_INPUT: $AGENT_POLICY_REDIS_URL: {said}")  # fmt: skip
    port = run(tmp_path, "--redis-url", "redis://u:S3CRET@127.0.0.1:abc/0", "policy", "list")
    assert port.stderr == (  # a bad port alone: said by the store, quoting none of the URL
        "agentpolicy: INVALID_INPUT: $.storage: not a valid Redis URL: Port could not be cast "
        "to a number (a / ? or # in a password is written %2F %3F %23)\n")  # fmt: skip


def test_simulate_puts_a_count_limit_beside_the_payments_not_the_amount(here: Path) -> None:
    """`0.5 -> 0.5 ETH of 1 payments`: the amount read as capped at "1 payments"."""
    policy = here / "counts.json"
    policy.write_text(json.dumps({"enabled": True, "limits": {
        "daily": {"value": "1000000000", "decimals": 6, "symbol": "USDT"},
        "counts": [{"window": "hourly", "max": 3}]}}))  # fmt: skip
    assert main("policy", "set", "bot", str(policy))[0] == 0
    assert main("authorize", "bot", "2.5 USDT", "0xv", "eip155:1")[0] == 0
    status, shown = main("policy", "simulate", "bot", str(policy))
    lines = [line.split("Z  ", 1)[1] for line in shown.splitlines() if "payments)" in line]
    assert (status, sorted(lines)) == (0, [
        "2.5 -> 2.5 USDT  (1 -> 1 of 3 payments)", "2.5 -> 2.5 USDT of 1000 USDT  (1 -> 1 payments)"])  # fmt: skip


def test_demo_with_json_prints_json(here: Path) -> None:
    """`demo --json` printed the walk-through as text: not JSON."""
    status, out = main("--json", "demo")
    shown = json.loads(out)
    assert (status, shown["kept"]) == (0, None)
    assert shown["lines"][0].startswith("agentpolicy demo: an approval, from request to payment")
    assert any(line.startswith("   ALLOWED  reservation res_") for line in shown["lines"])


# -- Ctrl-C at the edges of a command -----------------------------------------------------------

_INTERRUPT_IMPORT = """
import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "agentpolicy.examples":  # one of the modules the command starts with
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
sys.argv[0] = sys.argv[1]
from agentpolicy.cli import main
"""


@pytest.mark.parametrize("program", ["/usr/local/bin/agentpolicy", "a-program-importing-it"])
def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path: Path, program: str) -> None:
    """A Ctrl-C while the command imported its modules was a KeyboardInterrupt traceback."""
    done = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_IMPORT, program], capture_output=True, text=True,
        timeout=60, env=environment(tmp_path), check=False,
    )  # fmt: skip
    if program.endswith("agentpolicy"):
        assert (done.returncode, done.stderr) == (130, "agentpolicy: interrupted\n")
    else:  # a program that imports the module gets its KeyboardInterrupt, as from any import
        assert done.stderr.rstrip().endswith("KeyboardInterrupt")


def test_ctrl_c_as_the_store_commits_does_not_say_nothing_was_done(
    here: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C as SQLite's COMMIT returned, before the answer: plain `interrupted` and 130, and
    the policy was set (an authorize: the amount held). A retry made another version."""
    from agentpolicy.engine import PolicyEngine

    real = PolicyEngine.set_policy

    def committed(self: PolicyEngine, *args: Any, **kwargs: Any) -> int:
        real(self, *args, **kwargs)
        raise KeyboardInterrupt  # the change is in the store; its answer never came back

    (here / "p.json").write_text(DAILY)
    with monkeypatch.context() as patched:
        patched.setattr(PolicyEngine, "set_policy", committed)
        assert main("policy", "set", "bot", str(here / "p.json")) == (130, "")
    assert capsys.readouterr().err == (
        "agentpolicy: interrupted while the command was at the store: a change it makes may "
        "have been made (look before running it again)\n")  # fmt: skip
    assert main("policy", "list") == (0, "bot  v1  enabled\n")


def test_ctrl_c_after_the_command_was_carried_out_says_so(
    here: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said `interrupted` alone and exited 130, as if nothing had been done."""
    from agentpolicy.engine import PolicyEngine

    def interrupted(self: PolicyEngine, *exc: object) -> None:
        self.close()
        raise KeyboardInterrupt  # Ctrl-C as the store is closed, after the policy was set

    (here / "p.json").write_text(DAILY)
    with monkeypatch.context() as patched:
        patched.setattr(PolicyEngine, "__exit__", interrupted)
        assert main("policy", "set", "bot", str(here / "p.json")) == (  # too late to stop
            0, "policy of bot is now version 1\n")  # fmt: skip
    assert capsys.readouterr().err == (
        "agentpolicy: interrupted after the command was carried out (policy of bot is now "
        "version 1)\n")  # fmt: skip
    assert main("policy", "list") == (0, "bot  v1  enabled\n")


def test_the_command_ignores_ctrl_c_once_it_is_done(tmp_path: Path) -> None:
    """A Ctrl-C as the finished command exited killed it by signal (status -2, 130 in a shell)."""
    script = ("import signal, sys; sys.argv[0] = 'agentpolicy'; from agentpolicy.cli import main; "
              "status = main(['where']); "
              "print(status, signal.getsignal(signal.SIGINT) is signal.SIG_IGN)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env=environment(tmp_path), check=False)  # fmt: skip
    assert done.stdout.splitlines()[-1] == "0 True", done.stderr


def test_python_m_agentpolicy_with_a_command_carries_it_out(tmp_path: Path) -> None:
    """``python -m agentpolicy policy set ...`` printed the sample payments and set nothing."""
    policy = tmp_path / "p.json"
    policy.write_text(DAILY)
    as_module = [sys.executable, "-m", "agentpolicy"]
    done = subprocess.run([*as_module, "policy", "set", "bot", str(policy)], check=False,
                          capture_output=True, text=True, env=environment(tmp_path), timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "sample payments" not in done.stdout
    listed = run(tmp_path, "--json", "policy", "list")
    assert [p["agentId"] for p in json.loads(listed.stdout)["policies"]] == ["bot"]
    bad = subprocess.run([*as_module, "policy", "set"], check=False, capture_output=True,
                         text=True, env=environment(tmp_path), timeout=60)  # fmt: skip
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    samples = subprocess.run(as_module, check=True, capture_output=True, text=True,
                             env=environment(tmp_path), timeout=60)  # fmt: skip
    assert samples.stdout.startswith("agentpolicy: the example policy against sample payments")


def test_options_are_never_abbreviated(here: Path) -> None:
    """'--forc' was taken for '--force', '--dry' for '--dry-run': a guess at what was meant."""
    policy = here / "p.json"
    policy.write_text(DAILY)
    assert main("policy", "set", "bot", str(policy))[0] == 0
    assert main("policy", "shadow", "set", "bot", str(policy))[0] == 0
    with pytest.raises(SystemExit) as done:
        main("policy", "shadow", "promote", "bot", "--forc")
    assert done.value.code == 2
    with pytest.raises(SystemExit) as done:
        main("authorize", "bot", "1", "0xabc", "eip155:1", "--dry")
    assert done.value.code == 2
    assert main("--json", "policy", "shadow", "promote", "bot", "--force")[0] == 0
