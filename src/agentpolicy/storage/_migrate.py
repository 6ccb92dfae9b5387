"""Data written by agentpolicy 0.1, converted to the ledger's documents when a store opens it.

SQLite files of schema 1 and 2 become schema 3 inside one ``BEGIN IMMEDIATE``
transaction (all or nothing); the old tables are dropped. Redis data of 0.1
(its keys per agent, listed in ``<prefix>agents``) is converted agent by
agent, each in one commit, and then deleted; ``<prefix>schema`` records that
the prefix is done, so the conversion runs once. Policies with their
versions, counters, reservations, approvals with their votes, history,
idempotency keys and (from SQLite) undelivered webhook events all carry
over; ids stay as they were, so a reservation or approval handed out before the upgrade can be
confirmed, released or decided after it.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from agentpolicy.codec import decode
from agentpolicy.decisions import Code
from agentpolicy.errors import ErrorCode, PolicyError, StorageUnavailableError
from agentpolicy.ledger import keys
from agentpolicy.ledger.docs import Body, request_data
from agentpolicy.ledger.runner import View, run
from agentpolicy.records import (
    Approval,
    ApprovalStatus,
    DeliveryStatus,
    HistoryRecord,
    Reservation,
    ReservationStatus,
    Vote,
    WebhookDelivery,
)
from agentpolicy.requests import PaymentRequest
from agentpolicy.storage._time import micros
from agentpolicy.storage.base import NEXT_SEQ, Storage, Txn

__all__ = ["redis_v01", "sqlite_v2_to_v3"]

_PASSING = (Code.ALLOWED.value, Code.APPROVAL_REQUIRED.value)


def _history_entry(h: HistoryRecord) -> tuple[bool, Body]:
    """An old history record as a new log entry, and whether it is a denial."""
    entry: Body = {"ev": h.event, "at": micros(h.at)}
    for field, key in (("code", "code"), ("policy_version", "pv"), ("reservation_id", "rid"),
                       ("approval_id", "aid"), ("detail", "detail")):  # fmt: skip
        value = getattr(h, field)
        if value is not None:
            entry[key] = value
    if h.request is not None:
        entry["req"] = request_data(h.request)
    if h.expires_at is not None:
        entry["x"] = micros(h.expires_at)
    if h.usage is not None:
        entry["use"] = {k: [a.value, a.decimals] for k, a in h.usage.items()}
    denial = h.event == "decision" and h.code not in _PASSING
    return denial, entry


def _reservation(r: Reservation) -> Body:
    token = r.request.symbol.casefold()
    head = keys.head(r.agent_id)
    return {
        "agent": r.agent_id,
        "st": r.status.value,
        "req": request_data(r.request),
        "tg": [[head, f"{token}|{key}", "c", 0] for key in r.window_keys],
        "c": micros(r.created_at),
        "x": micros(r.expires_at),
        "u": micros(r.updated_at),
        "pv": r.policy_version,
        "apr": r.approval_id,
    }


def _approval(a: Approval) -> Body:
    return {
        "agent": a.agent_id,
        "st": a.status.value,
        "req": request_data(a.request),
        "need": a.required_approvers,
        "who": list(a.approvers),
        "votes": [[v.approver, v.decision, micros(v.at), v.comment] for v in a.votes],
        "c": micros(a.created_at),
        "x": micros(a.expires_at),
        "hold": a.hold_id,
        "pv": a.policy_version,
        "dec": None if a.decided_at is None else micros(a.decided_at),
    }


def _delivery(d: WebhookDelivery) -> Body:
    return {
        "id": d.id,
        "eid": d.event_id,
        "ep": d.endpoint_id,
        "ev": d.event,
        "agent": d.agent_id,
        "apr": d.approval_id,
        "c": micros(d.created_at),
        "payload": d.payload,
        "st": d.status.value,
        "n": d.attempts,
        "next": d.next_attempt_at,
        "err": d.last_error,
    }


class _Agent:
    """Everything of one agent, gathered before it is written in the new shape."""

    def __init__(self, agent: str) -> None:
        self.agent = agent
        self.version = 0
        self.policies: dict[int, Body] = {}
        self.counters: dict[str, list[int]] = {}
        self.reservations: list[Reservation] = []
        self.approvals: list[Approval] = []
        self.history: list[HistoryRecord] = []
        self.idempotency: list[tuple[str, str, int, HistoryRecord]] = []
        self.deliveries: list[WebhookDelivery] = []

    def check(self) -> None:
        """Refuse what 0.1 never wrote and this version could not use once converted.

        A current version that is not stored (every call of the agent would be
        ``INTERNAL``), or a negative amount in a counter (every budget read
        would be ``INVALID_INPUT``): raised as damaged, so nothing is converted.
        """
        if any(type(v) is not int or v < 1 for v in self.policies):
            raise ValueError(f"agent {self.agent} has a policy version that is not a number")
        if self.version and self.version not in self.policies:
            raise ValueError(
                f"agent {self.agent}'s current policy version {self.version} is missing"
            )
        for key, (_, decimals, spent, reserved) in self.counters.items():
            if min(decimals, spent, reserved) < 0:
                raise ValueError(f"agent {self.agent}'s counter {key} holds a negative number")

    def writes(self, txn: Txn) -> None:
        agent = self.agent
        due: int | None = None
        for r in self.reservations:
            txn.put[keys.reservation(r.id)] = _reservation(r)
            if r.status.is_open:
                expires = micros(r.expires_at)
                txn.index.append((keys.open_index(agent), r.id, expires))
                due = expires if due is None else min(due, expires)
        for a in self.approvals:
            txn.put[keys.approval(a.id)] = _approval(a)
            if a.status.value == "pending":
                created = micros(a.created_at)
                txn.index.append((keys.pending_index(agent), a.id, created))
                txn.index.append((keys.PENDING, a.id, created))
        for version, policy in self.policies.items():
            txn.put[keys.policy(agent, version)] = policy
        policy = self.policies.get(self.version, {}).get("policy", {})
        token = _token(policy)
        counters = {f"{token}|{key}": [*c, 0] for key, c in self.counters.items()}
        txn.put[keys.head(agent)] = {"pv": self.version, "c": counters, "due": due, "hz": 0}
        if self.version:
            txn.index.append((keys.AGENTS, agent, 0))
        if due is not None:
            txn.index.append((keys.DUE, agent, due))
        for h in self.history:
            denial, entry = _history_entry(h)
            log = keys.denials_log(agent) if denial else keys.changes_log(agent)
            txn.append.append((log, entry, None, None))
        for key, fingerprint, created, record in self.idempotency:
            _, rec = _history_entry(record)
            txn.put[keys.idempotency(agent, key)] = {"fp": fingerprint, "c": created, "rec": rec}
        for d in self.deliveries:
            txn.put[keys.webhook(d.id)] = _delivery(d)
            queue = (keys.outbox_queue(agent) if d.status is DeliveryStatus.PENDING
                     else keys.outbox_done(agent))  # fmt: skip
            txn.index.append((queue, d.id, NEXT_SEQ))
            txn.index.append((keys.OUTBOX, agent, 0 if d.status is DeliveryStatus.PENDING else 1))


def _token(policy: Body) -> str:
    """The token a 0.1 policy's counters counted (one per policy then), case-folded."""
    for section in ("limits",):
        for amount in (policy.get(section) or {}).values():
            if isinstance(amount, dict) and "symbol" in amount:
                return str(amount["symbol"]).casefold()
    for threshold in (policy.get("approvalConfig") or {}).get("thresholds", []):
        return str(threshold.get("amount", {}).get("symbol", "USDT")).casefold()
    return "usdt"


