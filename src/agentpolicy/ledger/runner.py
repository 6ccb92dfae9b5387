"""Run a ledger step atomically over any store: read, decide in Python, commit.

A *step* is a function of a :class:`View` (what it reads) and a
:class:`~agentpolicy.storage.base.Txn` (what it will write). It reads the
documents it needs, decides, adds its writes to the transaction and sets the
transaction's ``result``. :func:`run` commits the transaction with the
versions of everything the step read as its conditions; if any of them
changed (only possible on an optimistic store such as Redis), it runs the
step again on fresh reads. Exclusive stores (memory, SQLite, PostgreSQL)
never conflict.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from agentpolicy.errors import PolicyError, StorageUnavailableError
from agentpolicy.storage.base import Doc, Session, Storage, Txn, new_op

__all__ = ["MAX_ATTEMPTS", "RETRY_SECONDS", "UNREADABLE", "View", "run"]

UNREADABLE = (LookupError, TypeError, ValueError, AttributeError)
"""What reading stored data not as the ledger wrote it raises (a :class:`PolicyError` aside).

A call's own arguments are checked before its flow starts, so in a flow
these come from documents read back: damaged, or written by something else.
"""

T = TypeVar("T")

MAX_ATTEMPTS = 100
"""Commits tried at least before an operation gives up under contention (with back-off)."""

RETRY_SECONDS = 5.0
"""And for at least this long (real time): a commit that keeps losing to others is not starved."""

_BACKOFF_BASE = 0.0005
_BACKOFF_CAP = 0.01


_ABSENT: Doc = (0, None)


class View:
    """The documents one run of a step has read, with their versions.

    Names read with ``guess`` may come from an optimistic store's cache (or be
    taken as absent); everything read is checked by the commit. A step whose
    outcome rests on a guess without a commit to check it (an error, or
    nothing to write) is run again on fresh reads: see :func:`run`.
    """

    __slots__ = ("guessed", "seen", "session", "trust")

    def __init__(self, session: Session, trust: bool = True) -> None:
        self.session = session
        self.seen: dict[str, Doc] = {}
        self.trust = trust
        self.guessed = False

    def read(self, names: Iterable[str], guess: Iterable[str] = ()) -> None:
        """Read these documents (those not read yet) in one request to the store."""
        seen = self.seen
        missing = [n for n in names if n not in seen]
        if not missing:
            return
        session = self.session
        if session.fresh or not self.trust:  # an exclusive store has nothing to guess from
            got = session.get(missing)
        else:
            guesses = frozenset(guess)
            if guesses:
                self.guessed = True
            got = session.get(missing, guesses)
        for name in missing:
            seen[name] = got.get(name, _ABSENT)

    def doc(self, name: str) -> Any:
        """A document's body, or ``None`` when there is none (reading it if needed)."""
        found = self.seen.get(name)
        if found is None:
            self.read((name,))
            found = self.seen[name]
        return found[1]

    def scan(self, index: str, upto: int, limit: int) -> list[tuple[str, int]]:
        """Members of an index up to a score (see :meth:`Session.scan`)."""
        return self.session.scan(index, upto, limit)

    def expected(self) -> dict[str, int]:
        """Every document read, with the version it had: the commit's conditions."""
        return {name: doc[0] for name, doc in self.seen.items()}


class _Attempts:
    """Where one run of a step stands: trust in guesses, commits lost, since when.

    Shared by :func:`run` and :func:`agentpolicy.ledger.arunner.arun`, so
    both decide alike what follows a run of the step and a lost commit.
    """

    __slots__ = ("conflicts", "started", "trust", "write")

    def __init__(self, write: bool) -> None:
        self.trust = True
        self.write = write
        self.conflicts = 0
        self.started = 0.0  # set by the first lost commit (an exclusive store never loses one)

    def view(self, session: Session) -> View:
        """A view for the next run of the step (trusting guesses until told otherwise)."""
        return View(session, trust=self.trust)

    def ran(self, step: Callable[[View, Txn], None], view: View, txn: Txn) -> bool | None:
        """Run ``step`` once: ``True`` to commit ``txn``, ``False`` when done, ``None``: again.

        ``None`` means that the step's outcome (an error, or nothing to
        write) rests on a guess that no commit would check: the step must
        run again on fresh reads, in a new session. A
        :class:`~agentpolicy.PolicyError` that rests on nothing guessed is
        raised. ``True`` sets the commit's conditions (``txn.expect``).
        """
        try:
            step(view, txn)
        except PolicyError:
            if not view.guessed:
                raise
            self.trust = False  # the error may rest on a stale guess: check it fresh
            return None
        except UNREADABLE:
            if not view.guessed:
                raise
            self.trust = False  # a cached document may have been damaged, and since repaired
            return None
        if not (txn.put or txn.delete or txn.index or txn.append):
            if view.guessed:
                self.trust = False
                return None
            return False
        txn.expect = view.expected()
        return True

    def conflicted(self) -> float:
        """A commit lost to another: the seconds to wait before the next attempt.

        Raises :class:`~agentpolicy.errors.StorageUnavailableError` once
        contention outlasts both :data:`MAX_ATTEMPTS` and :data:`RETRY_SECONDS`.
        """
        self.conflicts += 1
        attempt = self.conflicts
        if attempt == 1:
            self.started = time.monotonic()
        if attempt >= MAX_ATTEMPTS and time.monotonic() - self.started >= RETRY_SECONDS:
            raise StorageUnavailableError(
                f"the store stayed too busy for {attempt} attempts; nothing was changed"
            )
        self.write = True
        ceiling = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** min(attempt, 16))
        return random.uniform(0, ceiling)  # noqa: S311 - jitter between retries, real time


def run(
    storage: Storage,
    shard: str,
    step: Callable[[View, Txn], None],
    finish: Callable[[Any], T],
    *,
    at: int,
    write: bool = True,
    op: str | None = None,
) -> T:
    """Run ``step`` on ``shard`` until its transaction commits; return ``finish(result)``.

    ``at`` is the engine's time in microseconds. A step that writes nothing
    commits nothing. A step may raise (a :class:`~agentpolicy.PolicyError`):
    then nothing is written. Raises
    :class:`~agentpolicy.errors.StorageUnavailableError` when contention
    outlasts both :data:`MAX_ATTEMPTS` commits and :data:`RETRY_SECONDS`.
    """
    op = op or new_op(at)
    attempts = _Attempts(write)
    while True:
        with storage.session(shard, write=attempts.write) as session:
            txn = Txn(op, at)
            commit = attempts.ran(step, View(session, attempts.trust), txn)
            if commit is None:
                continue
            if not commit:
                return finish(txn.result)
            outcome = session.commit(txn)
        if not outcome.conflict:
            return finish(outcome.result)
        time.sleep(attempts.conflicted())
