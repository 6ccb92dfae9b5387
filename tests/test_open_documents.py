"""Open reservations and pending approvals carry no expiry of their own in the store.

The ledger gives an open reservation's amount back from its document (which
counters it counts in), so the store must keep the document until the
ledger closes it; a closed one is kept for ``keep_closed`` and then
forgotten. On Redis a key's expiry runs on the server's real clock, so the
contract suite (on a manual clock) cannot see it: this reads the keys.
"""

from __future__ import annotations

import uuid
from typing import Any

import redis

from agentpolicy import PolicyEngine
from agentpolicy.ledger import keys
from agentpolicy.storage.redis import RedisStorage
from agentpolicy.testing import ManualClock, payment

USDT = 1_000_000
POLICY = {
    "limits": {"lifetime": {"value": str(20 * USDT)}},
    "approvalConfig": {
        "thresholds": [{"amount": {"value": str(5 * USDT)}, "requiredApprovers": 1,
                        "approvers": ["admin@company.com"]}],
    },
}  # fmt: skip


def test_open_documents_never_expire_on_redis_and_closed_ones_do(redis_url: str) -> None:
    prefix = f"open-{uuid.uuid4().hex[:8]}:"
    storage = RedisStorage(redis_url, key_prefix=prefix)
    client: Any = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with PolicyEngine(storage=storage, clock=ManualClock()) as engine:
            engine.set_policy("agent-1", POLICY)
            rid = engine.authorize(payment(4 * USDT)).reservation_id
            held = engine.authorize(payment(6 * USDT))
            assert rid is not None
            assert held.approval_id is not None
            hold = engine.get_approval(held.approval_id).hold_id
            shard = storage.keys.shard_prefix("agent-1")
            reservation = shard + keys.reservation(rid)
            assert client.pttl(reservation) == -1  # open: kept until the ledger closes it
            assert client.pttl(shard + keys.reservation(hold)) == -1
            assert client.pttl(shard + keys.approval(held.approval_id)) == -1
            engine.confirm(rid)
            assert client.pttl(reservation) > 0  # closed: forgotten after keep_closed
            engine.decide(held.approval_id, "admin@company.com", "approve")
            assert client.pttl(shard + keys.approval(held.approval_id)) > 0
            assert client.pttl(shard + keys.reservation(hold)) == -1  # approved: open again
    finally:
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
        client.close()
