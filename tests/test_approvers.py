"""Approvers who are who they say they are: the registry, signed votes, groups, separation of duties.

Every refusal is checked to change nothing: the approval, the agent's history and
its budget are the same afterwards. Runs on every store (the ``backend`` fixture).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agentpolicy import (
    ConflictError,
    ForbiddenError,
    NotFoundError,
    PolicyEngine,
    PolicyValidationError,
    load_policy,
)
from agentpolicy.signing import SigningKey, verify_vote, vote_message
from agentpolicy.testing import ManualClock, payment
from tests.backends import Backend

U = 1_000_000
TWO_GROUPS = {
    "limits": {"daily": {"value": str(10_000 * U)}},
    "approvalConfig": {"thresholds": [{"amount": {"value": str(100 * U)}, "groups": [
        {"name": "finance", "approvers": ["fin1@acme.com", "fin2@acme.com"], "required": 1},
        {"name": "security", "approvers": ["sec@acme.com"], "required": 1},
    ]}]},
}  # fmt: skip
SIGNED_ONLY = {
    "limits": {"daily": {"value": str(10_000 * U)}},
    "approvalConfig": {"requireSignedVotes": True, "thresholds": [
        {"amount": {"value": str(100 * U)}, "requiredApprovers": 2,
         "approvers": ["alice", "bob", "carol"]}]},
}  # fmt: skip


def state(engine: PolicyEngine, approval_id: str, agent: str = "bot") -> Any:
    """Everything a refused vote must leave as it was."""
    approval = engine.get_approval(approval_id)
    history = [(h.event, h.code, h.detail, h.seq) for h in engine.history(agent)]
    daily = engine.budget(agent).periods
    used = {p: (w.spent.value, w.reserved.value) for p, w in daily.items()}
    return approval, history, used


def refused(engine: PolicyEngine, approval_id: str, code: str, call: Any) -> None:
    before = state(engine, approval_id)
    with pytest.raises((ForbiddenError, ConflictError, NotFoundError)) as info:
        call()
    assert info.value.code == code, info.value.message
    assert state(engine, approval_id) == before


def sign(
    engine: PolicyEngine,
    key: SigningKey,
    approval_id: str,
    approver: str,
    decision: str = "approve",
    comment: str | None = None,
    clock: ManualClock | None = None,
) -> dict[str, Any]:
    at = engine.clock() if clock is None else clock()
    message = engine.vote_message(approval_id, approver, decision, at, comment)
    return {"signature": key.sign(message), "signed_at": at}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def engine(backend: Backend, clock: ManualClock) -> PolicyEngine:
    return backend.engine(clock)


def held(engine: PolicyEngine, policy: Any = SIGNED_ONLY, **kwargs: Any) -> str:
    engine.set_policy("bot", policy)
    d = engine.authorize(payment(500 * U, agent_id="bot"), **kwargs)
    assert d.approval_id is not None
    return d.approval_id


# -- signed votes ---------------------------------------------------------------------------------


def test_a_registered_approvers_vote_counts_only_when_signed_with_their_key(
    engine: PolicyEngine,
) -> None:
    alice, bob = SigningKey.generate(), SigningKey.generate()
    engine.register_approver("alice", alice.public_key)
    engine.register_approver("Bob", bob.public_key)
    aid = held(engine, {**SIGNED_ONLY, "approvalConfig": {**SIGNED_ONLY["approvalConfig"],
                                                          "requireSignedVotes": False}})  # fmt: skip
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", lambda: engine.decide(aid, "alice", "approve"))
    first = engine.decide(aid, "ALICE", "approve", "invoice 7", **sign(engine, alice, aid, "ALICE",
                                                                       comment="invoice 7"))  # fmt: skip
    assert (first.status, first.votes[0].via, first.votes[0].key_version) == ("pending",
                                                                              "signature", 1)  # fmt: skip
    done = engine.decide(aid, "bob", "approve", **sign(engine, bob, aid, "bob"))
    assert done.status == "approved"
    assert [h.detail for h in engine.history("bot") if h.event == "vote"] == [
        "bob: approve [signed, key version 1]",
        "ALICE: approve (invoice 7) [signed, key version 1]",
    ]


_SMALL_ORDER = [  # the 8 points of small order (the identity first), and other encodings
    "01" + "00" * 31,
    "00" * 32,
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",  # p: y = 0 written past p
    "ee" + "ff" * 30 + "7f",  # p + 1: the identity written past p
    "01" + "00" * 30 + "80",  # the identity with the sign bit of x = 0 set
]


@pytest.mark.parametrize("point", _SMALL_ORDER)
def test_a_key_of_small_order_is_refused_so_no_keyless_signature_can_vote(
    engine: PolicyEngine, point: str
) -> None:
    # the identity point was registered, and then one fixed signature (R the identity, S zero)
    # verified for every vote: anyone could vote as that approver
    import base64

    def text(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    key = "ed25519:" + text(bytes.fromhex(point))
    with pytest.raises(PolicyValidationError) as err:
        engine.register_approver("cfo", key)
    assert err.value.path == "$.publicKey"
    assert "small order" in err.value.message
    forged = text(bytes.fromhex("01" + "00" * 31) + bytes(32))
    assert not verify_vote(key, b"any vote at all", forged)  # nor one registered before


def test_a_forged_signature_is_refused_and_changes_nothing(engine: PolicyEngine) -> None:
    alice, mallory = SigningKey.generate(), SigningKey.generate()
    engine.register_approver("alice", alice.public_key)
    aid = held(engine)
    forged = sign(engine, mallory, aid, "alice")
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED",
            lambda: engine.decide(aid, "alice", "approve", **forged))  # fmt: skip
    flipped = {**forged, "signature": "A" * 86}  # well formed, signed by nobody
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED",
            lambda: engine.decide(aid, "alice", "approve", **flipped))  # fmt: skip
    with pytest.raises(PolicyValidationError) as bad:
        engine.decide(aid, "alice", "approve", signature="not base64!", signed_at=engine.clock())
    assert bad.value.path == "$.signature"
    # a signature by alice's key, submitted as carol (unregistered): no key checks it
    refused(
        engine,
        aid,
        "APPROVER_NOT_AUTHORIZED",
        lambda: engine.decide(aid, "carol", "approve", **sign(engine, alice, aid, "carol")),
    )


def test_a_replayed_signature_is_refused_and_changes_nothing(
    engine: PolicyEngine, clock: ManualClock
) -> None:
    alice = SigningKey.generate()
    engine.register_approver("alice", alice.public_key)
    aid = held(engine)
    vote = sign(engine, alice, aid, "alice")
    engine.decide(aid, "alice", "approve", **vote)
    clock.advance(seconds=30)
    refused(engine, aid, "DUPLICATE_DECISION", lambda: engine.decide(aid, "alice", "approve",
                                                                       **vote))  # fmt: skip


def test_a_signature_made_before_a_rotation_is_refused_after_it(engine: PolicyEngine) -> None:
    old, new = SigningKey.generate(), SigningKey.generate()
    engine.register_approver("alice", old.public_key)
    aid = held(engine)
    captured = sign(engine, old, aid, "alice")  # never submitted: say an attacker kept it
    rotated = engine.rotate_approver("alice", new.public_key)
    assert [(k.version, k.retired_by) for k in rotated.keys] == [(1, "rotation"), (2, None)]
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED",
            lambda: engine.decide(aid, "alice", "approve", **captured))  # fmt: skip
    done = engine.decide(aid, "alice", "approve", **sign(engine, new, aid, "alice"))
    assert done.votes[0].key_version == 2
    with pytest.raises(PolicyValidationError):  # a retired key never comes back
        engine.rotate_approver("alice", old.public_key)


def test_a_signature_for_another_approval_decision_approver_comment_or_store_is_refused(
    engine: PolicyEngine, backend: Backend, clock: ManualClock
) -> None:
    alice = SigningKey.generate()
    engine.register_approver("alice", alice.public_key)
    engine.register_approver("bob", SigningKey.generate().public_key)
    aid = held(engine)
    other = engine.authorize(payment(600 * U, agent_id="bot")).approval_id
    assert other is not None
    for_other = sign(engine, alice, other, "alice")
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED",
            lambda: engine.decide(aid, "alice", "approve", **for_other))  # fmt: skip
    approve = sign(engine, alice, aid, "alice", "approve")
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED",
            lambda: engine.decide(aid, "alice", "deny", **approve))  # fmt: skip
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED",
            lambda: engine.decide(aid, "bob", "approve", **approve))  # fmt: skip
    commented = sign(engine, alice, aid, "alice", comment="ok")
    refused(
        engine,
        aid,
        "APPROVER_NOT_AUTHORIZED",
        lambda: engine.decide(aid, "alice", "approve", "ok, and pay twice", **commented),
    )
    elsewhere = PolicyEngine(clock=clock)  # another store: another id in the message
    message = vote_message(store=elsewhere.store_id(), approval_id=aid, approver="alice",
                           decision="approve", signed_at=clock())  # fmt: skip
    assert elsewhere.store_id() != engine.store_id()
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", lambda: engine.decide(
        aid, "alice", "approve", signature=alice.sign(message), signed_at=clock()))  # fmt: skip
    assert engine.decide(aid, "alice", "approve", "ok", **commented).votes[0].comment == "ok"


def test_an_expired_signature_is_refused_and_changes_nothing(
    engine: PolicyEngine, clock: ManualClock
) -> None:
    alice = SigningKey.generate()
    engine.register_approver("alice", alice.public_key)
    aid = held(engine)
    early = sign(engine, alice, aid, "alice")
    clock.advance(minutes=5, seconds=1)
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED",
            lambda: engine.decide(aid, "alice", "approve", **early))  # fmt: skip
    ahead = engine.vote_message(aid, "alice", "approve", clock() + timedelta(minutes=6))
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", lambda: engine.decide(
        aid, "alice", "approve", signature=alice.sign(ahead),
        signed_at=clock() + timedelta(minutes=6)))  # fmt: skip
    at_the_edge = sign(engine, alice, aid, "alice")
    clock.advance(minutes=5)  # exactly the window: still accepted
    assert engine.decide(aid, "alice", "approve", **at_the_edge).approvals == 1


def test_a_signed_vote_keeps_the_whole_second_it_signed(engine: PolicyEngine) -> None:
    """The message signs whole seconds: a fraction added to ``signed_at`` was recorded as signed."""
    alice = SigningKey.generate()
    engine.register_approver("alice", alice.public_key)
    aid = held(engine)
    signed = sign(engine, alice, aid, "alice")
    claimed = signed["signed_at"].replace(microsecond=999_000)
    vote = engine.decide(aid, "alice", "approve", signature=signed["signature"],
                         signed_at=claimed).votes[0]  # fmt: skip
    assert vote.signed_at == claimed.replace(microsecond=0)
    assert engine.get_approval(aid).votes[0].signed_at == claimed.replace(microsecond=0)


def test_require_signed_votes_refuses_unsigned_votes_and_unregistered_approvers(
    engine: PolicyEngine,
) -> None:
    alice, bob = SigningKey.generate(), SigningKey.generate()
    engine.register_approver("alice", alice.public_key)
    engine.register_approver("bob", bob.public_key)
    aid = held(engine)
    assert engine.get_approval(aid).require_signed_votes
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", lambda: engine.decide(aid, "carol", "deny"))
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", lambda: engine.decide(aid, "alice", "deny"))
    engine.remove_approver("bob")  # removed: no key, so bob cannot vote on it at all
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", lambda: engine.decide(aid, "bob", "approve"))
    refused(
        engine,
        aid,
        "APPROVER_NOT_AUTHORIZED",
        lambda: engine.decide(aid, "bob", "approve", **sign(engine, bob, aid, "bob")),
    )
    engine.decide(aid, "alice", "approve", **sign(engine, alice, aid, "alice"))
    engine.register_approver("carol", (carol := SigningKey.generate()).public_key)
    assert engine.decide(aid, "carol", "approve", **sign(engine, carol, aid, "carol")).status == (
        "approved"
    )


def test_without_the_flag_unregistered_approvers_vote_unsigned_as_before(
    engine: PolicyEngine,
) -> None:
    aid = held(engine, TWO_GROUPS)
    approval = engine.decide(aid, "fin2@acme.com", "approve")
    assert (approval.votes[0].via, approval.votes[0].key_version) == (None, None)
    engine.register_approver("sec@acme.com", (key := SigningKey.generate()).public_key)
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED",
            lambda: engine.decide(aid, "sec@acme.com", "approve"))  # fmt: skip
    engine.remove_approver("sec@acme.com")  # removed: unsigned votes count again here
    assert engine.decide(aid, "sec@acme.com", "approve").status == "approved"
    assert engine.get_approver("sec@acme.com").keys[0].public_key == key.public_key  # kept


# -- separation of duties ---------------------------------------------------------------------------


def test_the_agent_and_whoever_asked_cannot_vote_on_the_payment(engine: PolicyEngine) -> None:
    policy = {"approvalConfig": {"thresholds": [{"amount": {"value": "1"}, "requiredApprovers": 1,
                                                 "approvers": ["bot", "ops", "cfo"]}]}}  # fmt: skip
    aid = held(engine, policy, requested_by="OPS")
    approval = engine.get_approval(aid)
    assert (approval.requested_by, approval.requesters) == ("OPS", ("bot", "OPS"))
    assert engine.history("bot")[0].requested_by == "OPS"
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", lambda: engine.decide(aid, "ops", "approve"))
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", lambda: engine.decide(aid, "Bot", "approve"))
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", lambda: engine.decide(aid, "bot", "deny"))
    # signed by the requester's own registered key: still the requester
    engine.register_approver("ops", (ops := SigningKey.generate()).public_key)
    refused(
        engine,
        aid,
        "APPROVER_NOT_AUTHORIZED",
        lambda: engine.decide(aid, "ops", "approve", **sign(engine, ops, aid, "ops")),
    )
    assert engine.decide(aid, "cfo", "approve").status == "approved"
    with pytest.raises(PolicyValidationError) as bad:
        engine.authorize(payment(1, agent_id="bot"), requested_by=" ops")
    assert bad.value.path == "$.requestedBy"


# -- groups ---------------------------------------------------------------------------------------


def test_every_group_must_reach_its_count_and_any_deny_denies(engine: PolicyEngine) -> None:
    aid = held(engine, TWO_GROUPS)
    approval = engine.get_approval(aid)
    assert [(g.name, g.required, g.budget) for g in approval.groups] == [
        ("finance", 1, "bot"), ("security", 1, "bot")]  # fmt: skip
    assert (approval.required_approvers, approval.approvers) == (
        2, ("fin1@acme.com", "fin2@acme.com", "sec@acme.com"))  # fmt: skip
    assert engine.decide(aid, "fin1@acme.com", "approve").status == "pending"
    assert engine.decide(aid, "fin2@acme.com", "approve").status == "pending"  # finance twice
    assert engine.decide(aid, "sec@acme.com", "approve").status == "approved"
    second = engine.authorize(payment(500 * U, agent_id="bot")).approval_id or ""
    engine.decide(second, "fin1@acme.com", "approve")
    assert engine.decide(second, "sec@acme.com", "deny").status == "denied"
    assert "needs every group: finance 1 of 2, security 1 of 1" in (
        engine.authorize(payment(500 * U, agent_id="bot")).reason
    )


def test_a_trees_approval_unites_each_budgets_groups(engine: PolicyEngine) -> None:
    engine.set_policy(
        "fleet",
        {
            "limits": {"daily": {"value": str(10_000 * U)}},
            "approvalConfig": {
                "thresholds": [
                    {"amount": {"value": str(50 * U)}, "requiredApprovers": 1, "approvers": ["cfo"]}
                ]
            },
        },
    )
    engine.set_policy("bot", {**TWO_GROUPS, "parent": "fleet"})  # fmt: skip
    d = engine.authorize(payment(500 * U, agent_id="bot"))
    approval = engine.get_approval(d.approval_id or "")
    assert [(g.name, g.budget) for g in approval.groups] == [
        ("finance", "bot"), ("security", "bot"), ("fleet", "fleet")]  # fmt: skip
    assert approval.required_approvers == 3
    engine.decide(approval.id, "fin1@acme.com", "approve")
    engine.decide(approval.id, "sec@acme.com", "approve")
    assert engine.get_approval(approval.id).status == "pending"  # the fleet's group waits
    assert engine.decide(approval.id, "cfo", "approve").status == "approved"


@pytest.mark.parametrize(
    ("threshold", "path"),
    [
        ({"groups": [{"name": "a", "approvers": ["x"], "required": 1}], "approvers": ["y"]},
         "$.approvalConfig.thresholds[0].approvers"),
        ({"groups": [{"name": "a", "approvers": ["x"], "required": 1}], "requiredApprovers": 1},
         "$.approvalConfig.thresholds[0].requiredApprovers"),
        ({"groups": [{"name": "a", "approvers": ["x"], "required": 1},
                     {"name": "A", "approvers": ["y"], "required": 1}]},
         "$.approvalConfig.thresholds[0].groups[1].name"),
        ({"groups": [{"name": "a", "approvers": ["x"], "required": 1},
                     {"name": "b", "approvers": ["y", "X"], "required": 1}]},
         "$.approvalConfig.thresholds[0].groups[1].approvers"),
        ({"groups": [{"name": "a", "approvers": ["x"], "required": 2}]},
         "$.approvalConfig.thresholds[0].groups[0].required"),
        ({"groups": [{"name": "a", "approvers": [], "required": 1}]},
         "$.approvalConfig.thresholds[0].groups[0].approvers"),
        ({"groups": [{"name": "a", "approvers": ["x", "X"], "required": 1}]},
         "$.approvalConfig.thresholds[0].groups[0].approvers"),
        ({"groups": [{"name": "a", "approvers": ["x"]}]},
         "$.approvalConfig.thresholds[0].groups[0].required"),
        ({"approvers": ["x"]}, "$.approvalConfig.thresholds[0].requiredApprovers"),
        ({}, "$.approvalConfig.thresholds[0].approvers"),
        ({"groups": [{"name": f"g{i}", "approvers": [f"a{i}"], "required": 1}
                     for i in range(17)]}, "$.approvalConfig.thresholds[0].groups"),
    ],
)  # fmt: skip
def test_bad_groups_are_refused_with_their_path(threshold: dict[str, Any], path: str) -> None:
    document = {"approvalConfig": {"thresholds": [{"amount": {"value": "1"}, **threshold}]}}
    with pytest.raises(PolicyValidationError) as info:
        load_policy(document)
    assert path in [p.path for p in info.value.problems], info.value.problems


def test_groups_and_the_flag_round_trip_and_the_flag_is_left_out_when_off() -> None:
    from agentpolicy import dump_policy

    policy = load_policy(TWO_GROUPS)
    dumped = dump_policy(policy)
    threshold = dumped["approvalConfig"]["thresholds"][0]
    assert set(threshold) == {"amount", "groups"}
    assert threshold["groups"][0] == {"name": "finance", "required": 1,
                                      "approvers": ["fin1@acme.com", "fin2@acme.com"]}  # fmt: skip
    assert "requireSignedVotes" not in dumped["approvalConfig"]
    grouped = policy.approval_config.thresholds[0]  # type: ignore[union-attr]
    assert grouped.every_approver == ("fin1@acme.com", "fin2@acme.com", "sec@acme.com")
    assert grouped.approver_keys == frozenset(grouped.every_approver)
    assert load_policy(dumped) == policy
    signed = dump_policy(load_policy(SIGNED_ONLY))
    assert signed["approvalConfig"]["requireSignedVotes"] is True
    assert load_policy(signed) == load_policy(SIGNED_ONLY)


# -- the registry -------------------------------------------------------------------------------------


def test_the_registry_keeps_every_key_version_and_refuses_what_would_blur_identities(
    engine: PolicyEngine, clock: ManualClock
) -> None:
    k1, k2, k3 = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    first = engine.register_approver("Alice", k1.public_key)
    assert (first.name, first.version, first.public_key) == ("Alice", 1, k1.public_key)
    assert engine.register_approver("alice", k1.public_key) == first  # again: no change
    with pytest.raises(ConflictError) as other_key:
        engine.register_approver("alice", k2.public_key)
    assert other_key.value.code == "APPROVER_CONFLICT"
    with pytest.raises(ConflictError) as shared:  # one key never stands for two approvers
        engine.register_approver("bob", k1.public_key)
    assert shared.value.code == "APPROVER_CONFLICT"
    clock.advance(minutes=1)
    engine.rotate_approver("alice", k2.public_key)
    assert engine.rotate_approver("alice", k2.public_key).version == 2  # same key: no change
    clock.advance(minutes=1)
    removed = engine.remove_approver("ALICE")
    assert removed.current is None
    assert engine.remove_approver("alice") == removed
    with pytest.raises(NotFoundError) as gone:
        engine.rotate_approver("alice", k3.public_key)
    assert gone.value.code == "APPROVER_NOT_FOUND"
    with pytest.raises(PolicyValidationError):  # a retired key never verifies again
        engine.register_approver("alice", k2.public_key)
    again = engine.register_approver("alice", k3.public_key)
    assert [(k.version, k.retired_by) for k in again.keys] == [
        (1, "rotation"), (2, "removal"), (3, None)]  # fmt: skip
    assert [k.added_at - first.keys[0].added_at for k in again.keys] == [
        timedelta(0), timedelta(minutes=1), timedelta(minutes=2)]  # fmt: skip
    with pytest.raises(NotFoundError):
        engine.remove_approver("nobody")
    assert [a.name for a in engine.list_approvers()] == ["Alice"]
    assert engine.get_approver("nobody") is None
    with pytest.raises(PolicyValidationError) as bad:
        engine.register_approver("carol", "ssh-ed25519 AAAA")
    assert bad.value.path == "$.publicKey"


def test_the_store_holds_public_keys_only_and_no_link_token(tmp_path: Path) -> None:
    import sqlite3

    url = f"sqlite:///{tmp_path / 'store.db'}"
    hook = [{"url": "http://127.0.0.1:9/hooks", "secret": "hook-secret"}]  # nobody listens
    engine = PolicyEngine(storage=url, clock=ManualClock(), link_secret="s" * 40,
                          webhook_endpoints=hook, webhook_backoff=3600)  # fmt: skip
    key = SigningKey.generate()
    engine.register_approver("alice", key.public_key)
    aid = held(engine, {**SIGNED_ONLY, "approvalConfig": {**SIGNED_ONLY["approvalConfig"],
                                                          "requireSignedVotes": False}})  # fmt: skip
    tokens = [link.token for link in engine.approval_links(aid)]
    assert len(tokens) == 4  # bob and carol, approve and deny (alice signs)
    engine.decide(aid, "alice", "approve", **sign(engine, key, aid, "alice"))
    engine.close()
    with sqlite3.connect(tmp_path / "store.db") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        dump = "\n".join(str(row) for t in tables for row in db.execute(f"SELECT * FROM {t}"))
    assert key.public_key in dump
    assert "approval.created" in dump
    assert "PRIVATE" not in dump
    assert key.pem().decode().splitlines()[1] not in dump
    assert "s" * 40 not in dump
    assert not any(token in dump or token.split(".")[2] in dump for token in tokens)


# -- keys, files and messages -------------------------------------------------------------------------


def test_the_vote_message_is_the_documented_text() -> None:
    from datetime import UTC, datetime

    message = vote_message(store="sto_1", approval_id="apr_1", approver="Admin@Company.com",
                           decision="approve", signed_at=datetime(2026, 1, 19, 10, 30, 0, 900,
                                                                  tzinfo=UTC))  # fmt: skip
    assert message == (
        b"agentpolicy-vote-v1\nstore:sto_1\napproval:apr_1\napprover:admin@company.com\n"
        b"decision:approve\nat:1768818600\ncomment:-"
    )
    with_comment = vote_message(store="s", approval_id="a", approver="b", decision="deny",
                                signed_at=datetime(2026, 1, 19, tzinfo=UTC), comment="ok")  # fmt: skip
    assert with_comment.endswith(
        b"comment:2689367b205c16ce32ed4200942b8b8b1e262dfc70d9bc9fbc77c49699a4f1df"
    )
    key = SigningKey.generate()
    assert verify_vote(key.public_key, message, key.sign(message))
    assert not verify_vote(key.public_key, message + b"!", key.sign(message))
    assert not verify_vote("ed25519:short", message, key.sign(message))


def test_key_files_are_private_never_overwritten_and_openssl_keys_load(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = tmp_path / "alice.key"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SigningKey.load(path).public_key == key.public_key
    assert key.public_key not in repr(SigningKey.load(path).pem())
    assert "PRIVATE" not in repr(key)
    with pytest.raises(PolicyValidationError) as exists:
        SigningKey.generate().save(path)
    assert "never overwritten" in exists.value.message
    path.chmod(0o644)
    with pytest.raises(PolicyValidationError) as open_to_others:
        SigningKey.load(path)
    assert "chmod 600" in open_to_others.value.message
    junk = tmp_path / "junk.key"
    junk.write_text("not a key")
    junk.chmod(0o600)
    with pytest.raises(PolicyValidationError):
        SigningKey.load(junk)
    with pytest.raises(PolicyValidationError):
        SigningKey.load(tmp_path / "missing.key")
    openssl = tmp_path / "openssl.pem"
    done = subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(openssl)],
                          check=False, capture_output=True)  # fmt: skip
    if done.returncode == 0:  # the openssl command is there on most machines
        openssl.chmod(0o600)
        assert SigningKey.load(openssl).public_key.startswith("ed25519:")


def test_a_key_file_that_is_huge_or_not_a_file_is_refused_without_reading_it_all(
    tmp_path: Path,
) -> None:
    huge = tmp_path / "huge.key"
    with huge.open("wb") as out:
        out.truncate(1 << 30)  # 1 GiB, sparse: read whole, it would fill memory
    huge.chmod(0o600)
    with pytest.raises(PolicyValidationError) as too_big:
        SigningKey.load(huge)
    assert "larger than a key file" in too_big.value.message
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo, 0o600)  # opening it would wait for a writer for ever
    with pytest.raises(PolicyValidationError) as not_a_file:
        SigningKey.load(fifo)
    assert "not a regular file" in not_a_file.value.message


def test_without_the_signing_extra_a_signed_vote_names_the_extra_to_install() -> None:
    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] == 'cryptography':
            raise ImportError(name)
sys.meta_path.insert(0, Block())
from agentpolicy import PolicyEngine
from agentpolicy.signing import SigningKey
engine = PolicyEngine()
engine.set_policy('bot', {})
try:
    SigningKey.generate()
except Exception as err:
    print(err.code, err.message)
try:
    engine.register_approver('alice', 'ed25519:0C-hD8UlIHxFv_YmrAoeQGbiWS0W6vRloP32XqLaZfk')
    print('registered')
except Exception as err:
    print('refused', err)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": "src"})  # fmt: skip
    lines = done.stdout.splitlines()
    assert lines[0] == ("EXTRA_NOT_INSTALLED approvers' keys and signed votes need the signing extra: "
                        "pip install 'agentpolicy[signing]'")  # fmt: skip
    assert lines[1] == "registered"  # registering a public key needs no cryptography library


def test_settings_name_the_approver_its_key_file_and_the_link_secret() -> None:
    from agentpolicy.config import read_settings

    settings = read_settings({"AGENT_POLICY_APPROVER": "alice",
                              "AGENT_POLICY_APPROVER_KEY_FILE": "/keys/alice.key",
                              "AGENT_POLICY_LINK_SECRET": "L" * 32})  # fmt: skip
    assert (settings.approver, settings.approver_key_file) == ("alice", "/keys/alice.key")
    assert settings.link_secret == "L" * 32
    assert "L" * 32 not in repr(settings)
    with pytest.raises(PolicyValidationError) as bad:
        read_settings({"AGENT_POLICY_LINK_SECRET": "x", "AGENT_POLICY_APPROVER": " spaced"})
    assert [p.path for p in bad.value.problems] == [
        "$AGENT_POLICY_APPROVER", "$AGENT_POLICY_LINK_SECRET"]  # fmt: skip
    with pytest.raises(PolicyValidationError) as keyless:
        read_settings({"AGENT_POLICY_APPROVER_KEY_FILE": "/k"})
    assert keyless.value.path == "$AGENT_POLICY_APPROVER_KEY_FILE"


def test_bad_vote_input_is_refused_with_its_path_and_changes_nothing(engine: PolicyEngine) -> None:
    from datetime import datetime

    key = SigningKey.generate()
    engine.register_approver("alice", key.public_key)
    aid = held(engine)
    before = state(engine, aid)
    naive = datetime(2026, 1, 19, 10)
    signature = key.sign(b"anything")
    cases = [
        ({"signature": signature}, "$.signedAt"),
        ({"signature": signature, "signed_at": naive}, "$.signedAt"),
        ({"signed_at": engine.clock()}, "$.signedAt"),
        ({"signature": 42, "signed_at": engine.clock()}, "$.signature"),
        ({"signature": "A" * 200, "signed_at": engine.clock()}, "$.signature"),
    ]
    for kwargs, path in cases:
        with pytest.raises(PolicyValidationError) as bad:
            engine.decide(aid, "alice", "approve", **kwargs)
        assert bad.value.path == path, kwargs
    # a signed_at of another type was taken for damaged stored data (STORAGE_UNAVAILABLE)
    for args, path in [(("apr_x", "alice", "maybe", engine.clock()), "$.decision"),
                       (("apr_x", " alice", "approve", engine.clock()), "$.approver"),
                       ((aid, "alice", "approve", "2026-01-19T10:00:00Z"), "$.signedAt"),
                       ((aid, "alice", "approve", naive), "$.signedAt")]:  # fmt: skip
        with pytest.raises(PolicyValidationError) as bad:
            engine.vote_message(*args)
        assert bad.value.path == path
    with pytest.raises(PolicyValidationError) as naive_message:
        vote_message(store="s", approval_id="a", approver="b", decision="approve",
                     signed_at=naive)  # fmt: skip
    assert naive_message.value.path == "$.signedAt"
    for text in (42, "ed25519:" + "A" * 600, "ed25519:AAAA", "rsa:" + "A" * 43):
        with pytest.raises(PolicyValidationError):
            engine.register_approver("bob", text)  # type: ignore[arg-type]
    assert state(engine, aid) == before


def test_approvals_and_links_in_json() -> None:
    from agentpolicy.views import approval_data, approver_data, link_data

    engine = PolicyEngine(clock=ManualClock(), link_secret="k" * 32)
    engine.set_policy("bot", TWO_GROUPS)
    engine.set_policy("bot", {**TWO_GROUPS, "approvalConfig": {
        **TWO_GROUPS["approvalConfig"], "requireSignedVotes": True}})  # fmt: skip
    aid = engine.authorize(payment(500 * U, agent_id="bot"), requested_by="ops").approval_id or ""
    data = approval_data(engine.get_approval(aid))
    assert data["groups"] == [
        {"name": "finance", "required": 1, "approvers": ["fin1@acme.com", "fin2@acme.com"],
         "budget": "bot"},
        {"name": "security", "required": 1, "approvers": ["sec@acme.com"], "budget": "bot"},
    ]  # fmt: skip
    assert (data["requestedBy"], data["requireSignedVotes"]) == ("ops", True)
    assert engine.approval_links(aid) == []  # signed votes only: no links
    engine.set_policy("bot", TWO_GROUPS)
    other = engine.authorize(payment(500 * U, agent_id="bot")).approval_id or ""
    link = engine.approval_links(other)[0]
    assert link_data(link) == {"approvalId": other, "approver": "fin1@acme.com",
                               "decision": "approve", "expiresAt": "2026-01-19T11:00:00Z",
                               "token": link.token}  # fmt: skip
    assert link.token not in repr(link)
    key = SigningKey.generate()
    engine.register_approver("fin1@acme.com", key.public_key)
    shown = approver_data(engine.remove_approver("fin1@acme.com"))
    assert shown == {"name": "fin1@acme.com", "registered": False, "keys": [
        {"version": 1, "publicKey": key.public_key, "addedAt": "2026-01-19T10:00:00Z",
         "retiredAt": "2026-01-19T10:00:00Z", "retiredBy": "removal"}]}  # fmt: skip


def test_the_async_engine_registers_signs_and_redeems_links() -> None:
    import asyncio

    from agentpolicy import AsyncPolicyEngine

    async def main() -> None:
        clock = ManualClock()
        async with AsyncPolicyEngine(clock=clock, link_secret="k" * 32) as aengine:
            key = SigningKey.generate()
            await aengine.register_approver("fin1@acme.com", key.public_key)
            await aengine.set_policy("bot", TWO_GROUPS)
            d = await aengine.authorize(payment(500 * U, agent_id="bot"), requested_by="ops")
            aid = d.approval_id or ""
            at = clock()
            message = await aengine.vote_message(aid, "fin1@acme.com", "approve", at)
            assert message.startswith(
                b"agentpolicy-vote-v1\nstore:" + (await aengine.store_id()).encode()
            )
            signed = await aengine.decide(aid, "fin1@acme.com", "approve",
                                          signature=key.sign(message), signed_at=at)  # fmt: skip
            assert signed.votes[0].via == "signature"
            links = await aengine.approval_links(aid)
            assert {x.approver for x in links} == {"fin2@acme.com", "sec@acme.com"}
            sec = next(x for x in links if (x.approver, x.decision) == ("sec@acme.com", "approve"))
            assert (await aengine.inspect_link(sec.token))[0].approver == "sec@acme.com"
            assert (await aengine.redeem_link(sec.token, approval_id=aid)).status == "approved"
            assert [a.name for a in await aengine.list_approvers()] == ["fin1@acme.com"]
            await aengine.rotate_approver("fin1@acme.com", SigningKey.generate().public_key)
            assert (await aengine.remove_approver("fin1@acme.com")).current is None
            assert (await aengine.get_approver("fin1@acme.com")) is not None

    asyncio.run(main())


def test_a_signed_vote_can_be_verified_again_by_an_audit_from_the_store_alone(
    engine: PolicyEngine, backend: Backend, clock: ManualClock
) -> None:
    alice, later = SigningKey.generate(), SigningKey.generate()
    engine.register_approver("alice", alice.public_key)
    aid = held(engine)
    vote_args = sign(engine, alice, aid, "alice", comment="per invoice 9")
    clock.advance(seconds=40)  # recorded later than it was signed
    engine.decide(aid, "alice", "approve", "per invoice 9", **vote_args)
    engine.rotate_approver(
        "alice", later.public_key
    )  # the audit needs the version it was signed with
    auditor = backend.engine(clock)  # another process, reading the store only
    vote = auditor.get_approval(aid).votes[0]
    assert (vote.signed_at, vote.at - vote.signed_at) == (vote_args["signed_at"],
                                                          timedelta(seconds=40))  # fmt: skip
    key = auditor.get_approver("alice").keys[vote.key_version - 1]  # type: ignore[union-attr,operator]
    message = vote_message(store=auditor.store_id(), approval_id=aid, approver=vote.approver,
                           decision=vote.decision, signed_at=vote.signed_at, comment=vote.comment)  # fmt: skip
    assert verify_vote(key.public_key, message, vote.signature or "")
    assert not verify_vote(later.public_key, message, vote.signature or "")


def test_listing_approvals_without_expiry_leaves_out_those_whose_time_is_up_and_writes_nothing(
    backend: Backend,
) -> None:
    clock = ManualClock()
    engine = backend.engine(clock)
    engine.set_policy("bot", {"approvalConfig": {"timeout": 60_000, "thresholds": [
        {"amount": {"value": "1"}, "requiredApprovers": 1, "approvers": ["a"]}]}})  # fmt: skip
    d = engine.authorize(payment(5, agent_id="bot"))
    assert [a.id for a in engine.list_approvals(expire=False)] == [d.approval_id]
    clock.advance(minutes=2)
    assert engine.list_approvals(expire=False) == []
    assert engine.list_approvals("bot", expire=False) == []
    assert "approval_expired" not in {h.event for h in engine.history("bot", 10)}
    assert engine.list_approvals() == []  # this one expires it
    assert "approval_expired" in {h.event for h in engine.history("bot", 10)}
