"""In-memory storage: thread-safe, for one process, tests and demos.

Each shard (one agent, or one budget tree) has its own lock, held for the
whole of a session, so a commit never conflicts and two agents never wait on
each other. Documents are kept as the very values the ledger wrote (nothing
is serialised); the ledger never changes a value after writing it.

Indexes are heaps with lazy deletion: adding and removing a member cost
O(log n), and asking for the members due by some score costs
O(log n) per member returned, so expiry stays cheap with many thousands of
open reservations. Documents written with a ``ttl`` are forgotten after it
(measured on the engine's clock, as the commits tell it), which bounds
memory for closed reservations and approvals.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import threading
from collections.abc import Sequence
from typing import Any

from agentpolicy.storage.base import CONFLICT, NEXT_SEQ, OP_KEEP_US, Doc, Outcome, Txn

__all__ = ["MemoryStorage"]


class _Index:
    """A sorted set: a heap of ``(score, member)`` plus the current score of each member."""

    __slots__ = ("heap", "scores")

    def __init__(self) -> None:
        self.heap: list[tuple[int, str]] = []
        self.scores: dict[str, int] = {}

    def set(self, member: str, score: int | None) -> None:
        if score is None:
            self.scores.pop(member, None)
            return
        if self.scores.get(member) == score:
            return
        self.scores[member] = score
        heapq.heappush(self.heap, (score, member))
        if len(self.heap) > 2 * len(self.scores) + 64:  # mostly stale entries: rebuild
            self.heap = [(s, m) for m, s in self.scores.items()]
            heapq.heapify(self.heap)

    def upto(self, score: int, limit: int) -> list[tuple[str, int]]:
        """Members with a score at most ``score``, lowest first (O(log n) per member)."""
        heap, scores = self.heap, self.scores
        found: list[tuple[str, int]] = []
        popped: list[tuple[int, str]] = []
        while heap and heap[0][0] <= score and len(found) < limit:
            entry = heapq.heappop(heap)
            if scores.get(entry[1]) == entry[0]:  # else stale: it stays dropped
                found.append((entry[1], entry[0]))
                popped.append(entry)
        for entry in popped:
            heapq.heappush(heap, entry)
        return found


class _Shard:
    __slots__ = ("docs", "forget", "indexes", "lock", "logs", "op_first", "op_order", "ops")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.docs: dict[str, Doc] = {}
        self.indexes: dict[str, _Index] = {}
        # a log is flat: sequence number, time, entry, sequence number, ...; a tuple per entry
        # would be one more object for the garbage collector to scan on every full collection,
        # for as long as the log keeps it (and 64 bytes)
        self.logs: dict[str, collections.deque[Any]] = {}
        self.ops: dict[str, Any] = {}  # op id -> result
        # time, op id, time, op id, ... in the order applied, from op_order[op_first]: forgetting
        # the oldest is O(1), where taking the first key of `ops` would step over every key
        # deleted since the dict last resized (a list and an index: a deque per shard would cost
        # 600 bytes an agent)
        self.op_order: list[int | str] = []
        self.op_first = 0
        self.forget: list[tuple[int, str, int]] = []  # (when, name, version written with a ttl)

    def append(
        self, log: str, seq: int, at: int, entry: Any, keep_after: int | None, max_len: int | None
    ) -> None:
        """Append to a log, then drop entries older than ``keep_after`` and beyond ``max_len``."""
        lines = self.logs.get(log)
        if lines is None:
            lines = self.logs[log] = collections.deque()
        lines.extend((seq, at, entry))
        while lines and (
            (keep_after is not None and lines[1] < keep_after)
            or (max_len is not None and len(lines) > 3 * max_len)
        ):  # the oldest entry goes
            lines.popleft()
            lines.popleft()
            lines.popleft()

    def expire(self, now: int) -> None:
        """Forget documents whose ttl is up, unless they were written again since."""
        forget, docs = self.forget, self.docs
        while forget and forget[0][0] <= now:
            _, name, version = heapq.heappop(forget)
            doc = docs.get(name)
            if doc is not None and doc[0] == version:
                del docs[name]


class _MemorySession:
    fresh = True

    __slots__ = ("shard", "storage")

    def __init__(self, storage: MemoryStorage, shard: _Shard) -> None:
        self.storage = storage
        self.shard = shard

    def __enter__(self) -> _MemorySession:
        self.shard.lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shard.lock.release()

    def get(self, names: Sequence[str], guess: frozenset[str] = frozenset()) -> dict[str, Doc]:
        docs = self.shard.docs
        found = {}
        for name in names:
            doc = docs.get(name)
            if doc is not None:
                found[name] = doc
        return found

    def scan(self, index: str, upto: int, limit: int) -> list[tuple[str, int]]:
        if index.startswith("@"):
            return self.storage._scan_global(index, upto, limit)
        found = self.shard.indexes.get(index)
        return [] if found is None else found.upto(upto, limit)

    def commit(self, txn: Txn) -> Outcome:
        shard = self.shard
        ops = shard.ops
        if txn.op in ops:
            return Outcome(applied=False, replayed=True, result=ops[txn.op])
        docs = shard.docs
        for name, version in txn.expect.items():
            doc = docs.get(name)
            if (0 if doc is None else doc[0]) != version:
                return CONFLICT
        storage = self.storage
        for name, body in txn.put.items():
            old = docs.get(name)
            version = 1 if old is None else old[0] + 1
            docs[name] = (version, body)
            ttl = txn.ttl.get(name)
            if ttl is not None:
                heapq.heappush(shard.forget, (txn.at + ttl * 1000, name, version))
        for name in txn.delete:
            docs.pop(name, None)
        for index, member, given in txn.index:
            score = next(storage._seq) if given == NEXT_SEQ else given
            if index.startswith("@"):
                storage._set_global(index, member, score)
            else:
                found = shard.indexes.get(index)
                if found is None:
                    found = shard.indexes[index] = _Index()
                found.set(member, score)
        for log, entry, keep_after, max_len in txn.append:
            shard.append(log, next(storage._seq), txn.at, entry, keep_after, max_len)
        order, first = shard.op_order, shard.op_first
        ops[txn.op] = txn.result
        order += (txn.at, txn.op)
        horizon = txn.at - OP_KEEP_US
        while order[first] < horizon:  # type: ignore[operator]  # a time, then its op id
            ops.pop(order[first + 1], None)  # type: ignore[arg-type]
            first += 2
        if first > 128 and 2 * first > len(order):
            del order[:first]
            first = 0
        shard.op_first = first
        forget = shard.forget
        if forget and forget[0][0] <= txn.at:
            shard.expire(txn.at)
        return Outcome(applied=True, result=txn.result)


class MemoryStorage:
    """Thread-safe in-memory storage (``memory://``); its state ends with the process."""

    global_indexes_atomic = True
    default_history_retention: int | None = 90 * 86_400_000_000
    """Memory keeps 90 days of history by default, so a long-running process stays bounded."""

    def __init__(self) -> None:
        self._shards: dict[str, _Shard] = {}
        self._sessions: dict[str, _MemorySession] = {}
        self._global: dict[str, _Index] = {}
        self._global_lock = threading.Lock()
        self._seq = itertools.count(1)  # next() is atomic under the GIL

    def _shard(self, shard: str) -> _Shard:
        found = self._shards.get(shard)
        if found is None:
            found = self._shards.setdefault(shard, _Shard())
        return found

    def session(self, shard: str, *, write: bool = True) -> _MemorySession:
        """A session holding the shard's lock until it ends (a context manager)."""
        found = self._sessions.get(shard)
        if found is None:  # a session keeps no state of its own: one per shard serves all
            found = self._sessions.setdefault(shard, _MemorySession(self, self._shard(shard)))
        return found

    def _set_global(self, index: str, member: str, score: int | None) -> None:
        with self._global_lock:
            found = self._global.get(index)
            if found is None:
                found = self._global[index] = _Index()
            found.set(member, score)

    def _scan_global(self, index: str, upto: int, limit: int) -> list[tuple[str, int]]:
        with self._global_lock:
            found = self._global.get(index)
            return [] if found is None else found.upto(upto, limit)

    def log(self, shard: str, name: str, limit: int) -> list[tuple[int, int, Any]]:
        """The newest ``limit`` entries of a log, newest first."""
        state = self._shard(shard)
        with state.lock:
            lines = state.logs.get(name)
            if not lines:
                return []
            out: list[tuple[int, int, Any]] = []
            newest_first = reversed(lines)  # entry, time, sequence number, entry, ...
            for entry in newest_first:
                if len(out) >= limit:
                    break
                at = next(newest_first)
                out.append((next(newest_first), at, entry))
            return out

    def close(self) -> None:
        """Nothing to close; present so every storage can be closed alike."""
