"""``agentpolicy``: the command line for people who write policies and approve payments.

Human-readable output by default, ``--json`` for scripts. Errors print one
line on stderr and exit non-zero (2 for bad input, 1 otherwise); never a
traceback (``-v`` shows the traceback of an internal error). ``authorize``
exits 0 when the payment is allowed and 3 when it is not (denied, or
waiting for approval). A command carried out whose output could not be
written says so and exits 4 (a closed pipe: its own status, silently);
Ctrl-C exits 130. Control characters of stored data and input are shown
escaped. The storage and webhook endpoints come from the
same settings as the MCP server's (:func:`agentpolicy.config.build_engine`);
webhooks a command causes are delivered before it exits.
"""

from __future__ import annotations

import os
import sys

try:  # the command's modules, most of its start-up: Ctrl-C there is said as anywhere else
    import argparse
    import contextlib
    import errno
    import functools
    import io
    import json
    import logging
    import re
    import shutil
    import signal
    import stat
    import tempfile
    import time
    import traceback
    import urllib.parse
    from collections.abc import Callable, Iterator, Sequence
    from datetime import timedelta
    from pathlib import Path
    from typing import TYPE_CHECKING, Any, NoReturn, TextIO, cast

    from agentpolicy import __version__
    from agentpolicy import _json as bounded_json
    from agentpolicy import cli_output as show
    from agentpolicy._checks import check_identifier, person, raise_if
    from agentpolicy.amounts import DEFAULT_DECIMALS, DEFAULT_SYMBOL, parse_units
    from agentpolicy.codec import dump_policy, load_policy, parse_instant
    from agentpolicy.config import Settings, build_engine, read_settings, with_overrides
    from agentpolicy.durations import parse_duration, parse_since
    from agentpolicy.engine import PolicyEngine
    from agentpolicy.errors import (
        ErrorCode,
        NotFoundError,
        PolicyError,
        PolicyValidationError,
        Problem,
        StorageUnavailableError,
    )
    from agentpolicy.examples import approval_example_policy
    from agentpolicy.requests import PaymentRequest
    from agentpolicy.signing import SigningKey
    from agentpolicy.views import (
        approval_data,
        approver_data,
        budget_data,
        change_data,
        decision_data,
        delegation_data,
        history_data,
        reservation_data,
        shadow_data,
        shadow_report_data,
        simulation_data,
        version_data,
    )
    from agentpolicy.windows import Period
except KeyboardInterrupt:  # (only in the agentpolicy command: a program importing this decides)
    _PROGRAM = os.path.basename((getattr(sys, "argv", None) or [""])[0])
    if os.path.splitext(_PROGRAM)[0] != "agentpolicy":
        raise
    try:  # noqa: SIM105 - contextlib may not be imported yet
        sys.stderr.write("agentpolicy: interrupted\n")
    except (OSError, ValueError, AttributeError):  # stderr closed
        pass
    raise SystemExit(130) from None

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

__all__ = ["main", "silence_stdout"]

EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_ALLOWED = 3
EXIT_OUTPUT_LOST = 4  # carried out, but its output could not be written
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report it
MAX_POLICY_BYTES = 1 << 20  # a policy file (or stdin) larger than this is refused
MAX_KEY_BYTES = 64 << 10  # a private key file larger than this is refused
MAX_LIMIT = 10_000
MAX_NUMBER_DIGITS = 100  # a policy's amounts have at most 96 digits; a longer number is refused
_ALL = 10_000  # deliveries looked at when finding the ones a command caused
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a key shown as .key in a path, else ['key']
MCP_EXTRA = "pip install 'agentpolicy[mcp]'"
SERVE_EXTRA = "pip install 'agentpolicy[serve]'"


