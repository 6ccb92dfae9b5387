"""Safe rollout as ledger steps: dry runs, shadow policies judged beside the live one, promotion.

**Dry run.** :func:`dry_run` runs a step (the very authorize step) on a
transaction nobody commits: it sees what authorize would see at this
instant (due expiries, ended windows and rolling windows brought up to now,
all in memory) and writes nothing; its session is a reading one (no write
lock on SQLite or PostgreSQL).

**Shadow.** While an agent has a shadow policy its head holds ``"sh"`` (the
shadow's serial) and :func:`keys.shadow` holds the candidate and its tally
of ``(live code, shadow code)`` pairs. Every authorize that counts in the
agent's budget (its own payments and those of budgets below it) judges the
payment again with the shadow in the agent's place, at the same instant
and against the same usage; :func:`judge_shadows` returns the trials, the
live decision stays the one enforced. The shadow's own tallies that the
live policy does not keep (a rolling window, a count, a scope, windows of
another timezone) are **extras**: an allowed (or held) live payment counts
in them too, listed in its reservation's targets, so confirm, release and
expiry undo them with no other code. Extras live where a live policy with
the same limits would keep them, except the books of a shadow scope that
redefines a live scope of the same name, which get books of their own
(:func:`keys.shadow_scope_book`), so the live decision never reads what
only the shadow counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from agentpolicy.codec import format_instant
from agentpolicy.errors import ConflictError, ErrorCode, NotFoundError, PolicyValidationError
from agentpolicy.ledger import keys, trees
from agentpolicy.ledger.docs import Body
from agentpolicy.ledger.runner import View
from agentpolicy.ledger.state import Books, Head, LedgerConfig, record
from agentpolicy.ledger.tallies import ClockBehindError
from agentpolicy.ledger.trees import Level, PolicySource
from agentpolicy.policy import AgentPolicy, ScopedLimit
from agentpolicy.records import Delegation
from agentpolicy.rules import Assessment, BookKey, Verdict, assess, judge, windows_for
from agentpolicy.shadow import by_outcome, tally_pairs
from agentpolicy.storage._time import instant, micros
from agentpolicy.storage.base import Txn
from agentpolicy.windows import Window

__all__ = [
    "Extra",
    "ShadowSource",
    "Trials",
    "clear_shadow",
    "dry_run",
    "hold_extras",
    "judge_shadows",
    "promote_shadow",
    "set_shadow",
    "shadow_windows",
    "shadowed",
    "try_shadows",
]

Step = Callable[[View, Txn], None]

ShadowSource = Callable[[str, Body], AgentPolicy]
"""The engine's parsed shadows: ``(agent, shadow document) -> policy`` (cached by serial)."""

Extra = tuple[str, str, int | None, Window | None, tuple[str, str, str] | None]
"""A counter only a shadow keeps: book, key, seconds (rolling) or window (calendar), and
``(owner, scope, group)`` when it is a scope book of the live kind (indexed by group)."""


def dry_run(inner: Step) -> Step:
    """``inner`` run on a transaction that is thrown away: only its result is kept."""

    def step(view: View, txn: Txn) -> None:
        scratch = Txn(txn.op, txn.at)
        inner(view, scratch)
        txn.result = scratch.result

    return step


# -- shadows judged beside authorize ------------------------------------------------------------


def shadowed(head: Head, levels: Iterable[Level]) -> bool:
    """Whether the agent or a budget above it has a shadow policy (cheap: the heads say)."""
    return "sh" in head.body or any("sh" in lv.head.body for lv in levels)


class Trial:
    """One shadow's verdict on one payment."""

    __slots__ = ("doc", "name", "owner", "verdict")

    def __init__(self, owner: str, name: str, doc: Body, verdict: Verdict) -> None:
        self.owner = owner
        self.name = name
        self.doc = doc
        self.verdict = verdict


