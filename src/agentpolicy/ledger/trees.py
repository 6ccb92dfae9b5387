"""Budget trees: parents, delegation and revocation, as ledger steps.

A policy may name a ``parent``: a payment by the agent must then pass the
parent's rules and limits too (and its parent's, up to
:data:`~agentpolicy.policy.MAX_TREE_DEPTH` budgets), and counts in all of
their counters in the same commit. Every budget of a tree lives in one shard
(the shard of the agent it grew from), so that one commit can move them all;
an agent set up under a parent records where it lives in its own shard
(:func:`agentpolicy.ledger.keys.home`), written once.

A budget that joins a tree, or moves in it, counts in the head of every
budget above it (``"jb"``): a budget moved meanwhile (whose step counted the
levels below it by their index, which a commit does not check) then finds
its own head changed and runs again, so no race leaves a payment passing
through more than :data:`~agentpolicy.policy.MAX_TREE_DEPTH` budgets.

Each budget's head lists, in its open-reservation index, the open
reservations of every budget below it, so expiring under an ancestor frees
what its descendants held, and revoking a delegated budget finds every open
reservation below it in one index.

What an agent delegates itself (``by_parent``) is bounded, since every
version is kept for good: at most
:data:`~agentpolicy.policy.MAX_DELEGATED_POLICY_BYTES` a policy, and at most
``delegation.maxChildren`` budgets and ``maxChildren *``
:data:`~agentpolicy.policy.DELEGATED_VERSIONS_PER_CHILD` versions below a
budget, counted in its head (``"dq": {"n": budgets, "v": versions}``) in the
step that writes them (see :func:`quota_levels`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import attrs

from agentpolicy.errors import (
    ConflictError,
    ErrorCode,
    ForbiddenError,
    InternalError,
    NotFoundError,
    PolicyValidationError,
    Problem,
)
from agentpolicy.ledger import keys
from agentpolicy.ledger.docs import Body, delegation_record
from agentpolicy.ledger.runner import View
from agentpolicy.ledger.state import (
    Books,
    Closed,
    Head,
    LedgerConfig,
    close_reservation,
    lapse,
    record,
)
from agentpolicy.ledger.tallies import MAX_SCORE
from agentpolicy.policy import (
    DEFAULT_MAX_CHILDREN,
    DELEGATED_VERSIONS_PER_CHILD,
    MAX_DELEGATED_POLICY_BYTES,
    MAX_TREE_DEPTH,
    AgentPolicy,
    SpendingLimits,
)
from agentpolicy.records import Delegation
from agentpolicy.storage._time import micros
from agentpolicy.storage.base import Txn

__all__ = [
    "Grant",
    "Level",
    "PolicySource",
    "RelocatedError",
    "cap_problems",
    "chain",
    "delegation_end",
    "last_key_at",
    "place",
    "placed_in",
    "put_policy",
    "quota_levels",
    "revoke",
]

Step = Callable[[View, Txn], None]

PolicySource = Callable[[str, int, View], AgentPolicy | None]
"""The engine's parsed policies: ``(agent, version, view) -> policy`` (``None`` for version 0)."""

_MAX_SUBTREE = 100_000
_REVOKE_MAX = 1_000_000


class RelocatedError(ConflictError):
    """The agent was placed in another tree's shard meanwhile: run the step there instead."""

    def __init__(self, agent: str, shard: str) -> None:
        super().__init__(
            f"the budget of {agent} is kept with the tree of {shard}",
            code=ErrorCode.BUDGET_CONFLICT,
        )
        self.shard = shard


@attrs.frozen
class Level:
    """One budget above an agent: its id, head, policy, and delegation if it was delegated."""

    agent: str
    head: Head
    policy: AgentPolicy | None
    grant: Delegation | None


@attrs.frozen
class Grant:
    """A delegation being made: by ``parent``, until ``expires`` (microseconds) or for ever.

    ``by_parent`` is true when the parent agent itself asks (an agent-role
    MCP server): its policy's ``delegation`` switch must allow it.
    """

    parent: str
    expires: int | None
    by_parent: bool = False