def _commit(storage: Storage, gathered: Iterable[_Agent], at: int) -> None:
    for one in gathered:

        def step(view: View, txn: Txn, one: _Agent = one) -> None:
            if view.doc(keys.head(one.agent)) is not None:
                return  # converted already (another process got there first)
            one.writes(txn)

        run(storage, one.agent, step, lambda _: None, at=at)


# -- SQLite ---------------------------------------------------------------------------------


def _agent(found: dict[str, _Agent], agent: str) -> _Agent:
    if agent not in found:
        found[agent] = _Agent(agent)
    return found[agent]


@contextlib.contextmanager
def _damaged(what: str, left: str) -> Iterator[None]:
    """Report a stored row of 0.1 that cannot be read as a store's error saying what was left."""
    try:
        yield
    except PolicyError as exc:
        if exc.code is ErrorCode.STORAGE_UNAVAILABLE:
            raise
        raise _unreadable(what, left, exc) from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise _unreadable(what, left, exc) from None
    except Exception as exc:
        if not _wrong_type(exc):
            raise
        raise _unreadable(what, left, exc) from None


def _wrong_type(exc: BaseException) -> bool:
    """A key of 0.1's names holding another kind of value (Redis answers ``WRONGTYPE``)."""
    return str(exc).startswith("WRONGTYPE")


def _unreadable(what: str, left: str, exc: BaseException) -> StorageUnavailableError:
    return StorageUnavailableError(
        f"cannot convert {what} written by agentpolicy 0.1: a stored value is damaged "
        f"({type(exc).__name__}: {exc}); {left}"
    )


def sqlite_v2_to_v3(session: Any, path: str = "the SQLite file") -> None:
    """Convert the tables of schema 1 or 2 inside ``session`` (an open write transaction).

    A damaged row raises :class:`~agentpolicy.errors.StorageUnavailableError`
    and the transaction is rolled back: the file stays as it was.
    """
    with _damaged(path, "the file was left as it was"):
        _sqlite_v2_to_v3(session)


