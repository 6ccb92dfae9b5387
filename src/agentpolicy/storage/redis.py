"""Redis storage (the ``redis`` extra): one budget shared by every process, on Redis or Cluster.

Every operation that reads and then writes is one Lua script (package
resources in ``redis_scripts/``, registered once; a Redis restart that
forgets them is handled by redis-py's EVALSHA-then-load). Scripts check
everything before they write, because Redis does not roll back a script's
earlier writes.

Every key of one agent shares a hash tag (``agent-policy:{agent-1}:...``),
so in a Redis Cluster all of an agent's work runs on one slot; the ids of
reservations and approvals carry the tag, so a lookup by id needs no index.
The only key outside an agent's slot is the set of agents with a policy,
used by ``list_policies``, ``list_approvals()`` and ``sweep()``, never by
``authorize``. In the steady state an authorize is exactly one command.

Amounts are decimal strings inside Redis (Lua numbers are doubles). Expiries
are durations (``PEXPIRE``) from the server's own clock, never instants from
the engine's clock. While Redis is unreachable every call raises
``STORAGE_UNAVAILABLE``, so nothing is ever allowed; the client reconnects
by itself when Redis is back.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from importlib import resources
from typing import Any, TypeVar

import attrs
import redis
import redis.cluster
import redis.exceptions

from agentpolicy.amounts import Amount
from agentpolicy.codec import decode, encode, format_instant
from agentpolicy.errors import (
    ConflictError,
    ErrorCode,
    ForbiddenError,
    InternalError,
    NotFoundError,
    PolicyValidationError,
    StorageUnavailableError,
)
from agentpolicy.records import (
    Approval,
    ApprovalStatus,
    AuthorizeOutcome,
    AuthorizePlan,
    Counter,
    HistoryRecord,
    PolicyRecord,
    Reservation,
    ReservationStatus,
    SweepResult,
    Vote,
)
from agentpolicy.requests import PaymentRequest
from agentpolicy.storage._time import instant, micros
from agentpolicy.storage.redis_outbox import KEEP, RedisOutbox, keep_ms

__all__ = ["RedisStorage"]

T = TypeVar("T")

HISTORY_LIMIT = 10_000
IDEMPOTENCY_KEEP = timedelta(hours=25)
WINDOW_GRACE = timedelta(hours=1)
_SAFE_TAG = re.compile(r"[^{}]{1,64}")
_ID = re.compile(r"(res|apr)_[0-9a-f]{32}_(.+)")


def _script(name: str) -> str:
    folder = resources.files("agentpolicy.storage") / "redis_scripts"
    common = (folder / "common.lua").read_text(encoding="utf-8")
    return common + "\n" + (folder / f"{name}.lua").read_text(encoding="utf-8")


def agent_tag(agent_id: str) -> str:
    """The hash tag of an agent's keys: its id, or a digest when the id is long or has braces."""
    if _SAFE_TAG.fullmatch(agent_id):
        return agent_id
    return "h" + hashlib.sha256(agent_id.encode()).hexdigest()[:32]


def _fresh_record(entry: dict[str, Any], request: PaymentRequest, now: datetime) -> HistoryRecord:
    """The decision record a script just wrote, read without a second decode of the request."""
    usage = {
        key: Amount(int(u["value"]), int(u["decimals"]), u["symbol"])
        for key, u in (entry.get("usage") or {}).items()
    }
    expires = entry.get("expiresAt")
    return HistoryRecord(
        agent_id=request.agent_id,
        at=now,
        event="decision",
        code=entry["code"],
        policy_version=int(entry["policyVersion"]),
        request=request,
        reservation_id=entry.get("reservationId"),
        approval_id=entry.get("approvalId"),
        expires_at=None if expires is None else datetime.fromisoformat(expires),
        usage=usage,
    )


