"""The ledger's operations as steps: authorize, confirm, release, vote, set a policy, expire.

Each function returns a step for :func:`agentpolicy.ledger.runner.run`: it
reads what it needs through the view, checks everything before it writes,
and puts its writes and its result into the transaction. A step that raises
writes nothing. These are the only rules of the ledger; no store repeats
any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from operator import is_
from typing import Any

from agentpolicy import approvals
from agentpolicy.amounts import Amount, scale_units
from agentpolicy.codec import format_instant
from agentpolicy.decisions import Code, Decision
from agentpolicy.errors import ConflictError, ErrorCode, ForbiddenError, NotFoundError
from agentpolicy.ledger import keys, rollout
from agentpolicy.ledger.docs import (
    Body,
    approval_doc,
    approval_record,
    delegation_record,
    levels_of,
    request_data,
    reservation_doc,
    vote_entry,
)
from agentpolicy.ledger.runner import View
from agentpolicy.ledger.state import (
    Books,
    Head,
    LedgerConfig,
    close_reservation,
    closing,
    emit,
    emit_approval,
    expire_due,
    more_due,
    needs_books,
    record,
)
from agentpolicy.ledger.tallies import MAX_SCORE
from agentpolicy.ledger.trees import (
    Level,
    PolicySource,
    RelocatedError,
    chain,
    delegation_end,
    grant_deadline,
    placed_in,
)
from agentpolicy.policy import DEFAULT_APPROVAL_TIMEOUT_MS, AgentPolicy, ApprovalThreshold
from agentpolicy.records import ApprovalStatus, Delegation
from agentpolicy.requests import PaymentRequest
from agentpolicy.rules import Assessment, BookKey, Tally, Verdict, assess, judge
from agentpolicy.storage._time import instant, micros
from agentpolicy.storage.base import Txn, share
from agentpolicy.windows import Window

__all__ = [
    "MAX_GROUPS_LISTED",
    "PolicySource",
    "authorize",
    "expire",
    "refresh",
    "settle",
    "vote",
]

Step = Callable[[View, Txn], None]

_IDEMPOTENCY_KEEP_MS = 25 * 3_600_000
_PASSING = (Code.ALLOWED, Code.APPROVAL_REQUIRED)

MAX_GROUPS_LISTED = 200
"""The most scope groups a budget reads and lists (each group lists every limit of its scope).

A scope with ``groupBy`` gains a group for every recipient (network,
category) paid, for as long as its counters last; a budget listing them all
grew with every payment the governed agent made (400 payments under 30
scopes of 32 limits: a 74 MB answer).
"""


def _book_name(agent: str, key: BookKey) -> str:
    owner = key[0] or agent
    return keys.head(owner) if key[1] is None else keys.scope_book(owner, *key[1])


def _book_names(agent: str, a: Assessment) -> dict[BookKey, str]:
    """The document of every book the payment's tallies are in."""
    return {b.key: _book_name(agent, b.key) for b in a.every_book}


def _usage(
    books: Books, names: dict[BookKey, str], a: Assessment, now: int
) -> dict[str, tuple[int, int, int]]:
    """What every tally of the payment has used, as the ledger has it now."""
    usage: dict[str, tuple[int, int, int]] = {}
    for b in a.every_book:
        if b.silent:  # counters no limit reads now (kept for a later version)
            continue
        book = books[names[b.key]]
        counters = book.counters
        for t in b.calendar.values():
            c = counters.get(t.key)
            if c is not None:
                usage[t.usage_key] = (c[2] + c[3], c[1], c[4] if len(c) > 4 else 0)
        for t in b.rolling.values():
            value, decimals, count = book.rolling_used(t.key, now)
            if value or count:
                usage[t.usage_key] = (value, decimals, count)
    return usage


def _in_force(
    shadows: rollout.ShadowSource | None,
    view: View,
    books: Books,
    a: Assessment,
    levels: list[Level],
    now: datetime,
) -> tuple[Window, ...]:
    """The calendar windows in force now: the live policies' and the shadows' on the way."""
    in_force = a.windows_in_force()
    if shadows is not None and rollout.shadowed(books.head, levels):
        in_force += rollout.shadow_windows(shadows, view, books.head, levels, now)
    return in_force