def _sqlite_v2_to_v3(session: Any) -> None:
    c: sqlite3.Connection = session.conn
    tables = {row[0] for row in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    found: dict[str, _Agent] = {}
    for agent, version, body, updated in c.execute(
        "SELECT agent_id, version, body, updated_at FROM policies"
    ):
        at = micros(datetime.fromisoformat(updated))
        _agent(found, agent).policies[version] = {"policy": json.loads(body), "at": at}
    for agent, version in c.execute("SELECT agent_id, version FROM current_policies"):
        _agent(found, agent).version = version
    for agent, key, end, d, spent, reserved in c.execute(
        "SELECT agent_id, window_key, window_end, decimals, spent, reserved FROM counters"
    ):
        _agent(found, agent).counters[key] = [end, d, int(spent), int(reserved)]
    for (body,) in c.execute("SELECT body FROM reservations"):
        r = decode(body, Reservation)
        _agent(found, r.agent_id).reservations.append(r)
    for (body,) in c.execute("SELECT body FROM approvals"):
        a = decode(body, Approval)
        _agent(found, a.agent_id).approvals.append(a)
    for agent, body in c.execute("SELECT agent_id, body FROM history ORDER BY seq"):
        _agent(found, agent).history.append(decode(body, HistoryRecord))
    for agent, key, created, fingerprint, record in c.execute(
        "SELECT agent_id, key, created_at, fingerprint, record FROM idempotency"
    ):
        entry = (key, fingerprint, created, decode(record, HistoryRecord))
        _agent(found, agent).idempotency.append(entry)
    if "outbox" in tables:
        for (body,) in c.execute("SELECT body FROM outbox ORDER BY seq"):
            d = decode(body, WebhookDelivery)
            _agent(found, d.agent_id).deliveries.append(d)
    for table in ("policies", "current_policies", "counters", "reservations", "approvals",
                  "history", "idempotency", "outbox"):  # fmt: skip
        c.execute(f"DROP TABLE IF EXISTS {table}")
    for one in found.values():
        one.check()
    at = micros(datetime.now(UTC))
    for one in found.values():  # same transaction: a session over the open connection
        txn = Txn(f"migrate-{one.agent}", at)
        one.writes(txn)
        session.commit(txn)


# -- Redis ----------------------------------------------------------------------------------

_PERIOD_LENGTH = {"hourly": timedelta(hours=1), "daily": timedelta(days=1),
                  "weekly": timedelta(days=7)}  # fmt: skip


def _window_end(key: str) -> int:
    period, _, start_text = key.partition(":")
    start = datetime.fromisoformat(start_text)
    if period == "monthly":
        end = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    else:
        end = start + _PERIOD_LENGTH[period]
    return micros(end)


def _old_tag(agent: str) -> str:
    """The hash tag 0.1 gave an agent's keys and ids (a digest of a long id or one with braces)."""
    import hashlib  # noqa: PLC0415

    if 1 <= len(agent) <= 64 and "{" not in agent and "}" not in agent:
        return agent
    return "h" + hashlib.sha256(agent.encode()).hexdigest()[:32]


# What 0.1 named an agent's keys after ``<prefix>{<tag>}:``. The keys this version writes
# under the same tag (``h/agent-1``, ``r/res_...``, ``#op:...``) never look like these.
_OLD_NAMES = frozenset(
    {"policy", "policy:v", "h", "open", "pending", "seq", "evseq", "obq", "obdone"}
)
_OLD_KINDS = ("c:", "r:", "a:", "idem:", "ob:")


def _glob(text: str) -> str:
    """``text`` as a literal in a ``SCAN MATCH`` pattern (an id may hold ``*``, ``?``, ``[``)."""
    return "".join("\\" + ch if ch in "\\*?[]" else ch for ch in text)


def _old_keys(client: Any, p: str) -> list[str]:
    """The keys 0.1 wrote under the agent prefix ``p``: neither another agent's nor new ones."""
    return [
        key
        for key in client.scan_iter(match=_glob(p) + "*", count=1000)
        if key.startswith(p)
        and (key[len(p) :] in _OLD_NAMES or key[len(p) :].startswith(_OLD_KINDS))
    ]


def _redis_agent(client: Any, prefix: str, agent: str) -> tuple[_Agent, list[str]]:
    tag = _old_tag(agent)
    p = f"{prefix}{{{tag}}}:"
    approval_id = re.compile("apr_[0-9a-f]{32}_" + re.escape(tag))  # a:<id>:v holds its votes
    one = _Agent(agent)
    old = _old_keys(client, p)
    policy = client.hgetall(p + "policy")
    if policy:
        one.version = int(policy["version"])
    for version, stored in client.hgetall(p + "policy:v").items():
        body, updated = stored.split("\t")
        one.policies[int(version)] = {
            "policy": json.loads(body),
            "at": micros(datetime.fromisoformat(updated)),
        }
    for key in old:
        rest = key[len(p) :]
        kind, _, name = rest.partition(":")
        if kind not in ("c", "r", "a", "idem") or (kind == "a" and not approval_id.fullmatch(name)):
            continue
        f = client.hgetall(key)
        if not f:
            continue  # gone since the scan: expired, or converted by another process
        if kind == "c":
            one.counters[name] = [_window_end(name), int(f["d"]), int(f["s"]), int(f["r"])]
        elif kind == "r":
            request = decode(f["request"], PaymentRequest)
            one.reservations.append(
                Reservation(
                    id=name, agent_id=agent, status=ReservationStatus(f["status"]),
                    amount=request.asset_amount,
                    window_keys=tuple(f["w"].split("|")),
                    created_at=_instant(f["created"]), expires_at=_instant(f["expires"]),
                    updated_at=_instant(f["updated"]), request=request,
                    policy_version=int(f["version"]), approval_id=f["approval"] or None,
                )
            )  # fmt: skip
        elif kind == "a":
            base = decode(f["body"], Approval)
            votes = tuple(decode(v, Vote) for v in client.lrange(key + ":v", 0, -1))
            decided = f.get("decided") or None
            one.approvals.append(
                Approval(
                    id=base.id, agent_id=agent, status=ApprovalStatus(f["status"]),
                    request=base.request,
                    required_approvers=base.required_approvers, approvers=base.approvers,
                    votes=votes, created_at=base.created_at, expires_at=base.expires_at,
                    hold_id=base.hold_id, policy_version=base.policy_version,
                    decided_at=None if decided is None else datetime.fromisoformat(decided),
                )
            )  # fmt: skip
        else:
            record = decode(f["record"], HistoryRecord)
            one.idempotency.append((name, f["fp"], int(f["created"]), record))
    for line in reversed(client.lrange(p + "h", 0, -1)):
        data = json.loads(line.split("\t", 1)[1])
        data.setdefault("agentId", agent)
        one.history.append(decode(json.dumps(data), HistoryRecord))
    one.check()
    return one, old


def _point(storage: Storage, old_tag: str, agent: str, at: int) -> None:
    """Send lookups of the 0.1 ids of ``agent`` (``res_<hex>_<old_tag>``) to its shard.

    0.1 ended the ids of an agent whose id is long or has braces with a digest
    (``h`` + 32 hex), which this version reads as the id of an agent of that
    name: a pointer there (as for an agent in a tree) leads to the agent's
    own shard, where the conversion put its reservations and approvals. An
    agent really named so (0.1 gave it the same keys) keeps its own shard.
    """

    def step(view: View, txn: Txn) -> None:
        pointer, head = keys.home(old_tag), keys.head(old_tag)
        view.read((pointer, head))
        own = view.doc(head)
        if view.doc(pointer) is None and (own is None or not own["pv"]):
            txn.put[pointer] = {"s": agent}

    run(storage, old_tag, step, lambda _: None, at=at)


def _instant(us: str) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(us))


