"""Who votes: the approver registry, signed votes and one-time links, as engine methods.

:class:`Voting` is a part of :class:`~agentpolicy.PolicyEngine` (which
inherits it): registering, rotating and removing approvers' public keys,
checking a signed vote before the vote step, and minting, inspecting and
redeeming one-time approval links. What these methods decide is written
in ``docs/approvals.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from agentpolicy._checks import (
    check_identifier,
    check_person,
    check_record_id,
    check_text,
    person,
    raise_if,
)
from agentpolicy.approvals import DECISIONS, VoteProof
from agentpolicy.codec import format_instant, parse_instant
from agentpolicy.errors import ConflictError, ErrorCode, ForbiddenError, NotFoundError, Problem
from agentpolicy.ledger import approvers as registry
from agentpolicy.ledger.flows import Flow, Read, Run, Scan
from agentpolicy.ledger.runner import View
from agentpolicy.links import LinkClaims, mint, read
from agentpolicy.records import Approval, ApprovalLink, Approver, WebhookDelivery
from agentpolicy.signing import (
    SIGNATURE_WINDOW,
    normal_public_key,
    verify_vote,
    vote_message,
)
from agentpolicy.storage import Storage
from agentpolicy.storage._time import instant, micros
from agentpolicy.storage.base import Txn

__all__ = ["Voting"]

T = TypeVar("T")

Body = dict[str, Any]


class Voting:
    """The approver registry, signed votes and one-time approval links of an engine."""

    storage: Storage
    _link_key: bytes | None
    _store: str | None

    # -- provided by the engine -----------------------------------------------------------

    def _now(self) -> datetime:  # pragma: no cover - the engine's
        raise NotImplementedError

    def _drive(self, flow: Flow[T]) -> T:  # pragma: no cover - the engine's
        raise NotImplementedError

    def _get_approval(self, approval_id: str) -> Flow[Approval]:  # pragma: no cover
        raise NotImplementedError

    def _cast(
        self,
        approval_id: str,
        approver: str,
        decision: str,
        comment: str | None,
        proof: VoteProof,
        now: datetime,
    ) -> Flow[Approval]:  # pragma: no cover - the engine's
        raise NotImplementedError

    # -- the registry ----------------------------------------------------------------------

    def _registry(self, step: Callable[[View, Txn], None]) -> Flow[Approver]:
        now = self._now()
        result: Body = yield Run(registry.SHARD, step, at=micros(now))
        return registry.approver_record(result["doc"])

    def register_approver(self, name: str, public_key: str) -> Approver:
        """Register an approver's Ed25519 public key (``ed25519:<base64url>``).

        From then on the approver's votes count only when signed with that
        key (see :meth:`vote_message`). Registering again with the same key
        changes nothing; with another key it is ``APPROVER_CONFLICT`` (rotate
        it instead), and so is a key another approver holds. A key retired
        before is ``INVALID_INPUT``. A removed approver may be registered
        again, with a new key. Returns the approver with every key version.
        """
        return self._drive(self._register_approver(name, public_key))

    def _register_approver(self, name: str, public_key: str) -> Flow[Approver]:
        raise_if(check_person(name, "$.name"))
        key = normal_public_key(public_key)
        return (yield from self._registry(registry.register(name, key, micros(self._now()))))

    def rotate_approver(self, name: str, public_key: str) -> Approver:
        """Give a registered approver a new key; the old one stops verifying votes now.

        Raises ``APPROVER_NOT_FOUND`` (never registered, or removed),
        ``APPROVER_CONFLICT`` (another approver holds the key) or
        ``INVALID_INPUT`` (a key retired before). Rotating to the current key
        changes nothing.
        """
        return self._drive(self._rotate_approver(name, public_key))

    def _rotate_approver(self, name: str, public_key: str) -> Flow[Approver]:
        raise_if(check_identifier(name, "$.name"))
        key = normal_public_key(public_key)
        return (yield from self._registry(registry.rotate(name, key, micros(self._now()))))

    def remove_approver(self, name: str) -> Approver:
        """Retire an approver's key: none of their votes verifies from now on.

        The approver is kept, with every key version, for the audit. Then
        their unsigned votes count again where a policy does not require
        signed votes. Removing again changes nothing; a name never
        registered is ``APPROVER_NOT_FOUND``.
        """
        return self._drive(self._remove_approver(name))

    def _remove_approver(self, name: str) -> Flow[Approver]:
        raise_if(check_identifier(name, "$.name"))
        return (yield from self._registry(registry.remove(name, micros(self._now()))))

    def get_approver(self, name: str) -> Approver | None:
        """A registered (or removed) approver with every key version, or ``None``."""
        return self._drive(self._get_approver(name))

    def _get_approver(self, name: str) -> Flow[Approver | None]:
        raise_if(check_identifier(name, "$.name"))
        found = yield from self._approver_docs((name,))
        doc = found.get(person(name))
        return None if doc is None else registry.approver_record(doc)

    def _approver_docs(self, names: Iterable[str]) -> Flow[dict[str, Body]]:
        """The registry's documents of ``names``, by folded name (``person``); none if absent.

        A name folded otherwise when it was registered (``registry.locate``) is
        found where it was written.
        """
        spelled = {person(n): n for n in names}
        wanted = list(dict.fromkeys(d for n in spelled.values() for d in registry.doc_names(n)))
        if not wanted:
            return {}
        docs = yield Read(registry.SHARD, wanted)
        read = dict(zip(wanted, docs, strict=True))
        found = {}
        for folded, name in spelled.items():
            _, _, doc = registry.locate(read.get, name)
            if doc is not None:
                found[folded] = doc
        return found

    def list_approvers(self) -> list[Approver]:
        """Every approver ever registered (removed ones too), by name ignoring case."""
        return self._drive(self._list_approvers())

    def _list_approvers(self) -> Flow[list[Approver]]:
        members = yield Scan(registry.SHARD, registry.INDEX, 0, 10_000_000)
        names = sorted(m for m, _ in members)
        docs = yield Read(registry.SHARD, [registry.filed_doc_name(n) for n in names])
        return [registry.approver_record(d) for d in docs if d is not None]

    def _registered(self, names: Iterable[str]) -> Flow[dict[str, Approver]]:
        """The approvers among ``names`` that have a current key, by folded name (``person``)."""
        found = {}
        for name, doc in (yield from self._approver_docs(names)).items():
            approver = registry.approver_record(doc)
            if approver.current is not None:
                found[name] = approver
        return found

    # -- signed votes ----------------------------------------------------------------------

    def store_id(self) -> str:
        """The store's id (``sto_<32 hex>``), which every signed vote names; made on first use."""
        return self._drive(self._store_id())

    def _store_id(self) -> Flow[str]:
        if self._store is None:
            now = self._now()
            self._store = yield Run(registry.SHARD, registry.ensure_store_id(), at=micros(now))
        return self._store

    def vote_message(
        self,
        approval_id: str,
        approver: str,
        decision: str,
        signed_at: datetime,
        comment: str | None = None,
    ) -> bytes:
        """The bytes ``approver`` signs to cast ``decision`` on ``approval_id`` at ``signed_at``.

        See :func:`agentpolicy.signing.vote_message` for the form; this fills
        in the store's id. Sign it with the approver's
        :class:`~agentpolicy.signing.SigningKey` and pass the signature and
        ``signed_at`` to :meth:`~agentpolicy.PolicyEngine.decide`.
        """
        return self._drive(self._vote_message(approval_id, approver, decision, signed_at, comment))

    def _vote_message(
        self,
        approval_id: str,
        approver: str,
        decision: str,
        signed_at: datetime,
        comment: str | None = None,
    ) -> Flow[bytes]:
        problems = check_record_id(approval_id, "$.approvalId")
        problems += check_person(approver, "$.approver")
        if decision not in DECISIONS:
            problems.append(Problem("$.decision", "must be 'approve' or 'deny'"))
        if comment is not None:
            problems += check_text(comment, "$.comment")
        if not isinstance(signed_at, datetime) or signed_at.utcoffset() is None:
            problems.append(Problem("$.signedAt", "must be a timezone-aware instant"))
        raise_if(problems)
        store = yield from self._store_id()
        return vote_message(
            store=store, approval_id=approval_id, approver=approver,
            decision=decision, signed_at=signed_at, comment=comment,
        )  # fmt: skip

    def _vote_proof(
        self,
        approval_id: str,
        approver: str,
        decision: str,
        comment: str | None,
        signature: str | None,
        signed_at: datetime | None,
        now: datetime,
    ) -> Flow[VoteProof]:
        """Check a vote's signature (if any) against the approver's key registered now."""
        found = (yield from self._registered((approver,))).get(person(approver))
        if signature is None or signed_at is None:
            return VoteProof(registered=found is not None)
        if found is None or found.current is None:
            raise ForbiddenError(
                f"{approver} has no registered key, so a signed vote cannot be checked",
                code=ErrorCode.APPROVER_NOT_AUTHORIZED,
            )
        if abs(now - signed_at) > SIGNATURE_WINDOW:
            raise ForbiddenError(
                f"the vote was signed at {format_instant(signed_at)}, more than "
                f"{SIGNATURE_WINDOW.total_seconds() / 60:g} minutes from the engine's clock "
                f"({format_instant(now)}): sign it again",
                code=ErrorCode.APPROVER_NOT_AUTHORIZED,
            )
        message = yield from self._vote_message(approval_id, approver, decision, signed_at, comment)
        current = found.current
        if not verify_vote(current.public_key, message, signature):
            raise ForbiddenError(
                f"the signature does not verify with {approver}'s registered key (version "
                f"{current.version}) for this store, approval, decision, time and comment",
                code=ErrorCode.APPROVER_NOT_AUTHORIZED,
            )
        # the signature covers whole seconds: the vote keeps the instant it signed, not a
        # fraction of a second the caller added to it afterwards
        whole = signed_at.replace(microsecond=0)
        return VoteProof(via="signature", key_version=current.version, registered=True,
                         signature=signature, signed_at=whole)  # fmt: skip

    # -- one-time links --------------------------------------------------------------------

    def _links_key(self) -> bytes:
        if self._link_key is None:
            raise ForbiddenError(
                "approval links are off: give the engine a link secret "
                "(link_secret, or AGENT_POLICY_LINK_SECRET)",
                code=ErrorCode.FORBIDDEN,
            )
        return self._link_key

    def _link_names(
        self, approvers: Sequence[str], requesters: Iterable[str | None], signed_only: bool
    ) -> Flow[list[str]]:
        """Who gets links: approvers who may vote unsigned (not requesters, not registered)."""
        if signed_only:
            return []
        asked = {person(r) for r in requesters if r is not None}
        names = [a for a in dict.fromkeys(approvers) if person(a) not in asked]
        registered = yield from self._registered(names)
        return [a for a in names if person(a) not in registered]

    def approval_links(self, approval_id: str) -> list[ApprovalLink]:
        """The one-time links of an approval: approve and deny, for every approver who gets one.

        Every approver of the approval gets links except those who asked for
        the payment, those with a registered key (they sign) and everyone
        when the approval requires signed votes. The same approval always
        gives the same tokens (they are what ``approval.created`` carries).
        ``FORBIDDEN`` when the engine has no link secret.
        """
        return self._drive(self._approval_links(approval_id))

    def _approval_links(self, approval_id: str) -> Flow[list[ApprovalLink]]:
        key = self._links_key()
        approval = yield from self._get_approval(approval_id)
        names = yield from self._link_names(
            approval.every_approver, approval.requesters, approval.require_signed_votes
        )
        expires = micros(approval.expires_at)
        return [
            ApprovalLink(approval.id, name, decision, approval.expires_at,
                         mint(key, approval.id, name, decision, expires))
            for name in names
            for decision in DECISIONS
        ]  # fmt: skip

    def _claims(self, token: str) -> LinkClaims:
        return read(self._links_key(), token)

    def inspect_link(self, token: str) -> tuple[ApprovalLink, Approval]:
        """What a link token would do, and its approval now, without redeeming it.

        Raises ``APPROVER_NOT_AUTHORIZED`` for a token that is not valid, and
        ``APPROVAL_NOT_FOUND`` when its approval is gone. An expired or used
        token is still shown (its approval says it is no longer pending, or
        already has the approver's vote).
        """
        return self._drive(self._inspect_link(token))

    def _inspect_link(self, token: str) -> Flow[tuple[ApprovalLink, Approval]]:
        claims = self._claims(token)
        link = ApprovalLink(claims.approval_id, claims.approver, claims.decision,
                            instant(claims.expires), token)  # fmt: skip
        approval = yield from self._get_approval(claims.approval_id)
        return link, approval

    def redeem_link(
        self, token: str, *, approval_id: str | None = None, comment: str | None = None
    ) -> Approval:
        """Cast the vote a one-time link token carries; return the approval after it.

        Refused, changing nothing: a token that is not valid, or for another
        approval than ``approval_id`` (when given), or whose approver has a
        registered key since (``APPROVER_NOT_AUTHORIZED``); an expired token
        or a decided approval (``APPROVAL_NOT_PENDING``); a token used before,
        or an approver who voted already (``DUPLICATE_DECISION``). That a
        token was used is recorded in the approval, in the same commit as its
        vote, so it holds across processes and stores.
        """
        return self._drive(self._redeem_link(token, approval_id=approval_id, comment=comment))

    def _redeem_link(
        self, token: str, *, approval_id: str | None = None, comment: str | None = None
    ) -> Flow[Approval]:
        problems: list[Problem] = []
        if approval_id is not None:
            problems += check_record_id(approval_id, "$.approvalId")
        if comment is not None:
            problems += check_text(comment, "$.comment")
        raise_if(problems)
        claims = self._claims(token)
        if approval_id is not None and approval_id != claims.approval_id:
            raise ForbiddenError(
                f"this link is for another approval than {approval_id}",
                code=ErrorCode.APPROVER_NOT_AUTHORIZED,
            )
        now = self._now()
        if micros(now) >= claims.expires:
            raise ConflictError(
                f"this link expired at {format_instant(instant(claims.expires))}",
                code=ErrorCode.APPROVAL_NOT_PENDING,
            )
        registered = person(claims.approver) in (yield from self._registered((claims.approver,)))
        proof = VoteProof(via="link", registered=registered)
        return (
            yield from self._cast(
                claims.approval_id, claims.approver, claims.decision, comment, proof, now
            )
        )

    def _with_links(self, delivery: WebhookDelivery) -> Body:
        """An ``approval.created`` payload with its links (added when sent, never stored)."""
        payload = delivery.payload
        if delivery.event != "approval.created" or self._link_key is None:
            return payload
        a = payload["approval"]
        try:  # the budgets above the agent asked for it too; the payload does not name them
            asked: tuple[str | None, ...] = self._drive(self._get_approval(a["id"])).requesters
        except NotFoundError:  # gone (decided long ago): its links could not vote anyway
            asked = (a["agentId"], a.get("requestedBy"))
        names = self._drive(
            self._link_names(a["approvers"], asked, bool(a.get("requireSignedVotes")))
        )
        expires = micros(parse_instant(a["expiresAt"]))
        key = self._link_key
        links = [
            {"approver": name, **{d: mint(key, a["id"], name, d, expires) for d in DECISIONS},
             "expiresAt": a["expiresAt"]}
            for name in names
        ]  # fmt: skip
        return {**payload, "links": links}
