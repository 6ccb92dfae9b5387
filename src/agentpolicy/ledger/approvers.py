"""The approver registry as ledger steps: register, rotate, remove, and the store's id.

The registry lives in a shard of its own (:data:`SHARD`); it holds public
keys only. Each approver is one document with every version of its key::

    "ap/<name, case-folded>": {"name": as registered,
                               "keys": [[version, public key, added, retired, why], ...]}

``retired`` is when a version stopped verifying votes (``None`` for the
current one) and ``why`` is ``"rotation"`` or ``"removal"``. Every key ever
registered is also kept under ``"ak/<public key>"`` with the approver it
belongs to, so one key never stands for two approvers and a retired key
never comes back. The index ``"apx"`` lists the approvers; ``"apm"`` holds
the store's id (``{"id": "sto_<32 hex>"}``), which every signed vote names.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Callable
from typing import Any

from agentpolicy._checks import person
from agentpolicy.errors import ConflictError, ErrorCode, NotFoundError, PolicyValidationError
from agentpolicy.ledger.runner import View
from agentpolicy.records import Approver, ApproverKeyVersion
from agentpolicy.storage._time import instant
from agentpolicy.storage.base import Txn

__all__ = [
    "INDEX",
    "META",
    "SHARD",
    "approver_doc_name",
    "approver_record",
    "doc_names",
    "ensure_store_id",
    "locate",
    "register",
    "remove",
    "rotate",
]

Step = Callable[[View, Txn], None]
Body = dict[str, Any]

SHARD = "@approvers"
"""The registry's shard (the unit of atomicity of its documents)."""
INDEX = "apx"
"""Index of every approver ever registered, removed ones too (case-folded names, score 0)."""
META = "apm"
"""The store's identity: ``{"id": "sto_<32 hex>"}``, created once."""


def _esc(part: str) -> str:
    return part.replace("%", "%25").replace("/", "%2F")


def approver_doc_name(name: str) -> str:
    """The document of an approver (names compare as ``person`` folds them)."""
    return _doc_at(person(name))


def filed_doc_name(member: str) -> str:
    """The document of a member of :data:`INDEX`: the name as folded when it was filed.

    Not ``approver_doc_name(member)``: an entry an earlier release filed under
    its former folding (a name holding a character that shows nothing) is
    filed under a name that ``person`` folds to another.
    """
    return _doc_at(member)


def _doc_at(folded: str) -> str:
    """The document of the approver whose folded name is ``folded``."""
    return "ap/" + _esc(folded)


def _former(name: str) -> str | None:
    """How ``name`` was folded before names compared in their caseless form, if otherwise.

    Names were folded as ``NFKC(casefold(NFKC(name)))``; that parts from
    ``person`` only for a few names with combining marks (``ῼ͂``: ``ωῖ``, now
    ``ῶι``, as ``ῷ``). An approver registered under such a name keeps its
    document where it was written.
    """
    if name.isascii():
        return None
    former = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
    return None if former == person(name) else former


def doc_names(name: str) -> tuple[str, ...]:
    """Every document :func:`locate` may read for approver ``name``."""
    former = _former(name)
    own = approver_doc_name(name)
    return (own,) if former is None else (own, _doc_at(former))


def locate(read: Callable[[str], Body | None], name: str) -> tuple[str, str, Body | None]:
    """Approver ``name``'s folded name, document name and document, as ``read`` finds them.

    ``read`` gives a document by name (``View.doc``, after reading :func:`doc_names`).

    The document under an earlier folding of the name counts only when there
    is none under its folding now and the name it holds is the same person.
    A document under the name's folding now that holds another person (an
    earlier release filed that person there under its former folding) is
    ``APPROVER_CONFLICT``: it is never taken for this name's, whose key and
    votes it would otherwise stand for, nor written over.
    """
    folded = person(name)
    doc_name = approver_doc_name(name)
    doc = read(doc_name)
    if doc is not None and person(doc["name"]) != folded:
        raise ConflictError(
            f"approver {name!r} shares its registry entry with approver {doc['name']!r}, "
            "filed there by an earlier release: that entry is not this name's, so this name "
            "can neither be registered nor vote signed; list this approver under another "
            "spelling of a name",
            code=ErrorCode.APPROVER_CONFLICT,
        )
    former = _former(name)
    if doc is None and former is not None:
        old_name = _doc_at(former)
        old = read(old_name)
        if old is not None and person(old["name"]) == folded:
            return former, old_name, old
    return folded, doc_name, doc


def _key_doc_name(public_key: str) -> str:
    return "ak/" + _esc(public_key)


def approver_record(doc: Body) -> Approver:
    """The public :class:`~agentpolicy.records.Approver` of an approver document."""
    return Approver(
        name=doc["name"],
        keys=tuple(
            ApproverKeyVersion(
                version=k[0],
                public_key=k[1],
                added_at=instant(k[2]),
                retired_at=None if k[3] is None else instant(k[3]),
                retired_by=k[4],
            )
            for k in doc["keys"]
        ),
    )


def _current(doc: Body | None) -> list[Any] | None:
    if doc is None or not doc["keys"]:
        return None
    last: list[Any] = doc["keys"][-1]
    return last if last[3] is None else None