def _say(message: str) -> None:
    """One line on stderr, ``agentpolicy: message``, with every control character escaped."""
    if sys.stderr is not None:  # closed (2>&-): nowhere to say it
        with contextlib.suppress(OSError):
            sys.stderr.write(f"agentpolicy: {show.escape(message)}\n")
            sys.stderr.flush()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # an option is given whole: '--f' is never taken for '--force', nor '--dry' for
        # '--dry-run' (a command that acts, on a guess at what was meant)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        _say(f"{message} (see --help)")
        raise SystemExit(EXIT_BAD_INPUT)

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        """--help and --version: written at once; one that cannot be written says so, exits 4."""
        stream = file or sys.stderr
        if not message or stream is None:
            return
        try:
            stream.write(message)
            flush = getattr(stream, "flush", None)
            if flush is not None:  # now, not at exit: there Python says why itself, exits 120
                flush()
        except BrokenPipeError:  # the reader went away (| head): its choice
            silence_stdout()
        except OSError as exc:
            silence_stdout()
            _say(f"its output could not be written: {exc.strerror or exc}")
            raise SystemExit(EXIT_OUTPUT_LOST) from None


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--db, --redis-url, --postgres-url, --json, -v: accepted before and after the subcommand."""
    keep: dict[str, Any] = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument(
        "--db", help="SQLite file (default: $AGENT_POLICY_DB, else the state dir)", **keep
    )
    parser.add_argument("--redis-url", help="Redis URL (default: $AGENT_POLICY_REDIS_URL)", **keep)
    parser.add_argument(
        "--postgres-url",
        metavar="URL",
        help="PostgreSQL URL, postgresql://user@host:5432/db?schema=NAME "
        "(default: $AGENT_POLICY_POSTGRES_URL); wins over --redis-url and --db",
        **keep,
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts", **keep)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the traceback of an internal error",
        **keep,
    )  # fmt: skip
    parser.add_argument(
        "--webhook-wait",
        metavar="DURATION",
        help="how long to wait for the webhooks a command causes (default 10s)",
        **keep,
    )


class _Commands:
    """Adds leaf commands that also accept the global options."""

    def __init__(self, sub: Any) -> None:
        self.sub = sub

    def add(self, name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self.sub.add_parser(name, help=help)
        _global_options(parser, defaults=False)
        return parser

    def group(self, name: str, help: str, dest: str = "action") -> _Commands:
        parser = self.sub.add_parser(name, help=help)
        return _Commands(parser.add_subparsers(dest=dest, required=True, parser_class=_Parser))


def integer(text: str) -> int:
    """An integer option: ASCII digits, perhaps after a '-' (not int()'s ' 5', '1_0', '+5')."""
    digits = text.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(text)
    return int(text)


def _limit(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument(
        "--limit",
        type=integer,
        default=default,
        help=f"how many, 1 to {MAX_LIMIT} (default {default})",
    )


def _add_policy_commands(commands: _Commands) -> None:
    policy = commands.group(
        "policy",
        "set, show, list, validate policies; versions, diff, rollback, shadow, simulate",
    )
    ps = policy.add("set", "set an agent's policy from a JSON file ('-' for stdin)")
    ps.add_argument("agent")
    ps.add_argument("file")
    pg = policy.add("get", "show an agent's policy")
    pg.add_argument("agent")
    pg.add_argument("--version", type=integer, help="an earlier version (default: the live one)")
    pl = policy.add("list", "list agents with a policy")
    pl.add_argument("--org", help="only agents whose id starts with ORG:")
    pv = policy.add("validate", "check a policy file; print every problem (touches no store)")
    pv.add_argument("file")
    policy.add("schema", "print the JSON Schema of a policy file")
    _add_rollout_commands(policy)


def _add_rollout_commands(policy: _Commands) -> None:
    pvs = policy.add("versions", "an agent's policy versions, newest first, with what changed")
    pvs.add_argument("agent")
    _limit(pvs, 20)
    pd = policy.add("diff", "what differs between two versions of an agent's policy")
    pd.add_argument("agent")
    pd.add_argument("before", type=integer, metavar="A", help="the earlier version")
    pd.add_argument("after", type=integer, metavar="B", help="the later version")
    pr = policy.add("rollback", "make version N live again, as a new version")
    pr.add_argument("agent")
    pr.add_argument("version", type=integer, metavar="N")
    shadow = policy.group("shadow", "judge payments by a candidate policy beside the live one",
                          dest="shadow_action")  # fmt: skip
    ss = shadow.add("set", "set (or replace) an agent's shadow policy from a JSON file")
    ss.add_argument("agent")
    ss.add_argument("file")
    sr = shadow.add("report", "what the shadow would have decided since it was set")
    sr.add_argument("agent")
    _limit(sr, 20)
    sp = shadow.add("promote", "make the shadow the live policy (a new version)")
    sp.add_argument("agent")
    sp.add_argument(
        "--force", action="store_true", help="promote even when another version went live "
        "after the shadow was set (it would undo that version)",
    )  # fmt: skip
    sp.add_argument(
        "--set-at", metavar="INSTANT", help="promote only the shadow set at this instant (its "
        "setAt, as report shows it): one set since is refused",
    )  # fmt: skip
    shadow.add("clear", "remove the shadow; print its last report").add_argument("agent")
    sim = policy.add("simulate", "replay recorded payments against a candidate policy file")
    sim.add_argument("agent")
    sim.add_argument("file")
    sim.add_argument(
        "--since", default="30d", help="a duration back from now (30d, 12h) or an ISO 8601 "
        "instant (default 30d)",
    )  # fmt: skip


def _add_payment_commands(commands: _Commands) -> None:
    a = commands.add("authorize", "decide a payment and reserve its amount")
    a.add_argument("agent")
    a.add_argument(
        "amount",
        help="base units (500250000), human units with --units (500.25), or human units "
        "with the token ('500.25 USDT', decimals from the agent's policy)",
    )
    a.add_argument("recipient")
    a.add_argument("network", help="CAIP-2 chain id, e.g. eip155:8453")
    a.add_argument("--units", action="store_true", help="AMOUNT is in human units (500.25)")
    a.add_argument("--category")
    a.add_argument(
        "--decimals", type=integer, help=f"the token's decimals (default {DEFAULT_DECIMALS})"
    )
    a.add_argument("--symbol", help=f"the token's symbol (default {DEFAULT_SYMBOL})")
    a.add_argument("--memo")
    a.add_argument("--idempotency-key")
    a.add_argument(
        "--dry-run", action="store_true",
        help="decide as authorize would, reserving and recording nothing; show the headroom "
        "left in every limit",
    )  # fmt: skip
    a.add_argument(
        "--requested-by", metavar="NAME",
        help="who asks for the payment on the agent's behalf (may not vote on it)",
    )  # fmt: skip
    for name, text in (("confirm", "confirm a reservation"), ("release", "release one")):
        c = commands.add(name, text)
        c.add_argument("reservation")
        c.add_argument(
            "--holder",
            help="the claim a payment block holds on it (p.holder, UnconfirmedPayment.holder): "
            "a claimed reservation is settled only with it",
        )
    b = commands.add("budget", "spent, reserved and remaining per window")
    b.add_argument("agent")
    b.add_argument("--period", choices=[p.value for p in Period])


def _add_tree_commands(commands: _Commands) -> None:
    d = commands.add("delegate", "give a sub-agent a budget carved from a parent's, for a while")
    d.add_argument("parent")
    d.add_argument("child")
    d.add_argument("file", help="the sub-agent's policy, a JSON file ('-' for stdin)")
    ends = d.add_mutually_exclusive_group()
    ends.add_argument("--expires-in", metavar="DURATION", help="how long it lasts: 30m, 1h, 7d")
    ends.add_argument("--expires-at", metavar="INSTANT", help="when it ends (ISO 8601, offset)")
    r = commands.add("revoke", "revoke a delegated budget (and every budget below it)")
    r.add_argument("child")
    r.add_argument("--by", metavar="PARENT", help="revoke as this budget (must be above it)")


def _add_review_commands(commands: _Commands) -> None:
    approvals = commands.group("approvals", "list, show, approve and deny approvals")
    al = approvals.add("list", "pending approvals")
    al.add_argument("--agent")
    ash = approvals.add("show", "one approval")
    ash.add_argument("approval")
    for verb in ("approve", "deny"):
        v = approvals.add(verb, f"{verb} as a named approver")
        v.add_argument("approval")
        v.add_argument(
            "--as", dest="approver", help="the approver's name (default: $AGENT_POLICY_APPROVER)"
        )
        v.add_argument(
            "--key", metavar="FILE",
            help="sign the vote with this private key file (default: "
            "$AGENT_POLICY_APPROVER_KEY_FILE when voting as $AGENT_POLICY_APPROVER)",
        )  # fmt: skip
        v.add_argument("--comment")
    h = commands.add("history", "an agent's decisions and state changes")
    h.add_argument("agent")
    _limit(h, 50)
    h.add_argument("--version", type=integer, help="only records of this policy version")
    webhooks = commands.group("webhooks", "webhook deliveries in the outbox")
    whl = webhooks.add("list", "deliveries, newest first")
    whl.add_argument("--status", choices=["pending", "delivered", "failed"])
    _limit(whl, 50)


def _add_approver_commands(commands: _Commands) -> None:
    approver = commands.group("approver", "approvers' keys: keygen, register, rotate, remove, list")
    k = approver.add("keygen", "write a new private key file (0600); print its public key")
    k.add_argument("file", help="where to write the key (never overwritten)")
    for name, text in (
        ("register", "register an approver's public key"),
        ("rotate", "give an approver a new public key; the old one stops now"),
    ):
        r = approver.add(name, text)
        r.add_argument("name")
        r.add_argument("public_key", metavar="PUBLIC_KEY", help="ed25519:... as keygen prints")
    rm = approver.add("remove", "retire an approver's key (kept in the list, for the audit)")
    rm.add_argument("name")
    approver.add("list", "registered approvers with every key version")


def _add_serve_commands(commands: _Commands) -> None:
    sv = commands.add("serve", "serve MCP over HTTP, the approvals and budget pages, metrics")
    sv.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default "
        "127.0.0.1; another than loopback needs TLS, see docs/serve.md)",
    )
    sv.add_argument("--port", type=integer, default=8402, help="port (default 8402; 0: any free)")
    sv.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    sv.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    sv.add_argument(
        "--behind-tls-proxy",
        action="store_true",
        help="a TLS-terminating proxy is in front: cookies are Secure, "
        "X-Forwarded-* is trusted from --forwarded-allow-ips",
    )
    sv.add_argument(
        "--forwarded-allow-ips",
        default="127.0.0.1",
        metavar="IPS",
        help="the proxies whose X-Forwarded-* headers count (default 127.0.0.1)",
    )
    sv.add_argument(
        "--insecure-bind",
        action="store_true",
        help="serve plain HTTP on a non-loopback address anyway",
    )
    sv.add_argument(
        "--session-ttl",
        default="12h",
        metavar="DURATION",
        help="how long a browser sign-in lasts (default 12h)",
    )
    token = commands.group("token", "access tokens of agentpolicy serve: create, list, revoke")
    tc = token.add("create", "make a token; it is printed once (the store keeps its hash)")
    tc.add_argument("--role", required=True, choices=["agent", "admin", "approver", "metrics"])
    tc.add_argument("--agent", help="the one agent an agent token acts for")
    tc.add_argument("--org", help="bind to agent ids starting with ORG:")
    tc.add_argument(
        "--approver", metavar="NAME", help="the approver an approver (or admin) token votes as"
    )
    tc.add_argument("--label", help="a note for token list (who holds it, what for)")
    ends = tc.add_mutually_exclusive_group()
    ends.add_argument("--expires-in", metavar="DURATION", help="it stops working after: 30d, 12h")
    ends.add_argument("--expires-at", metavar="INSTANT", help="it stops working at (ISO 8601)")
    tl = token.add("list", "tokens (never the tokens themselves): id, role, binding, expiry")
    tl.add_argument("--all", action="store_true", help="also revoked and expired tokens")
    tr = token.add("revoke", "revoke a token now (and its browser sessions)")
    tr.add_argument("token_id", metavar="ID", help="the id token list shows")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="agentpolicy", description=(__doc__ or "").split("\n")[0].replace("``", ""))
    p.add_argument("--version", action="version", version=f"agentpolicy {__version__}")
    _global_options(p, defaults=True)
    commands = _Commands(p.add_subparsers(dest="command", required=True, parser_class=_Parser))
    _add_policy_commands(commands)
    _add_payment_commands(commands)
    _add_tree_commands(commands)
    _add_review_commands(commands)
    _add_approver_commands(commands)
    commands.add("sweep", "expire due reservations and approvals now")
    commands.add("where", "which storage and SQLite file are in use (touches no store)")
    s = commands.add("serve-mcp", "serve the MCP tools over stdio")
    s.add_argument("--role", choices=["agent", "admin"], help="default: $AGENT_POLICY_ROLE")
    s.add_argument("--agent-id", help="bind to one agent")
    s.add_argument("--org-id", help="bind to agent ids starting with ORG:")
    _add_serve_commands(commands)
    d = commands.add("demo", "walk through an approval on a temporary database")
    d.add_argument("--keep", action="store_true", help="keep the temporary database")
    return p