class Trials:
    """Every shadow that judged one payment, and the extras the payment counts in if held."""

    __slots__ = ("extra", "trials")

    def __init__(self) -> None:
        self.trials: list[Trial] = []
        self.extra: list[Extra] = []

    def record(self, txn: Txn, cfg: LedgerConfig, rec: Body) -> None:
        """Tally each shadow's pair of codes; log the payment where the codes differ."""
        live = rec["code"]
        keep = None if cfg.history_retention is None else txn.at - cfg.history_retention
        for trial in self.trials:
            code = trial.verdict.code.value
            pair = f"{live}>{code}"
            tally = dict(trial.doc.get("n", {}))
            tally[pair] = tally.get(pair, 0) + 1
            txn.put[trial.name] = {**trial.doc, "n": tally}
            if code != live:
                entry = {"ev": "shadow", "at": rec["at"], "id": trial.doc["id"], "req": rec["req"],
                         "live": live, "shadow": code, "pv": rec["pv"]}  # fmt: skip
                txn.append.append((keys.shadow_log(trial.owner), entry, keep, cfg.max_denials))


def _same_scope(a: ScopedLimit, b: ScopedLimit) -> bool:
    """Whether two scopes count the same payments in the same groups."""
    return a.match == b.match and a.group_by == b.group_by and a.token == b.token


def _books_of(
    agent: str, owner_key: str | None, owner: str, sa: Assessment, live: AgentPolicy | None
) -> dict[BookKey, tuple[str, tuple[str, str, str] | None]]:
    """Where each book of the shadow's assessment is kept (and the group index of a new one)."""
    found: dict[BookKey, tuple[str, tuple[str, str, str] | None]] = {}
    live_scopes = {} if live is None else {s.name: s for s in live.scoped_limits}
    for b in sa.every_book:
        who, scope = b.key
        if scope is None:
            found[b.key] = (keys.head(who or agent), None)
        elif who != owner_key or b.scope is None:
            found[b.key] = (keys.scope_book(who or agent, *scope), None)
        else:
            same = live_scopes.get(scope[0])
            if same is None or _same_scope(same, b.scope):
                found[b.key] = (keys.scope_book(owner, *scope), (owner, *scope))
            else:
                found[b.key] = (keys.shadow_scope_book(owner, *scope), None)
    return found


NO_TRIALS = Trials()
"""No shadow judged the payment (never changed)."""


def shadow_windows(
    source: ShadowSource, view: View, head: Head, levels: Iterable[Level], now: datetime
) -> tuple[Window, ...]:
    """The calendar windows of the shadow policies on the agent's way, now.

    A book keeps a counter until the window in force under its key ends,
    and a shadow is judged on the same counters as the live policy: so the
    counters a shadow in another timezone still counts in are kept too
    (else the live policy's pruning dropped them, and the shadow, and the
    policy once promoted, started that window from zero).
    """
    found: tuple[Window, ...] = ()
    for owner in (head, *(lv.head for lv in levels)):
        doc = _shadow_of(view, owner)
        if doc is not None:
            found += windows_for(source(owner.agent, doc), now)
    return found


def _shadow_of(view: View, head: Head) -> Body | None:
    """The shadow document ``head`` names, if it has one (reads it when it does)."""
    serial = head.body.get("sh")
    if serial is None:
        return None
    name = keys.shadow(head.agent)
    view.read((name,), guess=(name,))
    doc = view.doc(name)
    return doc if doc is not None and doc.get("id") == serial else None


def try_shadows(
    source: ShadowSource | None,
    view: View,
    txn: Txn,
    cfg: LedgerConfig,
    books: Books,
    a: Assessment,
    live_books: dict[BookKey, str],
    levels: list[Level],
    grant: Delegation | None,
    now: datetime,
    rec: Body,
) -> Trials:
    """Judge and record the decision ``rec`` with every shadow on its way, if there is one.

    Costs one look at the heads when there is none.
    """
    if source is None or not shadowed(books.head, levels):
        return NO_TRIALS
    trials = judge_shadows(view, txn, cfg, books, a, live_books, levels, grant, now, source)
    trials.record(txn, cfg, rec)
    return trials


