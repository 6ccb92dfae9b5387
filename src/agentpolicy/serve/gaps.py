"""WORKAROUND: figures the engine has no public method for yet (read from the ledger's keys).

The service is built on the public API of :class:`~agentpolicy.PolicyEngine`;
this module is the one place that reads the ledger's own documents, because
no engine method counts open reservations. It reads only (no step, no
commit) and can be replaced by one engine call,
``PolicyEngine.open_reservations(limit: int = 100_000) -> int`` (how many
reservations and approval holds are open across the store, read from each
agent's open index, at most ``limit`` agents), when the engine has it.
"""

from __future__ import annotations

from agentpolicy.engine import PolicyEngine
from agentpolicy.ledger import keys
from agentpolicy.ledger.state import MAX_SCORE

__all__ = ["open_reservations"]

_MAX_AGENTS = 100_000


def open_reservations(engine: PolicyEngine) -> int:
    """Reservations and holds that are open now, over every agent with something to expire.

    An agent with an open reservation or hold is in the global ``@due``
    index (it has something that will expire); its open index lives in its
    tree's shard, which a document in its own shard names. At most 100,000
    agents are looked at.
    """
    storage = engine.storage
    with storage.session("@", write=False) as session:
        agents = [a for a, _ in session.scan(keys.DUE, MAX_SCORE, _MAX_AGENTS)]
    total = 0
    for agent in agents:
        with storage.session(agent, write=False) as session:
            pointer = session.get([keys.home(agent)]).get(keys.home(agent))
        shard = agent if pointer is None else pointer[1]["s"]
        with storage.session(shard, write=False) as session:
            total += len(session.scan(keys.open_index(agent), MAX_SCORE, 1_000_000))
    return total