def chain(
    view: View, books: Books, policy: AgentPolicy | None, policies: PolicySource
) -> list[Level]:
    """The budgets above ``books.head``'s agent, its parent first (their heads join ``books``)."""
    found: list[Level] = []
    parent = None if policy is None else policy.parent
    seen = {books.head.agent}
    while parent is not None:
        if len(found) + 1 >= MAX_TREE_DEPTH or parent in seen:
            raise InternalError(
                f"the budget tree above {books.head.agent} is deeper than {MAX_TREE_DEPTH} "
                "budgets or loops; nothing was allowed or changed"
            )
        seen.add(parent)
        (head,) = books.heads((parent,))
        above = policies(parent, head.body["pv"], view)
        found.append(Level(parent, head, above, delegation_record(parent, head.body)))
        parent = None if above is None else above.parent
    return found


def placed_in(pointer: Body | None) -> str | None:
    """The shard an agent's pointer (:func:`agentpolicy.ledger.keys.home`) records, if any.

    Before an agent is placed, the document may exist without a shard: it
    then only says that idempotency keys of the agent's are kept in its own
    shard (``"k"``, see :func:`last_key_at`).
    """
    return None if pointer is None else pointer.get("s")


def last_key_at(pointer: Body | None) -> int | None:
    """When the newest decision with an idempotency key was recorded in the agent's own shard.

    An agent with no policy yet is decided in its own shard, and each such
    decision with a key notes its time (``"k"``, microseconds on the clock
    of the engine that decided it, as the key's entry). Once the agent is
    placed in a tree its own shard changes no more, so what it keeps there
    (those keys, its denials) is read from there as it was, and no key of it
    is read once this time is older than the idempotency window.
    """
    found = None if pointer is None else pointer.get("k")
    return found if type(found) is int else None


def place(agent: str, home: str) -> Step:
    """Record that ``agent`` lives in shard ``home`` (its tree), unless it already lives somewhere.

    Runs in the agent's own shard. The result is where the agent lives: the
    recorded shard, its own shard when it already has a policy there, else
    ``home`` (now recorded, with what the document said before kept).
    """
    pointer, head = keys.home(agent), keys.head(agent)

    def step(view: View, txn: Txn) -> None:
        view.read((pointer, head))
        found = view.doc(pointer)
        where = placed_in(found)
        if where is not None:
            txn.result = where
            return
        own = view.doc(head)
        if home == agent or (own is not None and own["pv"] > 0):
            txn.result = agent
            return
        txn.put[pointer] = {**(found or {}), "s": home}
        txn.result = home

    return step


def _invalid(path: str, message: str) -> PolicyValidationError:
    return PolicyValidationError([Problem(path, message)])


def _height(view: View, agent: str) -> int | None:
    """How many levels of budgets hang from ``agent``, itself included (``None``: too many)."""
    level, height, total = [agent], 1, 0
    while True:
        below = [m for a in level for m, _ in view.scan(keys.children(a), MAX_SCORE, _MAX_SUBTREE)]
        total += len(below)
        if not below:
            return height
        if total > _MAX_SUBTREE:
            return None
        if height > MAX_TREE_DEPTH:
            return MAX_TREE_DEPTH + 1
        level, height = below, height + 1


def _check_parent(
    view: View,
    books: Books,
    agent: str,
    parent: str,
    policies: PolicySource,
    *,
    moved: bool = True,
) -> list[Level]:
    """Refuse a parent that is missing, makes a cycle or makes the tree too deep.

    The budgets below the agent are counted only when it ``moved`` (a parent
    it did not have): a new version under the same parent changes no path,
    so however many budgets hang below it (delegated by the agent itself),
    an administrator can always change or disable its policy.
    """
    path = "$.policy.parent"
    levels: list[Level] = []
    current: str | None = parent
    while current is not None:
        if current == agent:
            raise _invalid(path, f"{parent!r} is {agent} or below it: that would make a cycle")
        if len(levels) >= MAX_TREE_DEPTH:
            break  # too deep either way: refused below
        (head,) = books.heads((current,))
        above = policies(current, head.body["pv"], view)
        if above is None and current == parent:
            raise _invalid(path, f"budget {parent!r} has no policy: set the parent's policy first")
        levels.append(Level(current, head, above, delegation_record(current, head.body)))
        current = None if above is None else above.parent
    if not moved and len(levels) < MAX_TREE_DEPTH:
        return levels
    height = _height(view, agent)
    if height is None:
        raise _invalid(
            path,
            f"more than {_MAX_SUBTREE:,} budgets hang below {agent}: it cannot be moved to "
            "another parent (revoke or remove budgets below it first)",
        )
    if len(levels) + height > MAX_TREE_DEPTH:
        raise _invalid(
            path,
            f"a payment would pass through more than {MAX_TREE_DEPTH} budgets "
            "(this agent, the budgets below it and those above the parent)",
        )
    return levels