def _prepare(
    view: View,
    txn: Txn,
    cfg: LedgerConfig,
    shard: str,
    books: Books,
    a: Assessment,
    names: dict[BookKey, str],
    levels: list[Level],
    now: int,
    in_force: tuple[Window, ...],
    *,
    batches: bool = True,
) -> list[str]:
    """Bring every book the payment touches up to ``now``: expiries, ended windows, rolling.

    ``in_force`` are the calendar windows of the policies (live and shadow)
    that apply now: a counter is kept until the window under its key ends.
    Returns the agents whose heads still have expiries due (more than one
    batch was), and the agent itself when more payments left a rolling
    window than one step moves (unless ``batches`` is false: a step that is
    never committed judges with what one batch moved, the rest still
    counted): the step must then commit these and run again.
    """
    agent = books.head.agent
    books.need(names.values())
    for book in books.by_name.values():
        book.check_horizon(now, agent)
    expire_due(view, txn, cfg, shard, books, now)
    more = [agent] if more_due(books.head, now) else []
    for level in levels:  # what budgets below an ancestor held in its counters
        expire_due(view, txn, cfg, shard, books, now, level.head)
        if more_due(level.head, now):
            more.append(level.head.agent)
    # only the books the payment counts in: ``in_force`` are the windows of its own chain of
    # budgets, and a book loaded for another's sake (a sibling's head, its expiries applied
    # above) may keep a counter under a window of its own policy that ends later (a timezone
    # it changed from): that book's own steps prune it, with its own windows
    for name in names.values():
        books[name].prune(now, cfg.counter_grace, in_force)
    rolling_due = False  # more payments left a rolling window than one step moves
    for t in a.tallies:
        if t.seconds is not None:
            book = books[names[(t.owner, t.book)]]
            rolling_due |= book.advance(view, txn, t.key, t.seconds, now, cfg.counter_grace, agent)
    if rolling_due and batches and agent not in more:  # commit this batch, judge after the rest
        more.append(agent)
    return more


def authorize(
    cfg: LedgerConfig,
    shard: str,
    request: PaymentRequest,
    now: datetime,
    policies: PolicySource,
    seen: list[Decision],
    *,
    shadows: rollout.ShadowSource | None = None,
    requested_by: str | None = None,
    holder: str | None = None,
    before: Body | None = None,
    batches: bool = True,
) -> Step:
    """Decide a payment and hold its amount when it is allowed or needs approval.

    The result is ``{"rec": decision record}`` (with ``"replayed": True``
    for an idempotency key seen before), or ``{"more": [agent ids]}`` when
    more expiries were due under those agents' heads than one step applies,
    or more payments left a rolling window of the agent than one step moves:
    it committed a batch of them, and the call must run the step again
    (``batches=False``, for a dry run that commits nothing: a rolling
    window's departures past one batch stay counted). The
    decision, with its ids, is appended to ``seen`` (its details are worded only when read). With
    ``shadows``, a shadow policy of the agent or of a budget above it judges
    the payment too (:func:`rollout.try_shadows`); the live verdict is the
    one enforced. ``requested_by`` (an operator asking on the agent's
    behalf) is recorded with the decision and the approval, and may not
    vote on it. ``holder`` claims the new reservation of an allowed payment
    in the same step (see ``agentpolicy.ledger.claims``): only the holder
    settles it while it is open. ``before`` is the entry of the request's
    idempotency key that the agent's own shard kept from before the agent
    was placed in ``shard`` (a tree): it answers when ``shard`` has no entry
    of the key in its window (one there is newer).
    """
    agent = request.agent_id
    now_us = micros(now)
    head_name = keys.head(agent)
    key = request.idempotency_key
    idem_name = None if key is None else keys.idempotency(agent, key)
    first = (head_name,) if idem_name is None else (head_name, idem_name)
    fingerprint = "" if key is None else request.fingerprint()

    def step(view: View, txn: Txn) -> None:
        view.read(first, guess=first)
        head = Head.read(view, agent)
        head.check_horizon(now_us, agent)
        if idem_name is not None:
            earlier = _earlier(cfg, (view.doc(idem_name), before), key, fingerprint, now_us)
            if earlier is not None:
                txn.result = {"rec": earlier, "replayed": True}
                return
        version = head.body["pv"]
        policy = policies(agent, version, view)
        pointer = _unplaced(view, agent) if policy is None and shard == agent else None
        books = Books(view, head)
        grant = delegation_record(agent, head.body) if "dg" in head.body else None
        levels = [] if policy is None or policy.parent is None else chain(view, books, policy,
                                                                           policies)  # fmt: skip
        ancestors = [(lv.agent, lv.policy, lv.grant) for lv in levels] if levels else ()
        a = assess(policy, request, now, grant=grant, ancestors=ancestors)
        names = _book_names(agent, a)
        in_force = _in_force(shadows, view, books, a, levels, now)
        more = _prepare(view, txn, cfg, shard, books, a, names, levels, now_us, in_force,
                        batches=batches)  # fmt: skip
        if more:  # expiries past one batch: commit these, and the call runs the step again
            books.write(txn)
            txn.result = {"more": more}
            return
        usage = _usage(books, names, a, now_us)
        verdict = judge(a, usage)
        rec = _decision_record(now_us, verdict, request, usage, head, levels, requested_by)
        trials = rollout.try_shadows(shadows, view, txn, cfg, books, a, names, levels, grant,
                                     now, rec)  # fmt: skip
        if verdict.code in _PASSING:
            _hold(txn, cfg, shard, books, names, a, rec, verdict, levels, grant, now_us,
                  trials.extra, holder)  # fmt: skip
            _alerts(txn, cfg, shard, books, a, usage)
            record(txn, cfg, agent, rec)
            seen.append(verdict.decision(
                reservation_id=rec.get("rid"), approval_id=rec.get("aid"),
                expires_at=instant(rec["x"]), policy_version=version or None, decided_at=now,
            ))  # fmt: skip
        else:
            record(txn, cfg, agent, rec, denial=True)
            seen.append(verdict.decision(policy_version=version or None, decided_at=now))
        books.write(txn)
        if idem_name is not None:
            txn.put[idem_name] = {"fp": fingerprint, "c": now_us, "rec": rec}
            txn.ttl[idem_name] = _IDEMPOTENCY_KEEP_MS
            if policy is None and shard == agent:  # read from here once the agent is placed
                txn.put[keys.home(agent)] = {**(pointer or {}), "k": now_us}
        txn.result = {"rec": rec}

    return step


