"""authorize on Redis beside a PING on the same connection, and commands per authorize.

Run: REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python benchmarks/bench_redis.py
Uses its own key prefix and deletes nothing else. Medians of several rounds.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import redis

from agentpolicy import PolicyEngine
from agentpolicy.examples import seed_policy
from agentpolicy.storage.redis import RedisStorage
from agentpolicy.testing import ManualClock, payment

NOW = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)


def per_call(fn: Callable[[], object], number: int, rounds: int = 5) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return statistics.median(samples)


def main() -> None:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    storage = RedisStorage(url, key_prefix=prefix)
    engine = PolicyEngine(storage=storage, clock=ManualClock(NOW))
    policy = seed_policy()
    policy["limits"] = {k: {**v, "value": str(10**30)} for k, v in policy["limits"].items()}
    policy.pop("approvalConfig")
    engine.set_policy("agent-1", policy)
    request = payment(1, recipient="0xaddr1", category="api_usage")
    engine.authorize(request)

    ping = per_call(storage.client.ping, 2_000)
    authorize = per_call(lambda: engine.authorize(request), 1_000)

    probe = redis.Redis.from_url(url)
    before = probe.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    for _ in range(100):
        engine.authorize(request)
    after = probe.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    print(f"{'figure':<36}{'median':>11}{'ratio':>8}")
    print(f"{'anchor: PING, same connection':<36}{ping * 1e6:>9.1f}us{1:>8.2f}")
    print(f"{'authorize on Redis':<36}{authorize * 1e6:>9.1f}us{authorize / ping:>8.2f}")
    print(
        f"EVALSHA per authorize (INFO commandstats, 100 calls): {(after - before) / 100:.2f}"
        " (other clients on a shared server add to this)"
    )
    for key in probe.scan_iter(match=prefix + "*"):  # only this run's own keys
        probe.delete(key)
    probe.close()
    engine.close()


if __name__ == "__main__":
    main()