def _active(grant: Delegation | None, now: datetime) -> bool:
    return grant is None or grant.active(now)


def quota_levels(levels: Sequence[Level]) -> list[Level]:
    """The budgets whose delegation quota an agent's delegation below ``levels[0]`` uses.

    The parent; and while the budget counted was itself delegated by an
    agent (so an agent chose its ``maxChildren``), the budget above it too,
    up to the first budget an administrator set up (or delegated). So an
    agent's whole tree of sub-agents fits in the quota its administrator set.
    """
    counted: list[Level] = []
    for level in levels:
        counted.append(level)
        dg = level.head.body.get("dg")
        if dg is None or dg.get("adm"):
            break
    return counted


def _quota_used(head: Head) -> tuple[int, int]:
    """Budgets and versions agents delegated below this budget so far."""
    dq = head.body.get("dq") or {}
    return int(dq.get("n", 0)), int(dq.get("v", 0))


def _check_quota(levels: Sequence[Level], new: bool) -> None:
    """Refuse an agent's delegation past a ``maxChildren`` of a budget above (``FORBIDDEN``)."""
    for level in quota_levels(levels):
        rules = level.policy.delegation if level.policy is not None else None
        most = DEFAULT_MAX_CHILDREN if rules is None else rules.max_children
        made, written = _quota_used(level.head)
        if new and made >= most:
            raise ForbiddenError(
                f"agents have delegated the {most:,} budget(s) below {level.agent} that its "
                "policy allows (delegation.maxChildren; revoked and expired ones count, their "
                "versions are kept): an administrator may raise it",
                code=ErrorCode.FORBIDDEN,
            )
        if written >= most * DELEGATED_VERSIONS_PER_CHILD:
            raise ForbiddenError(
                f"agents have written the {most * DELEGATED_VERSIONS_PER_CHILD:,} policy "
                f"versions below {level.agent} that its policy allows by delegating "
                f"({DELEGATED_VERSIONS_PER_CHILD} per delegation.maxChildren): an administrator "
                "may raise maxChildren",
                code=ErrorCode.FORBIDDEN,
            )


def _use_quota(grant: Grant, levels: Sequence[Level], new: bool) -> None:
    """Count an agent's delegation in every budget whose quota it uses (same commit)."""
    if not grant.by_parent:
        return  # an administrator's delegations are not counted
    for level in quota_levels(levels):
        made, written = _quota_used(level.head)
        level.head.set("dq", {"n": made + new, "v": written + 1})


def _check_size(data: dict[str, Any]) -> None:
    """Refuse a policy an agent delegates past :data:`MAX_DELEGATED_POLICY_BYTES`."""
    size = len(json.dumps(data, separators=(",", ":")))  # ASCII: as the stores keep it
    if size > MAX_DELEGATED_POLICY_BYTES:
        raise _invalid(
            "$.policy",
            f"is {size:,} bytes of JSON: a policy an agent delegates may be at most "
            f"{MAX_DELEGATED_POLICY_BYTES:,} bytes (an administrator may set a larger one)",
        )


