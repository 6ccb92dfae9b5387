"""Approvals and approver identity, probed as the governed agent and as a holder of old proofs.

The agent may call every MCP tool of its role; an attacker may hold a signed
vote or a one-time link made earlier. Each test either pins a refusal that
must hold (a replayed or moved proof, a second seat for one person, a vote
that would overspend) or is the regression test of a defect found here.
Every refusal is checked to change nothing (``tests.test_approvers.state``).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agentpolicy import ConflictError, ForbiddenError, PolicyEngine, PolicyValidationError
from agentpolicy._checks import person
from agentpolicy.ledger import approvers as registry
from agentpolicy.mcp import AgentPolicyMcpServer
from agentpolicy.signing import SIGNATURE_WINDOW, SigningKey, vote_message
from agentpolicy.storage import MemoryStorage
from agentpolicy.testing import ManualClock, payment
from tests import workers
from tests.backends import Backend
from tests.receiver import Receiver
from tests.test_approvers import refused, state

U = 1_000_000
SECRET = "the link secret of the approval probe, 40 chars+"

# One name, two spellings that show alike: U+1FFC (capital omega with prosgegrammeni) and a
# combining perispomeni, against U+1FF7 (small omega with perispomeni and ypogegrammeni).
# They are a compatibility caseless match (Unicode D146), but casefold(NFKC(x)) keeps them
# apart ("ωῖ" and "ῶι"): the combining mark ends up on the other letter.
CAPITAL, SMALL = "\u1ffc\u0342", "\u1ff7"
SPELLINGS = [
    (CAPITAL, SMALL),
    (
        "\u039a\u0391\u03aa\u0301\u039a\u0399",
        "\u03ba\u03b1\u0390\u03ba\u03b9",
    ),  # a Greek word, capitals and small
    ("Ops@Acme.com", "ops@acme.com"),
    ("\uff2f\uff30\uff33", "ops"),  # fullwidth OPS
]


def one_threshold(approvers: list[str], required: int = 1, **config: Any) -> dict[str, Any]:
    return {
        "limits": {"daily": {"value": str(1_000 * U)}},
        "approvalConfig": {"timeout": 600_000, **config, "thresholds": [
            {"amount": {"value": str(100 * U)}, "requiredApprovers": required,
             "approvers": approvers}]},
    }  # fmt: skip


def held(engine: PolicyEngine, agent: str = "bot", amount: int = 500, **kwargs: Any) -> str:
    d = engine.authorize(payment(amount * U, agent_id=agent), **kwargs)
    assert d.code == "APPROVAL_REQUIRED", d.code
    assert d.approval_id is not None
    return d.approval_id


def signed(engine: PolicyEngine, key: SigningKey, aid: str, who: str, decision: str = "approve",
           comment: str | None = None) -> dict[str, Any]:  # fmt: skip
    at = engine.clock()
    message = engine.vote_message(aid, who, decision, at, comment)
    return {"signature": key.sign(message), "signed_at": at}


# -- one person, two spellings ---------------------------------------------------------------


@pytest.mark.parametrize(("a", "b"), SPELLINGS)
def test_spellings_of_one_name_are_one_person(a: str, b: str) -> None:
    assert person(a) == person(b)
    assert person(person(a)) == person(a)


@pytest.mark.parametrize(("asked", "votes"), [(CAPITAL, SMALL), (SMALL, CAPITAL)])
def test_the_requester_cannot_approve_under_another_spelling_of_their_name(
    asked: str, votes: str
) -> None:
    # before the fix: "ῼ͂" asked for 500 and approved it alone as "ῷ" (status approved)
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", one_threshold([votes, "cfo"]))
    aid = held(engine, requested_by=asked)
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", lambda: engine.decide(aid, votes, "approve"))
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", lambda: engine.decide(aid, votes, "deny"))
    assert engine.decide(aid, "cfo", "approve").status.value == "approved"


def test_the_agent_cannot_approve_its_own_payment_under_another_spelling_of_its_id() -> None:
    # before the fix: the agent "ῼ͂" was approved by its own vote as "ῷ"
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy(CAPITAL, one_threshold([SMALL, "cfo"]))
    aid = held(engine, agent=CAPITAL)
    before = state(engine, aid, CAPITAL)
    with pytest.raises(ForbiddenError) as info:
        engine.decide(aid, SMALL, "approve")
    assert info.value.code == "APPROVER_NOT_AUTHORIZED"
    assert state(engine, aid, CAPITAL) == before


def test_one_person_cannot_hold_two_seats_of_a_quorum_by_two_spellings() -> None:
    # before the fix: a 2-of-2 quorum listed "ῼ͂" and "ῷ" and one person filled it alone
    with pytest.raises(PolicyValidationError) as info:
        PolicyEngine(clock=ManualClock()).set_policy("bot", one_threshold([CAPITAL, SMALL], 2))
    assert info.value.problems[0].path == "$.policy.approvalConfig.thresholds[0].approvers"
    groups = {"approvalConfig": {"thresholds": [{"amount": {"value": "1"}, "groups": [
        {"name": "finance", "approvers": [CAPITAL], "required": 1},
        {"name": "security", "approvers": [SMALL], "required": 1}]}]}}  # fmt: skip
    with pytest.raises(PolicyValidationError) as info:
        PolicyEngine(clock=ManualClock()).set_policy("bot", groups)
    assert info.value.problems[0].path.endswith(".approvers")


def test_a_second_vote_under_another_spelling_is_a_duplicate() -> None:
    engine = PolicyEngine(clock=ManualClock())
    engine.set_policy("bot", one_threshold([SMALL, "cfo"], 2))
    aid = held(engine)
    engine.decide(aid, CAPITAL, "approve")
    refused(engine, aid, "DUPLICATE_DECISION", lambda: engine.decide(aid, SMALL, "approve"))
    refused(engine, aid, "DUPLICATE_DECISION", lambda: engine.decide(aid, SMALL, "deny"))


def test_a_registered_approver_cannot_vote_unsigned_under_another_spelling(
    backend: Backend,
) -> None:
    # before the fix: "ῼ͂" registered a key, and an unsigned vote as "ῷ" approved (no signature)
    engine = backend.engine(ManualClock())
    key = SigningKey.generate()
    engine.register_approver(CAPITAL, key.public_key)
    engine.set_policy("bot", one_threshold([SMALL]))
    aid = held(engine)
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", lambda: engine.decide(aid, SMALL, "approve"))
    assert engine.get_approver(SMALL) == engine.get_approver(CAPITAL)
    vote = engine.decide(aid, SMALL, "approve", **signed(engine, key, aid, CAPITAL))
    assert (vote.status.value, vote.votes[0].via, vote.votes[0].key_version) == (
        "approved", "signature", 1,
    )  # fmt: skip


def test_a_key_registered_under_one_spelling_is_that_persons_only_key() -> None:
    engine = PolicyEngine(clock=ManualClock())
    key = SigningKey.generate()
    engine.register_approver(CAPITAL, key.public_key)
    assert engine.register_approver(SMALL, key.public_key).name == CAPITAL  # the same: no change
    with pytest.raises(ConflictError) as info:
        engine.register_approver(SMALL, SigningKey.generate().public_key)
    assert info.value.code == "APPROVER_CONFLICT"
    assert [a.name for a in engine.list_approvers()] == [CAPITAL]


def _former_fold(name: str) -> str:
    """How names were folded before they compared in their caseless form."""
    if name.isascii():
        return name.casefold()
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def test_approvers_filed_under_the_former_folding_are_listed_once_each(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An earlier release filed a name holding a character that shows nothing under a folding
    that kept it; list_approvers() read each entry at its name folded again, found nothing
    there (or another approver's entry, listed twice) and left the approver out."""
    engine = backend.engine(ManualClock())
    with monkeypatch.context() as m:
        m.setattr(registry, "person", _former_fold)
        m.setattr(registry, "_former", lambda name: None)
        engine.register_approver("Zoe\u0308\ufe0f", SigningKey.generate().public_key)
        engine.register_approver("cfo\ufe00", SigningKey.generate().public_key)
    engine.register_approver("bob", SigningKey.generate().public_key)
    engine.register_approver("cfo", SigningKey.generate().public_key)
    listed = [a.name for a in engine.list_approvers()]
    assert sorted(listed) == sorted(["Zoe\u0308\ufe0f", "cfo\ufe00", "bob", "cfo"])
    found = engine.get_approver("Zoe\u0308\ufe0f")
    assert found is not None
    assert found in engine.list_approvers()


