"""Operation ids and reservation tokens: their time first, then a counter, then random bits."""

from __future__ import annotations

import itertools
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from agentpolicy.ledger.keys import agent_of_id, new_id, new_token, tag
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


@settings(max_examples=500)
@given(st.text(min_size=1, max_size=70))
def test_an_id_beginning_with_a_tilde_finds_its_agent_in_either_version(rest: str) -> None:
    """This version writes ``~`` + hex for such an id; 0.1 wrote it as it was (``res_..._~zz``)."""
    agent = "~" + rest
    assert agent_of_id(new_id("res", agent)) == agent
    written_by_0_1 = f"res_{'0' * 32}_{agent}"
    if len(agent) <= 64 and "{" not in agent and "}" not in agent:  # 0.1 wrote it plain
        try:
            new_form = bytes.fromhex(rest).decode()
        except ValueError:
            new_form = None
        if new_form is None or tag(new_form) != agent:  # not an id this version writes
            assert agent_of_id(written_by_0_1) == agent


def test_ids_of_0_1_for_agents_beginning_with_a_tilde() -> None:
    token = "0" * 32
    assert agent_of_id(f"res_{token}_~zz") == "~zz"  # not hex: was no agent at all
    assert agent_of_id(f"apr_{token}_~41") == "~41"  # was agent 'A', which this version tags 'A'
    assert agent_of_id(f"res_{token}_~7e7a7a") == "~zz"  # this version's tag of '~zz'
    assert agent_of_id(f"res_{token}_~{'z' * 64}") is None  # 0.1 tagged so long an id 'h...'
