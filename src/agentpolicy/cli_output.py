"""How the ``agentpolicy`` command shows its results to people (``--json`` prints the data).

Each function writes one kind of result, given the same JSON data the MCP
tools return, to a text stream. The command line passes that data through
:func:`printable` first: stored data and input (a policy's reasons, an
approver's comment, a file name) may hold control characters that would
move the cursor, rewrite the screen or start a line of their own on a
terminal, and those are shown escaped.
"""

from __future__ import annotations

import io
import json
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

from agentpolicy.amounts import format_units
from agentpolicy.codec import format_instant

if TYPE_CHECKING:
    from agentpolicy.serve.tokens import AccessToken

__all__ = [
    "escape",
    "printable",
    "print_new_token",
    "print_token",
    "print_tokens",
    "token_data",
    "print_approval",
    "print_approvals",
    "print_approver",
    "print_approvers",
    "print_budget",
    "print_decision",
    "print_deliveries",
    "print_diff",
    "print_history",
    "print_policies",
    "print_policy",
    "print_problems",
    "print_shadow_report",
    "print_simulation",
    "print_versions",
    "print_where",
]


# C0 (newline and tab too), DEL, C1, the line and paragraph separators, the bidi embeddings,
# overrides and isolates: shown as \x1b, \u202e, so a value never acts on the terminal
_UNSAFE = {
    c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F),
              *range(0x2066, 0x206A))
}  # fmt: skip
# printed with json.dumps, which escapes every character but printable ASCII itself
_AS_JSON = frozenset({"policy"})


def escape(text: str) -> str:
    r"""``text`` with every control character shown escaped (``\x1b``, ``\u202e``)."""
    return text.translate(_UNSAFE)


