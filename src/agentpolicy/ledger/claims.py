"""Claiming a reservation: the right to make its payment, held by one caller at a time.

A reservation id can reach more than one caller: the same idempotency key
answers the first decision again, and anyone may resume an approved
approval. Whoever is about to pay with a reservation claims it first; the
claim is written in the reservation's own document, so of two callers
(threads, processes, machines) exactly one wins, and the other is refused
before it pays. Confirm and release are not affected: they need no claim.

A caller that sends a payment marks its reservation sent first
(:func:`mark_sent`): from then on the payee may be paid whether or not an
answer ever comes, so a sent reservation that expires unsettled is
counted as spent (``agentpolicy.ledger.state.close_reservation``), not
given back. Confirm and release still settle it as they say.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from agentpolicy.errors import ConflictError, ErrorCode, NotFoundError
from agentpolicy.ledger import keys
from agentpolicy.ledger.docs import Body, levels_of
from agentpolicy.ledger.runner import View
from agentpolicy.ledger.state import LedgerConfig
from agentpolicy.ledger.trees import delegation_end
from agentpolicy.storage._time import micros
from agentpolicy.storage.base import Txn

__all__ = ["claim", "mark_sent"]

_CLOSED = {
    "confirmed": ("is already confirmed", ErrorCode.RESERVATION_ALREADY_CONFIRMED),
    "released": ("was released", ErrorCode.RESERVATION_RELEASED),
    "expired": ("expired", ErrorCode.RESERVATION_EXPIRED),
}


def claim(
    cfg: LedgerConfig, reservation_id: str, holder: str, now: datetime
) -> Callable[[View, Txn], None]:
    """Claim an open reservation for ``holder``; the result is ``{"doc": reservation}``.

    Claiming again by the same holder changes nothing. Raises
    ``RESERVATION_NOT_FOUND`` (also for the hold of a pending approval),
    ``RESERVATION_CLAIMED`` (another holder has it),
    ``RESERVATION_ALREADY_CONFIRMED``, ``RESERVATION_RELEASED`` or
    ``RESERVATION_EXPIRED``; then nothing changes.
    """
    now_us = micros(now)
    name = keys.reservation(reservation_id)

    def step(view: View, txn: Txn) -> None:
        doc = _open(view, name, reservation_id, now_us)
        txn.result = {"doc": doc}
        taken = doc.get("cl")
        if taken == holder:
            return
        if taken:  # "" (an approval asked for by a block): kept for whichever block resumes it
            raise ConflictError(
                f"reservation {reservation_id} is claimed by another caller, which is "
                "making (or made) its payment",
                code=ErrorCode.RESERVATION_CLAIMED,
            )
        claimed = _underway(view, txn, reservation_id, {**doc, "cl": holder}, now_us)
        txn.put[name] = claimed  # still open: no ttl (see operations._hold)
        txn.result = {"doc": claimed}

    return step


def mark_sent(
    cfg: LedgerConfig, reservation_id: str, holder: str | None, now: datetime
) -> Callable[[View, Txn], None]:
    """Mark an open reservation's payment sent; the result is ``{"doc": reservation}``.

    Once sent, the reservation counts as spent if it expires unsettled
    (its outcome never reported): the payee may have been paid. Marking
    again changes nothing. A claimed reservation is marked only by its
    ``holder``. Raises as :func:`claim` does; then nothing changes.
    """
    now_us = micros(now)
    name = keys.reservation(reservation_id)

    def step(view: View, txn: Txn) -> None:
        doc = _open(view, name, reservation_id, now_us)
        txn.result = {"doc": doc}
        if doc.get("cl") not in (None, holder):
            raise ConflictError(
                f"reservation {reservation_id} is claimed by another caller: only that "
                "caller, which makes its payment, marks it sent",
                code=ErrorCode.RESERVATION_CLAIMED,
            )
        if "snt" in doc:
            return
        sent = _underway(view, txn, reservation_id, {**doc, "snt": now_us}, now_us)
        txn.put[name] = sent  # still open: no ttl (see operations._hold)
        txn.result = {"doc": sent}

    return step


def _underway(view: View, txn: Txn, reservation_id: str, doc: Body, now_us: int) -> Body:
    """``doc`` with its whole TTL, if it is an approved one cut to a delegation's end.

    An approved reservation that nobody has begun to pay with ends when a
    delegation above it does (``fx`` holds the end its TTL gives it); once
    a block claims it, or it is marked sent, its payment may be under way,
    so it keeps that whole TTL, as an allowed authorize's reservation does.
    A delegation that has ended by now (its end moved earlier since the
    vote, or revoked) refuses that with ``RESERVATION_EXPIRED``: the
    approved payment ended with it, and nothing changes.
    """
    whole = doc.pop("fx", None)
    if whole is None:
        return doc
    levels = levels_of(doc)
    names = [keys.head(level) for level in levels]
    view.read(names, guess=names)
    for level, name in zip(levels, names, strict=True):
        ended = delegation_end(view.doc(name))
        if ended is not None and ended <= now_us:
            raise ConflictError(
                f"reservation {reservation_id} expired: the delegation of {level}'s budget "
                "ended before a payment began with this approved reservation",
                code=ErrorCode.RESERVATION_EXPIRED,
            )
    doc["x"] = whole
    for level in levels:
        txn.index.append((keys.open_index(level), reservation_id, whole))
    return doc


def _open(view: View, name: str, reservation_id: str, now_us: int) -> Body:
    """The document of an open, usable reservation, or the error that says why it is not."""
    doc: Body | None = view.doc(name)
    if doc is None or doc["st"] == "held":
        raise NotFoundError(
            f"no reservation {reservation_id!r}", code=ErrorCode.RESERVATION_NOT_FOUND
        )
    status = "expired" if doc["st"] == "reserved" and now_us >= doc["x"] else doc["st"]
    if status in _CLOSED:
        words, code = _CLOSED[status]
        raise ConflictError(f"reservation {reservation_id} {words}", code=code)
    return doc
