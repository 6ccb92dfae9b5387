"""Names of the ledger's documents, indexes and logs, and the ids it hands out.

Every name is an injective function of the ids in it: ``/`` and ``%`` inside
an id are escaped, so ``"a/b"`` and ``("a", "b")`` never meet. Reservation
and approval ids carry a tag of their agent (``res_<32 hex>_<tag>``), so a
lookup by id knows which agent, and which shard, to ask. The tag of an agent
is its id when that is short and plain, and otherwise ``~`` followed by the
hex of its UTF-8 bytes; no plain tag starts with ``~``, so two agents never
share a tag (and, on Redis Cluster, never share keys).
"""

from __future__ import annotations

import functools
import os
import re

from agentpolicy.storage.base import serial_random

__all__ = [
    "AGENTS",
    "DUE",
    "OUTBOX",
    "PENDING",
    "agent_of_id",
    "approval",
    "changes_log",
    "children",
    "denials_log",
    "head",
    "home",
    "idempotency",
    "new_id",
    "new_token",
    "open_index",
    "outbox_done",
    "outbox_queue",
    "pending_index",
    "policy",
    "reservation",
    "rolling_grace",
    "rolling_live",
    "scope_book",
    "scope_groups",
    "shadow",
    "shadow_log",
    "shadow_scope_book",
    "tag",
    "webhook",
]

AGENTS = "@agents"
"""Global index: agents that have a policy (score 0)."""
DUE = "@due"
"""Global index: agents with something to expire, scored by when (microseconds)."""
PENDING = "@pending"
"""Global index: pending approvals of every agent, scored by creation."""
OUTBOX = "@outbox"
"""Global index: shards with webhook deliveries (score 0: some waiting, 1: none now)."""

_PLAIN_TAG = re.compile(r"[^{}~][^{}]{0,63}")
_PLAIN_ID_OF_01 = re.compile(r"~[^{}]{0,63}")  # 0.1 wrote an id beginning with ~ as it was
_HEX = re.compile(r"(?:[0-9a-f]{2})*")
_ID = re.compile(r"(?:res|apr)_[0-9a-f]{32}_(.+)", re.DOTALL)


def _esc(part: str) -> str:
    # not cached: two scans of a short string cost less than a cache lookup, and the parts of
    # unique ids (reservations, approvals, idempotency keys) would only push the others out
    if "%" not in part and "/" not in part:
        return part
    return part.replace("%", "%25").replace("/", "%2F")


def tag(agent_id: str) -> str:
    """The agent's tag: its id if short and plain, else ``~`` + hex of its UTF-8 bytes."""
    if _PLAIN_TAG.fullmatch(agent_id):
        return agent_id
    return "~" + agent_id.encode().hex()


def _untag(value: str) -> str | None:
    """The agent id of a tag; a ``~`` tag that :func:`tag` would not make is 0.1's, kept as is.

    agentpolicy 0.1 put an id beginning with ``~`` into its ids as it was
    (``res_..._~zz``); this version writes ``~`` + hex only for an id that is
    not plain. So a ``~`` tag that is not hex, or whose id would be written
    plain (``~41``, which this version writes ``A`` for agent ``A``), is the
    literal id of an agent of 0.1.
    """
    if not value.startswith("~"):
        return value
    decoded = None
    if _HEX.fullmatch(value, 1):  # exactly what tag() writes (fromhex would skip white space)
        try:
            decoded = bytes.fromhex(value[1:]).decode()
        except ValueError:
            decoded = None
    if decoded is None or _PLAIN_TAG.fullmatch(decoded):
        return value if _PLAIN_ID_OF_01.fullmatch(value) else None
    return decoded


def new_token(at: int) -> str:
    """32 hex digits: the time (13), a counter of this process (5), then 56 random bits (14).

    Time and counter first: stores keep new ids together, in the order they were made.
    The time is its low 52 bits, so an id is 32 digits at every instant (the
    time wraps once, at 2^52 microseconds, 2112-09-17T23:53:47.370496Z; ids made
    after that sort before older ones, which changes only where a store keeps
    them: ids are told apart by their counter and random bits, never by order).
    """
    return hex((at & _LOW52 if at > 0 else 0) | _BIT52)[3:] + serial_random()


_BIT52 = 1 << 52
_LOW52 = _BIT52 - 1


def new_id(kind: str, agent_id: str, token: str | None = None) -> str:
    """A new opaque id: ``<kind>_<32 hex>_<tag>`` (``token`` reuses the 32 hex digits)."""
    return f"{kind}_{token or os.urandom(16).hex()}_{tag(agent_id)}"