def _check_grant(
    grant: Grant,
    child: Head,
    policy: AgentPolicy,
    data: dict[str, Any],
    levels: list[Level],
    now: datetime,
) -> int | None:
    """Refuse a delegation its parent cannot make; return when it ends (microseconds)."""
    parent = levels[0]
    if policy.parent != grant.parent:
        raise _invalid("$.policy.parent", f"a budget delegated by {grant.parent} has it as parent")
    if not all(_active(level.grant, now) for level in levels):
        raise ConflictError(
            f"{grant.parent}'s own budget is no longer delegated to it (revoked or expired)",
            code=ErrorCode.BUDGET_CONFLICT,
        )
    dg = child.body.get("dg")
    if child.body["pv"] > 0 and (dg is None or dg["by"] != grant.parent):
        raise ConflictError(
            f"agent {child.agent} already has a budget that {grant.parent} did not delegate",
            code=ErrorCode.BUDGET_CONFLICT,
        )
    if dg is not None and dg["rv"] is not None:
        raise ConflictError(
            f"the budget of {child.agent} was revoked; delegate under a new agent id",
            code=ErrorCode.BUDGET_CONFLICT,
        )
    if grant.by_parent and dg is not None and dg.get("adm"):
        raise ForbiddenError(
            f"the budget of {child.agent} was delegated by an administrator: only an "
            f"administrator changes it ({grant.parent} may revoke it)",
            code=ErrorCode.FORBIDDEN,
        )
    now_us = micros(now)
    expires = grant.expires
    if expires is not None and expires <= now_us:
        raise _invalid("$.expiresAt", "must be in the future")
    ends = [micros(g.expires_at) for g in (lv.grant for lv in levels) if g and g.expires_at]
    if ends:
        if expires is not None and expires > min(ends):
            raise _invalid("$.expiresAt", "must not be after the parent's own delegation ends")
        expires = min(ends) if expires is None else expires
    if grant.by_parent:
        rules = parent.policy.delegation if parent.policy is not None else None
        if rules is None or not rules.allowed:
            raise ForbiddenError(
                f"{grant.parent}'s policy does not let it delegate "
                '(set "delegation": {"allowed": true})',
                code=ErrorCode.FORBIDDEN,
            )
        for level in quota_levels(levels)[1:]:  # the sub-agents' tree grew by these switches
            above = level.policy.delegation if level.policy is not None else None
            if above is None or not above.allowed:
                raise ForbiddenError(
                    f"{level.agent}'s policy no longer lets agents delegate below it, so "
                    f"{grant.parent}, which an agent delegated below it, may not either",
                    code=ErrorCode.FORBIDDEN,
                )
        for distance, level in enumerate(levels, start=1):
            above = level.policy.delegation if level.policy is not None else None
            if above is not None and above.allowed and distance > above.max_depth:
                raise ForbiddenError(
                    f"{level.agent}'s policy allows delegated budgets at most "
                    f"{above.max_depth} level(s) below it",
                    code=ErrorCode.FORBIDDEN,
                )
        _check_size(data)
        _check_quota(levels, new=child.body["pv"] == 0)
    problems = cap_problems(policy, parent.policy)
    if problems:
        raise PolicyValidationError(problems)
    return expires


def _limit_pairs(child: SpendingLimits, parent: SpendingLimits) -> list[tuple[str, Any, Any]]:
    pairs: list[tuple[str, Any, Any]] = [("perTransaction", child.per_transaction,
                                          parent.per_transaction)]  # fmt: skip
    pairs += [(p.value, child.by_period[p], parent.by_period[p]) for p in child.by_period]
    theirs = {r.seconds: r.amount for r in parent.rolling}
    pairs += [
        (f"rolling[{i}]", r.amount, theirs.get(r.seconds)) for i, r in enumerate(child.rolling)
    ]
    # a count's window: its calendar period, or its duration however spelled ("60m" is "1h")
    counts = {c.period or c.seconds: c.max for c in parent.counts}
    pairs += [
        (f"counts[{i}]", c.max, counts.get(c.period or c.seconds))
        for i, c in enumerate(child.counts)
    ]
    return pairs


def cap_problems(child: AgentPolicy, parent: AgentPolicy | None) -> list[Problem]:
    """Every limit of a delegated budget above the same limit of its parent.

    Limits are compared kind by kind (the same window, the same token);
    at every payment the parent's limits bind as well, so this only refuses
    a grant that promises more than the parent has.
    """
    if parent is None:
        return []
    problems: list[Problem] = []
    # each block with its token: an asset's block is of its token even when it names no amount
    blocks = [("$.policy.limits", child.limits, child.limits.symbol if child.limits else None)]
    blocks += [(f"$.policy.assets[{i}].limits", a.limits, a.symbol)
               for i, a in enumerate(child.assets)]  # fmt: skip
    for path, block, token in blocks:
        if block is None:
            continue
        theirs = parent.limits_for(token) if token is not None else parent.limits
        if theirs is None:
            continue
        for name, mine, cap in _limit_pairs(block, theirs):
            if mine is None or cap is None:
                continue
            over = mine > cap if isinstance(mine, int) else mine.compare(cap) > 0
            if over:
                problems.append(Problem(f"{path}.{name}", f"exceeds the parent's limit ({cap})"))
    return problems