def _earlier(
    cfg: LedgerConfig,
    entries: tuple[Body | None, Body | None],
    key: str | None,
    fingerprint: str,
    now: int,
) -> Body | None:
    """The decision record a request's idempotency key answers with, if any still holds.

    ``entries`` are what the shard keeps under the key, then what the
    agent's own shard kept from before the agent was placed in it: an entry
    in the shard is newer, so the first one inside the idempotency window
    answers. Raises ``IDEMPOTENCY_CONFLICT`` when it was for a different
    request (``fingerprint``: ``PaymentRequest.fingerprint``).
    """
    for entry in entries:
        if entry is None or now - entry["c"] >= cfg.idempotency_ttl:
            continue
        if entry["fp"] != fingerprint:
            raise ConflictError(
                f"idempotency key {key!r} was used for a different request",
                code=ErrorCode.IDEMPOTENCY_CONFLICT,
            )
        rec: Body = entry["rec"]
        return rec
    return None


def _unplaced(view: View, agent: str) -> Body | None:
    """The pointer of an agent with no policy decided in its own shard, if it is not placed.

    Raises :class:`RelocatedError` when the agent was placed in a tree
    meanwhile: nothing of it is written in its own shard after that.
    """
    pointer: Body | None = view.doc(keys.home(agent))
    where = placed_in(pointer)
    if where is not None and where != agent:
        raise RelocatedError(agent, where)
    return pointer


def _decision_record(
    now: int,
    verdict: Verdict,
    request: PaymentRequest,
    usage: dict[str, tuple[int, int, int]],
    head: Head,
    levels: list[Level],
    requested_by: str | None,
) -> Body:
    """The history record of a decision: what was asked, decided and used, under which rules."""
    rec: Body = {
        "ev": "decision",
        "at": now,
        "code": verdict.code.value,
        "pv": head.body["pv"],
        "req": request_data(request),
        "use": usage,
    }
    if requested_by is not None:
        rec["by"] = requested_by
    if levels:
        rec["up"] = [[lv.agent, lv.head.body["pv"]] for lv in levels]
    grants = _grants(request.agent_id, head, levels)
    if grants:  # the delegations as they were: a replay decides the same
        rec["dg"] = grants
    return rec


def _grants(agent: str, head: Head, levels: list[Level]) -> Body:
    """The delegation of the agent and of every budget above it, by budget (those delegated)."""
    grants: Body = {}
    if head.body.get("dg") is not None:
        grants[agent] = head.body["dg"]
    for lv in levels:
        if lv.head.body.get("dg") is not None:
            grants[lv.agent] = lv.head.body["dg"]
    return grants


_FOR_A_BLOCK = ""
"""The claim of an approval's hold asked for by a payment block: kept for a block to claim.

No caller's holder is empty, so nobody settles it until a block (resuming the
approval) claims it for itself; the governed agent's own tools cannot.
"""


