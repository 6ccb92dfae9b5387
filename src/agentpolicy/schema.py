"""The JSON Schema of a policy file, generated from the policy classes.

:func:`policy_schema` walks the attrs classes of :mod:`agentpolicy.policy`
(and :class:`~agentpolicy.Amount`): every field becomes a camelCase
property, fields without a default are required, no other key is allowed,
and the ranges, lengths and patterns come from the checks the fields
declare. A field added to a class appears in the schema without further
work. ``policy.schema.json`` in the package is this schema, written out
(a test keeps it in sync), and ``agentpolicy policy schema`` prints it.

The schema checks shape, types and ranges. Rules that relate two fields
(``startHour < endHour``, one token per policy, no more required approvers
than approvers) are checked by :func:`agentpolicy.load_policy` and
``agentpolicy policy validate``, which report every problem with its path.
"""

from __future__ import annotations

import json
import types
import typing
from datetime import datetime
from importlib import resources
from typing import Any

import attrs

from agentpolicy._checks import CHECK, SCHEMA, camel, schema_of
from agentpolicy.policy import AgentPolicy

__all__ = ["DRAFT", "SCHEMA_FILE", "packaged_policy_schema", "policy_schema"]

DRAFT = "https://json-schema.org/draft/2020-12/schema"
"""The JSON Schema dialect of the generated schema."""

SCHEMA_FILE = "policy.schema.json"
"""The name of the schema file shipped inside the package."""


def policy_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a policy document, generated from the classes."""
    defs: dict[str, Any] = {}
    root = _object(AgentPolicy, defs)
    root.pop("description", None)
    return {
        "$schema": DRAFT,
        "title": "agentpolicy policy",
        "description": "What one agent may spend, when, where and to whom (agentpolicy). "
        "Every section is optional; an absent section does not restrict.",
        **root,
        "$defs": dict(sorted(defs.items())),
    }


def packaged_policy_schema() -> dict[str, Any]:
    """The schema file shipped in the package (equal to :func:`policy_schema`)."""
    text = resources.files("agentpolicy").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _object(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    attrs.resolve_types(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for field in attrs.fields(cls):
        key = camel(field.name)
        properties[key] = _field(field, defs)
        if field.default is attrs.NOTHING:
            required.append(key)
    schema: dict[str, Any] = {"type": "object"}
    doc = (cls.__doc__ or "").strip().split("\n")[0].replace("``", "")
    if doc:
        schema["description"] = doc
    schema["properties"] = properties
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False
    return schema


def _field(field: attrs.Attribute[Any], defs: dict[str, Any]) -> dict[str, Any]:
    for cls in _classes_in(field.type):
        if cls.__name__ not in defs:
            defs[cls.__name__] = {}  # reserved first: a class may refer to itself
            defs[cls.__name__] = _object(cls, defs)
    check = field.metadata.get(CHECK)
    schema = field.metadata.get(SCHEMA) or (schema_of(check) if check is not None else None)
    schema = dict(schema) if schema is not None else _from_type(field.type)
    default = field.default
    if isinstance(default, bool | int | str) or default == ():
        schema["default"] = list(default) if default == () else default
    return schema


def _classes_in(kind: Any) -> list[type]:
    if attrs.has(kind):
        return [kind]
    return [c for arg in typing.get_args(kind) for c in _classes_in(arg)]


def _from_type(kind: Any) -> dict[str, Any]:
    """A schema from a field's type alone, for fields whose check records none."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        options = [_from_type(a) for a in args if a is not type(None)]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return {"anyOf": [schema, {"type": "null"}]} if type(None) in args else schema
    if origin in (tuple, frozenset, list, set):
        return {"type": "array", "items": _from_type(args[0])} if args else {"type": "array"}
    if attrs.has(kind):
        return {"$ref": f"#/$defs/{kind.__name__}"}
    simple = {bool: "boolean", int: "integer", str: "string"}
    if kind in simple:
        return {"type": simple[kind]}
    if kind is datetime:
        return {"type": "string", "format": "date-time"}
    return {}