def _delegation_doc(grant: Grant, dg: Body | None, expires: int | None, now: int) -> Body:
    """The head's record of a delegation made (or made again) now."""
    made: Body = {"by": grant.parent, "c": now if dg is None else dg["c"], "x": expires, "rv": None}
    if not grant.by_parent or (dg is not None and dg.get("adm")):
        made["adm"] = True  # an administrator's: the parent agent cannot change it
    return made


def put_policy(
    cfg: LedgerConfig,
    agent: str,
    policy: AgentPolicy,
    data: dict[str, Any],
    now: datetime,
    policies: PolicySource,
    grant: Grant | None = None,
    *,
    origin: dict[str, Any] | None = None,
    shard: str,
    check_only: bool = False,
) -> Step:
    """Store a new version of the agent's policy (its JSON form ``data``); the result: the version.

    With a ``parent``, the parent must have a policy, be no descendant of the
    agent, and keep every payment within :data:`MAX_TREE_DEPTH` budgets. A
    delegated budget keeps its delegating parent. With ``grant``, this is a
    delegation (see :func:`_check_grant`); one the parent agent makes itself
    (``grant.by_parent``) is at most :data:`MAX_DELEGATED_POLICY_BYTES` and
    counts in the delegation quotas above it (:func:`quota_levels`) in this
    step, so two delegations at once never both take the last slot.
    ``origin`` says how the version came to be (``{"op": "rollback",
    "from": 2}``, ``{"op": "promote"}``): kept with the version and worded in
    its history entry. ``check_only`` runs every check and writes nothing
    (the result is 0). In the agent's own shard, raises
    :class:`RelocatedError` when the agent was placed in a tree meanwhile.
    """
    now_us = micros(now)

    def step(view: View, txn: Txn) -> None:
        if shard == agent:
            where = placed_in(view.doc(keys.home(agent)))
            if where is not None and where != agent:
                raise RelocatedError(agent, where)
        head = Head.read(view, agent)
        books = Books(view, head)
        old = policies(agent, head.body["pv"], view)
        dg = head.body.get("dg")
        if grant is None and dg is not None and policy.parent != dg["by"]:
            raise ConflictError(
                f"the budget of {agent} was delegated by {dg['by']}, which stays its parent",
                code=ErrorCode.BUDGET_CONFLICT,
            )
        levels = []
        if policy.parent is not None:
            moved = old is None or old.parent != policy.parent
            levels = _check_parent(view, books, agent, policy.parent, policies, moved=moved)
        version = head.body["pv"] + 1
        expires = None if grant is None else _check_grant(grant, head, policy, data, levels, now)
        if grant is None and dg is not None and levels:  # a delegated budget stays within it
            problems = cap_problems(policy, levels[0].policy)
            if problems:
                raise PolicyValidationError(problems)
        if check_only:
            txn.result = 0
            return
        if grant is not None:
            _use_quota(grant, levels, new=head.body["pv"] == 0)
            head.set("dg", _delegation_doc(grant, dg, expires, now_us))
            record(txn, cfg, agent, {"ev": "delegate", "pv": version, "by": grant.parent,
                                     "x": expires})  # fmt: skip
        via = origin if origin is not None or grant is None else {"op": "delegate"}
        stored: Body = {"policy": data, "at": now_us}
        if via is not None:
            stored["via"] = via
        txn.put[keys.policy(agent, version)] = stored
        head.set("pv", version)
        _link(txn, agent, None if old is None else old.parent, policy.parent, levels)
        books.write(txn)
        txn.index.append((keys.AGENTS, agent, 0))
        entry: Body = {"ev": "policy_set", "pv": version}
        if via is not None and via["op"] == "rollback":
            entry["detail"] = f"rolled back to version {via['from']}"
        elif via is not None and via["op"] == "promote":
            entry["detail"] = "the shadow policy promoted"
        record(txn, cfg, agent, entry)
        txn.result = version

    return step


