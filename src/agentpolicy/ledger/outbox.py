"""The webhook outbox over the storage primitive: claim, finish, count and list deliveries.

Events are written by the ledger's steps in the same commit as the change
that caused them (:func:`agentpolicy.ledger.state.emit`): a delivery
document per endpoint, queued in its shard's outbox index in the order of
the store's sequence, and the shard named in the global ``@outbox`` index.
Delivery (:mod:`agentpolicy.delivery`) claims what is due through
:class:`LedgerOutbox`, on every store alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agentpolicy.ledger import keys
from agentpolicy.ledger.docs import Body, delivery_record
from agentpolicy.ledger.runner import View, run
from agentpolicy.ledger.state import MAX_SCORE
from agentpolicy.records import DeliveryStatus, WebhookDelivery
from agentpolicy.storage.base import NEXT_SEQ, Storage, Txn

__all__ = ["LedgerOutbox"]

_QUEUE_SCAN = 1000
"""The most queued deliveries of one endpoint read at once (their documents)."""
_QUEUE_IDS = 50_000
"""The most queue entries looked at at once (ids only: a delivery id ends with its endpoint)."""
_KEEP_DONE_MS = 8 * 86_400_000


class LedgerOutbox:
    """What webhook delivery needs, for any :class:`~agentpolicy.storage.base.Storage`.

    ``clock_us`` is the engine's clock in microseconds (it stamps commits;
    delivery times themselves are real time, passed in by the worker);
    ``shard_of`` names the shard of an agent.
    """

    def __init__(
        self, storage: Storage, clock_us: Callable[[], int], shard_of: Callable[[str], str]
    ) -> None:
        self.storage = storage
        self.clock_us = clock_us
        self.shard_of = shard_of

    def _shards(self, *, waiting: bool = True) -> list[str]:
        """Shards with deliveries waiting (score 0), or every shard that ever had one."""
        upto = 0 if waiting else MAX_SCORE
        with self.storage.session("@", write=False) as session:
            return [member for member, _ in session.scan(keys.OUTBOX, upto, 1_000_000)]

    def _queue(
        self, view: View, shard: str, wanted: set[str] | None = None
    ) -> tuple[bool, list[tuple[str, int, Body]]]:
        """``(idle, queued)``: whether the shard's queue is empty, and its deliveries.

        Only deliveries for ``wanted`` endpoints (all if ``None``) are read,
        at most :data:`_QUEUE_SCAN` of each endpoint, oldest first: the
        endpoint is the last part of a delivery's id, so a backlog of one
        endpoint (down, or no longer configured by any process) never hides
        another endpoint's deliveries behind it.
        """
        members = view.scan(keys.outbox_queue(shard), MAX_SCORE, _QUEUE_IDS)
        taken: dict[str, int] = {}
        chosen: list[tuple[str, int]] = []
        for delivery_id, seq in members:
            endpoint = delivery_id.rpartition(".")[2]
            if wanted is not None and endpoint not in wanted and endpoint.startswith("wh_"):
                continue
            if taken.get(endpoint, 0) < _QUEUE_SCAN:
                taken[endpoint] = taken.get(endpoint, 0) + 1
                chosen.append((delivery_id, seq))
        names = [keys.webhook(d) for d, _ in chosen]
        view.read(names)
        docs = [(d, seq, view.doc(n)) for (d, seq), n in zip(chosen, names, strict=True)]
        return not members, docs

    def claim_webhooks(
        self, endpoint_ids: list[str], now: float, lease: float, limit: int = 50
    ) -> list[WebhookDelivery]:
        """Claim due deliveries: only the oldest pending one per endpoint and approval.

        Claiming pushes ``next_attempt_at`` out by ``lease`` seconds, so no
        other worker sends the same delivery meanwhile; events of one
        approval reach an endpoint in the order they were written.
        """
        wanted = set(endpoint_ids)
        claimed: list[WebhookDelivery] = []
        for shard in self._shards():
            if len(claimed) >= limit:
                break

            def step(view: View, txn: Txn, shard: str = shard) -> None:
                idle, queue = self._queue(view, shard, wanted)
                if idle:
                    txn.index.append((keys.OUTBOX, shard, 1))  # idle until the next event
                heads: dict[tuple[str, str], tuple[str, int, Body]] = {}
                for delivery_id, seq, doc in queue:
                    if doc is None or doc["st"] != "pending":  # gone or finished: unqueue
                        txn.index.append((keys.outbox_queue(shard), delivery_id, None))
                        continue
                    heads.setdefault((doc["ep"], doc["apr"]), (delivery_id, seq, doc))
                taken: list[Any] = []
                for delivery_id, seq, doc in sorted(heads.values(), key=lambda h: h[1]):
                    due = doc["ep"] in wanted and doc["next"] <= now
                    if due and len(claimed) + len(taken) < limit:
                        leased = {**doc, "next": now + lease}
                        txn.put[keys.webhook(delivery_id)] = leased
                        taken.append([leased, seq])
                txn.result = {"taken": taken, "idle": idle}

            result = run(self.storage, shard, step, dict, at=self.clock_us())
            for doc, seq in result["taken"]:
                claimed.append(delivery_record(doc, seq))
            if result["idle"]:
                self._recheck_idle(shard)
        return claimed

    def _recheck_idle(self, shard: str) -> None:
        """Undo an idle mark that an event committed meanwhile may have overtaken.

        Where the ``@outbox`` index is only a hint beside the commit (Redis
        Cluster), or where the queue was read without a lock (Redis), an event
        can be queued between the read that found the queue empty and the idle
        mark landing. Reading the queue again after the mark is written closes
        that gap: an event committed before this read is seen here, and one
        committed after it writes its own mark later than ours.
        """
        with self.storage.session(shard, write=False) as session:
            if not session.scan(keys.outbox_queue(shard), MAX_SCORE, 1):
                return

        def step(view: View, txn: Txn) -> None:
            txn.index.append((keys.OUTBOX, shard, 0))

        run(self.storage, shard, step, lambda _: None, at=self.clock_us())

    def finish_webhook(self, delivery: WebhookDelivery, leased_until: float | None = None) -> None:
        """Record an attempt's outcome; a finished delivery leaves the queue.

        An outcome is recorded only while the delivery is pending and, with
        ``leased_until`` (its ``next_attempt_at`` as claimed), only while
        that claim is still the last one: a worker whose attempt outlived
        its lease, while another worker sent the delivery again, never
        overwrites the newer outcome.
        """
        shard = self.shard_of(delivery.agent_id)
        name = keys.webhook(delivery.id)

        def step(view: View, txn: Txn) -> None:
            doc = view.doc(name)
            if doc is None or doc["st"] != "pending":
                return
            if leased_until is not None and doc["next"] != leased_until:
                return  # claimed again since: that claim's outcome is the one to keep
            txn.put[name] = {
                **doc,
                "st": delivery.status.value,
                "n": delivery.attempts,
                "next": delivery.next_attempt_at,
                "err": delivery.last_error,
            }
            if delivery.status is not DeliveryStatus.PENDING:
                txn.ttl[name] = _KEEP_DONE_MS
                txn.index.append((keys.outbox_queue(shard), delivery.id, None))
                txn.index.append((keys.outbox_done(shard), delivery.id, NEXT_SEQ))

        run(self.storage, shard, step, lambda _: None, at=self.clock_us())

    def lease_webhook(self, delivery: WebhookDelivery, leased_until: float, until: float) -> bool:
        """Move a claim's lease to ``until``; return whether the claim was still the last one.

        Only a pending delivery whose ``next_attempt_at`` is still
        ``leased_until`` (as claimed, or as last moved) changes, so a worker
        renews the lease of a delivery it is about to attempt, or gives back
        (``until`` now) one it will not attempt this round, without ever
        touching a delivery another worker has claimed or finished since.
        """
        shard = self.shard_of(delivery.agent_id)
        name = keys.webhook(delivery.id)

        def step(view: View, txn: Txn) -> None:
            doc = view.doc(name)
            held = doc is not None and doc["st"] == "pending" and doc["next"] == leased_until
            if held:
                txn.put[name] = {**doc, "next": until}
            txn.result = held

        return bool(run(self.storage, shard, step, bool, at=self.clock_us()))

    def pending_webhooks(self, endpoint_ids: list[str]) -> int:
        """How many deliveries for these endpoints are still pending."""
        wanted = set(endpoint_ids)
        total = 0
        for shard in self._shards():
            with self.storage.session(shard, write=False) as session:
                view = View(session)
                total += sum(
                    1
                    for _, _, doc in self._queue(view, shard, wanted)[1]
                    if doc is not None and doc["st"] == "pending" and doc["ep"] in wanted
                )
        return total

    def webhook_deliveries(
        self, status: str | None = None, limit: int = 100
    ) -> list[WebhookDelivery]:
        """Deliveries, newest first, optionally of one status."""
        found: list[tuple[int, WebhookDelivery]] = []
        for shard in self._shards(waiting=False):
            with self.storage.session(shard, write=False) as session:
                view = View(session)
                listed = view.scan(keys.outbox_queue(shard), MAX_SCORE, _QUEUE_SCAN)
                listed += view.scan(keys.outbox_done(shard), MAX_SCORE, _QUEUE_SCAN)
                names = [keys.webhook(d) for d, _ in listed]
                view.read(names)
                for (_, seq), name in zip(listed, names, strict=True):
                    doc = view.doc(name)
                    if doc is not None and (status is None or doc["st"] == status):
                        found.append((doc["c"], delivery_record(doc, seq)))
        found.sort(key=lambda item: (item[0], item[1].seq), reverse=True)
        return [d for _, d in found[:limit]]