class RedisStorage(RedisOutbox):
    """Storage on Redis (``redis://``, ``rediss://``) or Redis Cluster (``redis+cluster://``)."""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "agent-policy:",
        timeout: timedelta = timedelta(seconds=2),
    ) -> None:
        self.key_prefix = key_prefix
        self.cluster = url.startswith(("redis+cluster://", "rediss+cluster://"))
        seconds = timeout.total_seconds()
        options: dict[str, Any] = {
            "socket_timeout": seconds,
            "socket_connect_timeout": seconds,
            "decode_responses": True,
        }
        try:
            if self.cluster:
                plain = url.replace("+cluster", "", 1)
                self.client: Any = redis.cluster.RedisCluster.from_url(plain, **options)
            else:
                self.client = redis.Redis.from_url(url, **options)
        except (redis.exceptions.RedisError, ValueError, IndexError) as exc:
            raise StorageUnavailableError(f"cannot reach Redis: {type(exc).__name__}") from None
        self._scripts = {
            name: self.client.register_script(_script(name))
            for name in ("authorize", "settle", "vote", "expire", "put_policy", "claim")
        }

    # -- plumbing ------------------------------------------------------------------------

    def _guard(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except redis.exceptions.ResponseError as exc:
            if "NOSCRIPT" in str(exc):  # pragma: no cover - redis-py reloads scripts itself
                raise StorageUnavailableError("Redis lost its scripts") from None
            raise InternalError(f"Redis refused a script: {exc}") from None
        except redis.exceptions.RedisError as exc:
            raise StorageUnavailableError(
                f"Redis is unavailable ({type(exc).__name__}); nothing was allowed or changed"
            ) from None

    def _p(self, agent_id: str) -> str:
        return f"{self.key_prefix}{{{agent_tag(agent_id)}}}:"

    def _p_of_id(self, some_id: str) -> str | None:
        match = _ID.fullmatch(some_id)
        return None if match is None else f"{self.key_prefix}{{{match.group(2)}}}:"

    def _new_id(self, kind: str, agent_id: str) -> str:
        return f"{kind}_{uuid.uuid4().hex}_{agent_tag(agent_id)}"

    @staticmethod
    def _now(now: datetime) -> dict[str, Any]:
        return {"now_us": str(micros(now)), "now_iso": format_instant(now)}

    def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts[name]
        return self._guard(lambda: script(keys=keys, args=args))

    # -- policies --------------------------------------------------------------------------

    def put_policy(self, agent_id: str, policy: dict[str, Any], now: datetime) -> PolicyRecord:
        """Store a new version of an agent's policy; add the agent to the agents set."""
        p = self._p(agent_id)
        body = json.dumps(policy, separators=(",", ":"))
        updated = now.isoformat()
        version = self._run(
            "put_policy",
            [p + "policy"],
            [body, updated, agent_id, format_instant(now), HISTORY_LIMIT, p],
        )
        self._guard(lambda: self.client.sadd(self.key_prefix + "agents", agent_id))
        return PolicyRecord(agent_id, int(version), policy, now)

    def get_policy(self, agent_id: str, version: int | None = None) -> PolicyRecord | None:
        """The current policy, or a given version."""
        p = self._p(agent_id)
        if version is None:
            got = self._guard(lambda: self.client.hmget(p + "policy", "version", "body", "updated"))
            if got[1] is None:
                return None
            return PolicyRecord(
                agent_id, int(got[0]), json.loads(got[1]), datetime.fromisoformat(got[2])
            )
        stored = self._guard(lambda: self.client.hget(p + "policy:v", str(version)))
        if stored is None:
            return None
        body, updated = stored.split("\t")
        return PolicyRecord(agent_id, version, json.loads(body), datetime.fromisoformat(updated))

    def _agents(self) -> list[str]:
        return sorted(self._guard(lambda: self.client.smembers(self.key_prefix + "agents")))

    def list_policies(self, prefix: str | None = None) -> list[PolicyRecord]:
        """Current policies of agents whose id starts with ``prefix``."""
        found = []
        for agent in self._agents():
            if prefix is None or agent.startswith(prefix):
                record = self.get_policy(agent)
                if record is not None:
                    found.append(record)
        return found

    # -- authorize -------------------------------------------------------------------------

    def authorize(self, plan: AuthorizePlan) -> AuthorizeOutcome:
        """Carry out ``plan`` in one script: one command in the steady state."""
        request, now = plan.request, plan.now
        agent = request.agent_id
        p = self._p(agent)
        amount = request.asset_amount
        rid = self._new_id("res", agent)
        args: dict[str, Any] = {
            "P": p,
            "agent": agent,
            "version": plan.policy_version,
            **self._now(now),
            "fp": request.fingerprint(),
            "idem_ttl_us": str(plan.idempotency_ttl_seconds * 1_000_000),
            "idem_keep_ms": keep_ms(IDEMPOTENCY_KEEP),
            "keep_ms": keep_ms(KEEP + (plan.reservation_expires_at - now)),
            "history_limit": HISTORY_LIMIT,
            "request": encode(request),
            "v": str(amount.value),
            "d": amount.decimals,
            "symbol": amount.symbol,
            "on_pass": plan.on_pass.value,
            "windows": [
                {"key": w.key, "ttl_ms": keep_ms(w.end - now + WINDOW_GRACE)} for w in plan.windows
            ],
            "limits": [
                {"key": x.key, "v": str(x.limit.value), "d": x.limit.decimals, "code": x.code.value}
                for x in plan.limits
            ],
            "rid": rid,
            "r_expires_us": str(micros(plan.reservation_expires_at)),
            "r_expires_iso": format_instant(plan.reservation_expires_at),
        }
        if request.idempotency_key is not None:
            args["idem_key"] = request.idempotency_key
        self._add_routes(args)
        if plan.approval is not None:
            aid = self._new_id("apr", agent)
            args.update(
                aid=aid,
                a_expires_us=str(micros(plan.approval.expires_at)),
                a_expires_iso=format_instant(plan.approval.expires_at),
                required=plan.approval.required_approvers,
                approvers="\n".join(a.casefold() for a in plan.approval.approvers),
                keep_ms=keep_ms(KEEP + (plan.approval.expires_at - now)),
                a_body=encode(
                    Approval(
                        id=aid, agent_id=agent, status=ApprovalStatus.PENDING, request=request,
                        required_approvers=plan.approval.required_approvers,
                        approvers=plan.approval.approvers, votes=(), created_at=now,
                        expires_at=plan.approval.expires_at, hold_id=rid,
                        policy_version=plan.policy_version,
                    )
                ),
            )  # fmt: skip
        reply = self._run("authorize", [p + "policy", p + "open"], [json.dumps(args)])
        if reply.startswith("E"):  # events were written to the agent's outbox
            self._index_outbox(agent)
            reply = reply[1:]
        kind, text = reply[:1], reply[1:]
        if kind == "S":
            return AuthorizeOutcome(stale=True)
        if kind == "C":
            raise ConflictError(
                f"idempotency key {request.idempotency_key!r} was used for a different request",
                code=ErrorCode.IDEMPOTENCY_CONFLICT,
            )
        if kind == "R":  # the first decision again, with the request it was made for
            return AuthorizeOutcome(record=decode(text, HistoryRecord), replayed=True)
        return AuthorizeOutcome(record=_fresh_record(json.loads(text), request, now))

    # -- reservations --------------------------------------------------------------------------

    @staticmethod
    def _reservation(reservation_id: str, fields: dict[str, str]) -> Reservation:
        return Reservation(
            id=reservation_id,
            agent_id=fields["agent"],
            status=ReservationStatus(fields["status"]),
            amount=Amount(int(fields["v"]), int(fields["d"]), fields["symbol"]),
            window_keys=tuple(fields["w"].split("|")),
            created_at=instant(fields["created"]),
            expires_at=instant(fields["expires"]),
            updated_at=instant(fields["updated"]),
            request=decode(fields["request"], PaymentRequest),
            policy_version=int(fields["version"]),
            approval_id=fields["approval"] or None,
        )

    def _settle(self, reservation_id: str, action: str, now: datetime) -> Reservation:
        p = self._p_of_id(reservation_id)
        not_found = NotFoundError(
            f"no reservation {reservation_id!r}", code=ErrorCode.RESERVATION_NOT_FOUND
        )
        if p is None:
            raise not_found
        args = {"P": p, "rid": reservation_id, "action": action, "history_limit": HISTORY_LIMIT}
        reply = self._run(
            "settle", [p + "r:" + reservation_id], [json.dumps({**args, **self._now(now)})]
        )
        outcome, flat = reply[0], reply[1:]
        if outcome == "NF":
            raise not_found
        r = self._reservation(reservation_id, dict(zip(flat[::2], flat[1::2], strict=True)))
        errors = {
            "EX": (ErrorCode.RESERVATION_EXPIRED, f"reservation {r.id} expired"),
            "RL": (ErrorCode.RESERVATION_RELEASED, f"reservation {r.id} was released"),
            "CF": (ErrorCode.RESERVATION_ALREADY_CONFIRMED, f"reservation {r.id} is confirmed"),
        }
        if outcome in errors:
            code, message = errors[outcome]
            raise ConflictError(message, code=code)
        return r

    def confirm(self, reservation_id: str, now: datetime) -> Reservation:
        """Turn a reservation into spending, atomically."""
        return self._settle(reservation_id, "confirm", now)

    def release(self, reservation_id: str, now: datetime) -> Reservation:
        """Give a reservation's budget back, atomically."""
        return self._settle(reservation_id, "release", now)

    def _expire(self, agent_id: str, now: datetime, counters: list[str] | None = None) -> Any:
        args: dict[str, Any] = {
            "P": self._p(agent_id),
            "agent": agent_id,
            "history_limit": HISTORY_LIMIT,
            **self._now(now),
        }
        if counters is not None:
            args["counters"] = counters
        self._add_routes(args)
        result = self._run("expire", [self._p(agent_id) + "open"], [json.dumps(args)])
        if self.webhook_routes and counters is None and result:
            self._index_outbox(agent_id)
        return result

    def _read_reservation(self, reservation_id: str) -> Reservation | None:
        p = self._p_of_id(reservation_id)
        if p is None:
            return None
        fields = self._guard(lambda: self.client.hgetall(p + "r:" + reservation_id))
        return self._reservation(reservation_id, fields) if fields else None

    def get_reservation(self, reservation_id: str, now: datetime) -> Reservation | None:
        """A reservation, expired if its time is up."""
        r = self._read_reservation(reservation_id)
        if r is not None and r.due(now):
            self._expire(r.agent_id, now)
            r = self._read_reservation(reservation_id)
        return r

    # -- approvals -------------------------------------------------------------------------------

    def _read_approval(self, approval_id: str) -> Approval | None:
        p = self._p_of_id(approval_id)
        if p is None:
            return None
        key = p + "a:" + approval_id

        def read() -> tuple[dict[str, str], list[str]]:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(key)
            pipe.lrange(key + ":v", 0, -1)
            fields, votes = pipe.execute()
            return fields, votes

        fields, votes = self._guard(read)
        if not fields:
            return None
        a = decode(fields["body"], Approval)
        decided = fields.get("decided") or None
        return attrs.evolve(
            a,
            status=ApprovalStatus(fields["status"]),
            votes=tuple(decode(v, Vote) for v in votes),
            decided_at=None if decided is None else datetime.fromisoformat(decided),
        )

    def vote(
        self,
        approval_id: str,
        approver: str,
        decision: str,
        comment: str | None,
        now: datetime,
        reservation_ttl: timedelta,
    ) -> Approval:
        """Record an approver's decision in one script."""
        if decision not in ("approve", "deny"):
            raise PolicyValidationError.single("$.decision", "must be 'approve' or 'deny'")
        p = self._p_of_id(approval_id)
        if p is None:
            raise NotFoundError(f"no approval {approval_id!r}", code=ErrorCode.APPROVAL_NOT_FOUND)
        expires = now + reservation_ttl
        args: dict[str, Any] = {
            "P": p, "aid": approval_id, "approver": approver, "folded": approver.casefold(),
            "decision": decision, "vote": encode(Vote(approver, decision, now, comment)),
            "r_expires_us": str(micros(expires)), "r_expires_iso": format_instant(expires),
            "keep_ms": keep_ms(KEEP), "history_limit": HISTORY_LIMIT, **self._now(now),
        }  # fmt: skip
        if comment is not None:
            args["comment"] = comment
        self._add_routes(args)
        outcome = self._run("vote", [p + "a:" + approval_id], [json.dumps(args)])
        if outcome == "OKE":
            agent = self._guard(lambda: self.client.hget(p + "a:" + approval_id, "agent"))
            self._index_outbox(agent)
            outcome = "OK"
        elif outcome == "NP" and self.webhook_routes:  # an expiry may have been announced
            agent = self._guard(lambda: self.client.hget(p + "a:" + approval_id, "agent"))
            self._index_outbox(agent)
        if outcome == "NF":
            raise NotFoundError(f"no approval {approval_id!r}", code=ErrorCode.APPROVAL_NOT_FOUND)
        if outcome == "NP":
            raise ConflictError(
                f"approval {approval_id} is not pending", code=ErrorCode.APPROVAL_NOT_PENDING
            )
        if outcome == "NA":
            raise ForbiddenError(
                f"{approver} is not an approver of {approval_id}",
                code=ErrorCode.APPROVER_NOT_AUTHORIZED,
            )
        if outcome == "DD":
            raise ConflictError(
                f"{approver} has already decided on {approval_id}",
                code=ErrorCode.DUPLICATE_DECISION,
            )
        approval = self._read_approval(approval_id)
        assert approval is not None  # noqa: S101 - the script just wrote it
        return approval

    def get_approval(self, approval_id: str, now: datetime) -> Approval | None:
        """An approval, expired if its time is up."""
        a = self._read_approval(approval_id)
        if a is not None and a.status is ApprovalStatus.PENDING and now >= a.expires_at:
            self._expire(a.agent_id, now)
            a = self._read_approval(approval_id)
        return a

    def list_approvals(self, agent_id: str | None, now: datetime) -> list[Approval]:
        """Pending approvals (of one agent, or of every agent with a policy), oldest first."""
        found: list[Approval] = []
        for agent in [agent_id] if agent_id is not None else self._agents():
            self._expire(agent, now)
            ids = self._guard(lambda a=agent: self.client.zrange(self._p(a) + "pending", 0, -1))  # type: ignore[misc]
            for aid in ids:
                approval = self._read_approval(aid)
                if approval is not None and approval.status is ApprovalStatus.PENDING:
                    found.append(approval)
        return sorted(found, key=lambda a: (a.created_at, a.id))

    # -- usage, history, sweep ---------------------------------------------------------------------

    def usage(self, agent_id: str, keys: Iterable[str], now: datetime) -> dict[str, Counter]:
        """Counters of these window keys, after due expiries (one script)."""
        flat = self._expire(agent_id, now, list(keys))
        out = {}
        for i in range(0, len(flat), 4):
            key, d, s, r = flat[i : i + 4]
            # The window's end is not stored in Redis (its expiry is); callers of usage()
            # read only the amounts.
            out[key] = Counter(key, now, int(d), int(s), int(r))
        return out

    def history(self, agent_id: str, limit: int = 100) -> list[HistoryRecord]:
        """An agent's history, newest first."""
        lines = self._guard(lambda: self.client.lrange(self._p(agent_id) + "h", 0, limit - 1))
        records = []
        for line in lines:
            seq, text = line.split("\t", 1)
            records.append(attrs.evolve(decode(text, HistoryRecord), seq=int(seq)))
        return records

    def sweep(self, now: datetime) -> SweepResult:
        """Expire what is due for every agent with a policy (one script per agent)."""
        reservations: list[Reservation] = []
        approvals: list[Approval] = []
        for agent in self._agents():
            if self.webhook_routes and self._guard(
                lambda a=agent: self.client.zcard(self._p(a) + "obq")  # type: ignore[misc]
            ):
                self._index_outbox(agent)  # re-index what a dead process may have missed
            for rid in self._expire(agent, now):
                r = self._read_reservation(rid)
                if r is None:  # pragma: no cover - it was just written
                    continue
                reservations.append(r)
                if r.approval_id is not None:
                    a = self._read_approval(r.approval_id)
                    if a is not None and a.status is ApprovalStatus.EXPIRED:
                        approvals.append(a)
        return SweepResult(tuple(reservations), tuple(approvals))

    def ping(self) -> bool:
        """Whether Redis answers."""
        return bool(self._guard(self.client.ping))

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()
