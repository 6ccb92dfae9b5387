"""Cost of the pure decision function beside a named anchor, measured in one run.

Run: .venv/bin/python benchmarks/bench_core.py
Prints medians of several rounds and the ratio to the anchor. The anchor is
``json.loads`` of the same policy text: a floor every caller already pays to
read a policy, measured on this machine in this run.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

from agentpolicy import PaymentRequest, evaluate, load_policy, windows_for
from agentpolicy.amounts import Amount
from agentpolicy.examples import seed_policy


def per_call(fn: Callable[[], object], number: int, rounds: int = 7) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return statistics.median(samples)


def main() -> None:
    raw = seed_policy()
    text = json.dumps(raw)
    policy = load_policy(raw)
    now = datetime(2026, 1, 19, 10, tzinfo=UTC)
    request = PaymentRequest("agent-1", "5000000", "0xaddr1", "eip155:8453", "api_usage")
    usage = {w.key: Amount(1_000_000) for w in windows_for(policy, now)}

    anchor = per_call(lambda: json.loads(text), 20_000)
    rows = [
        (
            "evaluate (seed policy, every rule kind)",
            per_call(lambda: evaluate(policy, request, usage, now), 5_000),
        ),
        ("load_policy (seed policy)", per_call(lambda: load_policy(raw), 2_000)),
        (
            "PaymentRequest(...)",
            per_call(
                lambda: PaymentRequest("agent-1", "5000000", "0xaddr1", "eip155:8453"), 20_000
            ),
        ),
    ]
    print(f"{'figure':<44}{'median':>12}{'x anchor':>10}")
    print(f"{'anchor: json.loads(policy text)':<44}{anchor * 1e6:>10.2f}us{1:>10.2f}")
    for name, seconds in rows:
        print(f"{name:<44}{seconds * 1e6:>10.2f}us{seconds / anchor:>10.2f}")


if __name__ == "__main__":
    main()