def test_an_approver_registered_under_the_former_folding_still_must_sign(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a store written before the fix keeps "ῼ͂" under its former folding ("ap/ωῖ"): without
    # looking there, the fix would have made the approver read as unregistered under the very
    # spelling it registered, and its unsigned votes would have counted again
    engine = backend.engine(ManualClock())
    old, new = SigningKey.generate(), SigningKey.generate()
    with monkeypatch.context() as m:
        m.setattr(registry, "person", _former_fold)
        engine.register_approver(CAPITAL, old.public_key)
    engine.set_policy("bot", one_threshold([CAPITAL, "cfo"], 2))
    aid = held(engine)
    found = engine.get_approver(CAPITAL)
    assert found is not None
    assert found.current is not None
    assert found.current.public_key == old.public_key
    assert [a.name for a in engine.list_approvers()] == [CAPITAL]
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", lambda: engine.decide(aid, CAPITAL, "approve"))
    assert engine.register_approver(CAPITAL, old.public_key).keys == found.keys  # no change
    rotated = engine.rotate_approver(CAPITAL, new.public_key)
    assert [(k.version, k.retired_by) for k in rotated.keys] == [(1, "rotation"), (2, None)]
    stale = signed(engine, old, aid, CAPITAL)
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED",
            lambda: engine.decide(aid, CAPITAL, "approve", **stale))  # fmt: skip
    vote = engine.decide(aid, CAPITAL, "approve", **signed(engine, new, aid, CAPITAL))
    assert (vote.votes[0].via, vote.votes[0].key_version) == ("signature", 2)
    removed = engine.remove_approver(CAPITAL)
    assert (removed.current, [a.name for a in engine.list_approvers()]) == (None, [CAPITAL])
    assert engine.get_approver(CAPITAL) == removed
    # registered again, it binds every spelling, and keeps its key versions for the audit
    third = SigningKey.generate()
    again = engine.register_approver(CAPITAL, third.public_key)
    assert [(k.version, k.public_key) for k in again.keys][-1] == (3, third.public_key)
    assert engine.get_approver(SMALL) == again
    assert [a.keys for a in engine.list_approvers()] == [again.keys]
    later = held(engine)
    refused(engine, later, "APPROVER_NOT_AUTHORIZED",
            lambda: engine.decide(later, SMALL, "approve"))  # fmt: skip
    with pytest.raises((ConflictError, PolicyValidationError)):  # a retired key stays retired
        engine.rotate_approver(SMALL, new.public_key)