def agent_of_id(some_id: str) -> str | None:
    """The agent a reservation or approval id belongs to, or ``None`` for an untagged id."""
    match = _ID.fullmatch(some_id)
    return None if match is None else _untag(match.group(1))


@functools.lru_cache(maxsize=4096)
def head(agent_id: str) -> str:
    """The agent's head: policy version, counters, next expiry, time horizon."""
    return "h/" + _esc(agent_id)


def home(agent_id: str) -> str:
    """Where an agent's state lives when not in its own shard: kept in the agent's own shard.

    ``{"s": shard}``: an agent set up below a parent lives with the parent's
    tree (one shard for every budget of a tree), and this document, written
    once, says so. ``"k"`` (also before the agent is placed, without
    ``"s"``): when the newest decision with an idempotency key was recorded
    in the agent's own shard while it had no policy (microseconds; see
    ``agentpolicy.ledger.trees``).
    """
    return "t/" + _esc(agent_id)


def children(agent_id: str) -> str:
    """Index of the budgets whose parent is this agent (score 0)."""
    return "ch/" + _esc(agent_id)


def policy(agent_id: str, version: int) -> str:
    """One stored version of an agent's policy."""
    return f"p/{_esc(agent_id)}/{version}"


def reservation(reservation_id: str) -> str:
    """A reservation (or the hold of an approval)."""
    return "r/" + _esc(reservation_id)


def approval(approval_id: str) -> str:
    """An approval."""
    return "a/" + _esc(approval_id)


def idempotency(agent_id: str, key: str) -> str:
    """The first decision made under an agent's idempotency key."""
    return f"i/{_esc(agent_id)}/{_esc(key)}"


def scope_book(agent_id: str, scope: str, group: str) -> str:
    """The counters of one group of one of the agent's scoped limits."""
    return f"g/{_esc(agent_id)}/{_esc(scope)}/{_esc(group)}"


def scope_groups(agent_id: str, scope: str) -> str:
    """Index of the groups a scope of the agent has counters for (by first use)."""
    return f"sg/{_esc(agent_id)}/{_esc(scope)}"


def rolling_live(book: str, key: str) -> str:
    """Index of the payments still counting in a rolling counter, by authorize instant."""
    return f"rl/{_esc(book)}/{_esc(key)}"


def rolling_grace(book: str, key: str) -> str:
    """Index of the payments that left a rolling counter within the grace period."""
    return f"rg/{_esc(book)}/{_esc(key)}"


def shadow(agent_id: str) -> str:
    """The agent's shadow policy: the candidate judged beside the live one, and its tallies.

    ``{"policy": JSON form, "at": set (us), "id": serial, "pv": live version
    when set, "n": {"LIVE>SHADOW": payments}}``; the head's ``"sh"`` holds
    the serial while a shadow is set. Never deleted: once a shadow ends it
    holds ``{"id": ""}``, so its version only grows (a document deleted and
    written again would start at version 1, which an optimistic store's
    cached copy of the old one could pass for).
    """
    return "sp/" + _esc(agent_id)


def shadow_log(agent_id: str) -> str:
    """The payments whose shadow decision differed from the live one (kept like history)."""
    return "hs/" + _esc(agent_id)


def shadow_scope_book(agent_id: str, scope: str, group: str) -> str:
    """A shadow scope's own counters, when the live policy has a different scope of that name."""
    return f"gx/{_esc(agent_id)}/{_esc(scope)}/{_esc(group)}"


def webhook(delivery_id: str) -> str:
    """One webhook delivery in the outbox."""
    return "w/" + _esc(delivery_id)


def open_index(agent_id: str) -> str:
    """Index of the agent's open reservations and holds, scored by expiry."""
    return "o/" + _esc(agent_id)


def pending_index(agent_id: str) -> str:
    """Index of the agent's pending approvals, scored by creation."""
    return "q/" + _esc(agent_id)


def outbox_queue(shard: str) -> str:
    """Index of a shard's pending webhook deliveries, in the order they were written."""
    return "wq/" + _esc(shard)


def outbox_done(shard: str) -> str:
    """Index of a shard's finished webhook deliveries."""
    return "wd/" + _esc(shard)


def changes_log(agent_id: str) -> str:
    """The agent's history of state changes (allowed decisions, holds, settlements, votes)."""
    return "hc/" + _esc(agent_id)


def denials_log(agent_id: str) -> str:
    """The agent's denied decisions, kept apart so a flood of them evicts nothing else."""
    return "hd/" + _esc(agent_id)
