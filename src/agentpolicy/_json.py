"""JSON from outside, read with a bound on its nesting that holds whatever the recursion limit.

``json.loads`` recurses in C once per level of nesting and stops at the
interpreter's recursion limit. A process may have raised that limit far
above what its C stack holds (``py_ecc``, which x402's Ethereum signing
imports, sets 100,000), and then 100,000 nested lists crash the whole
process instead of raising ``RecursionError``. So text from a user, a file
or a client is measured first, without recursion, and refused when it nests
deeper than anything agentpolicy reads.
"""

from __future__ import annotations

import itertools
import json
import operator
import re
from typing import Any

__all__ = ["MAX_DEPTH", "TooDeepError", "loads"]

MAX_DEPTH = 64
"""Levels of nesting (objects and lists) that text from outside may have; a policy has 5."""

# a string, or one left open (to the end: one pass, where restarting at every escaped quote of
# an unclosed string would take quadratic time)
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"?', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_OPENS = bytes.maketrans(b"[]{}", b"\x01\x00\x01\x00")


class TooDeepError(ValueError):
    """The text nests objects and lists deeper than :data:`MAX_DEPTH`."""


def depth(text: str) -> int:
    """How deep ``text`` nests objects and lists (brackets inside strings aside), in C loops."""
    if "[" not in text and "{" not in text:
        return 0
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", text)).encode("ascii")
    opens = itertools.accumulate(brackets.translate(_OPENS))  # opened so far, after each bracket
    # nested after bracket i (counting from 1): opened - closed = 2 * opened - i
    levels = map(operator.sub, map(operator.mul, opens, itertools.repeat(2)), itertools.count(1))
    return max(levels, default=0)


def loads(text: str, max_depth: int = MAX_DEPTH, **options: Any) -> Any:
    """``json.loads(text, **options)``, refusing text nested deeper than ``max_depth`` first.

    Raises :class:`TooDeepError` (a ``ValueError``) for such text, and what
    ``json.loads`` raises otherwise.
    """
    if text.count("[") + text.count("{") > max_depth and depth(text) > max_depth:
        raise TooDeepError(f"nested deeper than {max_depth} levels")
    return json.loads(text, **options)