def judge_shadows(
    view: View,
    txn: Txn,
    cfg: LedgerConfig,
    books: Books,
    a: Assessment,
    live_books: dict[BookKey, str],
    levels: list[Level],
    grant: Delegation | None,
    now: datetime,
    source: ShadowSource,
) -> Trials:
    """Judge the payment with each shadow on its way (the agent's, and those above it).

    Each shadow is judged in its budget's place, the other budgets as they
    are live. Its extras are brought up to ``now`` (expiries were applied
    already); a shadow whose extras cannot be read at this instant (the
    engine's clock far behind) is skipped for this payment.
    """
    request = a.request
    agent = request.agent_id
    now_us = micros(now)
    ancestors = [(lv.agent, lv.policy, lv.grant) for lv in levels]
    owners = [(books.head, a.policy), *((lv.head, lv.policy) for lv in levels)]
    live = {(live_books[(t.owner, t.book)], t.key) for t in a.tallies}
    found = Trials()
    for index, (head, live_policy) in enumerate(owners):
        doc = _shadow_of(view, head)
        if doc is None:
            continue
        shadow = source(head.agent, doc)
        if index == 0:
            sa = assess(shadow, request, now, grant=grant, ancestors=ancestors)
        else:
            mine = list(ancestors)
            mine[index - 1] = (head.agent, shadow, mine[index - 1][2])
            sa = assess(a.policy, request, now, grant=grant, ancestors=mine)
        where = _books_of(agent, None if index == 0 else head.agent, head.agent, sa, live_policy)
        try:
            extra = _prepare(view, txn, cfg, books, sa, where, live, now_us, agent)
        except ClockBehindError:
            continue
        usage = _usage(books, where, sa, now_us)
        found.trials.append(Trial(head.agent, keys.shadow(head.agent), doc, judge(sa, usage)))
        found.extra += [e for e in extra if e not in found.extra]
    return found


def _prepare(
    view: View,
    txn: Txn,
    cfg: LedgerConfig,
    books: Books,
    sa: Assessment,
    where: dict[BookKey, tuple[str, tuple[str, str, str] | None]],
    live: set[tuple[str, str]],
    now: int,
    agent: str,
) -> list[Extra]:
    """Bring the shadow's own books up to ``now``; return the counters only it keeps."""
    names = {where[b.key][0] for b in sa.every_book}
    fresh = [n for n in names if n not in books.by_name]
    books.need(fresh)
    in_force = sa.windows_in_force()
    for name in fresh:
        books[name].prune(now, cfg.counter_grace, in_force)
    extra: list[Extra] = []
    for t in sa.tallies:
        name, group = where[(t.owner, t.book)]
        if (name, t.key) in live:
            continue
        if t.seconds is not None:
            books[name].advance(view, txn, t.key, t.seconds, now, cfg.counter_grace, agent)
        extra.append((name, t.key, t.seconds, t.window, group))
    return extra


def _usage(
    books: Books,
    where: dict[BookKey, tuple[str, tuple[str, str, str] | None]],
    sa: Assessment,
    now: int,
) -> dict[str, tuple[int, int, int]]:
    """What every tally of the shadow's assessment has used, as its books have it now."""
    usage: dict[str, tuple[int, int, int]] = {}
    for t in sa.tallies:
        book = books[where[(t.owner, t.book)][0]]
        if t.seconds is None:
            c = book.counters.get(t.key)
            if c is not None:
                usage[t.usage_key] = (c[2] + c[3], c[1], c[4] if len(c) > 4 else 0)
        else:
            value, decimals, count = book.rolling_used(t.key, now)
            if value or count:
                usage[t.usage_key] = (value, decimals, count)
    return usage


