"""One-time approval links on every store: approve or deny one approval once, until it expires.

A refused redemption changes nothing (the approval, the history and the budget
are compared before and after). Two engines on one store stand for two processes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest

from agentpolicy import ConflictError, ForbiddenError, PolicyEngine, PolicyValidationError
from agentpolicy.links import link_key, mint
from agentpolicy.signing import SigningKey
from agentpolicy.testing import ManualClock, payment
from tests.backends import Backend
from tests.receiver import Receiver
from tests.test_approvers import state

U = 1_000_000
SECRET = "a link secret of forty characters, or so"
POLICY = {
    "limits": {"daily": {"value": str(10_000 * U)}},
    "approvalConfig": {"timeout": 600_000, "thresholds": [
        {"amount": {"value": str(100 * U)}, "requiredApprovers": 2,
         "approvers": ["alice", "bob", "carol", "ops"]}]},
}  # fmt: skip


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def engine(backend: Backend, clock: ManualClock) -> PolicyEngine:
    return backend.engine(clock, link_secret=SECRET)


def links_of(engine: PolicyEngine, approval_id: str) -> dict[tuple[str, str], str]:
    return {(x.approver, x.decision): x.token for x in engine.approval_links(approval_id)}


def held(engine: PolicyEngine, **kwargs: Any) -> str:
    engine.set_policy("bot", POLICY)
    d = engine.authorize(payment(500 * U, agent_id="bot"), **kwargs)
    assert d.approval_id is not None
    return d.approval_id


def refused(engine: PolicyEngine, watched: str, code: str, token: str, **kwargs: Any) -> None:
    before = state(engine, watched)
    with pytest.raises((ForbiddenError, ConflictError)) as info:
        engine.redeem_link(token, **kwargs)
    assert info.value.code == code, info.value.message
    assert state(engine, watched) == before


def test_a_link_votes_once_and_holds_across_engines_on_one_store(
    engine: PolicyEngine, backend: Backend, clock: ManualClock
) -> None:
    aid = held(engine, requested_by="ops")
    links = links_of(engine, aid)
    assert sorted(links) == [(who, d) for who in ("alice", "bob", "carol")
                             for d in ("approve", "deny")]  # fmt: skip
    assert links == links_of(engine, aid)  # the same tokens every time
    approval = engine.redeem_link(links[("alice", "approve")], comment="from chat")
    assert (approval.status, approval.votes[0].via, approval.votes[0].comment) == (
        "pending", "link", "from chat")  # fmt: skip
    other = backend.engine(clock, link_secret=SECRET)  # another process on the same store
    refused(other, aid, "DUPLICATE_DECISION", links[("alice", "approve")])
    refused(other, aid, "DUPLICATE_DECISION", links[("alice", "deny")])
    assert other.redeem_link(links[("bob", "approve")], approval_id=aid).status == "approved"
    refused(engine, aid, "APPROVAL_NOT_PENDING", links[("carol", "deny")])
    assert [h.detail for h in engine.history("bot") if h.event == "vote"] == [
        "bob: approve [one-time link]", "alice: approve (from chat) [one-time link]"]  # fmt: skip


def test_an_expired_link_is_refused_and_changes_nothing(
    engine: PolicyEngine, clock: ManualClock
) -> None:
    aid = held(engine)
    token = links_of(engine, aid)[("alice", "approve")]
    clock.advance(minutes=9, seconds=59)
    link, approval = engine.inspect_link(token)
    assert (link.approver, link.decision, approval.status) == ("alice", "approve", "pending")
    clock.advance(seconds=1)
    refused(engine, aid, "APPROVAL_NOT_PENDING", token)
    assert engine.inspect_link(token)[1].status == "expired"


def test_a_link_for_another_approval_or_altered_or_from_another_secret_is_refused(
    engine: PolicyEngine, backend: Backend, clock: ManualClock
) -> None:
    aid = held(engine)
    second = engine.authorize(payment(600 * U, agent_id="bot")).approval_id or ""
    token = links_of(engine, second)[("alice", "approve")]
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", token, approval_id=aid)
    head, body, mac = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    retargeted = mint(b"guessed key", aid, "alice", "approve", claims["x"])
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", retargeted)
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", f"{head}.{body}.{mac[:-2]}AA")
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", "apl1.x")
    elsewhere = backend.engine(clock, link_secret="another secret, as long as the first!!")
    refused(elsewhere, aid, "APPROVER_NOT_AUTHORIZED", links_of(engine, aid)[("bob", "deny")])
    genuine = mint(link_key(SECRET), aid, "alice", "approve", claims["x"])
    assert engine.redeem_link(genuine).votes[0].approver == "alice"
    with pytest.raises(PolicyValidationError):
        engine.redeem_link("x" * 9000)  # longer than any token minted
    # not ASCII (a MAC, a body, a lone surrogate from a JSON escape): refused as altered, where
    # comparing it raised TypeError and the engine answered STORAGE_UNAVAILABLE
    for odd in (f"{head}.{body}.\u00e9", f"{head}.{body}\u00e9.{mac}", f"{head}.{body}.\udcff"):
        refused(engine, aid, "APPROVER_NOT_AUTHORIZED", odd)
        with pytest.raises(ForbiddenError) as caught:
            engine.inspect_link(odd)
        assert caught.value.code == "APPROVER_NOT_AUTHORIZED"


def test_links_leave_out_requesters_registered_approvers_and_signed_only_approvals(
    engine: PolicyEngine,
) -> None:
    engine.register_approver("carol", SigningKey.generate().public_key)
    aid = held(engine, requested_by="ops")
    assert {who for who, _ in links_of(engine, aid)} == {"alice", "bob"}
    forged = mint(link_key(SECRET), aid, "carol", "approve",
                  int(engine.get_approval(aid).expires_at.timestamp() * 1_000_000))  # fmt: skip
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", forged)  # carol signs, links do not do
    requester = mint(link_key(SECRET), aid, "ops", "approve",
                     int(engine.get_approval(aid).expires_at.timestamp() * 1_000_000))  # fmt: skip
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", requester)
    policy = {**POLICY, "approvalConfig": {**POLICY["approvalConfig"], "requireSignedVotes": True}}
    engine.set_policy("bot", policy)
    signed_only = engine.authorize(payment(500 * U, agent_id="bot")).approval_id or ""
    assert engine.approval_links(signed_only) == []


def test_without_a_link_secret_links_are_off(backend: Backend, clock: ManualClock) -> None:
    engine = backend.engine(clock)
    aid = held(engine)
    for call in (lambda: engine.approval_links(aid), lambda: engine.redeem_link("apl1.a.b")):
        with pytest.raises(ForbiddenError) as info:
            call()
        assert info.value.code == "FORBIDDEN"
    with pytest.raises(PolicyValidationError):
        PolicyEngine(link_secret="short")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def test_approval_created_carries_the_links_added_when_sent_never_stored(
    receiver: Receiver,
) -> None:
    engine = PolicyEngine(clock=ManualClock(), link_secret=SECRET,
                          webhook_endpoints=[{"url": receiver.url, "secret": "hook"}])  # fmt: skip
    aid = held(engine, requested_by="ops")
    engine.decide(aid, "alice", "approve")
    assert engine.flush_webhooks(10)
    created, submitted = (json.loads(r.body) for r in receiver.received)
    assert created["event"] == "approval.created"
    assert created["approval"]["requestedBy"] == "ops"
    expected = links_of(engine, aid)
    assert created["links"] == [
        {"approver": who, "approve": expected[(who, "approve")], "deny": expected[(who, "deny")],
         "expiresAt": created["approval"]["expiresAt"]}
        for who in ("alice", "bob", "carol")
    ]  # fmt: skip
    assert "links" not in submitted
    stored = engine.webhook_deliveries()
    assert all("links" not in d.payload for d in stored)
    assert engine.redeem_link(created["links"][1]["approve"]).status == "approved"  # bob's
    engine.close()


def test_an_endpoint_with_links_off_gets_approval_created_without_them(
    receiver: Receiver,
) -> None:
    """An audit endpoint must not hold credentials to vote: ``"links": false`` leaves them out."""
    relay = Receiver().start()
    try:
        engine = PolicyEngine(clock=ManualClock(), link_secret=SECRET, webhook_endpoints=[
            {"url": receiver.url, "secret": "hook", "links": False},
            {"url": relay.url + "/relay", "secret": "hook"},
        ])  # fmt: skip
        held(engine)
        assert engine.flush_webhooks(10)
        (audited,) = (json.loads(r.body) for r in receiver.received)
        (relayed,) = (json.loads(r.body) for r in relay.received)
        assert audited["event"] == relayed["event"] == "approval.created"
        assert "links" not in audited
        assert [x["approver"] for x in relayed["links"]] == ["alice", "bob", "carol", "ops"]
        assert {k: v for k, v in relayed.items() if k != "links"} == audited
        engine.close()
    finally:
        relay.stop()
    for bad in ("false", 0, None):
        with pytest.raises(PolicyValidationError) as refused:
            PolicyEngine(webhook_endpoints=[{"url": receiver.url, "secret": "s", "links": bad}])
        assert [p.path for p in refused.value.problems] == ["$.webhookEndpoints[0].links"]


def test_the_longest_ids_make_tokens_that_are_read_back() -> None:
    """An approval of the longest agent id, for an approver of the longest name, gets a link."""
    from agentpolicy._checks import MAX_ID, MAX_RECORD_ID
    from agentpolicy.links import read

    key = b"k" * 32
    approval_id = "apr_" + "0" * 32 + "_~" + ("\U0001f4b0" * MAX_ID).encode().hex()
    assert len(approval_id) == MAX_RECORD_ID
    approver = "\U0001f4b0" * MAX_ID
    token = mint(key, approval_id, approver, "approve", 10**16)
    claims = read(key, token)
    assert (claims.approval_id, claims.approver, claims.decision) == (
        approval_id, approver, "approve",
    )  # fmt: skip