def _hold(
    txn: Txn,
    cfg: LedgerConfig,
    shard: str,
    books: Books,
    names: dict[BookKey, str],
    a: Assessment,
    rec: Body,
    verdict: Verdict,
    levels: list[Level],
    grant: Delegation | None,
    now: int,
    extra: Iterable[rollout.Extra] = (),
    holder: str | None = None,
) -> None:
    """Reserve the payment's amount (or hold it for an approval) in every tally it counts in.

    The reservation is listed under the agent and every budget above it. A
    pending approval lapses no later than the earliest delegation among them
    ends (the agent's ``grant``, the levels'); a reservation keeps its whole
    TTL past that end, as one keeps it past a revocation: its payment may be
    under way, and cutting it short would give back, before any block could
    confirm it, an amount that may have been paid (a delegation can be made
    to end in a second).
    ``extra`` are the counters only shadow policies keep: it counts there too.
    """
    request = a.request
    agent = request.agent_id
    token = keys.new_token(now)
    rid = keys.new_id("res", agent, token)
    version = rec["pv"]
    approval_id = None
    if verdict.code is Code.APPROVAL_REQUIRED:
        wanted = a.approvals()
        timeout_ms = min(
            p.approval_config.timeout if p.approval_config is not None
            else DEFAULT_APPROVAL_TIMEOUT_MS
            for _, _, p in wanted
        )  # fmt: skip
        expires = now + timeout_ms * 1000
        deadline = None if grant is None and not levels else grant_deadline(
            [grant, *(lv.grant for lv in levels)])  # fmt: skip
        if deadline is not None:
            expires = min(expires, deadline)
        approval_id = keys.new_id("apr", agent, token)
        groups = _groups(wanted)
        everyone = list(dict.fromkeys(w for _, _, who, _ in groups for w in who))
        signed = any(p.approval_config is not None and p.approval_config.require_signed_votes
                     for _, _, p in wanted)  # fmt: skip
        approval = approval_doc(
            agent=agent, request=rec["req"], required=sum(g[1] for g in groups),
            approvers=everyone, created=now, expires=expires, hold=rid,
            policy_version=version,
            groups=groups if len(wanted) > 1 or wanted[0][1].groups else (),
            requested_by=rec.get("by"), signed_votes=signed,
            above=[lv.agent for lv in levels],
        )  # fmt: skip
        name = keys.approval(approval_id)
        txn.put[name] = approval  # no ttl while pending: kept until it is decided or lapses
        txn.index.append((keys.pending_index(agent), approval_id, now))
        txn.index.append((keys.PENDING, approval_id, now))
        emit_approval(txn, cfg, shard, "approval.created", approval_id, approval)
        rec["aid"] = approval_id
    else:  # a delegation's end does not cut it: the payment may be under way (as at a revoke)
        expires = now + cfg.reservation_ttl
        rec["rid"] = rid
    rec["x"] = expires
    targets = _count(txn, books, names, a, now, rid, extra)
    name = keys.reservation(rid)
    level_ids = [agent, *(lv.agent for lv in levels)] if levels else [agent]
    txn.put[name] = reservation_doc(
        agent=agent, status="held" if approval_id else "reserved", request=rec["req"],
        targets=targets, created=now, expires=expires, policy_version=version,
        approval_id=approval_id, levels=level_ids,
        holder=_FOR_A_BLOCK if approval_id and holder is not None else holder,
    )  # fmt: skip
    # no ttl while open: the document says which counters to give the amount back to, so it
    # stays until the ledger closes it (expiry, confirm, release), which sets its ttl
    for level in level_ids:
        txn.index.append((keys.open_index(level), rid, expires))
    books.head.lower_due(expires)
    for lv in levels:
        lv.head.lower_due(expires)


def _count(
    txn: Txn,
    books: Books,
    names: dict[BookKey, str],
    a: Assessment,
    now: int,
    rid: str,
    extra: Iterable[rollout.Extra],
) -> tuple[_Target, ...]:
    """Reserve the payment in every counter it counts in; return them (the targets to undo)."""
    request = a.request
    value, decimals = request.amount, request.decimals
    parts: list[tuple[_Target, ...]] = []
    fresh = False
    for b in a.every_book:
        name = names[b.key]
        book = books[name]
        owner, scope = b.key
        if scope is not None and books.view.doc(name) is None:  # a scope's new group
            txn.index.append((keys.scope_groups(owner or request.agent_id, scope[0]), scope[1], 0))
        book.calendars(b.items, value, decimals, "reserve")
        parts.append(_calendar_targets(name, b.items))
        for t in b.rolling.values():
            book.rolling(txn, t.key, t.seconds or 0, value, decimals, "reserve", now, rid)
            parts.append(((name, t.key, "r", t.seconds or 0),))
            fresh = True
    extras = rollout.hold_extras(txn, books, extra, value, decimals, now, rid) if extra else ()
    if extras:
        parts.append(tuple(extras))
        fresh = True
    if len(parts) == 1:
        return parts[0]
    if fresh:  # a trailing counter's target is made anew: nothing to share
        return tuple(t for part in parts for t in part)
    return _joined(parts)


_Target = tuple[str, str, str, int]
"""A counter a reservation counts in: ``(book, key, "c", 0)`` or ``(book, key, "r", seconds)``."""


