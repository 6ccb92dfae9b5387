"""The camelCase JSON form of a policy file, read and written with a cattrs converter.

:func:`load_policy` is strict: unknown keys, wrong types (``true`` or ``"3"``
where a number is meant), out-of-range values and inconsistent rules are all
refused with one :class:`~agentpolicy.PolicyValidationError` that lists every
problem with its JSON path (``$.limits.daily.value``). :func:`dump_policy`
writes the normalised form back: amounts as strings of digits, instants in
UTC with ``Z``, ``days`` sorted, every default written out and absent
optional parts left out. ``load_policy(dump_policy(p)) == p`` always.
"""

from __future__ import annotations

import enum
import functools
import json
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import GenericAlias
from typing import Any, TypeVar, cast, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from agentpolicy._checks import CHECK, OMIT_EMPTY, Check, camel, raise_if, schema_of, type_name
from agentpolicy.amounts import Amount, parse_base_units
from agentpolicy.decisions import Code, Evaluation, Outcome
from agentpolicy.errors import PolicyValidationError, Problem
from agentpolicy.policy import (
    AgentPolicy,
    Alert,
    ApprovalConfig,
    ApprovalThreshold,
    ApproverGroup,
    AssetLimits,
    BlockedPeriod,
    CategoryRules,
    CountLimit,
    DelegationRules,
    MerchantRules,
    NetworkRules,
    RollingLimit,
    ScopedLimit,
    ScopeMatch,
    SpendingLimits,
    TimeRules,
    TimeWindow,
)
from agentpolicy.records import (
    Approval,
    ApprovalGroup,
    ApprovalStatus,
    Budget,
    Delegation,
    DeliveryStatus,
    HistoryRecord,
    Reservation,
    ReservationStatus,
    Vote,
    WebhookDelivery,
    WindowBudget,
)
from agentpolicy.requests import PaymentRequest
from agentpolicy.windows import Period, Window

__all__ = ["dump_policy", "format_instant", "load_policy", "parse_instant"]

T = TypeVar("T")

_VALUE_CLASSES: tuple[type, ...] = (
    Amount,
    SpendingLimits,
    TimeWindow,
    BlockedPeriod,
    TimeRules,
    MerchantRules,
    NetworkRules,
    CategoryRules,
    ApproverGroup,
    ApprovalThreshold,
    ApprovalConfig,
    RollingLimit,
    CountLimit,
    Alert,
    ScopeMatch,
    ScopedLimit,
    AssetLimits,
    DelegationRules,
    AgentPolicy,
    PaymentRequest,
    Window,
    Evaluation,
)
# Records are the storages' own data; read back, they are checked for shape
# (unknown keys, missing fields) and their values validate themselves.
_RECORD_CLASSES: tuple[type, ...] = (
    Reservation,
    Vote,
    ApprovalGroup,
    Approval,
    Delegation,
    HistoryRecord,
    WindowBudget,
    Budget,
    WebhookDelivery,
)


