"""Private validators shared by the value classes: each returns the problems it finds.

Classes call them from ``__attrs_post_init__`` and raise one
:class:`~agentpolicy.errors.PolicyValidationError` listing every problem, so
no half-valid object ever exists. Paths are relative (``$.field``); callers
that nest values move them below their own path.
"""

from __future__ import annotations

import functools
import hmac
import re
import unicodedata
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from agentpolicy.errors import PolicyValidationError, Problem

MAX_TEXT = 1024
MAX_ID = 256
MAX_DIGITS = 96
"""An amount read from input has at most this many digits (a uint256 has 78)."""

UNITS_LIMIT = 10**MAX_DIGITS
"""Amounts read from input are below this (at most :data:`MAX_DIGITS` digits)."""
_LIMIT = UNITS_LIMIT

# CAIP-2: namespace ":" reference (https://chainagnostic.org/CAIPs/caip-2).
_CAIP2 = re.compile(r"[-a-z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}", re.IGNORECASE | re.ASCII)
_EIP155 = "eip155:"  # the EVM namespace, whose reference is a decimal chain id
_PAYMENT_CAIP2 = re.compile(  # and a payment's: an eip155 one in decimal digits
    r"(?!eip155:)[-a-z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}|eip155:[0-9]{1,32}", re.IGNORECASE | re.ASCII
)

# Control characters, invisible format characters (zero-width spaces and
# joiners, soft hyphens, byte-order marks, bidirectional overrides), Unicode
# spaces other than " " and whitespace at either end would let an agent send
# "0xbad " or "0x\u200bbad" past a blacklist of "0xbad", or show an approver
# one name while paying another; identifiers refuse them outright. Python's
# ``str.isprintable`` is exactly "no character of the categories C* or Z*
# except the ASCII space".