def _calendar_targets(name: str, items: tuple[tuple[str, Any], ...]) -> tuple[_Target, ...]:
    """The targets of a book's calendar counters: one tuple per book and (cached) windows."""
    found = _TARGETS.get((name, id(items)))
    if found is not None and found[0] is items:
        return found[1]
    targets = share(tuple((name, key, "c", 0) for key, _ in items))
    if len(_TARGETS) > 4096:
        _TARGETS.clear()
    _TARGETS[(name, id(items))] = (items, targets)
    return targets


_TARGETS: dict[tuple[str, int], tuple[Any, tuple[_Target, ...]]] = {}
"""Calendar targets by book and windows (their identity): reservations of an hour share them."""


def _joined(parts: list[tuple[_Target, ...]]) -> tuple[_Target, ...]:
    """The targets of several books as one tuple, shared while the parts are the same ones."""
    key = tuple(map(id, parts))
    found = _JOINED.get(key)
    if found is not None and all(map(is_, found[0], parts)):  # same length: the key's
        return found[1]
    joined = share(tuple(t for part in parts for t in part))
    if len(_JOINED) > 4096:
        _JOINED.clear()
    _JOINED[key] = (tuple(parts), joined)
    return joined


_JOINED: dict[tuple[int, ...], tuple[tuple[Any, ...], tuple[_Target, ...]]] = {}
"""Targets joined from the parts above (their identity): reservations of an hour share them."""


def _groups(
    wanted: list[tuple[str, ApprovalThreshold, AgentPolicy]],
) -> list[tuple[str, int, list[str], str]]:
    """The approver groups of an approval: ``(name, required, approvers, budget)`` each.

    A threshold without groups is one group named after its budget; a
    threshold with groups gives each of its groups, under the group's name.
    """
    found: list[tuple[str, int, list[str], str]] = []
    for budget, t, _ in wanted:
        if t.groups:
            found += [(g.name, g.required, list(g.approvers), budget) for g in t.groups]
        else:
            found.append((budget, t.required_approvers or 0, list(t.approvers), budget))
    return found


def _alerts(
    txn: Txn,
    cfg: LedgerConfig,
    shard: str,
    books: Books,
    a: Assessment,
    usage: dict[str, tuple[int, int, int]],
) -> None:
    """Announce every alert threshold this payment's amount carried usage across."""
    for level in (a, *a.parents) if a.parents else (a,):
        policy = level.policy
        if policy is not None and (policy.alerts or policy.scoped_limits):
            break
    else:
        return  # no alert anywhere: nothing to announce
    agent = a.request.agent_id
    amount = a.request.asset_amount
    for tally, limit, percents, label in a.alerting():
        before = usage.get(tally.usage_key)
        used, decimals = (before[0], before[1]) if before else (0, 0)
        d = max(decimals, amount.decimals, limit.decimals)
        old = used * 10 ** (d - decimals)
        new = old + amount.scaled_to(d)
        cap = limit.scaled_to(d)
        crossed = [p for p in percents if old * 100 < cap * p <= new * 100]
        if not crossed:
            continue
        book = books[_book_name(agent, (tally.owner, tally.book))]
        fired: list[int] = []
        if tally.seconds is None:  # once per calendar window
            counter = book.counters[tally.key]
            fired = list(counter[5]) if len(counter) > 5 else []
            crossed = [p for p in crossed if p not in fired]
            if crossed:
                book.own()["c"][tally.key] = [*counter[:5], sorted({*fired, *crossed})]
        for percent in crossed:
            owner = tally.owner or agent
            _budget_event(txn, cfg, shard, owner, tally, label, limit, percent, new, d)


def _budget_event(
    txn: Txn,
    cfg: LedgerConfig,
    shard: str,
    agent: str,
    tally: Tally,
    label: str,
    limit: Amount,
    percent: int,
    used: int,
    decimals: int,
) -> None:
    def payload() -> Body:
        budget: Body = {
            "agentId": agent,
            "limit": label,
            "percent": percent,
            "limitAmount": str(limit.value),
            "used": str(used),
            "usedDecimals": decimals,
            "decimals": limit.decimals,
            "symbol": limit.symbol,
        }
        if tally.window is not None:
            budget["windowStart"] = format_instant(tally.window.start)
            budget["windowEnd"] = format_instant(tally.window.end)
        if tally.book is not None:
            budget["scope"], budget["group"] = tally.book
        return {"budget": budget}

    emit(txn, cfg, shard, "budget.threshold_reached", agent, "", payload)


