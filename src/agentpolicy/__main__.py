"""``python -m agentpolicy``: decide sample payments against the example policy.

With arguments it is the ``agentpolicy`` command (``python -m agentpolicy
policy set bot policy.json``), so a command given this way is carried out,
never taken for a request for the samples.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

from agentpolicy.cli import main as command
from agentpolicy.cli import silence_stdout
from agentpolicy.codec import load_policy
from agentpolicy.examples import example_policy
from agentpolicy.requests import PaymentRequest
from agentpolicy.rules import evaluate

_MONDAY = datetime(2026, 1, 19, 10, tzinfo=UTC)
_SAMPLES: tuple[tuple[str, PaymentRequest, datetime], ...] = (
    (
        "5 USDT for API usage on Base",
        PaymentRequest("agent-123", "5000000", "0xaddr1", "eip155:8453", "api_usage"),
        _MONDAY,
    ),
    (
        "150 USDT subscription (over the per-transaction cap)",
        PaymentRequest("agent-123", "150000000", "0xaddr2", "eip155:1", "subscription"),
        _MONDAY,
    ),
    (
        "100 USDT subscription (needs an approver)",
        PaymentRequest("agent-123", "100000000", "0xaddr2", "eip155:1", "subscription"),
        _MONDAY,
    ),
    (
        "1 USDT on BSC",
        PaymentRequest("agent-123", "1000000", "0xaddr1", "eip155:56", "api_usage"),
        _MONDAY,
    ),
    (
        "1 USDT to a blacklisted address",
        PaymentRequest("agent-123", "1000000", "0xBADADDR1", "eip155:8453", "api_usage"),
        _MONDAY,
    ),
    (
        "1 USDT for gambling",
        PaymentRequest("agent-123", "1000000", "0xaddr1", "eip155:8453", "gambling"),
        _MONDAY,
    ),
    (
        "1 USDT during the maintenance window",
        PaymentRequest("agent-123", "1000000", "0xaddr1", "eip155:8453", "api_usage"),
        datetime(2026, 1, 20, 10, tzinfo=UTC),
    ),
    (
        "1 USDT on Saturday",
        PaymentRequest("agent-123", "1000000", "0xaddr1", "eip155:8453", "api_usage"),
        datetime(2026, 1, 24, 10, tzinfo=UTC),
    ),
)


def main() -> None:
    """Print the decision for each sample payment."""
    policy = load_policy(example_policy())
    print("agentpolicy: the example policy against sample payments\n")
    for label, request, now in _SAMPLES:
        decision = evaluate(policy, request, {}, now)
        verdict = (
            "ALLOW" if decision.allowed else "HOLD " if decision.requires_approval else "DENY "
        )
        print(f"{verdict} {decision.code:<26} {label}")
        print(f"       {now:%a %Y-%m-%d %H:%M} UTC: {decision.reason}")


if __name__ == "__main__":
    if len(sys.argv) > 1:  # a command: what the agentpolicy command does with it
        sys.exit(command(sys.argv[1:]))
    try:
        main()
    except BrokenPipeError:  # the reader went away (| head)
        silence_stdout()