def _ensure_meta(view: View, txn: Txn) -> str:
    meta = view.doc(META)
    if meta is not None:
        found: str = meta["id"]
        return found
    new = "sto_" + os.urandom(16).hex()
    txn.put[META] = {"id": new}
    return new


def ensure_store_id() -> Step:
    """The store's id, created on first use. The result is the id."""

    def step(view: View, txn: Txn) -> None:
        view.read((META,))
        txn.result = _ensure_meta(view, txn)

    return step


def _claim_key(view: View, txn: Txn, folded: str, public_key: str) -> None:
    """Refuse a key another approver holds, or one this approver retired; else record it."""
    name = _key_doc_name(public_key)
    holder = view.doc(name)
    if holder is not None and holder["name"] != folded:
        raise ConflictError(
            "this public key is registered for another approver: one key stands for one approver",
            code=ErrorCode.APPROVER_CONFLICT,
        )
    if holder is not None:
        raise PolicyValidationError.single(
            "$.publicKey", "this key was retired: a retired key never verifies votes again"
        )
    txn.put[name] = {"name": folded}


def _add_version(doc: Body, public_key: str, now: int, retire_why: str | None) -> Body:
    keys = [list(k) for k in doc["keys"]]
    if retire_why is not None and keys and keys[-1][3] is None:
        keys[-1][3], keys[-1][4] = now, retire_why
    version = keys[-1][0] + 1 if keys else 1
    keys.append([version, public_key, now, None, None])
    return {**doc, "keys": keys}


def register(name: str, public_key: str, now: int) -> Step:
    """Register ``name`` with ``public_key`` (canonical text); again with the same key: no change.

    The result is ``{"doc": approver document}``. Raises ``APPROVER_CONFLICT``
    when the approver holds another key (rotate it instead) or another
    approver holds this one, and ``INVALID_INPUT`` for a key it retired.
    """

    def step(view: View, txn: Txn) -> None:
        view.read((*doc_names(name), _key_doc_name(public_key), META))
        folded, doc_name, doc = locate(view.doc, name)
        current = _current(doc)
        if current is not None:
            if current[1] == public_key:
                txn.result = {"doc": doc}
                return
            raise ConflictError(
                f"{name} is registered with another key: rotate it to change its key",
                code=ErrorCode.APPROVER_CONFLICT,
            )
        if doc is not None and folded != person(name):
            # removed while kept under its former folding: it comes back under the folding
            # of names now (every spelling binds it), with its key versions
            txn.index.append((INDEX, folded, None))
            folded, doc_name = person(name), approver_doc_name(name)
        _claim_key(view, txn, folded, public_key)
        new = _add_version(doc or {"name": name, "keys": []}, public_key, now, None)
        txn.put[doc_name] = new
        txn.index.append((INDEX, folded, 0))
        _ensure_meta(view, txn)
        txn.result = {"doc": new}

    return step


def _registered(view: View, doc_name: str, name: str) -> tuple[Body, list[Any]]:
    doc = view.doc(doc_name)
    current = _current(doc)
    if doc is None or current is None:
        gone = "" if doc is None else " (it was removed: register it again)"
        raise NotFoundError(
            f"{name} is not a registered approver{gone}", code=ErrorCode.APPROVER_NOT_FOUND
        )
    return doc, current


def rotate(name: str, public_key: str, now: int) -> Step:
    """Replace a registered approver's key: the old version stops verifying votes now.

    Rotating to the current key changes nothing. The result is ``{"doc":
    approver document}``. Raises ``APPROVER_NOT_FOUND``, ``APPROVER_CONFLICT``
    (another approver holds the key) or ``INVALID_INPUT`` (a retired key).
    """

    def step(view: View, txn: Txn) -> None:
        view.read((*doc_names(name), _key_doc_name(public_key)))
        folded, doc_name, _ = locate(view.doc, name)
        doc, current = _registered(view, doc_name, name)
        if current[1] == public_key:
            txn.result = {"doc": doc}
            return
        _claim_key(view, txn, folded, public_key)
        new = _add_version(doc, public_key, now, "rotation")
        txn.put[doc_name] = new
        txn.result = {"doc": new}

    return step


def remove(name: str, now: int) -> Step:
    """Retire a registered approver's key: no vote of theirs verifies from now on.

    Removing again changes nothing. The document stays, with every version,
    for the audit. The result is ``{"doc": approver document}``. Raises
    ``APPROVER_NOT_FOUND`` for a name never registered.
    """

    def step(view: View, txn: Txn) -> None:
        view.read(doc_names(name))
        _, doc_name, doc = locate(view.doc, name)
        if doc is None:
            raise NotFoundError(
                f"{name} is not a registered approver", code=ErrorCode.APPROVER_NOT_FOUND
            )
        if _current(doc) is None:
            txn.result = {"doc": doc}
            return
        keys = [list(k) for k in doc["keys"]]
        keys[-1][3], keys[-1][4] = now, "removal"
        new = {**doc, "keys": keys}
        txn.put[doc_name] = new
        txn.result = {"doc": new}

    return step
