"""The storage primitive: versioned documents, sorted indexes, logs, and one atomic commit.

A store knows nothing of policies, budgets or approvals. It keeps

- **documents**: JSON-able values under string names, each with a version
  (1, 2, ... ; an absent document has version 0);
- **indexes**: sorted sets of ``(member, score)`` with integer scores;
- **logs**: append-only lists of JSON-able entries, each given a sequence
  number, trimmed by age and length on request;

and offers one atomic operation, :meth:`Session.commit`: *if every document
named in* ``expect`` *still has the version the caller read, apply every
write of the* :class:`Txn`, *all or nothing, and remember its result under
its operation id*; otherwise change nothing and report a conflict. A commit
whose operation id was already applied changes nothing and answers the
first result again, so a client may resend a commit whose outcome it did not
learn (a timeout after sending).

Every name belongs to a **shard** (the unit of atomicity: all documents of
one commit share it; on Redis Cluster it is the hash tag). Index names
starting with ``@`` are global (not sharded): stores apply them in the same
commit where they can, and otherwise as hints right after it (see
:attr:`Storage.global_indexes_atomic`).

The rules of the ledger live in :mod:`agentpolicy.ledger`, written once over
this interface; see ``docs/storage.md`` for how to write a new store.

:class:`AsyncSession` and :class:`AsyncStorage` are the same primitive for
asyncio (Redis on ``redis.asyncio``, PostgreSQL on psycopg's async pool):
the same contract, with coroutines where the sync one blocks. The same
ledger steps run on them through :func:`agentpolicy.ledger.arunner.arun`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = [
    "NEXT_SEQ",
    "Encoded",
    "Written",
    "dumps",
    "new_op",
    "share",
    "serial_random",
    "op_prefix",
    "OP_KEEP_US",
    "PRUNE_SLACK_US",
    "AsyncSession",
    "AsyncStorage",
    "Doc",
    "Outcome",
    "Session",
    "Storage",
    "Txn",
]

Doc = tuple[int, Any]
"""A document as read: ``(version, body)``; ``body`` is a JSON-able value (a dict)."""

NEXT_SEQ = -(2**63)
"""An index score meaning "the next number of the store's sequence" (see :class:`Txn`)."""

OP_KEEP_US = 86_400_000_000
"""How long a store remembers an operation id and its result: one day, in microseconds."""

PRUNE_SLACK_US = 86_400_000_000
"""How much longer a store shared by processes keeps what its housekeeping deletes: a day.

