"""Shadow policies: a candidate judged beside the live policy on every payment, enforced never.

Pure records and arithmetic; the ledger keeps the shadow and its tallies
(:mod:`agentpolicy.ledger.rollout`). Every authorize of the agent (and of
every budget below it) is judged by the shadow too, at the same instant and
against the same usage; the live decision is the one enforced. The shadow
keeps a tally of ``(live code, shadow code)`` pairs, and the payments whose
codes differ are logged, so :class:`ShadowReport` can say how many payments
each policy would allow, deny or send for approval, and which would flip.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import attrs

from agentpolicy.decisions import Code
from agentpolicy.policy import AgentPolicy
from agentpolicy.requests import PaymentRequest

__all__ = [
    "OUTCOMES",
    "ShadowDifference",
    "ShadowPolicy",
    "ShadowReport",
    "by_outcome",
    "flip_of",
    "outcome_of",
    "tally_pairs",
]

OUTCOMES = ("allowed", "approval", "denied")
"""What a decision does to a payment: lets it through, waits for people, or stops it."""


def outcome_of(code: Code | str) -> str:
    """``allowed`` for ALLOWED, ``approval`` for APPROVAL_REQUIRED, else ``denied``."""
    if code == Code.ALLOWED:
        return "allowed"
    return "approval" if code == Code.APPROVAL_REQUIRED else "denied"


def flip_of(live: Code | str, other: Code | str) -> str | None:
    """``"allowed->denied"`` and the like when the two codes have different outcomes, else None."""
    a, b = outcome_of(live), outcome_of(other)
    return None if a == b else f"{a}->{b}"


@attrs.frozen
class ShadowPolicy:
    """An agent's shadow policy: the candidate, when it was set, and the live version then."""

    agent_id: str
    policy: AgentPolicy
    set_at: datetime
    live_version: int


@attrs.frozen
class ShadowDifference:
    """A payment the shadow would have decided differently from the live policy.

    ``agent_id`` is the agent that paid (the shadow's own agent, or a
    budget below it); ``policy_version`` the live version that decided.
    """

    at: datetime
    request: PaymentRequest
    live_code: Code
    shadow_code: Code
    policy_version: int | None = None

    @property
    def agent_id(self) -> str:
        """The agent that asked to pay."""
        return self.request.agent_id

    @property
    def flip(self) -> str | None:
        """``"allowed->denied"``, ``"denied->allowed"``, ``"allowed->approval"``, ... or None."""
        return flip_of(self.live_code, self.shadow_code)


@attrs.frozen
class ShadowReport:
    """What a shadow policy would have done since it was set.

    ``payments`` were judged by both policies; ``live_codes`` and
    ``shadow_codes`` count them by code, ``live`` and ``shadow`` by outcome
    (``allowed``, ``approval``, ``denied``); ``flips`` counts the payments
    whose outcome would change (``"allowed->denied"``: the shadow would stop
    them). ``differences`` are the payments whose code differs, newest
    first (at most the number asked for, and only as long as the log keeps
    them: by age like history, and at most ``max_denials`` entries).
    """

    shadow: ShadowPolicy
    payments: int
    live_codes: Mapping[str, int]
    shadow_codes: Mapping[str, int]
    flips: Mapping[str, int]
    differences: tuple[ShadowDifference, ...] = ()

    @property
    def agent_id(self) -> str:
        """The agent whose shadow this is."""
        return self.shadow.agent_id

    @property
    def live(self) -> dict[str, int]:
        """Payments by live outcome."""
        return by_outcome(self.live_codes)

    @property
    def shadow_outcomes(self) -> dict[str, int]:
        """Payments by shadow outcome."""
        return by_outcome(self.shadow_codes)


def by_outcome(codes: Mapping[str, int]) -> dict[str, int]:
    """Payments by outcome (``allowed``, ``approval``, ``denied``, all present) from codes."""
    found = dict.fromkeys(OUTCOMES, 0)
    for code, n in codes.items():
        found[outcome_of(code)] += n
    return found


def tally_pairs(
    pairs: Mapping[str, int],
) -> tuple[dict[str, int], dict[str, int], dict[str, int], int]:
    """Live codes, shadow codes, flips and the total, from ``{"LIVE>SHADOW": payments}``."""
    live: dict[str, int] = {}
    shadow: dict[str, int] = {}
    flips: dict[str, int] = {}
    total = 0
    for pair, n in sorted(pairs.items()):
        a, _, b = pair.partition(">")
        live[a] = live.get(a, 0) + n
        shadow[b] = shadow.get(b, 0) + n
        total += n
        flip = flip_of(a, b)
        if flip is not None:
            flips[flip] = flips.get(flip, 0) + n
    return live, shadow, flips, total