def parse_instant(raw: object, path: str = "$") -> datetime:
    """Parse an ISO 8601 instant that carries a UTC offset (or ``Z``); return it in UTC.

    Raises :class:`~agentpolicy.PolicyValidationError` for anything else,
    including a local time without an offset, which would be ambiguous.
    """
    if isinstance(raw, datetime) and raw.tzinfo is not None:
        return _in_utc(raw, path)
    if not isinstance(raw, str) or len(raw) > 64:
        raise PolicyValidationError.single(
            path, f"must be an ISO 8601 string with a UTC offset, not {type_name(raw)}"
        )
    try:
        value = datetime.fromisoformat(raw)  # fast, and covers what agentpolicy writes
    except ValueError:
        try:  # the rest of ISO 8601 (week dates, ordinal dates, ...)
            from dateutil.parser import isoparse  # noqa: PLC0415 - imported on demand

            value = isoparse(raw)
        except (ValueError, OverflowError):
            raise PolicyValidationError.single(
                path, f"is not an ISO 8601 instant: {raw!r}"
            ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise PolicyValidationError.single(
            path, f"must carry a UTC offset or 'Z' to name an instant: {raw!r}"
        )
    return _in_utc(value, path)


def _in_utc(value: datetime, path: str) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59-01:00 is past its end, 0001-01-01T00:00+01:00 before
        edge = "before the start" if value.year == 1 else "past the end"
        raise PolicyValidationError.single(
            path, f"is {edge} of the calendar in UTC: {value.isoformat()}"
        ) from None


def format_instant(value: datetime) -> str:
    """ISO 8601 in UTC with ``Z``: ``2026-01-20T00:00:00Z`` (microseconds only if set)."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _is_array(kind: Any) -> bool:
    return get_origin(kind) in (tuple, frozenset)


def _enum_hook(kind: type[enum.Enum]) -> Callable[[Any, Any], Any]:
    def structure(value: Any, _: Any) -> Any:
        try:
            return kind(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in kind)
            raise PolicyValidationError.single("$", f"must be one of {allowed}") from None

    return structure


def _passthrough(value: Any, _: Any) -> Any:
    # Primitive fields are checked, strictly, by the classes themselves.
    return value


def _array_hook(kind: Any, converter: cattrs.Converter) -> Callable[[Any, Any], Any]:
    elements = cattrs.cols.list_structure_factory(
        cast(type, GenericAlias(list, get_args(kind))), converter
    )
    build = frozenset if get_origin(kind) is frozenset else tuple

    def structure(value: Any, _: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise PolicyValidationError.single("$", f"must be an array, not {type_name(value)}")
        return build(elements(value, kind))

    return structure


def _unstructure_array(kind: Any, converter: cattrs.Converter) -> Callable[[Any], Any]:
    args = get_args(kind)
    element = converter.get_unstructure_hook(args[0]) if args else converter.unstructure
    if get_origin(kind) is frozenset:
        return lambda values: [element(v) for v in sorted(values)]
    return lambda values: [element(v) for v in values]


def _field_hook(base: Callable[[Any, Any], Any], check: Check | None) -> Callable[[Any, Any], Any]:
    # an array longer than its field allows is refused before its elements are read: each
    # element would otherwise be structured (and its problems listed) only to be refused
    max_items = (schema_of(check) or {}).get("maxItems") if check is not None else None

    def structure(value: Any, kind: Any) -> Any:
        if max_items is not None and isinstance(value, list | tuple) and len(value) > max_items:
            raise PolicyValidationError.single("$", f"must have at most {max_items} entries")
        result = base(value, kind)
        if check is not None:
            raise_if(check(result, "$"))
        return result

    return structure


def _object_hook(cls: type, converter: cattrs.Converter) -> Callable[[Any, Any], Any]:
    attrs.resolve_types(cls)
    fields: dict[str, Any] = {}
    for f in attrs.fields(cls):
        base = converter.get_structure_hook(f.type)
        if cls is Amount and f.name == "value":
            base = _units_hook
        fields[f.name] = override(
            rename=camel(f.name), struct_hook=_field_hook(base, f.metadata.get(CHECK))
        )
    generated: Callable[[Any, Any], Any] = make_dict_structure_fn(
        cls, converter, _cattrs_forbid_extra_keys=True, **fields
    )

    def structure(value: Any, _: Any) -> Any:
        if not isinstance(value, Mapping):
            raise PolicyValidationError.single("$", f"must be an object, not {type_name(value)}")
        return generated(value, cls)

    return structure


def _units_hook(value: Any, _: Any) -> int:
    return parse_base_units(value, "$")


def _unstructure_hook(cls: type, converter: cattrs.Converter) -> Callable[[Any], Any]:
    renames: dict[str, Any] = {
        f.name: override(
            rename=camel(f.name),
            omit_if_default=f.default is None or bool(f.metadata.get(OMIT_EMPTY)),
        )
        for f in attrs.fields(cls)
    }
    if cls in (Amount, PaymentRequest):
        renames["value" if cls is Amount else "amount"] = override(
            rename=camel("value" if cls is Amount else "amount"), unstruct_hook=str
        )
    return make_dict_unstructure_fn(cls, converter, **renames)


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(detailed_validation=True)
    for primitive in (int, str, bool):
        converter.register_structure_hook(primitive, _passthrough)
    converter.register_structure_hook(datetime, lambda v, _: parse_instant(v))
    # StrEnums subclass str: each gets its own strict hook, more specific than str's.
    for kind in (Code, Outcome, Period, ReservationStatus, ApprovalStatus, DeliveryStatus):
        converter.register_structure_hook(kind, _enum_hook(kind))
    converter.register_unstructure_hook(datetime, format_instant)
    converter.register_structure_hook_factory(
        _is_array,
        lambda t: _array_hook(t, converter),
    )
    converter.register_unstructure_hook_factory(
        _is_array,
        lambda t: _unstructure_array(t, converter),
    )
    for cls in (*_VALUE_CLASSES, *_RECORD_CLASSES):
        converter.register_structure_hook(cls, _object_hook(cls, converter))
        converter.register_unstructure_hook(cls, _unstructure_hook(cls, converter))
    return converter


@functools.cache
def _converter() -> cattrs.Converter:
    # Built on first use, not at import: generating the hooks takes tens of milliseconds.
    return _make_converter()


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if _KEY.fullmatch(key) else f"{path}[{key!r}]"


def problems_of(exc: BaseException, path: str = "$") -> list[Problem]:
    """Turn a cattrs structuring error (and what it wraps) into problems with JSON paths."""
    if isinstance(exc, PolicyValidationError):
        return [p.under(path) for p in exc.problems]
    if isinstance(exc, ClassValidationError | IterableValidationError):
        problems: list[Problem] = []
        for inner in exc.exceptions:
            note = next(
                (
                    n
                    for n in getattr(inner, "__notes__", ())
                    if isinstance(n, AttributeValidationNote | IterableValidationNote)
                ),
                None,
            )
            if isinstance(note, AttributeValidationNote):
                problems += problems_of(inner, _key_path(path, camel(note.name)))
            elif isinstance(note, IterableValidationNote):
                problems += problems_of(inner, f"{path}[{note.index}]")
            else:
                problems += problems_of(inner, path)
        return problems
    if isinstance(exc, ForbiddenExtraKeysError):
        return [Problem(_key_path(path, str(k)), "is not a known key") for k in exc.extra_fields]
    if isinstance(exc, KeyError):
        return [Problem(path, "is required")]
    return [Problem(path, f"is invalid ({type(exc).__name__})")]  # pragma: no cover


def structure(data: object, cls: type[T]) -> T:
    """Read ``data`` (the camelCase JSON form) as ``cls``; raises ``PolicyValidationError``."""
    try:
        return _converter().structure(data, cls)
    except cattrs.BaseValidationError as exc:
        raise PolicyValidationError(problems_of(exc)) from None


def unstructure(value: object) -> Any:
    """Write a value class in its camelCase JSON form."""
    return _converter().unstructure(value)


def encode(value: object) -> str:
    """Compact JSON text of a value class or record (for storages)."""
    return json.dumps(unstructure(value), separators=(",", ":"))


def decode(text: str | bytes, cls: type[T]) -> T:
    """Read back what :func:`encode` wrote; raises ``PolicyValidationError`` if it is not."""
    try:
        data = json.loads(text)
    except ValueError:
        raise PolicyValidationError.single("$", "stored data is not JSON") from None
    return structure(data, cls)


def load_policy(data: Mapping[str, Any]) -> AgentPolicy:
    """Read a policy in its camelCase JSON shape (the policy file's), strictly.

    Raises :class:`~agentpolicy.PolicyValidationError` (code ``INVALID_INPUT``)
    listing every problem with its JSON path. Nothing half-valid is returned.
    """
    return structure(data, AgentPolicy)


def dump_policy(policy: AgentPolicy) -> dict[str, Any]:
    """Write ``policy`` in its normalised camelCase JSON form (see the module docs)."""
    out: dict[str, Any] = unstructure(policy)
    return out