def test_the_vote_message_names_one_person_whatever_the_spelling() -> None:
    engine = PolicyEngine(clock=ManualClock())
    at = engine.clock()
    aid = "apr_" + "0" * 32 + "_bot"
    assert engine.vote_message(aid, CAPITAL, "approve", at) == engine.vote_message(
        aid, SMALL, "approve", at
    )


# -- replayed and moved proofs ---------------------------------------------------------------


def test_a_signed_vote_replayed_on_another_agents_approval_is_refused(backend: Backend) -> None:
    engine = backend.engine(ManualClock())
    key = SigningKey.generate()
    engine.register_approver("cfo", key.public_key)
    for agent in ("bot", "bot2"):
        engine.set_policy(agent, one_threshold(["cfo"]))
    first, second = held(engine, "bot"), held(engine, "bot2")
    proof = signed(engine, key, first, "cfo")
    before = state(engine, second, "bot2")
    with pytest.raises(ForbiddenError) as info:
        engine.decide(second, "cfo", "approve", **proof)
    assert info.value.code == "APPROVER_NOT_AUTHORIZED"
    assert state(engine, second, "bot2") == before
    assert engine.decide(first, "cfo", "approve", **proof).status.value == "approved"


def test_a_signed_vote_replayed_after_the_approval_was_decided_or_expired_is_refused(
    backend: Backend,
) -> None:
    clock = ManualClock()
    engine = backend.engine(clock)
    keys = {n: SigningKey.generate() for n in ("alice", "bob")}
    for name, key in keys.items():
        engine.register_approver(name, key.public_key)
    engine.set_policy("bot", one_threshold(["alice", "bob"], 2))
    decided = held(engine)
    late = signed(engine, keys["bob"], decided, "bob")  # made while pending, sent after the deny
    engine.decide(
        decided, "alice", "deny", **signed(engine, keys["alice"], decided, "alice", "deny")
    )
    refused(engine, decided, "APPROVAL_NOT_PENDING",
            lambda: engine.decide(decided, "bob", "approve", **late))  # fmt: skip
    # signed one second before the approval's time is up, sent at that instant
    timed = held(engine)
    expires = engine.get_approval(timed).expires_at
    clock.set(expires - timedelta(seconds=1))
    proof = signed(engine, keys["alice"], timed, "alice")
    clock.set(expires)
    with pytest.raises(ConflictError) as info:
        engine.decide(timed, "alice", "approve", **proof)
    assert info.value.code == "APPROVAL_NOT_PENDING"
    after = engine.get_approval(timed)
    assert (after.status.value, after.votes) == ("expired", ())
    assert engine.budget("bot").periods["daily"].reserved.value == 0