def settle(
    cfg: LedgerConfig,
    reservation_id: str,
    action: str,
    now: datetime,
    holder: str | None = None,
    agent: str | None = None,
    *,
    keep_sent: bool = False,
) -> Step:
    """Confirm (``action="confirm"``) or release a reservation.

    Confirming again, or releasing again (or after expiry), changes nothing
    and reports the reservation. The result is ``{"doc": reservation}``.
    Raises ``RESERVATION_NOT_FOUND``, ``RESERVATION_RELEASED``,
    ``RESERVATION_EXPIRED`` or ``RESERVATION_ALREADY_CONFIRMED``; and
    ``RESERVATION_CLAIMED`` for an open reservation another ``holder``
    claimed (see ``agentpolicy.ledger.claims``): only its holder settles it.
    ``agent`` is ``keys.agent_of_id(reservation_id)`` when the caller has it
    (else it is worked out here). With ``keep_sent`` (the governed agent's
    own release), releasing an open reservation marked sent is
    ``FORBIDDEN``: its payment may have been made.
    """
    now_us = micros(now)
    name = keys.reservation(reservation_id)
    if agent is None:
        agent = keys.agent_of_id(reservation_id)
    # a confirm moves no calendar counter: the head is read when a rolling one needs it
    names = (name,) if agent is None or action == "confirm" else (name, keys.head(agent))

    def step(view: View, txn: Txn) -> None:
        view.read(names, guess=names)
        doc = view.doc(name)
        if doc is None or doc["st"] == "held":
            raise NotFoundError(
                f"no reservation {reservation_id!r}", code=ErrorCode.RESERVATION_NOT_FOUND
            )
        status = doc["st"]
        txn.result = {"doc": doc}
        if status == "reserved" and now_us < doc["x"] and doc.get("cl") not in (None, holder):
            raise ConflictError(
                f"reservation {reservation_id} is claimed by a payment block (the caller making "
                "its payment, or the one resuming its approval): only that caller confirms or "
                "releases it (or it expires)",
                code=ErrorCode.RESERVATION_CLAIMED,
            )
        if action == "confirm":
            if status == "confirmed":
                return
            if status == "released":
                raise ConflictError(
                    f"reservation {reservation_id} was released",
                    code=ErrorCode.RESERVATION_RELEASED,
                )
            if status == "expired" or now_us >= doc["x"]:
                raise ConflictError(
                    f"reservation {reservation_id} expired",
                    code=ErrorCode.RESERVATION_EXPIRED,
                )
            new_status = "confirmed"
        else:
            if status == "confirmed":
                raise ConflictError(
                    f"reservation {reservation_id} is already confirmed",
                    code=ErrorCode.RESERVATION_ALREADY_CONFIRMED,
                )
            if status in ("released", "expired"):
                return
            new_status = "expired" if now_us >= doc["x"] else "released"
            if keep_sent and new_status == "released" and "snt" in doc:
                raise ForbiddenError(
                    f"reservation {reservation_id} is marked sent: its payment may have been "
                    "made, so only the caller that sent it (or an administrator) releases it; "
                    "unsettled, it counts as spent when it expires",
                    code=ErrorCode.FORBIDDEN,
                )
        books = None
        if needs_books(doc, closing(doc, new_status)):
            books = Books(view, Head.read(view, doc["agent"]))
        closed = close_reservation(txn, cfg, books, reservation_id, doc, new_status, now_us)
        txn.result = {"doc": closed}
        if books is not None:
            books.write(txn)

    return step


