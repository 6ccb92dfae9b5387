"""Instructions per operation, counted by Valgrind: figures that do not move with the machine.

Wall-clock figures on a shared two-core machine move by 10-50% from run to
run (and more when a neighbour is busy); the number of machine instructions
an operation executes does not. This counts them with Valgrind's cachegrind
(``--cache-sim=no``: instruction counts only), for each operation beside its
anchor, as ``benchmarks/run.py`` measures time::

    .venv/bin/python benchmarks/instructions.py            # needs valgrind on PATH

Each figure runs the operation ``warm`` times, then ``low`` and ``high``
times in two processes under Valgrind; instructions per operation are the
difference of the two totals over ``high - low``, so start-up, imports and
warm-up cancel out. ``PYTHONHASHSEED`` is fixed. Instructions are not time
(a cache miss costs more than an addition; the anchor ``limits`` hit moves
memory, which time sees and this does not), so read these beside the
timed figures, not instead of them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

_SETUP = {
    "memory": """
from run import make_engine, cycle
from agentpolicy.storage import MemoryStorage
op = cycle(make_engine(MemoryStorage()))
""",
    "sqlite": """
import tempfile
from run import make_engine, cycle
from agentpolicy.storage import SQLiteStorage
op = cycle(make_engine(SQLiteStorage(tempfile.mkdtemp() + "/bench.db")))
""",
    "rules": """
from run import NOW, REQUEST, full_policy
from agentpolicy import load_policy
from agentpolicy.rules import assess, judge
policy = load_policy(full_policy())
def op():  # the rules alone: what the payment counts in, and the verdict on no usage
    judge(assess(policy, REQUEST, NOW), {})
""",
    "fresh": """
from run import make_engine, REQUEST
from agentpolicy import PaymentRequest
from agentpolicy.storage import MemoryStorage
engine = make_engine(MemoryStorage())
fields = dict(agent_id=REQUEST.agent_id, amount=REQUEST.amount, recipient=REQUEST.recipient,
              network=REQUEST.network, category=REQUEST.category)
def op():  # the same cycle with a new request each time, as a caller makes them
    d = engine.authorize(PaymentRequest(**fields))
    engine.confirm(d.reservation_id)
""",
    "floor": """
from floor import floor_cycle
op = floor_cycle()
""",
    "counters": """
from run import make_engine, cycle, full_policy, NOW, REQUEST
from agentpolicy import load_policy
from agentpolicy.ledger.tallies import Book
from agentpolicy.rules import assess
from agentpolicy.storage import MemoryStorage
engine = make_engine(MemoryStorage())
cycle(engine)()
head = engine.storage.session("agent-1").get(["h/agent-1"])["h/agent-1"][1]
books = assess(load_policy(full_policy()), REQUEST, NOW).every_book
def op():  # the payment's calendar counters (every window, its token's and every token's)
    book = Book("h/agent-1", head, {})
    for b in books:
        book.calendars(b.items, 1, 6, "reserve")
""",
    "limits": """
from limits import parse, storage, strategies
item = parse("1000000/second")
count = 0
limiter = None
def op():
    global count, limiter
    if count % 100 == 0:  # a fresh storage every 100 hits, as run.py's anchor
        limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())
    count += 1
    limiter.hit(item, "agent-1")
""",
    "bare": """
import tempfile
from run import sqlite_anchor
from pathlib import Path
op = sqlite_anchor(Path(tempfile.mkdtemp()) / "anchor.db")
""",
}

_CHILD = """
import sys
sys.path.insert(0, {here!r})
{setup}
for _ in range({warm}):
    op()
for _ in range(int(sys.argv[1])):
    op()
"""

_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def _total(name: str, runs: int, warm: int) -> int:
    code = _CHILD.format(here=str(HERE), setup=_SETUP[name], warm=warm)
    done = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, "-c", code, str(runs)],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )  # fmt: skip
    found = _REFS.search(done.stderr)
    if found is None:
        raise SystemExit(f"valgrind printed no instruction count:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_op(name: str, low: int, high: int, warm: int) -> float:
    """Instructions per operation: the difference of two runs over the difference of their counts."""
    return (_total(name, high, warm) - _total(name, low, warm)) / (high - low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations per run")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not on PATH (apt-get install valgrind)")
    low, high = (100, 600) if args.quick else (200, 1200)
    print(f"instructions per operation (valgrind cachegrind, {high - low} operations)", flush=True)
    figures = {
        name: per_op(name, low, high, 300)
        for name in ("limits", "floor", "rules", "counters", "memory", "fresh", "bare", "sqlite")
    }
    rows = [
        ("the rules alone (assess+judge, no ledger), every rule kind", "rules", "limits",
         "a limits moving-window hit on a fresh storage"),
        ("the calendar counters alone (12: six windows, its token's and every token's)",
         "counters", "limits", "a limits moving-window hit on a fresh storage"),
        ("the same cycle's work hand-inlined on plain dicts (floor.py: a lower bound)",
         "floor", "limits", "a limits moving-window hit on a fresh storage"),
        ("authorize+confirm, memory, every rule kind", "memory", "limits",
         "a limits moving-window hit on a fresh storage"),
        ("authorize+confirm, memory, every rule kind", "memory", "floor",
         "the hand-inlined floor"),
        ("the same with a new PaymentRequest each time (made by the caller)", "fresh", "limits",
         "a limits moving-window hit on a fresh storage"),
        ("authorize+confirm, SQLite file (WAL)", "sqlite", "bare",
         "BEGIN IMMEDIATE; INSERT; COMMIT"),
    ]  # fmt: skip
    for figure, name, anchor, words in rows:
        value, base = figures[name], figures[anchor]
        print(f"  {figure}: {value:,.0f} | {words} {base:,.0f} | {value / base:.2f}x", flush=True)


if __name__ == "__main__":
    main()