Housekeeping runs in whichever engine commits, by that engine's clock; the
operation ids and documents it deletes were timed by other engines' clocks.
An engine whose clock ran two hours ahead deleted, for the whole store, the
idempotency entries of agents it never touched while another engine would
still answer with them (a key retried within its 24 hours made a second
payment). So SQLite and PostgreSQL delete an operation id a day after
:data:`OP_KEEP_US` has passed, and a document a day after its ttl, by the
clock of the engine pruning. Nothing reads a document past its time by
its presence alone (the ledger checks the times it holds), so keeping it
longer changes no answer.
"""


def op_prefix(at: int) -> str:
    """The first characters of operation ids made at ``at`` (microseconds): they sort by time."""
    return f"{max(at, 0):014x}"


def _unencodable(value: object) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


try:
    from json.encoder import c_make_encoder as _c_make_encoder  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - CPython always has the accelerator
    _c_make_encoder = None

if _c_make_encoder is not None:
    # markers (no circular check), default, string encoder, indent, key and item
    # separators, sort_keys, skipkeys, allow_nan: what json.dumps passes for these options
    _compact = _c_make_encoder(
        None, _unencodable, json.encoder.encode_basestring_ascii, None, ":", ",",
        False, False, True,  # noqa: FBT003
    )  # fmt: skip

    def dumps(value: Any) -> str:
        """Compact JSON, as ``json.dumps(value, separators=(",", ":"))`` writes it.

        Calls the standard library's C encoder directly: ``json.dumps`` with
        any argument builds a new encoder per call.
        """
        return "".join(_compact(value, 0))

else:  # pragma: no cover

    def dumps(value: Any) -> str:
        """Compact JSON, as ``json.dumps(value, separators=(",", ":"))`` writes it."""
        return json.dumps(value, separators=(",", ":"))


_SHARED: dict[int, list[Any]] = {}
"""Values shared by many documents, by ``id()``: ``[value, its text or None until encoded]``."""


_T = TypeVar("_T")


def share(value: _T) -> _T:
    """Mark ``value`` as shared by many documents: :class:`Encoded` encodes it once.

    A value held as a top-level field of a document is written with the text
    kept for it (encoded on first use), byte for byte what ``dumps`` writes:
    the reservations of a budget in one hour hold one tuple of targets. The
    value is kept alive while marked (at most 4,096 values, then starts
    over), so its ``id()`` names it alone; the caller must never change it.
    Answers ``value``.
    """
    if len(_SHARED) >= 4096:
        _SHARED.clear()
    _SHARED[id(value)] = [value, None]
    return value


_quoted = json.encoder.encode_basestring_ascii  # a key as dumps writes it (C, no encoder run)


def _pasted(body: dict[Any, Any]) -> str:
    """``dumps(body)``, each shared top-level value written with its kept text."""
    parts: list[str] = []
    plain: dict[Any, Any] = {}
    for key, value in body.items():
        kept = _SHARED.get(id(value))
        if kept is None or kept[0] is not value or type(key) is not str:
            plain[key] = value
            continue
        if plain:
            parts.append(dumps(plain)[1:-1])
            plain = {}
        text = kept[1]
        if text is None:
            text = kept[1] = dumps(value)
        parts.append(_quoted(key) + ":" + text)
    if plain:
        parts.append(dumps(plain)[1:-1])
    return "{" + ",".join(parts) + "}"


class Encoded:
    """A transaction's documents, log entries and result as JSON, each encoded once.

    ``put`` maps each document's name to its text, ``append`` lists each log
    entry's text in order, and ``result`` is the result's text. A result that
    holds a document or a log entry of the same transaction (an authorize's
    decision record, a confirm's reservation) is written with that value's
    text instead of encoding it again; a document's top-level field holding
    a value marked by :func:`share` is written with the text kept for it.
    Every text is the same text ``dumps`` would write.
    """

    __slots__ = ("append", "put", "result")

    def __init__(self, txn: Txn) -> None:
        known: dict[int, str] = {}  # id() of values the transaction holds (all alive meanwhile)
        self.put: dict[str, str] = {}
        shared = _SHARED.keys()
        for name, body in txn.put.items():
            self.put[name] = known[id(body)] = (
                _pasted(body)
                if shared and type(body) is dict and not shared.isdisjoint(map(id, body.values()))
                else dumps(body)
            )
        self.append: list[str] = []
        for _, entry, _, _ in txn.append:
            text = known[id(entry)] = dumps(entry)
            self.append.append(text)
        result = txn.result
        if type(result) is dict and len(result) == 1:  # the usual result: one document or entry
            ((key, value),) = result.items()
            same = known.get(id(value)) if type(key) is str else None
            self.result = dumps(result) if same is None else "{" + dumps(key) + ":" + same + "}"
        elif (
            type(result) is dict
            and any(id(v) in known for v in result.values())
            and all(type(k) is str for k in result)
        ):
            self.result = "{" + ",".join(
                f"{dumps(k)}:{known.get(id(v)) or dumps(v)}" for k, v in result.items()
            ) + "}"  # fmt: skip
        else:
            self.result = dumps(result)


class Written:
    """The text and value of the documents a storage object wrote last, by name.

    A read that finds the very text this object wrote takes the value it
    wrote instead of decoding the text again (the ledger never changes a
    value it wrote or read). The text is compared, so what another process
    wrote is always decoded. Keeps at most ``kept`` names (then starts over).
    """

    __slots__ = ("_docs", "kept")

    def __init__(self, kept: int = 4096) -> None:
        self._docs: dict[str, tuple[str, Any]] = {}
        self.kept = kept

    def decode(self, name: str, text: str) -> Any:
        """The value of ``text``, read as document ``name``."""
        mine = self._docs.get(name)
        return mine[1] if mine is not None and mine[0] == text else json.loads(text)

    def remember(self, txn: Txn, text: Encoded) -> None:
        """What ``txn`` writes, as ``text`` has it (call it as the documents are written)."""
        docs = self._docs
        if len(docs) >= self.kept:
            docs.clear()
        for name, body in txn.put.items():
            docs[name] = (text.put[name], body)

    def __len__(self) -> int:
        return len(self._docs)


_serial = itertools.count()  # next() is atomic under the GIL
_random: list[str] = []


def _reset_after_fork() -> None:
    _random.clear()  # a child must not hand out the random bits its parent will


os.register_at_fork(after_in_child=_reset_after_fork)


def serial_random() -> str:
    """19 hex digits: a counter of this process (5), then 56 random bits (14).

    After the time, ids made in one process sort in the order they were made,
    even when the clock stands still (a manual clock, or many ids in one
    microsecond), so B-trees receive new ids at their end. The random bits
    come from ``os.urandom``, drawn 256 ids at a time (one system call).
    """
    try:
        tail = _random.pop()
    except IndexError:
        pool = os.urandom(7 * 256).hex()
        _random.extend(pool[i : i + 14] for i in range(0, len(pool), 14))
        tail = _random.pop()
    return hex(next(_serial) & 0xFFFFF | 0x100000)[3:] + tail  # 5 digits: hex() of 1xxxxx


_BIT56 = 1 << 56


def new_op(at: int) -> str:
    """A new operation id: its time, a counter of this process, 56 random bits.

    Time first, then the counter, keeps B-trees compact: new ids land at the end.
    """
    if 0 <= at < _BIT56:  # op_prefix(at), without its call: hex() of 1 and 14 digits
        return hex(at | _BIT56)[3:] + serial_random()
    return op_prefix(at) + serial_random()


class Txn:
    """The writes of one atomic commit, and the conditions under which they apply.

    - ``op``: the operation id; a store applies an id at most once.
    - ``at``: the engine's time of the operation, in microseconds since the
      epoch (log entries carry it; stores use it to forget old operation ids).
    - ``expect``: document name -> version it must still have (0: absent).
    - ``put``: document name -> new body (its version becomes the old one + 1).
    - ``ttl``: document name -> milliseconds after which a store *may* forget
      the document (Redis expires it; memory drops it; SQL stores keep it).
    - ``delete``: document names to remove.
    - ``index``: ``(index, member, score)``; ``score`` ``None`` removes the
      member, :data:`NEXT_SEQ` gives it the next number of the sequence.
    - ``append``: ``(log, entry, keep_after_us, max_len)``: append ``entry``
      to ``log`` with the next sequence number and time ``at``, then drop
      entries older than ``keep_after_us`` (when given) and all but the
      newest ``max_len`` (when given).
    - ``result``: a JSON-able value kept under ``op`` and answered again to
      a repeated commit of the same id.
    """

    __slots__ = ("append", "at", "delete", "expect", "index", "op", "put", "result", "ttl")

    def __init__(self, op: str, at: int) -> None:
        self.op = op
        self.at = at
        self.expect: dict[str, int] = {}
        self.put: dict[str, Any] = {}
        self.ttl: dict[str, int] = {}
        self.delete: list[str] = []
        self.index: list[tuple[str, str, int | None]] = []
        self.append: list[tuple[str, Any, int | None, int | None]] = []
        self.result: Any = None

    def __repr__(self) -> str:
        return (
            f"Txn(op={self.op!r}, expect={self.expect!r}, put={sorted(self.put)!r}, "
            f"index={len(self.index)}, append={len(self.append)})"
        )


class Outcome:
    """What a commit did: ``applied`` now, ``replayed`` (the id was applied before), or neither.

    Neither means a conflict: a document of ``expect`` had changed, and
    nothing was written. ``result`` is the commit's result (the first one
    when replayed).
    """

    __slots__ = ("applied", "replayed", "result")

    def __init__(self, *, applied: bool, replayed: bool = False, result: Any = None) -> None:
        self.applied = applied
        self.replayed = replayed
        self.result = result

    @property
    def conflict(self) -> bool:
        """Whether nothing was written because a document changed since it was read."""
        return not (self.applied or self.replayed)


CONFLICT = Outcome(applied=False)


class Session(Protocol):
    """Reads and one commit on one shard.

    A store may make a session exclusive (memory takes the shard's lock,
    SQLite ``BEGIN IMMEDIATE``, PostgreSQL locks the rows it reads), in which
    case its commit never conflicts; or optimistic (Redis), in which case
    reads may come from a cache and the commit's version checks catch
    anything stale.
    """

    fresh: bool
    """Whether every read reflects the store now, guesses included (exclusive sessions)."""

    def get(self, names: Sequence[str], guess: frozenset[str] = frozenset()) -> dict[str, Doc]:
        """The documents of ``names`` that exist, as ``(version, body)``.

        A name in ``guess`` may be answered from what the session already
        knows (absent when it knows nothing) without asking the server; the
        commit's check of ``expect`` catches a wrong guess.
        """
        ...

    def scan(self, index: str, upto: int, limit: int) -> list[tuple[str, int]]:
        """Members of ``index`` with ``score <= upto``, lowest score first, at most ``limit``.

        A scan is not part of what a commit checks: a step that writes on
        the strength of a scan must also read the document that guards the
        index (the ledger's agent head), whose version the commit checks.
        """
        ...

    def commit(self, txn: Txn) -> Outcome:
        """Apply ``txn`` atomically if ``txn.expect`` holds (see the module docs)."""
        ...


@runtime_checkable
class Storage(Protocol):
    """Where the engine keeps its state: sessions per shard, logs, and housekeeping.

    Every method raises :class:`~agentpolicy.errors.StorageUnavailableError`
    when the backend cannot be reached; a commit whose outcome could not be
    learned raises it with a message that says so.
    """

    global_indexes_atomic: bool
    """Whether ``@`` indexes change in the same commit (else right after it, as hints)."""

    default_history_retention: int | None
    """How long history is kept unless the engine says otherwise (microseconds; None: always)."""

    def session(
        self, shard: str, *, write: bool = True
    ) -> contextlib.AbstractContextManager[Session]:
        """A session on ``shard``; ``write`` says a commit is likely (a store may lock for it)."""
        ...

    def log(self, shard: str, name: str, limit: int) -> list[tuple[int, int, Any]]:
        """The newest ``limit`` entries of a log, newest first, as ``(seq, at, entry)``."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


class AsyncSession(Protocol):
    """A :class:`Session` for asyncio: the same reads and commit, as coroutines.

    ``fresh``, :meth:`get`, :meth:`scan` and :meth:`commit` keep exactly the
    contract of :class:`Session` (exclusive or optimistic, guesses, a
    commit applied at most once per operation id).
    """

    fresh: bool
    """Whether every read reflects the store now, guesses included (exclusive sessions)."""

    async def get(
        self, names: Sequence[str], guess: frozenset[str] = frozenset()
    ) -> dict[str, Doc]:
        """The documents of ``names`` that exist, as ``(version, body)``, as in :class:`Session`."""
        ...

    async def scan(self, index: str, upto: int, limit: int) -> list[tuple[str, int]]:
        """Members of ``index`` with ``score <= upto``, lowest first (see :meth:`Session.scan`)."""
        ...

    async def commit(self, txn: Txn) -> Outcome:
        """Apply ``txn`` atomically if ``txn.expect`` holds (see :meth:`Session.commit`)."""
        ...


@runtime_checkable
class AsyncStorage(Protocol):
    """A :class:`Storage` for asyncio: sessions are ``async with``, every call is awaited.

    The contract is :class:`Storage`'s, word for word: every method raises
    :class:`~agentpolicy.errors.StorageUnavailableError` when the backend
    cannot be reached, and a commit whose outcome could not be learned
    raises it with a message that says so. No call blocks the event loop.
    A storage belongs to the event loop it is first used on (its
    connections do); close it with :meth:`aclose` on that loop.
    """

    global_indexes_atomic: bool
    """Whether ``@`` indexes change in the same commit (else right after it, as hints)."""

    default_history_retention: int | None
    """How long history is kept unless the engine says otherwise (microseconds; None: always)."""

    def session(
        self, shard: str, *, write: bool = True
    ) -> contextlib.AbstractAsyncContextManager[AsyncSession]:
        """A session on ``shard``, used as ``async with`` (see :meth:`Storage.session`)."""
        ...

    async def log(self, shard: str, name: str, limit: int) -> list[tuple[int, int, Any]]:
        """The newest ``limit`` entries of a log, newest first, as ``(seq, at, entry)``."""
        ...

    async def aclose(self) -> None:
        """Release connections (a closed storage refuses further calls)."""
        ...


def check_expect(expect: Mapping[str, int], versions: Mapping[str, int]) -> bool:
    """Whether every expected version matches ``versions`` (absent names count as 0)."""
    return all(versions.get(name, 0) == v for name, v in expect.items())