# -- commands that touch no store -------------------------------------------------------------


def _read_bytes(file: str, limit: int) -> bytes:
    """At most ``limit`` + 1 bytes of ``file`` (``-``: stdin)."""
    if file != "-":
        with open(file, "rb") as f:
            return f.read(limit + 1)
    if sys.stdin is None:  # closed (<&-)
        raise OSError(errno.EBADF, "stdin is closed")
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream put in its place (tests, embedding)
        return sys.stdin.read(limit + 1).encode()
    data: bytes = stream.read(limit + 1)
    return data


class _Repeated(dict[str, Any]):
    """A JSON object that named a key more than once (``repeated``: those keys)."""

    repeated: tuple[str, ...] = ()


class _LongNumberError(ValueError):
    """A JSON number of more digits than any policy value has."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; one that names a key twice is marked, never silently the last one."""
    found: dict[str, Any] = {}
    repeated = []
    for key, value in pairs:
        if key in found and key not in repeated:
            repeated.append(key)
        found[key] = value
    if not repeated:
        return found
    marked = _Repeated(found)
    marked.repeated = tuple(repeated)
    return marked


def _number(text: str) -> int:
    if len(text) > MAX_NUMBER_DIGITS:
        raise _LongNumberError(text)
    return int(text)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


_TWICE = "is given more than once in the same object: which one was meant is not clear"


