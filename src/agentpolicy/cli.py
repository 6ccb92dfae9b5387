"""``agentpolicy``: the command line for people who write policies and approve payments.

Human-readable output by default, ``--json`` for scripts. Errors print one
line on stderr and exit non-zero (2 for bad input, 1 otherwise); never a
traceback. ``authorize`` exits 0 when the payment is allowed and 3 when it is
not (denied, or waiting for approval).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import attrs

from agentpolicy import __version__
from agentpolicy.amounts import format_units
from agentpolicy.codec import dump_policy
from agentpolicy.config import Settings, read_settings
from agentpolicy.engine import DEFAULT_RESERVATION_TTL, PolicyEngine
from agentpolicy.errors import ErrorCode, NotFoundError, PolicyError, PolicyValidationError
from agentpolicy.examples import approval_example_policy
from agentpolicy.requests import PaymentRequest
from agentpolicy.storage import open_storage
from agentpolicy.views import (
    approval_data,
    budget_data,
    decision_data,
    history_data,
    reservation_data,
)

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_ALLOWED = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"agentpolicy: {message} (see --help)\n")
        raise SystemExit(EXIT_BAD_INPUT)


def _add_review_commands(sub: Any) -> None:
    """Commands for people who review: approvals, history and webhook deliveries."""
    ap = sub.add_parser("approvals", help="list, show, approve and deny approvals")
    asub = ap.add_subparsers(dest="action", required=True, parser_class=_Parser)
    al = asub.add_parser("list", help="pending approvals")
    al.add_argument("--agent")
    ash = asub.add_parser("show", help="one approval")
    ash.add_argument("approval")
    for verb in ("approve", "deny"):
        v = asub.add_parser(verb, help=f"{verb} as a named approver")
        v.add_argument("approval")
        v.add_argument("--as", dest="approver", required=True, help="the approver's name")
        v.add_argument("--comment")

    h = sub.add_parser("history", help="an agent's decisions and state changes")
    h.add_argument("agent")
    h.add_argument("--limit", type=int, default=50)

    wh = sub.add_parser("webhooks", help="webhook deliveries in the outbox")
    whsub = wh.add_subparsers(dest="action", required=True, parser_class=_Parser)
    whl = whsub.add_parser("list", help="deliveries, newest first")
    whl.add_argument("--status", choices=["pending", "delivered", "failed"])
    whl.add_argument("--limit", type=int, default=50)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="agentpolicy", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"agentpolicy {__version__}")
    p.add_argument("--db", help="SQLite file (default: $AGENT_POLICY_DB, else the state dir)")
    p.add_argument("--redis-url", help="Redis URL (default: $AGENT_POLICY_REDIS_URL)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    policy = sub.add_parser("policy", help="set, show and list policies")
    psub = policy.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ps = psub.add_parser("set", help="set an agent's policy from a JSON file ('-' for stdin)")
    ps.add_argument("agent")
    ps.add_argument("file")
    pg = psub.add_parser("get", help="show an agent's policy")
    pg.add_argument("agent")
    pl = psub.add_parser("list", help="list agents with a policy")
    pl.add_argument("--org", help="only agents whose id starts with ORG:")

    a = sub.add_parser("authorize", help="decide a payment and reserve its amount")
    a.add_argument("agent")
    a.add_argument("amount", help="base units, e.g. 500000000 for 500 USDT")
    a.add_argument("recipient")
    a.add_argument("network", help="CAIP-2 chain id, e.g. eip155:8453")
    a.add_argument("--category")
    a.add_argument("--decimals", type=int, default=6)
    a.add_argument("--symbol", default="USDT")
    a.add_argument("--memo")
    a.add_argument("--idempotency-key")

    for name, text in (("confirm", "confirm a reservation"), ("release", "release one")):
        c = sub.add_parser(name, help=text)
        c.add_argument("reservation")

    b = sub.add_parser("budget", help="spent, reserved and remaining per window")
    b.add_argument("agent")
    b.add_argument("--period", choices=["hourly", "daily", "weekly", "monthly"])

    _add_review_commands(sub)
    sub.add_parser("sweep", help="expire due reservations and approvals now")
    s = sub.add_parser("serve-mcp", help="serve the MCP tools over stdio")
    s.add_argument("--role", choices=["agent", "admin"], help="default: $AGENT_POLICY_ROLE")
    s.add_argument("--agent-id", help="bind to one agent")
    s.add_argument("--org-id", help="bind to agent ids starting with ORG:")
    d = sub.add_parser("demo", help="walk through the seed's approval example")
    d.add_argument("--keep", action="store_true", help="keep the temporary database")
    return p


# -- output ------------------------------------------------------------------------------------


def _bar(used: int, limit: int, width: int = 30) -> str:
    filled = width if limit == 0 else min(width, (used * width + limit - 1) // limit)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _units(value: str | None, decimals: int) -> str:
    if value is None:
        return "-"
    return format_units(int(value), decimals)


def _print_budget(data: dict[str, Any], out: TextIO) -> None:
    out.write(f"budget of {data['agentId']} at {data['at']}\n")
    for period, w in data["periods"].items():
        d, sym = w["decimals"], w["symbol"]
        used = int(w["spent"]) + int(w["reserved"])
        if w["limit"] is None:
            out.write(f"  {period:<8} no limit       spent {_units(w['spent'], d)} {sym}\n")
            continue
        out.write(
            f"  {period:<8} {_bar(used, int(w['limit']))} "
            f"spent {_units(w['spent'], d)} + reserved {_units(w['reserved'], d)} "
            f"of {_units(w['limit'], d)} {sym}; {_units(w['remaining'], d)} left "
            f"(until {w['windowEnd']})\n"
        )


def _print_approval(data: dict[str, Any], out: TextIO) -> None:
    out.write(
        f"{data['id']}  {data['status']:<8} {data['amount']} to {data['recipient']} on "
        f"{data['network']} for {data['agentId']}\n"
        f"    needs {data['requiredApprovers']} of {', '.join(data['approvers'])}; "
        f"expires {data['expiresAt']}\n"
    )
    for v in data["decisions"]:
        note = f" ({v['comment']})" if "comment" in v else ""
        out.write(f"    {v['timestamp']} {v['approver']}: {v['decision']}{note}\n")
    if "reservationId" in data:
        out.write(f"    reservation {data['reservationId']}: confirm it after paying\n")


def _print_decision(data: dict[str, Any], out: TextIO) -> None:
    if data["allowed"]:
        out.write(f"ALLOWED  reservation {data['reservationId']} until {data['expiresAt']}\n")
    elif data.get("requiresApproval"):
        out.write(f"APPROVAL_REQUIRED  approval {data['approvalId']}: {data['reason']}\n")
    else:
        out.write(f"DENIED {data['code']}: {data['reason']}\n")


# -- commands ------------------------------------------------------------------------------------


def _read_policy(file: str) -> Any:
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyValidationError.single(
            "$.file", f"cannot read {file}: {exc.strerror}"
        ) from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise PolicyValidationError.single("$.file", f"{file} is not JSON: {exc}") from None


def _print_policy(d: dict[str, Any], out: TextIO) -> None:
    out.write(f"# {d['agentId']}, version {d['version']}\n{json.dumps(d['policy'], indent=2)}\n")


def _print_policies(d: dict[str, Any], out: TextIO) -> None:
    for r in d["policies"]:
        state = "enabled" if r["enabled"] else "DISABLED"
        out.write(f"{r['agentId']}  v{r['version']}  {state}\n")


def _print_approvals(d: dict[str, Any], out: TextIO) -> None:
    for x in d["approvals"]:
        _print_approval(x, out)
    if not d["approvals"]:
        out.write("no pending approvals\n")


def _print_history(d: dict[str, Any], out: TextIO) -> None:
    for r in d["history"]:
        ref = r.get("reservationId") or r.get("approvalId") or ""
        out.write(f"{r['at']}  {r['event']:<17} {r.get('code', ''):<24} {ref}\n")


def _print_deliveries(d: dict[str, Any], out: TextIO) -> None:
    for r in d["deliveries"]:
        error = f"  ({r['lastError']})" if r["lastError"] else ""
        out.write(
            f"{r['status']:<9} {r['event']:<28} {r['approvalId']}  "
            f"attempts {r['attempts']}{error}\n"
        )
    if not d["deliveries"]:
        out.write("no webhook deliveries\n")


def _print_line(template: str) -> Callable[[dict[str, Any], TextIO], None]:
    def write(d: dict[str, Any], out: TextIO) -> None:
        out.write(template.format(**d) + "\n")

    return write


def _run(args: argparse.Namespace, engine: PolicyEngine, out: TextIO) -> int:
    def emit(data: Any, human: Callable[[Any, TextIO], None]) -> None:
        if args.json:
            out.write(json.dumps(data, indent=2) + "\n")
        else:
            human(data, out)

    cmd, action = args.command, getattr(args, "action", None)
    if cmd == "policy" and action == "set":
        version = engine.set_policy(args.agent, _read_policy(args.file))
        emit({"agentId": args.agent, "version": version},
             _print_line("policy of {agentId} is now version {version}"))  # fmt: skip
    elif cmd == "policy" and action == "get":
        stored = engine.get_policy(args.agent)
        if stored is None:
            raise NotFoundError(f"no policy is set for {args.agent}", code=ErrorCode.NO_POLICY)
        emit({"agentId": args.agent, "version": stored.version,
              "policy": dump_policy(stored.policy)}, _print_policy)  # fmt: skip
    elif cmd == "policy":
        rows = [{"agentId": p.agent_id, "enabled": p.policy.enabled, "version": p.version}
                for p in engine.list_policies(args.org)]  # fmt: skip
        emit({"policies": rows}, _print_policies)
    elif cmd == "authorize":
        request = PaymentRequest(
            agent_id=args.agent, amount=args.amount, recipient=args.recipient,
            network=args.network, category=args.category, decimals=args.decimals,
            symbol=args.symbol, memo=args.memo, idempotency_key=args.idempotency_key,
        )  # fmt: skip
        data = decision_data(engine.authorize(request))
        emit(data, _print_decision)
        return 0 if data["allowed"] else EXIT_NOT_ALLOWED
    elif cmd in ("confirm", "release"):
        r = getattr(engine, cmd)(args.reservation)
        emit(reservation_data(r), _print_line("{reservationId}: {status}"))
    elif cmd == "budget":
        emit(budget_data(engine.budget(args.agent, args.period)), _print_budget)
    elif cmd == "approvals" and action == "list":
        emit({"approvals": [approval_data(a) for a in engine.list_approvals(args.agent)]},
             _print_approvals)  # fmt: skip
    elif cmd == "approvals" and action == "show":
        emit(approval_data(engine.get_approval(args.approval)), _print_approval)
    elif cmd == "approvals":
        a = engine.decide(args.approval, args.approver, str(action), args.comment)
        emit(approval_data(a), _print_approval)
    elif cmd == "history":
        rows = [history_data(h) for h in engine.history(args.agent, args.limit)]
        emit({"history": rows}, _print_history)
    elif cmd == "webhooks":
        rows = [
            {"id": w.event_id, "event": w.event, "endpoint": w.endpoint_id,
             "approvalId": w.approval_id, "status": w.status.value, "attempts": w.attempts,
             "lastError": w.last_error}
            for w in engine.webhook_deliveries(args.status, args.limit)
        ]  # fmt: skip
        emit({"deliveries": rows}, _print_deliveries)
    elif cmd == "sweep":
        swept = engine.sweep()
        emit({"reservations": [r.id for r in swept.reservations],
              "approvals": [a.id for a in swept.approvals]},
             lambda d, o: _print_line("expired {r} reservations, {a} approvals")(
                 {"r": len(d["reservations"]), "a": len(d["approvals"])}, o))  # fmt: skip
    return 0


def _demo(out: TextIO, keep: bool) -> int:
    folder = tempfile.mkdtemp(prefix="agentpolicy-demo-")
    db = Path(folder) / "demo.db"
    out.write(f"agentpolicy demo: the seed's approval walk-through on {db}\n\n")
    with PolicyEngine(storage=f"sqlite:///{db}") as engine:
        out.write("1. set a policy for agent-123: 10,000 USDT a day; >= 100 USDT needs "
                  "admin@company.com\n")  # fmt: skip
        out.write(f"   version {engine.set_policy('agent-123', approval_example_policy())}\n")
        out.write("2. the agent asks to pay 500 USDT to 0xvendor on Base\n   ")
        d = engine.authorize(PaymentRequest("agent-123", "500000000", "0xvendor", "eip155:8453"))
        _print_decision(decision_data(d), out)
        assert d.approval_id is not None  # noqa: S101 - the example policy asks for approval
        out.write("3. the pending approval, its 500 USDT held against the daily limit\n")
        _print_approval(approval_data(engine.get_approval(d.approval_id)), out)
        out.write("4. admin@company.com approves\n")
        approval = engine.decide(d.approval_id, "admin@company.com", "approve", "looks right")
        _print_approval(approval_data(approval), out)
        assert approval.reservation_id is not None  # noqa: S101 - approved above
        out.write("5. the agent pays, then confirms the reservation\n")
        out.write(
            f"   {approval.reservation_id}: {engine.confirm(approval.reservation_id).status}\n"
        )
        out.write("6. the budget now\n")
        _print_budget(budget_data(engine.budget("agent-123")), out)
        out.write("7. a 20 USDT payment needs no approval\n   ")
        small = engine.authorize(PaymentRequest("agent-123", "20000000", "0xvendor", "eip155:8453"))
        _print_decision(decision_data(small), out)
    if not keep:
        for path in Path(folder).iterdir():
            path.unlink()
        Path(folder).rmdir()
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    settings = read_settings()
    if args.redis_url:
        settings = attrs.evolve(settings, redis_url=args.redis_url)
    elif args.db:
        settings = attrs.evolve(settings, db=args.db, redis_url=None)
    return settings


def silence_stdout() -> None:
    """Point stdout at the null device, so exiting after a closed pipe prints nothing."""
    with contextlib.suppress(OSError, ValueError):  # no real descriptor: tests, embedding
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; return the exit status (the console script exits with it)."""
    out = out or sys.stdout
    args = _parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    try:
        if args.command == "demo":
            return _demo(out, args.keep)
        settings = _settings(args)
        if args.command == "serve-mcp":
            import anyio  # noqa: PLC0415 - the mcp extra: imported only to serve

            from agentpolicy.mcp import stdio  # noqa: PLC0415

            settings = attrs.evolve(
                settings,
                role=args.role or settings.role,
                agent_id=args.agent_id or settings.agent_id,
                org_id=args.org_id or settings.org_id,
            )
            app = stdio.make_app(settings)
            try:
                anyio.run(stdio.serve, app)
            finally:
                app.close()
            return 0
        url = settings.storage_url(fallback_to_file=True)
        assert url is not None  # noqa: S101 - fallback_to_file always gives one
        ttl = settings.reservation_ttl or DEFAULT_RESERVATION_TTL
        storage = open_storage(url, key_prefix=settings.key_prefix)
        with PolicyEngine(storage=storage, reservation_ttl=ttl) as engine:
            return _run(args, engine, out)
    except BrokenPipeError:  # the reader went away (| head): not an error of ours
        silence_stdout()
        return 0
    except PolicyError as err:
        sys.stderr.write(f"agentpolicy: {err.code}: {err.message}\n")
        return EXIT_BAD_INPUT if err.code == ErrorCode.INVALID_INPUT else EXIT_ERROR
    except Exception as exc:
        logging.getLogger("agentpolicy.cli").debug("internal error", exc_info=True)
        sys.stderr.write(f"agentpolicy: INTERNAL: {type(exc).__name__}: {exc} (a bug)\n")
        return EXIT_ERROR
