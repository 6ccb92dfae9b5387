"""The token store of agentpolicy serve: hashed tokens, bindings, expiry, revocation, sessions."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

import pytest

from agentpolicy import PolicyValidationError
from agentpolicy.serve.tokens import SHARD, TokenRejected, TokenStore
from agentpolicy.storage import MemoryStorage
from agentpolicy.testing import ManualClock
from tests.backends import Backend


def _everything(storage: MemoryStorage) -> str:
    """Every document of the tokens' shard, as text (to look for secrets in it)."""
    with storage.session(SHARD, write=False) as session:
        names = [m for m, _ in session.scan("tokx", 2**62, 1000)]
        docs = session.get([f"tok/{n}" for n in names] + ["csrf"])
    return json.dumps(docs)


def test_a_token_works_on_every_store_and_the_store_keeps_only_its_hash(backend: Backend) -> None:
    clock = ManualClock()
    store = TokenStore(backend.handle(), clock)
    token, secret = store.create("agent", agent_id="agent-123", label="the crawler")
    assert secret.startswith(f"apt_{token.id}_")
    assert len(secret) == 4 + 16 + 1 + 43
    other = TokenStore(backend.handle(), clock)  # another handle (another process) sees it
    assert other.verify(secret) == token
    assert (token.role, token.agent_id, token.label) == ("agent", "agent-123", "the crawler")
    with other.storage.session(SHARD, write=False) as session:
        (_version, doc) = session.get([f"tok/{token.id}"])[f"tok/{token.id}"]
    assert secret not in json.dumps(doc)
    assert doc["h"] == hashlib.sha256(secret.encode()).hexdigest()


def test_wrong_malformed_revoked_and_expired_tokens_are_refused() -> None:
    clock = ManualClock()
    store = TokenStore(MemoryStorage(), clock)
    token, secret = store.create("admin", expires_at=clock() + timedelta(hours=1))
    reasons = {}
    for name, presented in (
        ("missing", ""),
        ("malformed", "Bearer " + secret),
        ("unknown", secret[:-1] + ("A" if secret[-1] != "A" else "B")),
        ("unknown-id", f"apt_{'0' * 16}_{secret.split('_', 2)[2]}"),
    ):
        with pytest.raises(TokenRejected) as refused:
            store.verify(presented)
        reasons[name] = refused.value.reason
    assert reasons == {"missing": "missing", "malformed": "malformed", "unknown": "unknown",
                       "unknown-id": "unknown"}  # fmt: skip
    assert store.verify(secret).id == token.id
    clock.advance(hours=1)
    with pytest.raises(TokenRejected) as refused:
        store.verify(secret)
    assert refused.value.reason == "expired"
    second, again = store.create("agent", org_id="acme")
    assert store.revoke(second.id).revoked_at == clock()
    assert store.revoke(second.id).revoked_at == clock()  # again: no change
    with pytest.raises(TokenRejected) as refused:
        store.verify(again)
    assert refused.value.reason == "revoked"


@pytest.mark.parametrize(
    ("role", "binding", "path"),
    [
        ("agent", {}, "$.agentId"),
        ("agent", {"agent_id": "a", "org_id": "o"}, "$.agentId"),
        ("agent", {"agent_id": "a", "approver": "alice"}, "$.approver"),
        ("approver", {}, "$.approver"),
        ("admin", {"agent_id": "a"}, "$.agentId"),
        ("metrics", {"org_id": "o"}, "$.role"),
        ("root", {}, "$.role"),
        ("agent", {"agent_id": " padded"}, "$.agentId"),
        ("admin", {"label": "x" * 201}, "$.label"),
    ],
)
def test_bindings_a_role_does_not_take_are_refused_and_nothing_is_stored(
    role: str, binding: dict[str, str], path: str
) -> None:
    storage = MemoryStorage()
    store = TokenStore(storage, ManualClock())
    with pytest.raises(PolicyValidationError) as refused:
        store.create(role, **binding)  # type: ignore[arg-type]
    assert path in [p.path for p in refused.value.problems]
    assert store.list_tokens(include_inactive=True) == []


def test_an_expiry_in_the_past_is_refused() -> None:
    clock = ManualClock()
    store = TokenStore(MemoryStorage(), clock)
    with pytest.raises(PolicyValidationError) as refused:
        store.create("admin", expires_at=clock())
    assert refused.value.problems[0].path == "$.expiresAt"


def test_list_shows_active_tokens_and_with_all_the_others_too() -> None:
    clock = ManualClock()
    store = TokenStore(MemoryStorage(), clock)
    a, _ = store.create("admin")
    clock.advance(seconds=1)
    b, _ = store.create("metrics", expires_at=clock() + timedelta(minutes=5))
    clock.advance(seconds=1)
    c, _ = store.create("approver", approver="alice")
    store.revoke(c.id)
    clock.advance(minutes=5)
    assert [t.id for t in store.list_tokens()] == [a.id]
    assert [(t.id, t.status(clock())) for t in store.list_tokens(include_inactive=True)] == [
        (a.id, "active"), (b.id, "expired"), (c.id, "revoked")]  # fmt: skip
    with pytest.raises(PolicyValidationError):
        store.revoke("0123456789abcdef")


def test_a_session_checks_its_token_again_and_ends() -> None:
    clock = ManualClock()
    storage = MemoryStorage()
    store = TokenStore(storage, clock)
    token, _ = store.create("approver", approver="alice", expires_at=clock() + timedelta(hours=2))
    secret, opened = store.open_session(token, timedelta(hours=12))
    assert opened.expires_at == clock() + timedelta(hours=2)  # never past the token's expiry
    assert store.session(secret).token == token
    assert secret not in _everything(storage)
    clock.advance(hours=2)
    with pytest.raises(TokenRejected):
        store.session(secret)
    other, _ = store.create("admin")
    secret, _ = store.open_session(other, timedelta(hours=1))
    store.revoke(other.id)  # revoking the token ends its sessions
    with pytest.raises(TokenRejected) as refused:
        store.session(secret)
    assert refused.value.reason == "revoked"
    third, _ = store.create("admin")
    secret, _ = store.open_session(third, timedelta(hours=1))
    store.close_session(secret)
    with pytest.raises(TokenRejected) as refused:
        store.session(secret)
    assert refused.value.reason == "unknown"
    for bad in ("", "x" * 65, "not a session"):
        with pytest.raises(TokenRejected):
            store.session(bad)


def test_the_csrf_key_is_made_once_and_shared() -> None:
    storage = MemoryStorage()
    a = TokenStore(storage, ManualClock()).csrf_key()
    assert len(a) == 32
    assert TokenStore(storage, ManualClock()).csrf_key() == a
