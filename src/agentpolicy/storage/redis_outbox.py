"""The webhook outbox on Redis: entries written by the scripts, claimed and finished here.

Entries live in each agent's slot (``PREFIX{tag}:ob:<id>`` hashes and the
``PREFIX{tag}:obq`` queue), written by the same script as the approval
change. The index of agents with waiting entries (``PREFIX`` +
``outbox-agents``) is outside the slot: it is a second command, sent only
when a script wrote an entry, and ``sweep()`` re-indexes what a dying
process missed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import attrs

from agentpolicy.codec import decode
from agentpolicy.records import (
    Approval,
    ApprovalStatus,
    DeliveryStatus,
    Vote,
    WebhookDelivery,
)
from agentpolicy.views import approval_data, vote_data

__all__ = ["KEEP", "RedisOutbox", "keep_ms"]

T = TypeVar("T")

KEEP = timedelta(days=8)
"""Closed reservations, decided approvals and finished deliveries stay readable this long."""


def keep_ms(delta: timedelta) -> int:
    """A positive duration in whole milliseconds, for ``PEXPIRE``."""
    return max(1, delta // timedelta(milliseconds=1))


class RedisOutbox:
    """The outbox half of :class:`~agentpolicy.storage.redis.RedisStorage`."""

    client: Any
    key_prefix: str
    webhook_routes: tuple[tuple[str, frozenset[str]], ...] = ()

    def _guard(self, call: Callable[[], T]) -> T:
        raise NotImplementedError

    def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        raise NotImplementedError

    def _p(self, agent_id: str) -> str:
        raise NotImplementedError

    def _read_approval(self, approval_id: str) -> Approval | None:
        raise NotImplementedError

    def set_webhook_routes(self, routes: tuple[tuple[str, frozenset[str]], ...]) -> None:
        """Which endpoints want which events: approval events go to the outbox from now on."""
        self.webhook_routes = tuple(routes)

    def _add_routes(self, args: dict[str, Any]) -> None:
        if self.webhook_routes:
            args["routes"] = [
                {"id": endpoint, "events": sorted(events)}
                for endpoint, events in self.webhook_routes
            ]

    def _index_outbox(self, agent_id: str) -> None:
        # The index lives outside the agent's slot, so it is a second command; an agent
        # missed here (a process dying between the two) is found again by sweep().
        self._guard(lambda: self.client.sadd(self.key_prefix + "outbox-agents", agent_id))

    def _outbox_agents(self) -> list[str]:
        return sorted(self._guard(lambda: self.client.smembers(self.key_prefix + "outbox-agents")))

    def _delivery(self, p: str, fields: dict[str, str]) -> WebhookDelivery:
        approval_id = fields["approvalId"]
        approval = self._read_approval(approval_id)
        payload: dict[str, Any] = {"id": fields["eventId"], "event": fields["event"]}
        if approval is None:  # pragma: no cover - kept 8 days, longer than any delivery
            payload["approval"] = {"id": approval_id, "agentId": fields["agentId"]}
        else:
            decided = fields["adecided"] or None
            snapshot = attrs.evolve(
                approval,
                status=ApprovalStatus(fields["astatus"]),
                votes=tuple(decode(v, Vote) for v in fields["votes"].split("\n") if v),
                decided_at=None if decided is None else datetime.fromisoformat(decided),
            )
            payload["approval"] = approval_data(snapshot)
        if fields["decision"]:
            payload["decision"] = vote_data(decode(fields["decision"], Vote))
        return WebhookDelivery(
            id=fields["id"], event_id=fields["eventId"], endpoint_id=fields["endpointId"],
            event=fields["event"], agent_id=fields["agentId"], approval_id=approval_id,
            created_at=datetime.fromisoformat(fields["createdAt"]), payload=payload,
            seq=int(fields["seq"]), status=DeliveryStatus(fields["status"]),
            attempts=int(fields["attempts"]), next_attempt_at=float(fields["nextAttemptAt"]),
            last_error=fields["lastError"] or None,
        )  # fmt: skip

    def claim_webhooks(
        self, endpoint_ids: list[str], now: float, lease: float, limit: int = 50
    ) -> list[WebhookDelivery]:
        """Claim due deliveries (one script per agent with events waiting)."""
        claimed: list[WebhookDelivery] = []
        for agent in self._outbox_agents():
            p = self._p(agent)
            args = {"P": p, "endpoints": endpoint_ids, "now": repr(now), "lease": lease,
                    "limit": limit - len(claimed)}  # fmt: skip
            for flat in self._run("claim", [p + "obq"], [json.dumps(args)]):
                claimed.append(self._delivery(p, dict(zip(flat[::2], flat[1::2], strict=True))))
            if len(claimed) >= limit:
                break
        return claimed

    def finish_webhook(self, delivery: WebhookDelivery) -> None:
        """Record an attempt's outcome; a finished delivery leaves the queue."""
        p = self._p(delivery.agent_id)
        key = p + "ob:" + delivery.id

        def write() -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(key, mapping={
                "status": delivery.status.value, "attempts": delivery.attempts,
                "nextAttemptAt": repr(delivery.next_attempt_at),
                "lastError": delivery.last_error or "",
            })  # fmt: skip
            if delivery.status is not DeliveryStatus.PENDING:
                pipe.zrem(p + "obq", delivery.id)
                pipe.lpush(p + "obdone", delivery.id)
                pipe.ltrim(p + "obdone", 0, 999)
                pipe.pexpire(key, keep_ms(KEEP))
            pipe.execute()

        self._guard(write)

    def pending_webhooks(self, endpoint_ids: list[str]) -> int:
        """How many deliveries for these endpoints are still pending."""
        total = 0
        for agent in self._outbox_agents():
            p = self._p(agent)
            args = {"P": p, "endpoints": endpoint_ids, "now": "0", "lease": 0, "limit": 0,
                    "count": True}  # fmt: skip
            total += int(self._run("claim", [p + "obq"], [json.dumps(args)]))
        return total

    def webhook_deliveries(
        self, status: str | None = None, limit: int = 100
    ) -> list[WebhookDelivery]:
        """Deliveries, newest first, optionally of one status."""
        found: list[WebhookDelivery] = []
        for agent in self._outbox_agents():
            p = self._p(agent)
            ids = self._guard(lambda p=p: self.client.zrange(p + "obq", 0, -1))  # type: ignore[misc]
            ids += self._guard(lambda p=p: self.client.lrange(p + "obdone", 0, -1))  # type: ignore[misc]
            for some_id in ids:
                fields = self._guard(lambda i=some_id, p=p: self.client.hgetall(p + "ob:" + i))  # type: ignore[misc]
                if fields and (status is None or fields["status"] == status):
                    found.append(self._delivery(p, fields))
        return sorted(found, key=lambda d: d.seq, reverse=True)[:limit]
