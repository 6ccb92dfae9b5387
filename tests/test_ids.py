"""Operation ids and reservation tokens: their time first, then a counter, then random bits."""

from __future__ import annotations

import itertools
import re

from hypothesis import given
from hypothesis import strategies as st

from agentpolicy.ledger.keys import new_token
from agentpolicy.storage.base import new_op, op_prefix

_TAIL = re.compile(r"[0-9a-f]{19}")


@given(st.integers(-(2**20), 2**62))
def test_ids_begin_with_their_time_in_hex_and_end_with_19_digits(at: int) -> None:
    op, token = new_op(at), new_token(at)
    time_14, time_13 = f"{max(at, 0):014x}", f"{max(at, 0) % 2**52:013x}"  # tokens: 32 digits
    assert op_prefix(at) == time_14
    assert op[: len(time_14)] == time_14
    assert _TAIL.fullmatch(op[len(time_14) :])
    assert token[:13] == time_13
    assert _TAIL.fullmatch(token[13:])


def test_ids_made_at_one_instant_sort_in_the_order_they_were_made() -> None:
    # 600 ids: past the 256 random tails drawn at a time; the 5-digit counter may wrap once
    ops = [new_op(1_768_816_800_000_000) for _ in range(600)]
    counters = [int(op[14:19], 16) for op in ops]
    wraps = sum(1 for a, b in itertools.pairwise(counters) if b < a)
    assert wraps <= 1
    if not wraps:
        assert ops == sorted(ops)
    assert len(set(ops)) == 600