def vote(
    cfg: LedgerConfig,
    shard: str,
    approval_id: str,
    approver: str,
    decision: str,
    comment: str | None,
    now: datetime,
    proof: approvals.VoteProof = approvals.UNSIGNED,
) -> Step:
    """Record an approver's decision; approving enough turns the hold into a reservation.

    ``proof`` is what was checked before the step (a verified signature, a
    one-time link, or nothing); the vote records it. The result is
    ``{"doc": approval}``. Raises ``APPROVAL_NOT_FOUND``,
    ``APPROVAL_NOT_PENDING``, ``APPROVER_NOT_AUTHORIZED`` or
    ``DUPLICATE_DECISION`` (nothing changes).
    """
    now_us = micros(now)
    name = keys.approval(approval_id)
    agent = keys.agent_of_id(approval_id)
    names = [name]
    if agent is not None:
        names += [keys.head(agent), keys.reservation("res" + approval_id[3:])]

    def step(view: View, txn: Txn) -> None:
        view.read(names, guess=names)
        doc = view.doc(name)
        if doc is None:
            raise NotFoundError(f"no approval {approval_id!r}", code=ErrorCode.APPROVAL_NOT_FOUND)
        decided = approvals.cast_vote(
            approval_record(approval_id, doc), approver, decision, now, comment, proof
        )
        status = decided.status.value
        vote = decided.votes[-1]
        new = {
            **doc,
            "st": status,
            "votes": [*doc["votes"], vote_entry(vote, now_us)],
            "dec": now_us if decided.decided_at is not None else None,
        }
        txn.put[name] = new
        owner = doc["agent"]
        emit_approval(txn, cfg, shard, "approval.decision_submitted", approval_id, new, vote)
        detail = f"{approver}: {decision}" + (f" ({comment})" if comment else "")
        if vote.via == "signature":
            detail += f" [signed, key version {vote.key_version}]"
        elif vote.via == "link":
            detail += " [one-time link]"
        record(txn, cfg, owner, {"ev": "vote", "aid": approval_id, "code": decision,
                                 "detail": detail})  # fmt: skip
        txn.result = {"doc": new}
        if decided.status is ApprovalStatus.PENDING:
            return
        txn.ttl[name] = cfg.keep_closed_ms
        txn.index.append((keys.pending_index(owner), approval_id, None))
        txn.index.append((keys.PENDING, approval_id, None))
        hold_name = keys.reservation(doc["hold"])
        hold = view.doc(hold_name)
        if hold is None:  # pragma: no cover - written together with the approval
            raise NotFoundError("the approval's hold is missing", code=ErrorCode.INTERNAL)
        books = Books(view, Head.read(view, owner))
        if decided.status is ApprovalStatus.DENIED:
            close_reservation(txn, cfg, books, doc["hold"], hold, "released", now_us)
            record(txn, cfg, owner, {"ev": "approval_denied", "aid": approval_id})
            emit_approval(txn, cfg, shard, "approval.denied", approval_id, new)
        else:
            expires = _open_approved(txn, cfg, books, owner, doc["hold"], hold, now_us)
            record(txn, cfg, owner, {"ev": "approval_approved", "aid": approval_id,
                                     "rid": doc["hold"], "x": expires})  # fmt: skip
            emit_approval(txn, cfg, shard, "approval.approved", approval_id, new)
        books.write(txn)

    return step


def _open_approved(
    txn: Txn, cfg: LedgerConfig, books: Books, owner: str, rid: str, hold: Body, now_us: int
) -> int:
    """Turn an approved approval's hold into an open reservation; return when it expires."""
    heads = books.heads(levels_of(hold))
    whole = now_us + cfg.reservation_ttl
    expires = min(whole, _delegated_until(heads, owner, now_us))
    opened = {**hold, "st": "reserved", "x": expires, "u": now_us}
    if expires < whole:  # nobody pays with it yet: it ends with the delegation unless a
        opened["fx"] = whole  # block claims it (or it is marked sent) first (claims.py)
    txn.put[keys.reservation(rid)] = opened
    for head in heads:
        txn.index.append((keys.open_index(head.agent), rid, expires))
        head.lower_due(expires)
    return expires


def _delegated_until(heads: list[Head], owner: str, now: int) -> int:
    """When the delegations the payment's budgets hold now end (``MAX_SCORE``: never).

    An approval is approved against the delegations as they are now, not
    as they were when the payment was asked for: one revoked or ended since
    refuses the approving vote (nothing changes; the approval lapses at its
    timeout, or a deny releases it). The reservation it makes ends no later
    than they do until a payment block claims it (``fx``, see
    ``ledger/claims.py``): an approved payment nobody has begun to make
    ends with the delegation, as a revocation ends it.
    """
    until = MAX_SCORE
    for head in heads:
        ended = delegation_end(head.body)
        if ended is None:
            continue
        if ended <= now:
            raise ConflictError(
                f"the budget of {head.agent} is no longer delegated (it was revoked or its "
                f"delegation ended), so this approval can no longer let {owner} pay; nothing "
                "was changed, and the approval lapses at its timeout (or deny it)",
                code=ErrorCode.BUDGET_CONFLICT,
            )
        until = min(until, ended)
    return until


def expire(cfg: LedgerConfig, shard: str, agent: str, now: datetime) -> Step:
    """Expire what of the agent is due.

    The result is ``{"head": the head after it, "expired": [[id, reservation]],
    "lapsed": [[id, approval]], "more": whether more is still due}`` (one
    step expires at most :data:`~agentpolicy.ledger.state.EXPIRE_BATCH`).
    """
    now_us = micros(now)

    def step(view: View, txn: Txn) -> None:
        books = Books(view, Head.read(view, agent))
        expired, lapsed = expire_due(view, txn, cfg, shard, books, now_us)
        books.write(txn)
        txn.result = {"head": books.head.body, "expired": expired, "lapsed": lapsed,
                      "more": more_due(books.head, now_us)}  # fmt: skip

    return step