def printable(data: Any) -> Any:
    """``data`` (JSON) with every string in it, keys too, passed through :func:`escape`."""
    if isinstance(data, str):
        return escape(data)
    if isinstance(data, dict):
        return {escape(str(k)): v if k in _AS_JSON else printable(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [printable(v) for v in data]
    return data


def _bar(used: int, limit: int, width: int = 30) -> str:
    filled = width if limit == 0 else min(width, (used * width + limit - 1) // limit)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _units(value: str | None, decimals: int) -> str:
    if value is None:
        return "-"
    return format_units(int(value), decimals)


def print_budget(data: dict[str, Any], out: TextIO, period: str | None = None) -> None:
    """A bar per window: spent, reserved, limit and what is left.

    With ``period`` (``budget --period``), only that window: the main
    token's bar and the limits of that window (other tokens, scopes,
    counts), here and in every budget above.
    """
    out.write(f"budget of {data['agentId']} at {data['at']}\n")
    for name, w in data["periods"].items():
        if period is not None and name != period:
            continue
        d, sym = w["decimals"], w["symbol"]
        used = int(w["spent"]) + int(w["reserved"])
        if w["limit"] is None:
            out.write(f"  {name:<8} no limit       spent {_units(w['spent'], d)} {sym}\n")
            continue
        out.write(
            f"  {name:<8} {_bar(used, int(w['limit']))} "
            f"spent {_units(w['spent'], d)} + reserved {_units(w['reserved'], d)} "
            f"of {_units(w['limit'], d)} {sym}; {_units(w['remaining'], d)} left "
            f"(until {w['windowEnd']})\n"
        )
    main = _main_symbol(data)
    others = [x for x in data.get("limits", []) if x["kind"] != "amount" or "scope" in x
              or x["window"] not in data["periods"] or x["symbol"] != main]  # fmt: skip
    if period is not None:
        others = [x for x in others if x["window"] == period]
    for x in others:
        where = f"{x['scope']} ({x['group']}) " if "scope" in x else ""
        frees = f" (frees {x['freesAt']})" if "freesAt" in x else ""
        if x["kind"] == "count":
            out.write(
                f"  {where}{x['window']:<8} {_bar(x['count'], x['max'])} "
                f"{x['count']} of {x['max']} {_of_token(x)}payments; {x['remaining']} left{frees}\n"
            )
            continue
        d, sym = x["decimals"], x["symbol"]
        used = int(x["spent"]) + int(x["reserved"])
        out.write(
            f"  {where}{x['window']:<8} {_bar(used, int(x['limit']))} "
            f"spent {_units(x['spent'], d)} + reserved {_units(x['reserved'], d)} "
            f"of {_units(x['limit'], d)} {sym}; {_units(x['remaining'], d)} left{frees}\n"
        )
    for scope in data.get("moreGroups", []):  # a budget lists at most 200 groups
        out.write(f"  {scope}: more groups than listed\n")
    if "delegation" in data:
        out.write("  ")
        print_delegation(data["delegation"], out)
    for above in data.get("ancestors", []):
        out.write(f"within the budget of {above['agentId']}:\n")
        buffer = io.StringIO()
        print_budget(above, buffer, period)
        out.write("".join(buffer.getvalue().splitlines(keepends=True)[1:]))


def print_delegation(data: dict[str, Any], out: TextIO) -> None:
    """A delegated budget: whose, until when, and whether it was revoked."""
    until = f" until {data['expiresAt']}" if "expiresAt" in data else ""
    out.write(f"{data['agentId']}: delegated by {data['parentId']}{until}\n")
    if "revokedAt" in data:
        out.write(f"  revoked at {data['revokedAt']}\n")


def _main_symbol(data: dict[str, Any]) -> str | None:
    periods = list(data["periods"].values())
    return str(periods[0]["symbol"]) if periods else None


def print_approval(data: dict[str, Any], out: TextIO) -> None:
    """One approval with its decisions so far."""
    out.write(
        f"{data['id']}  {data['status']:<8} {data['amount']} to {data['recipient']} on "
        f"{data['network']} for {data['agentId']}\n"
        f"    needs {data['requiredApprovers']} of {', '.join(data['approvers'])}; "
        f"expires {data['expiresAt']}\n"
    )
    groups = data.get("groups", ())
    names = [g["name"].casefold() for g in groups]
    for g in groups:
        # a budget is named when it is not the group's own, or when another budget has a
        # group of the same name (two levels may name their groups alike)
        alike = names.count(g["name"].casefold()) > 1
        shown = g.get("budget") is not None and (
            alike or g["budget"] not in (g["name"], data["agentId"])
        )
        budget = f" (budget {g['budget']})" if shown else ""
        who = ", ".join(g["approvers"])
        out.write(f"    group {g['name']}{budget}: {g['required']} of {who}\n")
    if "requestedBy" in data:
        out.write(f"    requested by {data['requestedBy']} for {data['agentId']}\n")
    if data.get("requireSignedVotes"):
        out.write("    votes must be signed\n")
    for v in data["decisions"]:
        note = f" ({v['comment']})" if "comment" in v else ""
        if v.get("via") == "signature":
            note += f" [signed, key version {v['keyVersion']}]"
        elif v.get("via") == "link":
            note += " [one-time link]"
        out.write(f"    {v['timestamp']} {v['approver']}: {v['decision']}{note}\n")
    if "reservationId" in data:
        out.write(f"    reservation {data['reservationId']}: confirm it after paying\n")


def print_approvals(data: dict[str, Any], out: TextIO) -> None:
    """Pending approvals, or a line saying there are none."""
    for x in data["approvals"]:
        print_approval(x, out)
    if not data["approvals"]:
        out.write("no pending approvals\n")


def print_decision(data: dict[str, Any], out: TextIO) -> None:
    """ALLOWED with its reservation, APPROVAL_REQUIRED with its approval, or DENIED and why.

    A dry run says what authorize would answer, then the headroom of every limit.
    """
    if data.get("dryRun"):
        _print_dry_run(data, out)
    elif data["allowed"]:
        out.write(f"ALLOWED  reservation {data['reservationId']} until {data['expiresAt']}\n")
    elif data.get("requiresApproval"):
        out.write(f"APPROVAL_REQUIRED  approval {data['approvalId']}: {data['reason']}\n")
    else:
        out.write(f"DENIED {data['code']}: {data['reason']}\n")


def _print_dry_run(data: dict[str, Any], out: TextIO) -> None:
    if data["allowed"]:
        out.write("WOULD BE ALLOWED (dry run: nothing reserved or recorded)\n")
    elif data.get("requiresApproval"):
        out.write(f"WOULD NEED APPROVAL (dry run): {data['reason']}\n")
    else:
        out.write(f"WOULD BE DENIED {data['code']} (dry run): {data['reason']}\n")
    agent = data["headroom"][0]["budgetId"] if data["headroom"] else None
    for h in data["headroom"]:
        where = "" if h["budgetId"] == agent else f"budget {h['budgetId']}: "
        if "scope" in h:
            where += f"{h['scope']} ({h['group']}) "
        fits = "" if h["fits"] else "  DOES NOT FIT"
        if h["kind"] == "count":
            out.write(f"  {where}{h['window']:<8} {h['count']} of {h['max']} {_of_token(h)}"
                      f"payments; {h['remaining']} left after this one{fits}\n")  # fmt: skip
            continue
        d, sym = h["decimals"], h["symbol"]
        out.write(
            f"  {where}{h['window']:<8} used {_units(h['used'], d)} of {_units(h['limit'], d)} "
            f"{sym}; {_units(h['remaining'], d)} left after this payment{fits}\n"
        )


def print_versions(data: dict[str, Any], out: TextIO) -> None:
    """One line per version, newest first, then what changed from the version before."""
    for v in data["versions"]:
        how = v["origin"] + (f" of v{v['fromVersion']}" if "fromVersion" in v else "")
        live = "  (live)" if v["current"] else ""
        out.write(f"v{v['version']}  {v['setAt']}  {how}{live}\n")
        for c in v["changes"]:
            out.write(f"    {c['text']}\n")


def print_diff(data: dict[str, Any], out: TextIO) -> None:
    """Every field that differs between two versions, one per line."""
    for c in data["changes"]:
        out.write(c["text"] + "\n")
    if not data["changes"]:
        out.write(f"versions {data['fromVersion']} and {data['toVersion']} are the same\n")


def _of_token(limit: dict[str, Any]) -> str:
    """``"USDC "`` for a count limit of one token's payments; nothing for every token's."""
    return f"{limit['symbol']} " if "symbol" in limit else ""


def _outcomes(counts: dict[str, int]) -> str:
    return f"{counts['allowed']} allowed, {counts['approval']} approval, {counts['denied']} denied"


def _codes(counts: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(counts.items())) or "none"


def _payment_line(p: dict[str, Any], before: str, after: str) -> str:
    amount = format_units(int(p["amount"]), p["decimals"])
    return (f"  {p['at']}  {p['agentId']}  {amount} {p['symbol']} to {p['recipient']}  "
            f"{p[before]} -> {p[after]}\n")  # fmt: skip


def print_shadow_report(data: dict[str, Any], out: TextIO) -> None:
    """Counts by outcome and code, live and shadow; the flips; the payments that differ."""
    out.write(f"shadow policy of {data['agentId']}, set {data['setAt']} beside version "
              f"{data['liveVersion']}: {data['payments']} payment(s) judged\n")  # fmt: skip
    out.write(f"  live:   {_outcomes(data['live'])}  ({_codes(data['liveCodes'])})\n")
    out.write(f"  shadow: {_outcomes(data['shadow'])}  ({_codes(data['shadowCodes'])})\n")
    out.write(f"  flips:  {_codes(data['flips'])}\n")
    if data["differences"]:
        out.write("  decided differently (newest first):\n")
    for p in data["differences"]:
        out.write("  " + _payment_line(p, "liveCode", "shadowCode"))


def print_simulation(data: dict[str, Any], out: TextIO) -> None:
    """Counts, flips, the spend per window and the payments the candidate would change."""
    out.write(f"simulation of {data['agentId']} from {data['since']} to {data['until']}: "
              f"{data['payments']} payment(s) replayed\n")  # fmt: skip
    out.write(f"  live:      {_outcomes(data['live'])}  ({_codes(data['liveCodes'])})\n")
    out.write(f"  candidate: {_outcomes(data['candidate'])}  "
              f"({_codes(data['candidateCodes'])})\n")  # fmt: skip
    out.write(f"  flips:     {_codes(data['flips'])}\n")
    if data["windows"]:
        out.write("  spend per window (live -> candidate):\n")
    for w in data["windows"]:
        d, sym = w["decimals"], w["symbol"]
        where = f"{w['scope']} ({w['group']}) " if "scope" in w else ""
        cap = most = ""
        if "limit" in w:
            cap = f" of {format_units(int(w['limit']), w['limitDecimals'])} {sym}"
        elif "max" in w:  # a count limit caps the payments, not the amount beside it
            most = f" of {w['max']}"
        out.write(
            f"    {where}{w['window']:<8} {w['windowStart']}  {_units(w['live'], d)} -> "
            f"{_units(w['candidate'], d)} {sym}{cap}  ({w['liveCount']} -> "
            f"{w['candidateCount']}{most} payments)\n"
        )
    if data["changed"]:
        shown = len(data["changed"])
        out.write(f"  decided differently ({shown} of {data['changedTotal']}, oldest first):\n")
    for p in data["changed"]:
        out.write("  " + _payment_line(p, "liveCode", "candidateCode"))
    for note in data["notes"]:
        out.write(f"  note: {note}\n")


def print_policy(data: dict[str, Any], out: TextIO) -> None:
    """An agent's policy as JSON, under a line with its version."""
    out.write(
        f"# {data['agentId']}, version {data['version']}\n{json.dumps(data['policy'], indent=2)}\n"
    )


def print_policies(data: dict[str, Any], out: TextIO, org: str | None = None) -> None:
    """One line per agent with a policy, or a line saying there is none (under ``org``)."""
    for r in data["policies"]:
        state = "enabled" if r["enabled"] else "DISABLED"
        out.write(f"{r['agentId']}  v{r['version']}  {state}\n")
    if not data["policies"]:
        out.write(
            "no agent has a policy\n" if org is None else f"no agent under {org}: has a policy\n"
        )


def print_history(data: dict[str, Any], out: TextIO) -> None:
    """One line per event, newest first: what, the amount and recipient, who decided."""
    for r in data["history"]:
        ref = r.get("reservationId") or r.get("approvalId") or ""
        parts = [f"{r['at']}  {r['event']:<17} {r.get('code', ''):<24} {ref}"]
        if "amount" in r and "decimals" in r:
            parts.append(f"{format_units(int(r['amount']), r['decimals'])} {r['symbol']}")
        if "recipient" in r:
            parts.append(f"to {r['recipient']}")
        if "approver" in r:
            parts.append(f"by {r['approver']}")
        elif r.get("approvers"):
            parts.append("by " + ", ".join(r["approvers"]))
        if r.get("comment"):
            parts.append(f"({r['comment']})")
        detail = r.get("detail") or ""
        if r["event"] != "vote":
            parts.append(detail)  # a rollback, a promoted or set shadow policy
        elif detail.endswith("]") and " [" in detail:  # what proved the vote shown above
            parts.append("[" + detail.rpartition(" [")[2])
        out.write("  ".join(parts).rstrip() + "\n")
    if not data["history"]:
        out.write("no history\n")


def print_deliveries(data: dict[str, Any], out: TextIO) -> None:
    """One line per webhook delivery, newest first."""
    for r in data["deliveries"]:
        error = f"  ({r['lastError']})" if r["lastError"] else ""
        where = f"  {r['url']}" if r.get("url") else ""
        out.write(
            f"{r['status']:<9} {r['event']:<28} {r['approvalId']}  "
            f"attempts {r['attempts']}{where}{error}\n"
        )
    if not data["deliveries"]:
        out.write("no webhook deliveries\n")


def print_problems(data: dict[str, Any], out: TextIO) -> None:
    """Whether a policy file is valid, and every problem with its path."""
    if data["valid"]:
        out.write(f"{data['file']}: valid\n")
        return
    out.write(f"{data['file']}: {len(data['problems'])} problem(s)\n")
    for p in data["problems"]:
        out.write(f"  {p['path']}: {p['message']}\n")


def print_where(data: dict[str, Any], out: TextIO) -> None:
    """Which store and file the command uses."""
    out.write(f"storage: {data['storage']}\n")
    if data.get("sqlitePath") is not None:
        state = "exists" if data["exists"] else "does not exist yet"
        out.write(f"sqlite file: {data['sqlitePath']} ({state})\n")
    if data.get("keyPrefix") is not None:
        out.write(f"key prefix: {data['keyPrefix']}\n")
    for url in data["webhookEndpoints"]:
        out.write(f"webhook endpoint: {url}\n")


def print_approver(data: dict[str, Any], out: TextIO) -> None:
    """An approver: the current key (or that it was removed), then every key version."""
    state = f"key version {data['version']}" if data["registered"] else "removed"
    out.write(f"{data['name']}  {data.get('publicKey', '-')}  {state}\n")
    for k in data["keys"]:
        until = f" until {k['retiredAt']} ({k['retiredBy']})" if "retiredAt" in k else ""
        out.write(f"    v{k['version']} {k['publicKey']} from {k['addedAt']}{until}\n")


def print_approvers(data: dict[str, Any], out: TextIO) -> None:
    """Every registered approver, or a line saying there is none."""
    for a in data["approvers"]:
        print_approver(a, out)
    if not data["approvers"]:
        out.write("no registered approvers\n")


def token_data(t: AccessToken, now: datetime) -> dict[str, Any]:
    """A token's record as JSON (never the token itself): id, role, binding, times, status."""
    data: dict[str, Any] = {"id": t.id, "role": t.role, "status": t.status(now)}
    data.update({key: value for key, value in (("agentId", t.agent_id), ("orgId", t.org_id),
                                               ("approver", t.approver), ("label", t.label))
                 if value is not None})  # fmt: skip
    data["createdAt"] = format_instant(t.created_at)
    for key, when in (("expiresAt", t.expires_at), ("revokedAt", t.revoked_at)):
        if when is not None:
            data[key] = format_instant(when)
    return data


def _token_line(d: dict[str, Any]) -> str:
    binding = (
        ", ".join(
            f"{word} {d[key]}{':*' if key == 'orgId' else ''}"
            for key, word in (("agentId", "agent"), ("orgId", "org"), ("approver", "approver"))
            if key in d
        )
        or "all agents"
    )
    ends = f"expires {d['expiresAt']}" if "expiresAt" in d else "no expiry"
    label = f"  ({d['label']})" if "label" in d else ""
    return f"{d['id']}  {d['role']:<8} {binding}  {d['status']}, {ends}{label}"


def print_token(data: dict[str, Any], out: TextIO) -> None:
    """One token's record."""
    out.write(_token_line(data) + "\n")


def print_new_token(data: dict[str, Any], out: TextIO) -> None:
    """A new token: its record, then the token on a line of its own, shown this once."""
    out.write(_token_line(data) + "\n")
    out.write(data["token"] + "\n")
    out.write("keep it now: it is shown only this once (the store keeps only its SHA-256)\n")


def print_tokens(data: dict[str, Any], out: TextIO) -> None:
    """Tokens, oldest first."""
    if not data["tokens"]:
        out.write("no tokens\n")
    for d in data["tokens"]:
        out.write(_token_line(d) + "\n")