def test_a_signature_of_a_key_removed_then_replaced_never_counts_again(backend: Backend) -> None:
    clock = ManualClock()
    engine = backend.engine(clock)
    old, new = SigningKey.generate(), SigningKey.generate()
    engine.register_approver("cfo", old.public_key)
    engine.set_policy("bot", one_threshold(["cfo"]))
    aid = held(engine)
    proof = signed(engine, old, aid, "cfo")
    engine.remove_approver("cfo")
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED",
            lambda: engine.decide(aid, "cfo", "approve", **proof))  # fmt: skip
    engine.register_approver("cfo", new.public_key)
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED",
            lambda: engine.decide(aid, "cfo", "approve", **proof))  # fmt: skip
    with pytest.raises(PolicyValidationError):  # the old key never comes back
        engine.rotate_approver("cfo", old.public_key)
    clock.advance(SIGNATURE_WINDOW)  # exactly at the window's edge the new one still counts
    at = clock() - SIGNATURE_WINDOW
    sig = new.sign(engine.vote_message(aid, "cfo", "approve", at))
    vote = engine.decide(aid, "cfo", "approve", signature=sig, signed_at=at)
    assert (vote.status.value, vote.votes[0].key_version) == ("approved", 2)


def test_a_vote_message_cannot_be_spliced_by_a_line_break_in_a_field() -> None:
    engine = PolicyEngine(clock=ManualClock())
    at = engine.clock()
    aid = "apr_" + "0" * 32 + "_bot"
    for approval_id, approver in ((aid, "cfo\ndecision:approve"), (aid + "\napprover:cfo", "x"),
                                  (aid, "cfo\u2028x"), (aid, "cfo\x85x")):  # fmt: skip
        with pytest.raises(PolicyValidationError):
            engine.vote_message(approval_id, approver, "approve", at)
    lines = engine.vote_message(aid, "cfo", "deny", at, "a\ncomment:-").decode().split("\n")
    assert len(lines) == 7
    assert lines[-1] == "comment:" + hashlib.sha256(b"a\ncomment:-").hexdigest()


# -- one-time links --------------------------------------------------------------------------


def test_a_link_after_a_deny_a_secret_change_or_for_another_approver_is_refused(
    backend: Backend,
) -> None:
    clock = ManualClock()
    engine = backend.engine(clock, link_secret=SECRET)
    engine.set_policy("bot", one_threshold(["alice", "bob", "carol"], 2))
    aid = held(engine)
    links = {(x.approver, x.decision): x.token for x in engine.approval_links(aid)}
    rotated = backend.engine(clock, link_secret=SECRET[::-1])  # another process, new secret
    for token in links.values():
        with pytest.raises(ForbiddenError) as info:
            rotated.redeem_link(token)
        assert info.value.code == "APPROVER_NOT_AUTHORIZED"
    # bob's token with alice's name in the claims, keeping bob's MAC
    head, body, mac = links[("bob", "approve")].split(".")
    claims = json.loads(_unb64(body))
    forged = ".".join((head, _b64(json.dumps({**claims, "v": "alice"}).encode()), mac))
    before = state(engine, aid)
    with pytest.raises(ForbiddenError):
        engine.redeem_link(forged)
    assert state(engine, aid) == before
    engine.redeem_link(links[("carol", "deny")])
    for token in (links[("alice", "approve")], links[("carol", "approve")]):
        before = state(engine, aid)
        with pytest.raises(ConflictError) as conflict:
            engine.redeem_link(token)
        assert conflict.value.code == "APPROVAL_NOT_PENDING"
        assert state(engine, aid) == before


