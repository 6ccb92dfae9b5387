"""Sequences of legitimate calls that tried to spend past a limit: each found one, with its figures.

Every test runs on every store (the ``backend`` fixture). The clock is a
``ManualClock``: nothing sleeps.
"""

from __future__ import annotations

from datetime import UTC, datetime

from agentpolicy.testing import ManualClock, payment
from tests.backends import Backend

T0 = datetime(2026, 3, 30, 8, 0, tzinfo=UTC)


def test_counts_of_every_token_bind_an_asset_whose_block_has_counts_alone(backend: Backend) -> None:
    """``limits`` of counts alone beside an asset's block that names no amount.

    docs/policy.md: a payment in an asset counts against that asset's own
    limits *and* against the counts of every token. An asset block of counts
    only (no amount, so no token of its own in its amounts) was taken for
    the counts alone themselves: the every-token 10-minute count of 2 was
    never checked on USDC payments, and 3 (then any number) passed.
    """
    clock = ManualClock(T0)
    engine = backend.engine(clock)
    engine.set_policy("bot", {
        "limits": {"counts": [{"window": "10m", "max": 2}]},
        "assets": [{"symbol": "USDC", "limits": {"counts": [{"window": "daily", "max": 100}]}}],
    })  # fmt: skip
    codes = [engine.authorize(payment(1, agent_id="bot", symbol="USDC")).code for _ in range(3)]
    assert codes == ["ALLOWED", "ALLOWED", "COUNT_LIMIT"]  # was 3 allowed against a max of 2
    d = engine.authorize(payment(1, agent_id="bot", symbol="ETH", decimals=18))
    assert d.code == "COUNT_LIMIT"  # every token counts together
    # an asset block with no limits at all is no way around it either
    engine.set_policy("bot-2", {"limits": {"counts": [{"window": "10m", "max": 2}]},
                                "assets": [{"symbol": "USDC", "limits": {}}]})  # fmt: skip
    codes = [engine.authorize(payment(1, agent_id="bot-2", symbol="USDC")).code for _ in range(3)]
    assert codes == ["ALLOWED", "ALLOWED", "COUNT_LIMIT"]


def test_an_asset_block_of_counts_alone_counts_that_asset_only(backend: Backend) -> None:
    """The asset's own counts are per token: another token's payments do not use them up.

    USDC may be paid once a day; one ETH payment before it refused the USDC
    payment (``COUNT_LIMIT``: 1 payment so far, counting the ETH one), and
    ``budget()`` showed the ETH payment in USDC's count.
    """
    clock = ManualClock(T0)
    engine = backend.engine(clock)
    engine.set_policy("bot", {
        "limits": {"counts": [{"window": "10m", "max": 100}]},
        "assets": [{"symbol": "USDC", "limits": {"counts": [{"window": "daily", "max": 1}]}}],
    })  # fmt: skip
    assert engine.authorize(payment(1, agent_id="bot", symbol="ETH", decimals=18)).allowed
    assert engine.authorize(payment(1, agent_id="bot", symbol="USDC")).allowed  # was COUNT_LIMIT
    assert engine.authorize(payment(1, agent_id="bot", symbol="USDC")).code == "COUNT_LIMIT"
    counts = {(lim.window, lim.count) for lim in engine.budget("bot").limits}
    assert counts == {("10m", 2), ("daily", 1)}  # ETH and USDC; USDC alone
