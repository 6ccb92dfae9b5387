"""JSON from outside is refused when nested too deeply, whatever the recursion limit.

``py_ecc`` (imported by x402's Ethereum signing) raises the recursion limit
to 100,000; ``json.loads`` of 100,000 nested lists then overflows the C stack
and the process dies (SIGSEGV) instead of raising ``RecursionError``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentpolicy._json import MAX_DEPTH, TooDeepError, depth, loads

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab,:'),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=4),
    max_leaves=40,
)  # fmt: skip


def nesting(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(nesting, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(nesting, value.values()), default=0)
    return 0


@given(_JSON, st.booleans())
def test_depth_is_the_nesting_of_the_value(value: Any, indent: bool) -> None:
    text = json.dumps(value, indent=1 if indent else None, ensure_ascii=False)
    assert depth(text) == nesting(value)
    if nesting(value) <= MAX_DEPTH:
        assert loads(text) == value


def test_text_nested_too_deeply_is_refused_before_it_is_parsed() -> None:
    for text in ("[" * 100_000 + "]" * 100_000, '{"a":' * 65 + "1" + "}" * 65, "[1," * 65 + "]"):
        with pytest.raises(TooDeepError, match=f"^nested deeper than {MAX_DEPTH} levels$"):
            loads(text)
    assert loads("[" * 64 + "]" * 64) is not None
    assert loads('["' + "[" * 1000 + '"]') == ["[" * 1000]  # inside a string: not nesting
    unclosed = '"' + '\\"' * 200_000  # an unclosed string of escaped quotes: one pass, not n**2
    with pytest.raises(ValueError, match="Unterminated string"):
        loads(unclosed)


_CHILD = r"""
import base64, json, os, sys, tempfile
sys.setrecursionlimit(100_000)  # as py_ecc does on import
deep = "[" * 100_000 + "]" * 100_000
from agentpolicy import PolicyError
from agentpolicy import cli
from agentpolicy.mcp.server import _read_cursor
from agentpolicy.webhooks import endpoints_from_env
said = []
try:
    endpoints_from_env({"AGENT_POLICY_WEBHOOKS": deep})
except PolicyError as err:
    said.append(str(err))
try:
    _read_cursor(base64.urlsafe_b64encode(deep.encode()).decode())
except PolicyError as err:
    said.append(str(err))
folder = tempfile.mkdtemp()
path = os.path.join(folder, "deep.json")
with open(path, "w") as f:
    f.write(deep)
os.environ["AGENT_POLICY_DB"] = os.path.join(folder, "a.db")
status = cli.main(["policy", "validate", path])
said.append(status)
print(json.dumps(said))
"""


def test_nothing_crashes_when_the_recursion_limit_is_raised() -> None:
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # -11: the C stack
    webhooks, cursor, status = json.loads(done.stdout.splitlines()[-1])
    assert webhooks == "$AGENT_POLICY_WEBHOOKS: is nested too deeply (a list of endpoint objects)"
    assert cursor.startswith("$.cursor: is not a cursor of this listing")
    assert status == 2
    assert "is nested too deeply" in done.stdout + done.stderr
