"""Policy versions and the readable, field-level difference between two policies.

Pure: :func:`diff_policies` compares the JSON forms of two policies (as
:func:`~agentpolicy.dump_policy` writes them, defaults included) and lists
every field that differs, with a path such as ``limits.daily.value``. Lists
of objects are matched by their ``name`` (scoped limits) or ``window``
(rolling and count limits) when those are unique, otherwise by position;
lists of plain values (recipients, networks, categories) are compared
whole.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attrs

from agentpolicy.policy import AgentPolicy

__all__ = ["ORIGINS", "PolicyChange", "PolicyVersion", "diff_policies"]

ORIGINS = ("set", "delegate", "rollback", "promote")
"""How a version came to be: set (set_policy), delegate, rollback, promote (a shadow)."""

_MISSING = object()


def _shown(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(", ", ": "))


@attrs.frozen
class PolicyChange:
    """One field that differs between two policies: its path, the value before and after.

    ``before`` and ``after`` are JSON values (amounts are strings of base
    units); ``None`` means the field is absent on that side. ``str()`` gives
    the readable line: ``limits.daily.value: 1000000000 -> 500000000``.
    """

    path: str
    before: Any = None
    after: Any = None

    @property
    def kind(self) -> str:
        """``added``, ``removed`` or ``changed``."""
        if self.before is None:
            return "added"
        return "removed" if self.after is None else "changed"

    def __str__(self) -> str:
        return f"{self.path}: {_shown(self.before)} -> {_shown(self.after)}"


@attrs.frozen
class PolicyVersion:
    """One stored version of an agent's policy.

    ``origin`` says how it was made (see :data:`ORIGINS`); a rollback names
    the version it copied in ``from_version``. ``current`` is true for the
    live version. ``changes`` lists what differs from the version before it
    (empty for version 1).
    """

    agent_id: str
    version: int
    policy: AgentPolicy
    set_at: datetime
    origin: str = "set"
    from_version: int | None = None
    current: bool = False
    changes: tuple[PolicyChange, ...] = ()


def _json(policy: AgentPolicy | Mapping[str, Any]) -> Any:
    if isinstance(policy, AgentPolicy):
        from agentpolicy.codec import dump_policy  # noqa: PLC0415 - the converter loads lazily

        return dump_policy(policy)
    return policy


def diff_policies(
    before: AgentPolicy | Mapping[str, Any], after: AgentPolicy | Mapping[str, Any]
) -> tuple[PolicyChange, ...]:
    """Every field that differs from ``before`` to ``after``, in the order of the document.

    Each side is an :class:`~agentpolicy.AgentPolicy` or its JSON form.
    Equal policies give ``()``.
    """
    found: list[PolicyChange] = []
    _walk("", _json(before), _json(after), found)
    return tuple(found)


def _join(path: str, key: str) -> str:
    return key if not path else f"{path}.{key}"


def _walk(path: str, old: Any, new: Any, found: list[PolicyChange]) -> None:
    if old == new and type(old) is type(new):
        return
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in [*old, *(k for k in new if k not in old)]:
            a, b = old.get(key, _MISSING), new.get(key, _MISSING)
            here = _join(path, str(key))
            if a is _MISSING:
                found.append(PolicyChange(here, None, b))
            elif b is _MISSING:
                found.append(PolicyChange(here, a, None))
            else:
                _walk(here, a, b, found)
        return
    if isinstance(old, list) and isinstance(new, list) and _objects(old) and _objects(new):
        _walk_items(path, old, new, found)
        return
    found.append(PolicyChange(path, old, new))


def _objects(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(i, Mapping) for i in items)


def _identity(items: list[Any]) -> str | None:
    """The field that names each item uniquely (``name`` or ``window``), if any."""
    for field in ("name", "window"):
        names = [i.get(field) for i in items]
        if all(isinstance(n, str) for n in names) and len(set(names)) == len(names):
            return field
    return None


def _walk_items(path: str, old: list[Any], new: list[Any], found: list[PolicyChange]) -> None:
    field = _identity(old) if _identity(old) == _identity(new) else None
    if field is None:
        for i in range(max(len(old), len(new))):
            here = f"{path}[{i}]"
            if i >= len(old):
                found.append(PolicyChange(here, None, new[i]))
            elif i >= len(new):
                found.append(PolicyChange(here, old[i], None))
            else:
                _walk(here, old[i], new[i], found)
        return
    theirs = {i[field]: i for i in new}
    mine = {i[field]: i for i in old}
    for name in [*mine, *(n for n in theirs if n not in mine)]:
        here = f"{path}[{name}]"
        if name not in mine:
            found.append(PolicyChange(here, None, theirs[name]))
        elif name not in theirs:
            found.append(PolicyChange(here, mine[name], None))
        else:
            _walk(here, mine[name], theirs[name], found)