def redis_v01(storage: Any) -> None:
    """Convert the 0.1 data under the storage's prefix, once (see the module docs).

    Every step can be interrupted and run again: an agent whose head exists
    was converted (by this process before it stopped, or by another one), so
    only its 0.1 keys are deleted; only keys of 0.1's shapes ever are, and a
    key gone since the scan (expired, or deleted by another process) is skipped.
    """
    client, prefix = storage.client, storage.key_prefix
    if client.get(prefix + "schema") == "3":
        return
    with _damaged(f"the list of agents {prefix}agents", "nothing was converted"):
        agents = sorted(client.smembers(prefix + "agents"))
    at = micros(datetime.now(UTC))
    for agent in agents:
        old_tag = _old_tag(agent)
        head = storage.keys.shard_prefix(agent) + keys.head(agent)
        try:
            with _damaged(f"agent {agent}'s data under {prefix!r}", "that agent's data was left "
                          "as it was (agents before it were converted)"):  # fmt: skip
                one, old = _redis_agent(client, prefix, agent)
        except StorageUnavailableError:
            if not client.exists(head):
                raise
            # converted already (by this process before it stopped, or by another one that
            # deleted some of its 0.1 keys while they were read here): only delete the rest
            old = _old_keys(client, f"{prefix}{{{old_tag}}}:")
        else:
            _commit(storage, [one], at)  # skipped if another process converted it meanwhile
        if old_tag != keys.tag(agent):
            _point(storage, old_tag, agent, at)
        for key in old:
            client.delete(key)
    client.delete(prefix + "agents", prefix + "outbox-agents")
    client.set(prefix + "schema", "3")