def refresh(
    cfg: LedgerConfig,
    shard: str,
    agent: str,
    now: datetime,
    rolling: list[tuple[str, int]],
    scopes: dict[str, list[tuple[str, int]]],
    windows: tuple[Window, ...] = (),
    read_under: tuple[int, Any] | None = None,
) -> Step:
    """Bring the agent's books up to now (expiries, ended windows, rolling windows) and read them.

    ``rolling`` are the head's rolling counters ``(key, seconds)``;
    ``scopes`` maps each scope name to its rolling counters (the same in
    every group); ``windows`` the calendar windows of the agent's policy
    now (a counter is kept until the window in force under its key ends).
    ``read_under`` is the policy version and shadow serial (``"pv"``,
    ``"sh"``) of the head ``windows`` were taken from: when the head names
    others by the time the step runs (a policy or shadow set in between),
    no counter is dropped, since ``windows`` may not be the ones in force.
    At most :data:`MAX_GROUPS_LISTED` groups of the scopes are read, scope
    by scope in the order given and each scope's groups in the order its
    index keeps them; a group left out is brought up to now by the next
    payment in it.
    The result is ``{"books": {name: body}, "groups": {book: [scope,
    group]}, "more_groups": [scopes with groups left out], "expired": ...,
    "lapsed": ...}``, or ``{"more": True,
    "expired": ..., "lapsed": ...}`` when more expiries were due than one
    step applies, or more payments left a rolling window than one step
    moves: it committed a batch of them, and the call runs it again.
    """
    now_us = micros(now)

    def step(view: View, txn: Txn) -> None:
        head = Head.read(view, agent)
        books = Books(view, head)
        owners: dict[str, list[str]] = {}
        more_groups: list[str] = []
        for scope in scopes:  # one past what is left says whether any were left out
            left = MAX_GROUPS_LISTED - len(owners)
            found = view.scan(keys.scope_groups(agent, scope), MAX_SCORE, left + 1)
            if len(found) > left:
                more_groups.append(scope)
            for group, _ in found[:left]:
                owners[keys.scope_book(agent, scope, group)] = [scope, group]
        books.need(owners)
        expired, lapsed = expire_due(view, txn, cfg, shard, books, now_us)
        if more_due(head, now_us):  # more than one batch: commit it, the call runs again
            books.write(txn)
            txn.result = {"more": True, "expired": expired, "lapsed": lapsed}
            return
        current = read_under is None or read_under == (head.body["pv"], head.body.get("sh"))
        due = False
        for name in [head.name, *owners]:  # (expiry may have touched books of others)
            book = books[name]
            if current:
                book.prune(now_us, cfg.counter_grace, windows)
            counters = rolling if book is head else scopes.get(owners[name][0], [])
            for key, seconds in counters:
                if now_us >= book.counters.get(key, {}).get("t", 0):  # a late read moves nothing
                    due |= book.advance(view, txn, key, seconds, now_us, cfg.counter_grace, agent)
        books.write(txn)
        if due:  # more payments left a rolling window than one step moves: the rest next
            txn.result = {"more": True, "expired": expired, "lapsed": lapsed}
            return
        names = [head.name, *owners]
        txn.result = {
            "books": {n: books[n].body for n in names},
            "groups": owners,
            "more_groups": more_groups,
            "open": _held(view, txn, agent, names),
            "expired": expired,
            "lapsed": lapsed,
        }

    return step


_OPEN_MAX = 1_000_000


def _held(
    view: View, txn: Txn, agent: str, names: list[str]
) -> dict[str, dict[str, tuple[int, int]]]:
    """What the open reservations listed under ``agent`` hold in these books' calendar counters.

    ``{book: {counter key: (value, decimals)}}``: a calendar counter counts
    an amount from its reserve on (spent or still open alike), so what of
    its usage is reserved is what the open reservations counted in it hold
    (as this step leaves them: it may have expired some).
    """
    wanted = set(names)
    found: dict[str, dict[str, tuple[int, int]]] = {}
    ids = [member for member, _ in view.scan(keys.open_index(agent), MAX_SCORE, _OPEN_MAX)]
    docs = [keys.reservation(r) for r in ids]
    view.read(docs)
    for name in docs:
        doc = txn.put.get(name) or view.doc(name)
        if doc is None or doc["st"] not in ("reserved", "held"):
            continue  # closed (its index entry goes in the same commit): none is left here
        value, decimals = int(doc["req"]["amount"]), doc["req"]["decimals"]
        targets = doc.get("tg")
        if targets is None:  # written before scoped and rolling limits: the head's windows
            targets = [(keys.head(doc["agent"]), key, "c", 0) for key in doc["w"]]
        for book, key, kind, _ in targets:
            if kind != "c" or book not in wanted:
                continue
            counters = found.setdefault(book, {})
            held, held_decimals = counters.get(key, (0, decimals))
            d = max(held_decimals, decimals)
            counters[key] = (
                scale_units(held, held_decimals, d) + scale_units(value, decimals, d),
                d,
            )
    return found