def _link(
    txn: Txn, agent: str, old_parent: str | None, parent: str | None, levels: Sequence[Level]
) -> None:
    """Hang ``agent`` below its new ``parent`` (if it changed), counted in every head above it.

    ``levels`` are the budgets above it now. Counting in their heads makes a
    move of any of them, which read its own head, run again (see the module's
    docstring).
    """
    if old_parent == parent:
        return
    if old_parent is not None:
        txn.index.append((keys.children(old_parent), agent, None))
    if parent is not None:
        txn.index.append((keys.children(parent), agent, 0))
        for level in levels:
            level.head.set("jb", int(level.head.body.get("jb", 0)) + 1)


def revoke(
    cfg: LedgerConfig,
    shard: str,
    agent: str,
    by: str | None,
    now: datetime,
    policies: PolicySource,
) -> Step:
    """Revoke a delegated budget: it and every budget below it stop allowing payments.

    Every held approval at or below it is released (the approvals expire),
    and so is an approved one that no payment block has claimed yet.
    Reservations handed out by an allowed authorize, or claimed by a block,
    stay open until confirmed or expired: their payments may be under way,
    and releasing them would give back budget that is being spent. ``by`` (when
    given) must be a budget above it.
    Revoking again changes nothing. The result is ``{"head": head,
    "released": [[id, reservation]], "lapsed": [[id, approval]]}``.
    """
    now_us = micros(now)

    def step(view: View, txn: Txn) -> None:
        head = Head.read(view, agent)
        if head.body["pv"] == 0:
            raise NotFoundError(f"no policy is set for agent {agent}", code=ErrorCode.NO_POLICY)
        dg = head.body.get("dg")
        if dg is None:
            raise NotFoundError(
                f"the budget of {agent} was not delegated", code=ErrorCode.DELEGATION_NOT_FOUND
            )
        books = Books(view, head)
        if by is not None:
            above = chain(view, books, policies(agent, head.body["pv"], view), policies)
            if by not in (level.agent for level in above):
                raise ForbiddenError(
                    f"{by} is not above {agent}: only a budget above it may revoke it",
                    code=ErrorCode.FORBIDDEN,
                )
        if dg["rv"] is None:
            head.set("dg", {**dg, "rv": now_us})
            record(txn, cfg, agent, {"ev": "revoke", "by": by})
        index = keys.open_index(agent)
        ids = [rid for rid, _ in view.scan(index, MAX_SCORE, _REVOKE_MAX)]
        names = [keys.reservation(r) for r in ids]
        view.read(names)
        released: Closed = []
        held_for: list[str] = []
        for rid, name in zip(ids, names, strict=True):
            doc = view.doc(name)
            reserved = doc is not None and doc["st"] == "reserved"
            if reserved and (doc.get("apr") is None or doc.get("cl") or "snt" in doc):
                continue  # a payment under way (claimed, or sent): settled by its payer, or expires
            txn.index.append((index, rid, None))
            if doc is None or doc["st"] not in ("held", "reserved"):
                continue
            released.append((rid, close_reservation(txn, cfg, books, rid, doc, "released", now_us)))
            if doc["st"] == "held" and doc["apr"] is not None:
                held_for.append(doc["apr"])
        lapsed = lapse(view, txn, cfg, shard, held_for, now_us)
        books.write(txn)
        result: Body = {"head": head.body, "released": released, "lapsed": lapsed}
        txn.result = result

    return step


def delegation_end(head: Body | None) -> int | None:
    """When the delegation a head records ended or ends (its revocation first), or ``None``."""
    dg = None if head is None else head.get("dg")
    if dg is None:
        return None
    ended: int | None = dg["rv"] if dg["rv"] is not None else dg["x"]
    return ended


def grant_deadline(levels: Sequence[Delegation | None]) -> int | None:
    """The earliest end among these delegations (microseconds), or ``None``."""
    ends = [micros(g.expires_at) for g in levels if g is not None and g.expires_at is not None]
    return min(ends) if ends else None