def _b64(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def test_the_created_webhook_carries_no_link_for_a_budget_above_the_agent(
    receiver: Receiver,
) -> None:
    # before the fix: the approval.created webhook carried approve and deny links for "fleet",
    # the budget that delegated the paying one (it asked for the payment: approval_links
    # leaves it out, and so must the webhook)
    engine = PolicyEngine(clock=ManualClock(), link_secret=SECRET,
                          webhook_endpoints=[{"url": receiver.url, "secret": "hook"}])  # fmt: skip
    engine.set_policy("fleet", {"limits": {"daily": {"value": str(10_000 * U)}}})
    engine.delegate("fleet", "bot", one_threshold(["fleet", "cfo", "FLEET-ops"]))
    aid = held(engine)
    assert engine.get_approval(aid).budgets_above == ("fleet",)
    assert engine.flush_webhooks(10)
    (created,) = (json.loads(r.body) for r in receiver.received)
    assert created["event"] == "approval.created"
    assert [x["approver"] for x in created["links"]] == ["cfo", "FLEET-ops"]
    expected = {(x.approver, x.decision): x.token for x in engine.approval_links(aid)}
    assert {(x["approver"], d): x[d] for x in created["links"] for d in ("approve", "deny")} == (
        expected
    )
    engine.close()


def test_the_created_webhook_carries_no_link_for_the_requester_spelled_otherwise(
    receiver: Receiver,
) -> None:
    engine = PolicyEngine(clock=ManualClock(), link_secret=SECRET,
                          webhook_endpoints=[{"url": receiver.url, "secret": "hook"}])  # fmt: skip
    engine.set_policy("bot", one_threshold([SMALL, "cfo"]))
    aid = held(engine, requested_by=CAPITAL)
    assert [x.approver for x in engine.approval_links(aid)] == ["cfo", "cfo"]
    assert engine.flush_webhooks(10)
    (created,) = (json.loads(r.body) for r in receiver.received)
    assert [x["approver"] for x in created["links"]] == ["cfo"]
    engine.close()


# -- the governed agent's own tools ----------------------------------------------------------


def test_an_agent_role_server_can_neither_vote_nor_touch_the_registry() -> None:
    storage = MemoryStorage()
    clock = ManualClock()
    admin = AgentPolicyMcpServer(storage=storage, role="admin", clock=clock)
    agent = AgentPolicyMcpServer(storage=storage, role="agent", clock=clock, agent_id="bot")
    assert admin.call("agent_policy_set", {"agentId": "bot", "policy": one_threshold(["bot-ops"])})[
        "success"
    ]
    pay = {"agentId": "bot", "amount": str(500 * U), "recipient": "0xv", "network": "eip155:8453"}
    aid = agent.call("agent_policy_authorize", pay)["data"]["approvalId"]
    key = SigningKey.generate().public_key
    calls = [
        ("agent_policy_approvals_decide", {"approvalId": aid, "approver": "bot-ops",
                                           "decision": "approve"}),
        ("agent_policy_approvers_register", {"name": "bot-ops", "publicKey": key}),
        ("agent_policy_approvers_rotate", {"name": "bot-ops", "publicKey": key}),
        ("agent_policy_approvers_remove", {"name": "bot-ops"}),
        ("agent_policy_set", {"agentId": "bot", "policy": one_threshold(["x"])}),
    ]  # fmt: skip
    for tool, args in calls:
        answer = agent.call(tool, args)
        assert (answer["success"], answer["error"]["code"]) == (False, "FORBIDDEN"), tool
    got = agent.call("agent_policy_approvals_get", {"approvalId": aid})["data"]
    assert (got["status"], got.get("decisions", [])) == ("pending", [])
    assert "link" not in json.dumps(got)
    assert admin.engine.list_approvers() == []


# -- budgets: an approval never overspends ---------------------------------------------------


def test_approvals_granted_at_once_in_threads_never_spend_past_the_limit(tmp_path: Path) -> None:
    clock = ManualClock(workers.FIXED_NOW)
    url = f"sqlite:///{tmp_path / 'p.db'}"
    engine = PolicyEngine(storage=url, clock=clock)
    engine.set_policy("bot", one_threshold(["alice", "bob"]))
    aids = [held(engine, amount=250) for _ in range(4)]  # 4 x 250 = the daily 1,000
    over = engine.authorize(payment(100 * U, agent_id="bot"))
    assert (over.allowed, over.code) == (False, "DAILY_LIMIT")
    engines = [PolicyEngine(storage=url, clock=clock) for _ in range(4)]
    start = threading.Barrier(8)

    def vote(i: int) -> str:
        start.wait()
        who = "alice" if i % 2 else "bob"
        try:
            return engines[i // 2].decide(aids[i // 2], who, "approve").status.value
        except ConflictError as err:
            return err.code

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(vote, range(8)))
    assert sorted(outcomes) == ["APPROVAL_NOT_PENDING"] * 4 + ["approved"] * 4
    for aid in aids:
        engine.confirm(engine.get_approval(aid).reservation_id or "")
    daily = engine.budget("bot").periods["daily"]
    assert (daily.spent.value, daily.reserved.value, daily.remaining.value) == (1_000 * U, 0, 0)
    assert engine.authorize(payment(1, agent_id="bot")).code == "DAILY_LIMIT"
    for e in (engine, *engines):
        e.close()


def test_an_approve_and_a_deny_racing_in_two_processes_settle_one_way(tmp_path: Path) -> None:
    spec = (f"sqlite:///{tmp_path / 'race.db'}", "")
    engine = workers._engine(spec)
    engine.set_policy("agent-1", one_threshold(["a", "b"]))
    aid = held(engine, agent="agent-1")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        barrier = manager.Barrier(2)
        jobs = [pool.apply_async(_vote_or_code, (spec, aid, who, d, barrier))
                for who, d in (("a", "approve"), ("b", "deny"))]  # fmt: skip
        outcomes = [j.get(60) for j in jobs]
    approval = engine.get_approval(aid)
    assert len(approval.votes) == 1
    reserved = engine.budget("agent-1").periods["daily"].reserved.value
    events = [h.event for h in engine.history("agent-1")]
    if approval.status.value == "approved":
        assert outcomes == ["approved", "APPROVAL_NOT_PENDING"]
        assert (reserved, events.count("approval_approved"), events.count("approval_denied")) == (
            500 * U, 1, 0,
        )  # fmt: skip
    else:
        assert outcomes == ["APPROVAL_NOT_PENDING", "denied"]
        assert (reserved, events.count("approval_approved"), events.count("approval_denied")) == (
            0, 0, 1,
        )  # fmt: skip
    engine.close()


def _vote_or_code(spec: Any, aid: str, who: str, decision: str, barrier: Any) -> str:
    engine = workers._engine(spec)
    barrier.wait()
    try:
        return engine.decide(aid, who, decision).status.value
    except ConflictError as err:
        return err.code
    finally:
        engine.close()


def test_a_pending_approval_keeps_the_version_that_asked_for_it(backend: Backend) -> None:
    """docs/rollout.md: a new version (disabled, stricter, other approvers) decides what comes
    after it; a pending approval keeps its hold, approvers and proof rules, and once approved its
    payment counts, so an operator who means to stop payments denies what is pending."""
    engine = backend.engine(ManualClock())
    engine.set_policy("bot", one_threshold(["alice", "bob"], 2))
    aid = held(engine, amount=600)
    stricter = one_threshold(["carol"], 1, requireSignedVotes=True)
    engine.set_policy("bot", {**stricter, "limits": {"daily": {"value": str(100 * U)}},
                              "enabled": False})  # fmt: skip
    assert engine.authorize(payment(600 * U, agent_id="bot")).code == "POLICY_DISABLED"
    refused(engine, aid, "APPROVER_NOT_AUTHORIZED", lambda: engine.decide(aid, "carol", "approve"))
    engine.decide(aid, "alice", "approve")  # unsigned, as version 1 allowed
    approval = engine.decide(aid, "bob", "approve")
    assert (approval.status.value, approval.policy_version) == ("approved", 1)
    engine.confirm(approval.reservation_id or "")
    assert engine.budget("bot").periods["daily"].spent.value == 600 * U
    # and the way to stop one: a deny by one of its own approvers gives the hold back
    engine.set_policy("bot", one_threshold(["alice", "bob"], 2))
    stopped = held(engine, amount=300)
    engine.set_policy("bot", {**one_threshold(["alice", "bob"], 2), "enabled": False})
    assert engine.decide(stopped, "bob", "deny").status.value == "denied"
    assert engine.budget("bot").periods["daily"].reserved.value == 0


def test_a_signed_vote_whose_comment_utf8_cannot_encode_is_invalid_input(
    backend: Backend,
) -> None:
    # before the fix: STORAGE_UNAVAILABLE, "the stored data of shard '@approvers' cannot be read
    # (UnicodeEncodeError ...)", for a comment holding a lone surrogate (JSON "\ud800"): the
    # store was fine, the comment has no UTF-8 bytes to hash into the signed text
    engine = backend.engine(ManualClock())
    key = SigningKey.generate()
    engine.register_approver("cfo", key.public_key)
    engine.set_policy("bot", one_threshold(["cfo"]))
    aid = held(engine)
    at = engine.clock()
    for bad in ("\ud800", "ok \udfff"):
        with pytest.raises(PolicyValidationError) as info:
            engine.vote_message(aid, "cfo", "approve", at, bad)
        assert info.value.problems[0].path == "$.comment"
        with pytest.raises(PolicyValidationError) as info:
            vote_message(store="sto_x", approval_id=aid, approver="cfo", decision="approve",
                         signed_at=at, comment=bad)  # fmt: skip
        assert info.value.problems[0].path == "$.comment"
        before = state(engine, aid)
        with pytest.raises(PolicyValidationError) as info:
            engine.decide(aid, "cfo", "approve", bad, signature=key.sign(b"x"), signed_at=at)
        assert (info.value.code, info.value.problems[0].path) == ("INVALID_INPUT", "$.comment")
        assert state(engine, aid) == before
    assert engine.decide(aid, "cfo", "approve", "fine", **signed(engine, key, aid, "cfo",
                                                                  comment="fine")).status.value == (
        "approved"
    )  # fmt: skip


def test_a_name_whose_entry_an_earlier_release_gave_another_person_is_never_that_person(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an earlier release filed "ῼ͂" under its former folding "ap/ωῖ", which is where "ωῖ"
    # (omega, iota with perispomeni: another person now) is filed: "ωῖ" read as "ῼ͂", could
    # not register, and a signature with "ῼ͂"'s key counted as a vote of "ωῖ"
    other = "\u03c9\u1fd6"
    engine = backend.engine(ManualClock())
    key = SigningKey.generate()
    with monkeypatch.context() as m:
        m.setattr(registry, "person", _former_fold)
        engine.register_approver(CAPITAL, key.public_key)
    engine.set_policy("bot", one_threshold([CAPITAL, other, "cfo"], 2))
    aid = held(engine)
    for call in (lambda: engine.get_approver(other),
                 lambda: engine.register_approver(other, SigningKey.generate().public_key),
                 lambda: engine.decide(aid, other, "approve", **signed(engine, key, aid, other))):  # fmt: skip
        with pytest.raises(ConflictError) as err:
            call()
        assert err.value.code == "APPROVER_CONFLICT"
    assert engine.get_approval(aid).votes == ()
    found = engine.get_approver(CAPITAL)  # the entry's own approver is as it was
    assert found is not None
    assert found.current is not None
    assert found.current.public_key == key.public_key