def hold_extras(
    txn: Txn,
    books: Books,
    extra: Iterable[Extra],
    value: int,
    decimals: int,
    now: int,
    rid: str,
) -> list[tuple[str, str, str, int]]:
    """Count a held payment in the counters only shadows keep; return them as targets."""
    targets: list[tuple[str, str, str, int]] = []
    for name, key, seconds, window, group in extra:
        book = books[name]
        if group is not None and books.view.doc(name) is None:  # a scope's new group
            owner, scope, member = group
            txn.index.append((keys.scope_groups(owner, scope), member, 0))
        if seconds is None:
            book.calendars(((key, window),), value, decimals, "reserve")
            targets.append((name, key, "c", 0))
        else:
            book.rolling(txn, key, seconds, value, decimals, "reserve", now, rid)
            targets.append((name, key, "r", seconds))
    return targets


# -- shadow steps ----------------------------------------------------------------------------------


def _no_shadow(agent: str) -> NotFoundError:
    return NotFoundError(f"agent {agent} has no shadow policy", code=ErrorCode.SHADOW_NOT_FOUND)


def _same_parent(agent: str, shadow: AgentPolicy, live: AgentPolicy | None) -> None:
    parent = None if live is None else live.parent
    if shadow.parent != parent:
        where = "no parent" if parent is None else f"parent {parent!r}"
        raise PolicyValidationError.single(
            "$.policy.parent",
            f"a shadow policy keeps the live policy's parent ({where} for {agent}); "
            "change the parent with set_policy",
        )


def set_shadow(
    cfg: LedgerConfig,
    agent: str,
    policy: AgentPolicy,
    data: dict[str, Any],
    now: datetime,
    policies: PolicySource,
) -> Step:
    """Set (or replace) the agent's shadow policy; its tallies start from nothing.

    The result is the shadow's document. Raises ``NO_POLICY`` for an agent
    without a live policy, ``INVALID_INPUT`` when the shadow names another
    parent than the live policy.
    """
    now_us = micros(now)

    def step(view: View, txn: Txn) -> None:
        head = Head.read(view, agent)
        version = head.body["pv"]
        if version == 0:
            raise NotFoundError(f"no policy is set for agent {agent}", code=ErrorCode.NO_POLICY)
        _same_parent(agent, policy, policies(agent, version, view))
        serial = keys.new_token(now_us)
        # set_at names the shadow a promotion was reviewed for: one set in the same microsecond
        # as the one before it (or, by a clock behind, earlier) is stamped just after it, so no
        # two shadows of an agent share an instant (a cleared or promoted one keeps its own)
        before = view.doc(keys.shadow(agent))
        at = now_us if before is None or before.get("at", -1) < now_us else before["at"] + 1
        doc = {"policy": data, "at": at, "id": serial, "pv": version, "n": {}}
        txn.put[keys.shadow(agent)] = doc
        head.set("sh", serial)
        head.write(txn)
        words = f"shadow policy set beside version {version}"
        record(txn, cfg, agent, {"ev": "shadow_set", "pv": version, "detail": words})
        txn.result = doc

    return step


def _drop(head: Head) -> None:
    body = head.own()
    body.pop("sh", None)


_CLEARED: Body = {"id": ""}
"""What :func:`keys.shadow` holds once its shadow is cleared or promoted: no shadow.

Its ``id`` is no serial (nor ``None``, what a head without ``"sh"`` gives),
so nothing takes it for a shadow. Written, it keeps the ``at`` of the shadow
it ends, so that the next shadow is stamped later (see ``set_shadow``).

The document is overwritten, never deleted, so that its version only ever
grows. A deleted document written again starts at version 1, and an
optimistic store (Redis) checks a commit by versions: a process holding
the cleared shadow's document at version n in its cache took the next
shadow's document at version n for it, found another serial than the head
names, judged the payment with no shadow, and the commit passed. The
payment was then neither tallied nor counted in the counters only the
shadow keeps (promoted, its rolling hour let 90 more through).
"""