def _repeated_keys(document: Any) -> list[Problem]:
    """Every key an object of ``document`` names twice, with its path (``$.limits.daily``)."""

    def member(path: str, key: str) -> str:
        return f"{path}.{key}" if _KEY.fullmatch(key) else f"{path}[{key!r}]"

    problems: list[Problem] = []
    stack: list[tuple[str, Any]] = [("$", document)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            twice = getattr(value, "repeated", ())
            problems += (Problem(member(path, key), _TWICE) for key in twice)
            stack.extend((member(path, k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
    return sorted(problems, key=lambda p: p.path)


def _read_policy(file: str) -> Any:
    try:
        data = _read_bytes(file, MAX_POLICY_BYTES)
        if len(data) > MAX_POLICY_BYTES:
            raise PolicyValidationError.single(
                "$.file",
                f"{'stdin' if file == '-' else file} is larger than "
                f"{MAX_POLICY_BYTES} bytes (1 MiB): not a policy",
            )
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror or str(exc) if isinstance(exc, OSError) else "not UTF-8 text"
        raise PolicyValidationError.single("$.file", f"cannot read {file}: {reason}") from None
    text = text.removeprefix("\ufeff")  # a byte order mark (Notepad): RFC 8259 lets readers skip it
    try:
        document = bounded_json.loads(
            text, object_pairs_hook=_object, parse_int=_number, parse_constant=_not_json
        )
    except (bounded_json.TooDeepError, RecursionError):
        raise PolicyValidationError.single("$.file", f"{file} is nested too deeply") from None
    except _LongNumberError:
        raise PolicyValidationError.single(
            "$.file", f"{file} has a number of more than {MAX_NUMBER_DIGITS} digits: not a policy"
        ) from None
    except ValueError as exc:
        raise PolicyValidationError.single("$.file", f"{file} is not JSON: {exc}") from None
    problems = _repeated_keys(document)
    if problems:
        raise PolicyValidationError(problems)
    return document


def _validate(file: str) -> dict[str, Any]:
    problems: list[Problem] = []
    try:
        document = _read_policy(file)
        if not isinstance(document, dict):
            raise PolicyValidationError.single("$", "a policy must be a JSON object")
        load_policy(document)
    except PolicyValidationError as err:
        problems = list(err.problems)
    return {
        "file": file,
        "valid": not problems,
        "problems": [{"path": p.path, "message": p.message} for p in problems],
    }


def _where(settings: Settings) -> dict[str, Any]:
    path = settings.sqlite_path(fallback_to_file=True)
    return {
        "storage": settings.shown_storage_url(fallback_to_file=True),
        "sqlitePath": None if path is None else str(path),
        "exists": None if path is None else path.exists(),
        "keyPrefix": None
        if settings.postgres_url or not settings.redis_url
        else settings.key_prefix,
        "webhookEndpoints": [e.shown_url for e in settings.webhook_endpoints],
    }


def _demo(output: _Output, keep: bool) -> int:
    shown = io.StringIO()
    folder = ""
    # Ctrl-C between making the folder and the try that removes it left it behind: SIGINT
    # waits (POSIX) until the folder's name is held inside the try
    posix = hasattr(signal, "pthread_sigmask")
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if posix else set()
    try:
        try:
            folder = tempfile.mkdtemp(prefix="agentpolicy-demo-")
        finally:
            if posix:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _walk_through(Path(folder) / "demo.db", shown)
    finally:
        if keep:
            shown.write(f"\nkept {folder}\n")
        elif folder:
            shutil.rmtree(folder, ignore_errors=True)
        if output.as_json:  # the walk-through as its lines, so that --json is JSON here too
            lines = shown.getvalue().splitlines()
            output.write(json.dumps({"lines": lines, "kept": folder if keep else None}, indent=2))
            output.write("\n")
        else:
            output.write(shown.getvalue())
    return 0


def _walk_through(db: Path, out: TextIO) -> None:
    out.write(f"agentpolicy demo: an approval, from request to payment, on {db}\n\n")
    with PolicyEngine(storage=f"sqlite:///{db}") as engine:
        out.write("1. set a policy for agent-123: 10,000 USDT a day; >= 100 USDT needs "
                  "admin@company.com\n")  # fmt: skip
        out.write(f"   version {engine.set_policy('agent-123', approval_example_policy())}\n")
        out.write("2. the agent asks to pay 500 USDT to 0xvendor on Base\n   ")
        d = engine.authorize(PaymentRequest("agent-123", "500000000", "0xvendor", "eip155:8453"))
        show.print_decision(decision_data(d), out)
        assert d.approval_id is not None  # noqa: S101 - the example policy asks for approval
        out.write("3. the pending approval, its 500 USDT held against the daily limit\n")
        show.print_approval(approval_data(engine.get_approval(d.approval_id)), out)
        out.write("4. admin@company.com approves\n")
        approval = engine.decide(d.approval_id, "admin@company.com", "approve", "looks right")
        show.print_approval(approval_data(approval), out)
        assert approval.reservation_id is not None  # noqa: S101 - approved above
        out.write("5. the agent pays, then confirms the reservation\n")
        out.write(
            f"   {approval.reservation_id}: {engine.confirm(approval.reservation_id).status}\n"
        )
        out.write("6. the budget now\n")
        show.print_budget(budget_data(engine.budget("agent-123")), out)
        out.write("7. a 20 USDT payment needs no approval\n   ")
        small = engine.authorize(PaymentRequest("agent-123", "20000000", "0xvendor", "eip155:8453"))
        show.print_decision(decision_data(small), out)


# -- commands on the engine ----------------------------------------------------------------------


def _check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise PolicyValidationError.single("$.limit", f"must be an integer from 1 to {MAX_LIMIT}")
    return limit


def _payment(args: argparse.Namespace, engine: PolicyEngine) -> PaymentRequest:
    """The request, reading AMOUNT as base units, human units, or human units with a token."""
    amount: str | int = args.amount
    symbol, decimals = args.symbol, args.decimals
    if symbol == "":  # not the default: a mistake (MCP refuses it too)
        raise PolicyValidationError.single("$.symbol", "must not be empty")
    text, _, token = str(args.amount).strip().partition(" ")
    if token:  # "500.25 USDT"
        token = token.strip()
        if symbol is not None and symbol.casefold() != token.casefold():
            raise PolicyValidationError.single(
                "$.symbol", f"--symbol {symbol} contradicts the amount's token {token}"
            )
        symbol = token
        if decimals is None:
            decimals = _policy_decimals(engine, args.agent, token)
        amount = parse_units(text, decimals, "$.amount")
    elif args.units:
        if decimals is None and symbol is not None:
            decimals = _policy_decimals(engine, args.agent, symbol)
        amount = parse_units(text, DEFAULT_DECIMALS if decimals is None else decimals, "$.amount")
    return PaymentRequest(
        agent_id=args.agent, amount=amount, recipient=args.recipient, network=args.network,
        category=args.category, decimals=DEFAULT_DECIMALS if decimals is None else decimals,
        symbol=DEFAULT_SYMBOL if symbol is None else symbol, memo=args.memo,
        idempotency_key=args.idempotency_key,
    )  # fmt: skip


def _policy_decimals(engine: PolicyEngine, agent: str, symbol: str) -> int:
    stored = engine.get_policy(agent)
    amounts = [] if stored is None else [a for _, a in stored.policy.amounts()]
    for a in amounts:
        if a.symbol.casefold() == symbol.casefold():
            return a.decimals
    raise PolicyValidationError.single(
        "$.amount",
        f"the decimals of {symbol} are not known: the policy of {agent} names no {symbol} "
        "amount; give --decimals N (with --units) or the amount in base units",
    )


def _keygen(file: str) -> dict[str, Any]:
    if not file.strip():  # else "." (the folder) "exists"
        raise PolicyValidationError.single("$.file", "must not be empty: name the key file")
    key = SigningKey.generate()
    key.save(file, "$.file")
    return {"file": file, "publicKey": key.public_key}


def _vote(args: argparse.Namespace, engine: PolicyEngine, settings: Settings) -> dict[str, Any]:
    """Approve or deny; with a key file, sign the vote here (the key never leaves this process)."""
    raise_if(
        Problem(path, f"{flag} must not be empty")  # "$UNSET": never the configured one instead
        for flag, path, value in (
            ("--as", "$.approver", args.approver),
            ("--key", "$.key", args.key),
        )
        if value is not None and not value.strip()
    )
    approver = args.approver or settings.approver
    if approver is None:
        raise PolicyValidationError.single(
            "$.approver", "give --as NAME (or set AGENT_POLICY_APPROVER)"
        )
    key_file = args.key
    configured = settings.approver
    if key_file is None and configured is not None and person(approver) == person(configured):
        key_file = settings.approver_key_file  # the configured approver's own key only
    action = str(args.action)
    if key_file is None:
        return approval_data(engine.decide(args.approval, approver, action, args.comment))
    _check_key_file(key_file)
    key = SigningKey.load(key_file, "$.key")
    signed_at = engine.clock()
    message = engine.vote_message(args.approval, approver, action, signed_at, args.comment)
    approval = engine.decide(
        args.approval, approver, action, args.comment,
        signature=key.sign(message), signed_at=signed_at,
    )  # fmt: skip
    return approval_data(approval)


def _check_key_file(file: str) -> None:
    """Refuse a key "file" that is not a regular file (a device, a pipe) or is too large."""
    try:
        info = os.stat(file)
    except OSError:
        return  # SigningKey.load says why it cannot read it
    if not stat.S_ISREG(info.st_mode):
        raise PolicyValidationError.single("$.key", f"the key file {file} is not a regular file")
    if info.st_size > MAX_KEY_BYTES:
        raise PolicyValidationError.single(
            "$.key", f"the key file {file} is larger than {MAX_KEY_BYTES} bytes: not a key"
        )


def _approvers(args: argparse.Namespace, engine: PolicyEngine) -> tuple[Any, Any]:
    action = args.action
    if action == "list":
        return {"approvers": [approver_data(a) for a in engine.list_approvers()]}, (
            show.print_approvers
        )
    if action == "register":
        found = engine.register_approver(args.name, args.public_key)
    elif action == "rotate":
        found = engine.rotate_approver(args.name, args.public_key)
    else:
        found = engine.remove_approver(args.name)
    return approver_data(found), show.print_approver


def _history(args: argparse.Namespace, engine: PolicyEngine) -> dict[str, Any]:
    records = engine.history(args.agent, _check_limit(args.limit), version=args.version)
    if not records and engine.get_policy(args.agent) is None:
        raise NotFoundError(f"no policy is set for agent {args.agent}", code=ErrorCode.NO_POLICY)
    approvals: dict[str, Any] = {}
    reservations: dict[str, Any] = {}

    def lookup(table: dict[str, Any], key: str, get: Callable[[str], Any]) -> Any:
        if key not in table:
            try:
                table[key] = get(key)
            except NotFoundError:
                table[key] = None
        return table[key]

    rows = []
    for h in records:
        row = history_data(h)
        request = h.request
        approval = None
        if h.approval_id is not None:
            approval = lookup(approvals, h.approval_id, engine.get_approval)
        if request is None and h.reservation_id is not None:
            reservation = lookup(reservations, h.reservation_id, engine.get_reservation)
            request = None if reservation is None else reservation.request
        if request is None and approval is not None:
            request = approval.request
        if request is not None:
            row.update(amount=str(request.amount), decimals=request.decimals,
                       symbol=request.symbol, recipient=request.recipient)  # fmt: skip
        if approval is not None and h.event == "vote":
            vote = next((v for v in approval.votes if v.at == h.at and v.decision == h.code), None)
            if vote is not None:
                row["approver"] = vote.approver
                if vote.comment:
                    row["comment"] = vote.comment
        elif approval is not None and h.event in ("approval_approved", "approval_denied"):
            wanted = "approve" if h.event == "approval_approved" else "deny"
            row["approvers"] = [v.approver for v in approval.votes if v.decision == wanted]
        rows.append(row)
    return {"history": rows}


def _deliveries(args: argparse.Namespace, engine: PolicyEngine, settings: Settings) -> Any:
    urls = {e.id: e.shown_url for e in settings.webhook_endpoints}
    return {"deliveries": [
        {"id": w.event_id, "event": w.event, "endpoint": w.endpoint_id,
         "url": urls.get(w.endpoint_id), "approvalId": w.approval_id,
         "status": w.status.value, "attempts": w.attempts, "lastError": w.last_error}
        for w in engine.webhook_deliveries(args.status, _check_limit(args.limit))
    ]}  # fmt: skip


def _delegate(args: argparse.Namespace, engine: PolicyEngine) -> dict[str, Any]:
    expires_at = None
    if args.expires_at is not None:
        expires_at = parse_instant(args.expires_at, "$.expiresAt")
    elif args.expires_in is not None:
        expires_at = engine.clock() + parse_duration(args.expires_in, "$.expiresIn")
    delegation = engine.delegate(
        args.parent, args.child, _read_policy(args.file), expires_at=expires_at
    )
    return delegation_data(delegation)


def _settle(args: argparse.Namespace, engine: PolicyEngine) -> dict[str, Any]:
    reservation = (engine.confirm if args.command == "confirm" else engine.release)(
        args.reservation, holder=args.holder
    )
    return reservation_data(reservation)


Emit = Callable[[Any, Callable[[Any, TextIO], None]], None]


def _encodable(text: str, stream: TextIO) -> str:
    r"""``text`` with what ``stream``'s encoding cannot hold escaped (``\xf8``, ``\udcff``)."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding)


class _Output:
    """Where a command's result goes (stdout).

    Human output gets its data through :func:`cli_output.printable` (stored
    data and input are shown with control characters escaped); ``--json``
    prints the data with :func:`json.dumps`, which escapes them itself. A
    write that fails does not undo what the command did: the error is kept
    in ``lost``, later output is dropped, and :meth:`finish` reports it.
    """

    def __init__(self, stream: TextIO | None, as_json: bool) -> None:
        self.stream = stream
        self.as_json = as_json
        self.lost: OSError | None = None
        self.status = 0  # the exit status of the result emitted (authorize: 3 when not allowed)
        # the command's calls of the store began: a Ctrl-C from then on, before a result, may
        # come as the store commits (the change made, its answer not yet back)
        self.at_store = False
        self._shown: tuple[Any, Callable[[Any, TextIO], None]] | None = None

    def write(self, text: str) -> None:
        if self.lost is not None:
            return
        if self.stream is None:  # closed (>&-)
            self.lost = OSError(errno.EBADF, "stdout is closed")
            return
        try:
            try:
                self.stream.write(text)
            except UnicodeEncodeError:  # a stdout that cannot show it (PYTHONIOENCODING=ascii)
                self.stream.write(_encodable(text, self.stream))
            self.stream.flush()  # a full disk or a closed pipe fails here, not at exit
        except OSError as exc:
            self.lost = exc

    def emit(self, data: Any, human: Callable[[Any, TextIO], None]) -> None:
        """Print a result: JSON with --json, else for people."""
        self._shown = (data, human)
        self.write(json.dumps(data, indent=2) + "\n" if self.as_json else self._human())

    def _human(self) -> str:
        if self._shown is None:
            return ""
        data, human = self._shown
        text = io.StringIO()
        human(show.printable(data), text)
        return text.getvalue()

    def carried_out(self) -> str | None:
        """The first line of the result, once there is one (else None)."""
        if self._shown is None:
            return None
        return self._human().partition("\n")[0] or "done"

    def finish(self, status: int) -> int:
        """The exit status of a command that returned ``status``, its output written or not."""
        if self.lost is None:
            return status
        if self.stream is not None and self.stream is sys.stdout:
            silence_stdout()  # what is left in its buffer must not fail again at exit
        if isinstance(self.lost, BrokenPipeError):  # the reader went away (| head): its choice
            return status
        done = self._human().partition("\n")[0]
        _say(f"the command was carried out{f' ({done})' if done else ''}, but its output "
             f"could not be written: {self.lost.strerror or self.lost}")  # fmt: skip
        # a payment not allowed (3), a file not valid (2) keeps its status: 4 is for one done
        return EXIT_OUTPUT_LOST if status == 0 else status


def _versions(args: argparse.Namespace, engine: PolicyEngine, emit: Emit) -> None:
    found = engine.policy_versions(args.agent, _check_limit(args.limit))
    emit({"agentId": args.agent, "versions": [version_data(v) for v in found]},
         show.print_versions)  # fmt: skip


def _diff(args: argparse.Namespace, engine: PolicyEngine, emit: Emit) -> None:
    changes = engine.diff_policy_versions(args.agent, args.before, args.after)
    emit({"agentId": args.agent, "fromVersion": args.before, "toVersion": args.after,
          "changes": [change_data(c) for c in changes]}, show.print_diff)  # fmt: skip


def _rollback(args: argparse.Namespace, engine: PolicyEngine, emit: Emit) -> None:
    version = engine.rollback_policy(args.agent, args.version)
    text = "policy of {agentId} is now version {version} (equal to version {fromVersion})"
    emit({"agentId": args.agent, "version": version, "fromVersion": args.version}, _line(text))


def _shadow(args: argparse.Namespace, engine: PolicyEngine, emit: Emit) -> None:
    verb = args.shadow_action
    if verb == "set":
        found = engine.set_shadow_policy(args.agent, _read_policy(args.file))
        text = "shadow policy of {agentId} set beside version {liveVersion} at {setAt}"
        emit(shadow_data(found), _line(text))
    elif verb == "report":
        limit = _check_limit(args.limit)
        emit(shadow_report_data(engine.shadow_report(args.agent, limit)), show.print_shadow_report)
    elif verb == "promote":
        set_at = None if args.set_at is None else parse_instant(args.set_at, "$.setAt")
        version = engine.promote_shadow_policy(args.agent, force=args.force, set_at=set_at)
        emit({"agentId": args.agent, "version": version},
             _line("shadow policy of {agentId} promoted: it is now version {version}"))  # fmt: skip
    else:
        emit(shadow_report_data(engine.clear_shadow_policy(args.agent)), show.print_shadow_report)


def _simulate(args: argparse.Namespace, engine: PolicyEngine, emit: Emit) -> None:
    since = parse_since(args.since, "$.since")
    report = engine.simulate(args.agent, _read_policy(args.file), since=since)
    emit(simulation_data(report), show.print_simulation)


_ROLLOUT: dict[str, Callable[[argparse.Namespace, PolicyEngine, Emit], None]] = {
    "versions": _versions,
    "diff": _diff,
    "rollback": _rollback,
    "shadow": _shadow,
    "simulate": _simulate,
}


def _line(template: str) -> Callable[[dict[str, Any], TextIO], None]:
    def write(d: dict[str, Any], out: TextIO) -> None:
        out.write(template.format(**d) + "\n")

    return write


def _run(
    args: argparse.Namespace, engine: PolicyEngine, settings: Settings, output: _Output
) -> int:
    emit = output.emit
    cmd, action = args.command, getattr(args, "action", None)
    if cmd == "policy" and action == "set":
        version = engine.set_policy(args.agent, _read_policy(args.file))
        emit({"agentId": args.agent, "version": version},
             _line("policy of {agentId} is now version {version}"))  # fmt: skip
    elif cmd == "policy" and action in _ROLLOUT:
        _ROLLOUT[action](args, engine, emit)
    elif cmd == "policy" and action == "get" and args.version is not None:
        found = engine.get_policy_version(args.agent, args.version)
        emit({"agentId": args.agent, "version": found.version,
              "policy": dump_policy(found.policy)}, show.print_policy)  # fmt: skip
    elif cmd == "policy" and action == "get":
        stored = engine.get_policy(args.agent)
        if stored is None:
            raise NotFoundError(
                f"no policy is set for agent {args.agent}", code=ErrorCode.NO_POLICY
            )
        emit({"agentId": args.agent, "version": stored.version,
              "policy": dump_policy(stored.policy)}, show.print_policy)  # fmt: skip
    elif cmd == "policy":
        rows = [{"agentId": p.agent_id, "enabled": p.policy.enabled, "version": p.version}
                for p in engine.list_policies(args.org)]  # fmt: skip
        emit({"policies": rows}, functools.partial(show.print_policies, org=args.org))
    elif cmd == "authorize":
        decision = engine.authorize(
            _payment(args, engine), dry_run=args.dry_run, requested_by=args.requested_by
        )
        data = decision_data(decision)
        output.status = 0 if data["allowed"] else EXIT_NOT_ALLOWED
        emit(data, show.print_decision)
        return output.status
    elif cmd in ("confirm", "release"):
        emit(_settle(args, engine), _line("{reservationId}: {status}"))
    elif cmd == "budget":
        emit(budget_data(engine.budget(args.agent, args.period)),
             functools.partial(show.print_budget, period=args.period))  # fmt: skip
    elif cmd == "delegate":
        emit(_delegate(args, engine), show.print_delegation)
    elif cmd == "revoke":
        emit(delegation_data(engine.revoke(args.child, by=args.by)), show.print_delegation)
    elif cmd == "approvals" and action == "list":
        emit({"approvals": [approval_data(a) for a in engine.list_approvals(args.agent)]},
             show.print_approvals)  # fmt: skip
    elif cmd == "approvals" and action == "show":
        emit(approval_data(engine.get_approval(args.approval)), show.print_approval)
    elif cmd == "approvals":
        emit(_vote(args, engine, settings), show.print_approval)
    elif cmd in ("approver", "token"):
        data, human = (_approvers if cmd == "approver" else _tokens)(args, engine)
        emit(data, human)
    elif cmd == "history":
        emit(_history(args, engine), show.print_history)
    elif cmd == "webhooks":
        emit(_deliveries(args, engine, settings), show.print_deliveries)
    elif cmd == "sweep":
        swept = engine.sweep()
        emit({"reservations": [r.id for r in swept.reservations],
              "approvals": [a.id for a in swept.approvals]},
             lambda d, o: _line("expired {r} reservations, {a} approvals")(
                 {"r": len(d["reservations"]), "a": len(d["approvals"])}, o))  # fmt: skip
    return 0


# -- webhooks a command causes ---------------------------------------------------------------


def _delivery_ids(engine: PolicyEngine) -> set[str]:
    if engine.webhooks is None:
        return set()
    return {d.id for d in engine.webhook_deliveries(None, _ALL)}


def _deliver_own_webhooks(
    engine: PolicyEngine, before: set[str], wait: timedelta, settings: Settings
) -> None:
    """Deliver the webhooks this command caused, for at most ``wait``; say what is left."""
    dispatcher = engine.webhooks
    if dispatcher is None:
        return
    deadline = time.monotonic() + wait.total_seconds()
    # what failed or is left is said below, one line each: not also as the delivery's log record
    quiet = logging.getLogger("agentpolicy.webhooks")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        while True:
            mine = [d for d in engine.webhook_deliveries(None, _ALL) if d.id not in before]
            pending = [d for d in mine if d.status.value == "pending"]
            if not pending or time.monotonic() >= deadline:
                break
            if dispatcher.run_once() == 0:
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    finally:
        quiet.setLevel(level)
    urls = {e.id: e.shown_url for e in settings.webhook_endpoints}
    for d in mine:
        if d.status.value == "failed":
            _say(f"webhook {d.event} to {urls.get(d.endpoint_id, d.endpoint_id)} "
                 f"failed: {d.last_error}")  # fmt: skip
    if pending:
        _say(
            f"{len(pending)} webhook delivery(ies) still pending after "
            f"{wait.total_seconds():g}s; the next agentpolicy command or MCP "
            "server on this storage with the same endpoints retries them "
            "(agentpolicy webhooks list --status pending)"
        )


# -- entry point -----------------------------------------------------------------------------------


def _serve_mcp(args: argparse.Namespace, settings: Settings) -> int:
    try:
        import anyio  # noqa: PLC0415 - the mcp extra: imported only to serve

        from agentpolicy.mcp import stdio  # noqa: PLC0415
    except ImportError:
        _say(f"serve-mcp needs the mcp extra: {MCP_EXTRA}")
        return EXIT_ERROR
    import attrs  # noqa: PLC0415

    # a flag given empty (--agent-id "$UNSET") is a mistake, never "unbound": checked before the
    # store is opened, as the constructor would, so it neither serves every agent nor creates a file
    raise_if(
        problem
        for flag, value in (("$.agentId", args.agent_id), ("$.orgId", args.org_id))
        if value is not None
        for problem in check_identifier(value, flag)
    )
    settings = attrs.evolve(
        settings,
        role=args.role or settings.role,
        agent_id=settings.agent_id if args.agent_id is None else args.agent_id,
        org_id=settings.org_id if args.org_id is None else args.org_id,
    )
    with _opening_the_store():
        app = stdio.make_app(settings)
    try:
        anyio.run(stdio.serve, app)
    finally:
        app.close()
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from agentpolicy.serve import command  # noqa: PLC0415 - the serve extra
    except ImportError:
        _say(f"serve needs the serve extra: {SERVE_EXTRA}")
        return EXIT_ERROR
    ttl = parse_duration(args.session_ttl, "$.sessionTtl")
    flags = command.ServeArgs(
        host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key,
        behind_tls_proxy=args.behind_tls_proxy, forwarded_allow_ips=args.forwarded_allow_ips,
        insecure_bind=args.insecure_bind, session_ttl=ttl,
    )  # fmt: skip
    return command.serve(flags, settings)


def _tokens(args: argparse.Namespace, engine: PolicyEngine) -> tuple[Any, Any]:
    from agentpolicy.serve.tokens import TokenStore  # noqa: PLC0415 - only for these commands

    store = TokenStore(engine.storage, engine.clock)
    if args.action == "create":
        expires_at = None
        if args.expires_at is not None:
            expires_at = parse_instant(args.expires_at, "$.expiresAt")
        elif args.expires_in is not None:
            expires_at = engine.clock() + parse_duration(args.expires_in, "$.expiresIn")
        token, secret = store.create(
            args.role, agent_id=args.agent, org_id=args.org, approver=args.approver,
            label=args.label, expires_at=expires_at,
        )  # fmt: skip
        return {**show.token_data(token, engine.clock()), "token": secret}, show.print_new_token
    if args.action == "revoke":
        return show.token_data(store.revoke(args.token_id), engine.clock()), show.print_token
    now = engine.clock()
    found = store.list_tokens(include_inactive=args.all)
    return {"tokens": [show.token_data(t, now) for t in found]}, show.print_tokens


def silence_stdout() -> None:
    """Point stdout at the null device, so exiting after a closed pipe prints nothing."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # tests, embedding, closed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _dispatch(args: argparse.Namespace, output: _Output) -> int:
    emit = output.emit
    if args.command == "demo":
        return _demo(output, args.keep)
    if args.command == "policy" and args.action == "validate":
        result = _validate(args.file)
        output.status = 0 if result["valid"] else EXIT_BAD_INPUT
        emit(result, show.print_problems)
        return output.status
    if args.command == "approver" and args.action == "keygen":
        emit(_keygen(args.file), _line("wrote {file} (mode 0600; keep it private)\n"
                                       "public key: {publicKey}"))  # fmt: skip
        return 0
    if args.command == "policy" and args.action == "schema":
        from agentpolicy.schema import policy_schema  # noqa: PLC0415

        output.write(json.dumps(policy_schema(), indent=2) + "\n")
        return 0
    wait = parse_duration(
        "10s" if args.webhook_wait is None else args.webhook_wait, "$.webhookWait"
    )
    _check_store_flags(args)
    settings = with_overrides(
        read_settings(), db=args.db, redis_url=args.redis_url, postgres_url=args.postgres_url
    )
    if not (settings.postgres_url or settings.redis_url):  # the DB file is the store
        _check_home(settings.db, "$AGENT_POLICY_DB" if args.db is None else "$.db")
    elif not settings.postgres_url and settings.redis_url is not None:
        _check_redis_userinfo(
            settings.redis_url,
            "$AGENT_POLICY_REDIS_URL" if args.redis_url is None else "$.redisUrl",
        )
    if args.command == "where":
        emit(_where(settings), show.print_where)
        return 0
    if args.command == "serve-mcp":
        return _serve_mcp(args, settings)
    if args.command == "serve":
        return _serve(args, settings)
    with _opening_the_store():
        engine = build_engine(settings)
    with engine:
        before = _delivery_ids(engine)
        status = _run(args, cast(PolicyEngine, _AtStore(engine, output)), settings, output)
        try:
            _deliver_own_webhooks(engine, before, wait, settings)
        except PolicyError as err:  # the command itself is done: only say so
            _say(f"webhook delivery not checked: {err.message}")
        except KeyboardInterrupt:  # Ctrl-C while waiting: the command itself is done
            _say(
                "interrupted while delivering webhooks; the command was carried out, and the next "
                "agentpolicy command or MCP server on this storage with the same endpoints "
                "delivers what is pending (agentpolicy webhooks list --status pending)"
            )
        return status


class _AtStore:
    """The engine, for a command: a call of its methods marks the output ``at_store``.

    Reading the command's input (a policy file, a FIFO that waits) comes
    first, and a Ctrl-C then changed nothing; once a call of the engine
    began, the store may commit before the Ctrl-C that stops it.
    """

    def __init__(self, engine: PolicyEngine, output: _Output) -> None:
        self._engine = engine
        self._output = output

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._engine, name)
        if not callable(found):
            return found
        output = self._output

        def call(*args: Any, **kwargs: Any) -> Any:
            output.at_store = True
            return found(*args, **kwargs)

        return call


def _check_store_flags(args: argparse.Namespace) -> None:
    """An empty --db, --redis-url or --postgres-url (``--db "$UNSET"``) is a mistake.

    Read as not given, it would quietly use the store of the environment or
    the state directory: a policy set there instead of the store meant.
    """
    raise_if(
        Problem(
            path,
            f"{flag} must not be empty: name the store, or leave {flag} out "
            "to use the environment's",
        )
        for flag, path, value in (
            ("--db", "$.db", args.db),
            ("--redis-url", "$.redisUrl", args.redis_url),
            ("--postgres-url", "$.postgresUrl", args.postgres_url),
        )
        if value is not None and not value.strip()
    )


def _check_redis_userinfo(url: str, path: str) -> None:
    """A Redis URL whose password holds a raw / ? or # is refused without showing any of it.

    The URL parser ends the password there and reads the start of it as the
    port: its error ("Port could not be cast to integer value as 'S3CR'")
    would show the start of the password.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # an unbalanced [ or ] ("Invalid IPv6 URL"): not shown, it may hold one
        raise PolicyValidationError.single(
            path, "the Redis URL is not a URL: an unbalanced [ or ] (an IPv6 host is written "
            "[::1]; in a password write them as %5B, %5D; the URL is not shown)",
        ) from None  # fmt: skip
    try:
        parts.port  # noqa: B018 - read for its ValueError
    except ValueError:
        if "@" in url.partition("://")[2].removeprefix(parts.netloc):
            raise PolicyValidationError.single(
                path, "the user name or password of the Redis URL holds a /, ? or #, which ends "
                "it early: write them as %2F, %3F, %23 (the URL is not shown: it holds a password)",
            ) from None  # fmt: skip


def _check_home(db: str | None, path: str) -> None:
    """A DB file under ``~user`` of a user that does not exist is bad input, not a RuntimeError."""
    if db is None or not db.startswith("~"):
        return
    try:
        Path(db).expanduser()
    except RuntimeError:
        user = db[1:].partition("/")[0] or "the user"
        raise PolicyValidationError.single(
            path, f"{db}: the home folder of {user} is not known"
        ) from None


@contextlib.contextmanager
def _opening_the_store() -> Iterator[None]:
    """An OSError opening the store (its SQLite file: too long a name, no access) is unavailable."""
    try:
        yield
    except OSError as exc:
        name = "" if exc.filename is None else str(exc.filename)
        if len(name) > 100:
            name = f"{name[:40]}...{name[-40:]}"
        why = f"{exc.strerror or exc}: {name}" if name else str(exc.strerror or exc)
        raise StorageUnavailableError(f"cannot open the store: {why}") from None


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; return the exit status (the console script exits with it)."""
    try:
        return _main(argv, out)
    finally:  # done: a Ctrl-C while the agentpolicy command exits must not kill it by signal
        if Path((getattr(sys, "argv", None) or [""])[0]).stem == "agentpolicy":  # not imported
            with contextlib.suppress(ValueError, OSError):  # not the main thread
                signal.signal(signal.SIGINT, signal.SIG_IGN)


def _main(argv: Sequence[str] | None, out: TextIO | None) -> int:
    verbose = False
    output: _Output | None = None
    try:
        args = _parser().parse_args(argv)
        verbose = args.verbose
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
        # the pool's reconnection warnings repeat what the one error line of a failed command says
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        output = _Output(sys.stdout if out is None else out, args.json)
        return output.finish(_dispatch(args, output))
    except KeyboardInterrupt:  # Ctrl-C; once the command was carried out, it says so
        done = None if output is None else output.carried_out()
        if output is None or done is None:
            if output is not None and output.at_store:  # no result yet: not said it was not done
                _say("interrupted while the command was at the store: a change it makes may "
                     "have been made (look before running it again)")  # fmt: skip
            else:
                _say("interrupted")
            return EXIT_INTERRUPTED
        _say(f"interrupted after the command was carried out ({done})")
        return output.finish(output.status)  # too late to stop it: its own status stands
    except PolicyError as err:
        _say(f"{err.code}: {err.message}")
        return EXIT_BAD_INPUT if err.code == ErrorCode.INVALID_INPUT else EXIT_ERROR
    except Exception as exc:
        if verbose:
            traceback.print_exc(file=sys.stderr)
        _say(f"INTERNAL: {type(exc).__name__}: {exc} (a bug; -v shows where)")
        return EXIT_ERROR