def type_name(value: object) -> str:
    """Name a JSON-ish type for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple | frozenset | set):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def person(name: str) -> str:
    """The form people's names (approvers, requesters, agent ids) are compared in.

    Unicode's compatibility caseless form (D146, :func:`_caseless`):
    compatibility and canonical forms mapped (``é`` written as one code point
    or as ``e`` and an accent, fullwidth letters) and case folded, so that
    two spellings that show the same name are one person: for a quorum, the
    approver registry and separation of duties alike. ``casefold(NFKC(x))``
    alone kept ``ῼ͂`` (a capital and a combining accent) apart from ``ῷ``.
    ASCII names are simply case folded. Characters that show nothing
    (variation selectors, the combining grapheme joiner, Hangul fillers, the
    blank Braille pattern: the default-ignorable ones) are left out, as in
    payees' names: ``cfo`` and ``cfo`` with U+FE00 show alike and were two
    people, so one person filled a quorum of two.
    """
    if name.isascii():
        return name.casefold()
    if not _INVISIBLE.isdisjoint(name):
        name = "".join(c for c in name if c not in _INVISIBLE)
    return _caseless(name)


def check_person(value: object, path: str) -> list[Problem]:
    """A person's name (an approver's): an identifier that shows something.

    A name made only of characters that show nothing folds to nothing in
    :func:`person`: every such name would be one and the same person.
    """
    problems = check_identifier(value, path)
    if not problems and not person(value):  # type: ignore[arg-type]
        problems.append(Problem(path, "must show at least one character"))
    return problems


def check_int(value: object, path: str, low: int, high: int) -> list[Problem]:
    """An integer (never a boolean, float or string) with ``low <= value <= high``."""
    if type(value) is not int:
        return [Problem(path, f"must be an integer, not {type_name(value)}")]
    if not low <= value <= high:
        return [Problem(path, f"must be between {low} and {high}, got {value}")]
    return []


def check_bool(value: object, path: str) -> list[Problem]:
    """A boolean, never a number or a string."""
    if type(value) is not bool:
        return [Problem(path, f"must be a boolean, not {type_name(value)}")]
    return []


DEFAULT_IGNORABLE = frozenset(
    [0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180F, 0x3164, 0xFFA0,
     *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)],
)  # fmt: skip
"""Printable code points that renderers and resolvers ignore (Unicode's default-ignorable).

Variation selectors (also in emoji), Mongolian free variation selectors,
the combining grapheme joiner, Hangul fillers, Khmer inherent vowels. The
unprintable default-ignorables (zero-width joiners, ...) fail
``str.isprintable`` already.
"""
_INVISIBLE = frozenset(map(chr, DEFAULT_IGNORABLE | {0x2800}))  # and the blank Braille pattern


def plain_payee(value: object, *, names: bool = False) -> bool:
    """Whether :func:`check_payee` would find nothing wrong (a fast test, no messages)."""
    return (
        isinstance(value, str)
        and plain_identifier(value)
        and (value.isascii() or (names and "." in value) or _INVISIBLE.isdisjoint(value))
    )


def check_payee(value: object, path: str, *, names: bool = False) -> list[Problem]:
    """An identifier a payment names its payee or category by: nothing invisible in it either.

    Printable characters that show nothing (variation selectors, Hangul
    fillers, the blank Braille pattern, ...) appended to a blacklisted
    address or a blocked category would make another string that looks the
    same to an approver and matches no list; a request is refused instead.
    With ``names`` (a recipient), a name with a dot (ENS, DNS) may hold
    them: such names are compared folded, without them (emoji names carry
    U+FE0F), and a whitelist admits them only as listed.
    """
    problems = check_identifier(value, path)
    if problems or not isinstance(value, str) or value.isascii() or (names and "." in value):
        return problems
    bad = next((c for c in value if c in _INVISIBLE), None)
    if bad is None:
        return []
    return [
        Problem(
            path,
            f"must not contain characters that show nothing (found U+{ord(bad):04X}): it would "
            "look like another payee or category",
        )
    ]


def plain_identifier(value: object, max_len: int = MAX_ID) -> bool:
    """Whether :func:`check_identifier` would find nothing wrong (a fast test, no messages)."""
    # a printable string holds no whitespace but the ASCII space: only its ends need a look
    return (
        type(value) is str
        and 0 < len(value) <= max_len
        and value.isprintable()
        and value[0] != " "
        and value[-1] != " "
    )


def plain_network(value: object) -> bool:
    """Whether :func:`check_payment_network` would find nothing wrong (a fast test, no messages)."""
    if type(value) is str and value in _PLAIN_NETWORKS:
        return True
    plain = (
        isinstance(value, str)
        and plain_identifier(value, 64)
        and bool(_PAYMENT_CAIP2.fullmatch(value))
    )
    if plain and type(value) is str:
        if len(_PLAIN_NETWORKS) >= _NETWORKS_KEPT:
            _PLAIN_NETWORKS.clear()
        _PLAIN_NETWORKS.add(value)
    return plain


_NETWORKS_KEPT = 256
_PLAIN_NETWORKS: set[str] = set()
"""Networks found plain (a payment names one of a few; many cost time, not memory)."""


def network_form(value: Any) -> Any:
    """A payment's network as it is kept: an ``eip155`` chain id without leading zeros.

    ``eip155:08453`` is chain 8453 to anything that reads the decimal chain
    id, so it is kept (compared, counted and fingerprinted) as
    ``eip155:8453``; the namespace is recognised ignoring case, as networks
    compare, and kept as written. A reference longer than CAIP-2's 32
    characters, and every other value, is returned unchanged, for validation
    to judge (and refuse).
    """
    if type(value) is str and ":0" in value and value[:7].lower() == _EIP155:
        reference = value[7:]
        # within CAIP-2's 32 characters as written: a longer one is refused, not shortened
        if len(reference) <= 32 and reference.isascii() and reference.isdigit():
            return value[:7] + (reference.lstrip("0") or "0")
    return value


def network_key(network: str) -> str:
    """The form policies compare networks in: :func:`network_form`, case folded."""
    return str(network_form(network)).casefold()


def _caseless(text: str) -> str:
    """``text`` in Unicode's compatibility caseless form (D146), composed (NFKC).

    Two strings are a compatibility caseless match when
    ``NFKD(casefold(NFKD(casefold(NFD(x)))))`` is equal for both; this is that,
    composed again. ``casefold(NFKC(x))`` alone is not enough: folding can
    leave combining marks in another order or unmade (``ΐ`` folds to three
    code points, ``Ϊ́`` to two; an iota subscript folds to an iota beside
    the accents).
    """
    folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFD", text).casefold())
    return unicodedata.normalize("NFKC", folded.casefold())


def category_form(value: Any) -> Any:
    """A payment's category as it is kept: NFKC-normalised, ``""`` as ``None``.

    Compatibility forms (fullwidth letters, ligatures) are the category
    a person typed, so they are mapped to it (``data``); ASCII is left as it
    is. A category whose NFKC form case folds to another string than its
    caseless form (:func:`category_key`: a capital ``Ϊ`` and a combining
    acute fold apart from ``ΐ``) is kept in that form (``ΐ``), so that its
    case folding, which the rules compare, is the key of every spelling of it.
    Non-strings, and strings with characters that show nothing (which
    :func:`check_payee` refuses, naming the one written), are returned
    unchanged.
    """
    if value == "":
        return None
    if type(value) is str and not value.isascii() and _INVISIBLE.isdisjoint(value):
        kept = unicodedata.normalize("NFKC", value)
        caseless = _caseless(value)
        return kept if kept.casefold() == caseless.casefold() else caseless
    return value


def category_key(category: str) -> str:
    """The form categories are compared in: Unicode's compatibility caseless form, case folded.

    For a category as kept (:func:`category_form`) this is its case folding.
    """
    if category.isascii():
        return category.casefold()
    return _caseless(category).casefold()


def check_identifier(value: object, path: str, max_len: int = MAX_ID) -> list[Problem]:
    """A non-empty string of printable characters without surrounding whitespace.

    Not printable: control and format characters (zero-width, soft hyphen,
    byte-order mark, bidirectional controls), separators other than the
    ASCII space, surrogates, private-use and unassigned code points.
    """
    if not isinstance(value, str):
        return [Problem(path, f"must be a string, not {type_name(value)}")]
    if not value:
        return [Problem(path, "must not be empty")]
    if len(value) > max_len:
        return [Problem(path, f"must be at most {max_len} characters")]
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        return [
            Problem(
                path,
                f"must not contain invisible or control characters (found U+{ord(bad):04X})",
            )
        ]
    if value != value.strip():
        return [Problem(path, "must not have whitespace at either end")]
    return []


MAX_RECORD_ID = len("res_") + 32 + len("_~") + 2 * 4 * MAX_ID
"""The longest reservation or approval id the engine makes.

``res_`` (or ``apr_``), 32 hex digits, ``_``, then the agent's tag: its id,
or ``~`` and the hex of its UTF-8 bytes (up to 4 per character of an id of
:data:`MAX_ID` characters). A bound below this would refuse ids the engine
handed out, and a payment that cannot be confirmed stops counting at its TTL.
"""


def check_record_id(value: object, path: str) -> list[Problem]:
    """A reservation or approval id: an identifier of up to :data:`MAX_RECORD_ID` characters."""
    return check_identifier(value, path, MAX_RECORD_ID)


def check_text(value: object, path: str, max_len: int = MAX_TEXT) -> list[Problem]:
    """Free text (a memo, a reason): a string of bounded length that UTF-8 can carry.

    A lone surrogate (a code point of U+D800 to U+DFFF) is refused: stored, it made every reply
    that showed it (JSON over stdio, a page) fail to encode.
    """
    if not isinstance(value, str):
        return [Problem(path, f"must be a string, not {type_name(value)}")]
    if len(value) > max_len:
        return [Problem(path, f"must be at most {max_len} characters")]
    if not utf8_text(value):
        found = f"U+{ord(next(c for c in value if _SURROGATE.match(c))):04X}"
        return [Problem(path, f"must not contain a lone surrogate (found {found})")]
    return []


_SURROGATE = re.compile("[\ud800-\udfff]")


def utf8_text(text: str) -> bool:
    """Whether UTF-8 can carry ``text``: it holds no lone surrogate (U+D800 to U+DFFF).

    ``os.environ`` holds one for a byte it could not decode, and JSON may
    spell one with an escape; no reply, page or request could carry it.
    """
    return text.isascii() or _SURROGATE.search(text) is None


def cut(text: str, max_len: int) -> str:
    """``text`` for a message, cut to ``max_len`` characters and saying how long it was."""
    return text if len(text) <= max_len else f"{text[:max_len]}... ({len(text)} characters)"


def quoted(value: object, max_len: int = 64) -> str:
    """``repr(value)`` for a message, cut to ``max_len`` characters (a setting of 100 KB)."""
    return cut(repr(value), max_len)


def same_secret(presented: object, expected: str) -> bool:
    """Whether ``presented`` is the secret ``expected`` (ASCII), compared in constant time.

    ``hmac.compare_digest`` raises ``TypeError`` on a string that is not
    ASCII; what a caller presents may be anything, so anything else (a
    non-string, or a string that is not ASCII) is simply not the secret.
    """
    return (
        type(presented) is str and presented.isascii() and hmac.compare_digest(presented, expected)
    )


def plain_text(value: object, max_len: int = MAX_TEXT) -> bool:
    """Whether :func:`check_text` finds nothing, in one pass (the fast path of a request)."""
    return type(value) is str and len(value) <= max_len and utf8_text(value)


def units_problems(raw: object, path: str) -> list[Problem]:
    """A non-negative count of base units: an ``int`` or a string of ASCII digits."""
    if type(raw) is int:
        if raw < 0:
            return [Problem(path, f"must not be negative, got {raw}")]
        if raw >= _LIMIT:
            return [Problem(path, f"must have at most {MAX_DIGITS} digits")]
        return []
    if isinstance(raw, str):
        if not raw:
            return [Problem(path, "must not be empty")]
        if not (raw.isascii() and raw.isdigit()):
            return [Problem(path, f"must be a string of ASCII digits (base units), got {raw!r}")]
        if len(raw) > MAX_DIGITS:
            return [Problem(path, f"must have at most {MAX_DIGITS} digits")]
        return []
    return [Problem(path, f"must be an integer or a string of digits, not {type_name(raw)}")]


def check_network(value: object, path: str) -> list[Problem]:
    """A CAIP-2 chain id such as ``eip155:8453``."""
    problems = check_identifier(value, path, 64)
    if not problems and not _CAIP2.fullmatch(str(value)):
        problems = [
            Problem(path, f"must be a CAIP-2 chain id such as 'eip155:8453', got {value!r}")
        ]
    return problems


def check_payment_network(value: object, path: str) -> list[Problem]:
    """A payment's CAIP-2 chain id; an ``eip155`` one in decimal digits (``eip155:8453``).

    CAIP-2 writes an EVM chain id in decimal, and no rail writes it otherwise:
    ``eip155:0x2105`` or ``eip155:8453e0`` would be chain 8453 to some readers
    and no chain to others, so they are refused rather than kept apart from
    ``eip155:8453`` (a limit per network would count them separately).
    Leading zeros are dropped before this check (see :func:`network_form`).
    """
    problems = check_network(value, path)
    if problems or not isinstance(value, str) or value[:7].lower() != _EIP155:
        return problems
    if value[7:].isdigit():
        return []
    return [
        Problem(
            path,
            f"an eip155 chain id is written in decimal digits ('eip155:8453'), got {value!r}",
        )
    ]


def raise_if(problems: Iterable[Problem]) -> None:
    """Raise one :class:`PolicyValidationError` listing ``problems``, if there are any."""
    found = list(problems)
    if found:
        raise PolicyValidationError(found)


Check = Callable[[Any, str], list[Problem]]
"""A field check: ``(value, path) -> problems``, declared once as field metadata."""

CHECK = "agentpolicy.check"
OMIT_EMPTY = "agentpolicy.omit_empty"
SCHEMA = "agentpolicy.schema"
"""Field metadata: the JSON Schema of the field's JSON form, when the check's does not fit."""

_SCHEMAS: dict[Check, dict[str, Any]] = {}


def describe(check: Check, schema: dict[str, Any]) -> Check:
    """Record the JSON Schema that ``check`` enforces (read by :mod:`agentpolicy.schema`)."""
    _SCHEMAS[check] = schema
    return check


def schema_of(check: Check) -> dict[str, Any] | None:
    """The JSON Schema recorded for ``check``, if any."""
    return _SCHEMAS.get(check)


# The characters of the Basic Multilingual Plane that ``str.isprintable`` refuses
# and that are assigned (controls, format characters, separators but " ",
# private use), as a JSON Schema class. The schema cannot list unassigned code
# points or those beyond the BMP; the code refuses those too.
_UNPRINTABLE = (
    r"\x00-\x1f\x7f-\xa0\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2"
    r"\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u2064\u2066-\u206f\u3000"
    r"\ue000-\uf8ff\ufeff\ufff9-\ufffb"
)
_NOT_AT_ENDS = rf"[^\s{_UNPRINTABLE}]"
_INSIDE = rf"[^{_UNPRINTABLE}]"


def identifier_schema(max_len: int = MAX_ID) -> dict[str, Any]:
    """The JSON Schema of :func:`check_identifier`."""
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": max_len,
        "pattern": f"^{_NOT_AT_ENDS}(?:{_INSIDE}*{_NOT_AT_ENDS})?$",
    }


def camel(name: str) -> str:
    """``per_transaction -> perTransaction``: the JSON key of a Python field."""
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def checked(
    check: Check,
    *,
    schema: dict[str, Any] | None = None,
    omit_empty: bool = False,
    **kwargs: Any,
) -> Any:
    """An attrs field whose value ``check`` validates (on construction and in the codec).

    ``schema`` is the JSON Schema of the field's JSON form when it differs
    from the one recorded for ``check`` (see :func:`describe`). ``omit_empty``
    leaves an empty list out of the JSON form (for sections most policies do
    not use, so their files stay as they were).
    """
    metadata: dict[str, Any] = {CHECK: check}
    if schema is not None:
        metadata[SCHEMA] = schema
    if omit_empty:
        metadata[OMIT_EMPTY] = True
    return attrs.field(metadata=metadata, **kwargs)


def optional(check: Check) -> Check:
    """A check that also accepts ``None``."""
    inner = schema_of(check)

    def check_optional(value: Any, path: str) -> list[Problem]:
        return [] if value is None else check(value, path)

    if inner is not None:
        describe(check_optional, {"anyOf": [inner, {"type": "null"}]})
    return check_optional


@functools.cache
def _field_checks(cls: type) -> tuple[tuple[str, str, Check], ...]:
    return tuple(
        (f.name, f"$.{camel(f.name)}", f.metadata[CHECK])
        for f in attrs.fields(cls)
        if CHECK in f.metadata
    )


def field_problems(instance: Any) -> list[Problem]:
    """Run every field check of an attrs instance, with the fields' JSON paths."""
    problems: list[Problem] = []
    cls: type = type(instance)
    for name, path, check in _field_checks(cls):
        problems += check(getattr(instance, name), path)
    return problems


def validate(instance: Any, cross: Callable[[], list[Problem]] | None = None) -> None:
    """Raise one ``PolicyValidationError`` for every field problem, then cross-field ones."""
    problems = field_problems(instance)
    if not problems and cross is not None:
        problems = cross()
    raise_if(problems)


def int_between(low: int, high: int) -> Check:
    """A check for an integer in ``[low, high]``."""
    return describe(
        lambda value, path: check_int(value, path, low, high),
        {"type": "integer", "minimum": low, "maximum": high},
    )


def identifier(max_len: int = MAX_ID) -> Check:
    """A check for an identifier of at most ``max_len`` characters."""
    return describe(
        lambda value, path: check_identifier(value, path, max_len), identifier_schema(max_len)
    )


def instance_of(cls: type) -> Check:
    """A check for an already validated value object of ``cls``."""

    def check(value: Any, path: str) -> list[Problem]:
        if isinstance(value, cls):
            return []
        return [Problem(path, f"must be a {cls.__name__} object, not {type_name(value)}")]

    return describe(check, {"$ref": f"#/$defs/{cls.__name__}"})


MAX_LIST = 10_000


def array_of(item: Check, max_len: int = MAX_LIST) -> Check:
    """A check for a tuple whose every element passes ``item``."""

    def check(values: Any, path: str) -> list[Problem]:
        if not isinstance(values, tuple):
            return [Problem(path, f"must be an array, not {type_name(values)}")]
        if len(values) > max_len:
            return [Problem(path, f"must have at most {max_len} entries")]
        return [p for i, v in enumerate(values) for p in item(v, f"{path}[{i}]")]

    schema: dict[str, Any] = {"type": "array", "maxItems": max_len}
    if (items := schema_of(item)) is not None:
        schema["items"] = items
    return describe(check, schema)


describe(check_bool, {"type": "boolean"})
describe(check_text, {"type": "string", "maxLength": MAX_TEXT})
describe(
    check_network,
    {"type": "string", "maxLength": 64, "pattern": "^[-a-zA-Z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}$"},
)