def _ended(txn: Txn, cfg: LedgerConfig, agent: str, version: int, doc: Body, how: str) -> None:
    """Record the end of a shadow with what it judged: its tallies outlive its document.

    A promotion returns only the new version, and a clear's report is read
    after its commit: the history keeps the figures the decision rested on.
    """
    live, shadow, _, total = tally_pairs(doc.get("n", {}))

    def outcomes(codes: dict[str, int]) -> str:
        return ", ".join(f"{n} {outcome}" for outcome, n in by_outcome(codes).items())

    words = (
        f"shadow policy set beside version {doc['pv']} {how} after {total} payment(s) judged: "
        f"live {outcomes(live)}; shadow {outcomes(shadow)}"
    )
    record(txn, cfg, agent, {"ev": "shadow_cleared", "pv": version, "detail": words})


def clear_shadow(cfg: LedgerConfig, agent: str) -> Step:
    """Remove the agent's shadow policy; the result is its last document (with its tallies)."""

    def step(view: View, txn: Txn) -> None:
        head = Head.read(view, agent)
        name = keys.shadow(agent)
        doc = view.doc(name)
        if doc is None or head.body.get("sh") != doc["id"]:
            raise _no_shadow(agent)
        _drop(head)
        head.write(txn)
        txn.put[name] = {**_CLEARED, "at": doc["at"]}  # see set_shadow
        _ended(txn, cfg, agent, head.body["pv"], doc, "cleared")
        txn.result = doc

    return step


def promote_shadow(
    cfg: LedgerConfig,
    shard: str,
    agent: str,
    now: datetime,
    policies: PolicySource,
    source: ShadowSource,
    *,
    force: bool = False,
    set_at: int | None = None,
) -> Step:
    """Make the shadow the agent's live policy (a new version) and remove it, in one commit.

    The new version is checked as :func:`trees.put_policy` checks any
    version. A shadow set beside an older version than the live one (a
    version set, rolled back or delegated since) is refused with
    ``SHADOW_OUTDATED`` unless ``force``: promoting it would silently undo
    that later version. With ``set_at`` (microseconds), only the shadow set
    at that instant is promoted: one set since (another candidate, which
    nobody reviewed) is ``SHADOW_OUTDATED``, ``force`` or not. The result is
    ``{"version": new version, "doc": the shadow}``.
    """

    def step(view: View, txn: Txn) -> None:
        head = Head.read(view, agent)
        name = keys.shadow(agent)
        doc = view.doc(name)
        if doc is None or head.body.get("sh") != doc["id"]:
            raise _no_shadow(agent)
        if set_at is not None and doc["at"] != set_at:
            was, asked = format_instant(instant(doc["at"])), format_instant(instant(set_at))
            raise ConflictError(
                f"the shadow policy of agent {agent} was set at {was}, not at {asked}: it was "
                "replaced since; report on it and promote it with its own setAt",
                code=ErrorCode.SHADOW_OUTDATED,
            )
        shadow = source(agent, doc)
        _same_parent(agent, shadow, policies(agent, head.body["pv"], view))
        if doc["pv"] != head.body["pv"] and not force:
            raise ConflictError(
                f"the shadow policy of agent {agent} was set beside version {doc['pv']}, "
                f"and version {head.body['pv']} is live now: promoting it would undo "
                f"version {head.body['pv']}; set the shadow again beside the live version, "
                "or promote with force",
                code=ErrorCode.SHADOW_OUTDATED,
            )
        _ended(txn, cfg, agent, head.body["pv"], doc, f"promoted as version {head.body['pv'] + 1}")
        origin = {"op": "promote", "at": doc["at"]}
        trees.put_policy(
            cfg, agent, shadow, doc["policy"], now, policies, origin=origin, shard=shard
        )(view, txn)
        version = txn.result
        head_name = keys.head(agent)
        body = dict(txn.put[head_name])
        body.pop("sh", None)
        txn.put[head_name] = body
        txn.put[name] = {**_CLEARED, "at": doc["at"]}  # see set_shadow
        txn.result = {"version": version, "doc": doc}

    return step
