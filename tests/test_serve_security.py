"""``agentpolicy serve`` attacked from the point of view of the governed agent.

The agent can reach every endpoint and put any text into its payment
requests; it wants an approval granted, or its budget raised, without a
real approver, or to see or hold more than its token allows.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

import agentpolicy.serve.service as service_module
import agentpolicy.serve.tokens as tokens_module
from agentpolicy import PaymentRequest, PolicyEngine
from agentpolicy.errors import (
    ConflictError,
    ErrorCode,
    ForbiddenError,
    NotFoundError,
    PolicyError,
)
from agentpolicy.serve.app import CSP, create_app
from agentpolicy.serve.command import redact_links
from agentpolicy.serve.service import ServeOptions, b64, vote_binding
from agentpolicy.serve.tokens import TokenStore, token_hash
from agentpolicy.testing import ManualClock

LINK_SECRET = "a test link secret of at least 32 characters!"
BASE = "http://127.0.0.1"
MCP_HEADERS = {"Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2025-06-18"}  # fmt: skip


def _policy(*approvers: str, required: int = 1) -> dict[str, Any]:
    return {"limits": {"daily": {"value": "1000000000"}},
            "approvalConfig": {"thresholds": [{"amount": {"value": "100000000"},
                                               "requiredApprovers": required,
                                               "approvers": list(approvers)}]}}  # fmt: skip


@dataclass
class Env:
    engine: PolicyEngine
    clock: ManualClock
    app: Starlette
    tokens: TokenStore

    def token(self, role: str, **binding: Any) -> str:
        return self.tokens.create(role, **binding)[1]

    def browser(self) -> TestClient:
        """A client without the lifespan (the pages need none): one browser."""
        return TestClient(self.app, base_url=BASE, follow_redirects=False,
                          raise_server_exceptions=False)  # fmt: skip

    def signed_in(self, token: str) -> TestClient:
        b = self.browser()
        form = b.get("/signin")
        answer = b.post("/signin", data={"token": token, "csrf": _value(form.text, "csrf"),
                                         "next": "/approvals"})  # fmt: skip
        assert answer.status_code == 303
        return b

    def pending(self, agent: str = "bot", amount: str = "200000000", **fields: Any) -> str:
        d = self.engine.authorize(PaymentRequest(agent, amount, fields.pop("recipient", "0xv"),
                                                 "eip155:8453", **fields))  # fmt: skip
        assert d.approval_id is not None
        return d.approval_id

    def status(self, approval_id: str) -> str:
        return self.engine.get_approval(approval_id).status.value

    def forged_csrf(self, browser: TestClient, approval_id: str) -> str:
        """The CSRF token a vote form for this session and approval carries (as if it had one)."""
        secret = browser.cookies.get("agentpolicy_session")
        assert secret
        binding = vote_binding(token_hash(secret), approval_id)
        return b64(hmac.new(self.tokens.csrf_key(), binding.encode(), hashlib.sha256).digest())

    def forged_vote(self, browser: TestClient, approval_id: str) -> Any:
        """An approve vote from ``browser``, with the CSRF token its form would carry."""
        return browser.post("/approvals/vote", data={
            "approval": approval_id, "decision": "approve",
            "csrf": self.forged_csrf(browser, approval_id)})  # fmt: skip


def _value(page: str, name: str, after: str = "") -> str:
    match = re.search(rf'name="{name}" value="([^"]+)"', page[page.find(after) :])
    assert match is not None, f"no {name} in the page"
    return html.unescape(match.group(1))


def _make_env(options: ServeOptions | None = None) -> Env:
    clock = ManualClock()
    engine = PolicyEngine(clock=clock, link_secret=LINK_SECRET)
    engine.set_policy("bot", _policy("alice"))
    engine.set_policy("pair", _policy("alice", "bob", required=2))
    engine.set_policy("bobs", _policy("bob"))
    engine.set_policy("acme:bot", _policy("alice"))
    app = create_app(engine, options or ServeOptions(sweep_seconds=3600.0))
    return Env(engine, clock, app, TokenStore(engine.storage, engine.clock))


@pytest.fixture
def env() -> Iterator[Env]:
    e = _make_env()
    try:
        yield e
    finally:
        e.engine.close()


@pytest.fixture
def served(env: Env) -> Iterator[TestClient]:
    """A client with the app's lifespan running (``/mcp`` needs its transport)."""
    with TestClient(env.app, base_url=BASE, follow_redirects=False,
                    raise_server_exceptions=False) as client:  # fmt: skip
        yield client


def _mcp_call(client: TestClient, token: str, name: str, args: dict[str, Any]) -> Any:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": name, "arguments": args}}  # fmt: skip
    return client.post(
        "/mcp", json=body, headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"}
    )


# -- voting: who may vote ----------------------------------------------------------------------


def test_no_sign_in_and_bearer_headers_never_vote(env: Env) -> None:
    approval = env.pending()
    alice = env.token("approver", approver="alice")
    admin = env.token("admin", approver="alice")
    b = env.browser()
    form = {"approval": approval, "decision": "approve", "csrf": "x"}
    assert b.post("/approvals/vote", data=form).status_code == 401
    for bearer in (alice, admin):  # a script's bearer header is for reading pages, not voting
        r = b.post("/approvals/vote", data=form, headers={"Authorization": f"Bearer {bearer}"})
        assert r.status_code == 401
    assert env.status(approval) == "pending"


def test_the_agents_own_token_cannot_vote_even_with_a_valid_form(env: Env) -> None:
    approval = env.pending()
    agent = env.token("agent", agent_id="bot")
    b = env.signed_in(agent)
    assert b.get("/approvals").status_code == 403  # an agent token sees no approvals
    assert b.get(f"/approvals/{approval}").status_code == 403
    r = env.forged_vote(b, approval)
    assert r.status_code == 403
    assert "votes as no approver" in r.text
    assert env.status(approval) == "pending"
    # an org-wide agent token is no approver either
    org_agent = env.signed_in(env.token("agent", org_id="acme"))
    mine = env.pending("acme:bot")
    r = env.forged_vote(org_agent, mine)
    assert r.status_code == 403
    assert env.status(mine) == "pending"


def test_an_admin_without_an_approver_name_cannot_vote(env: Env) -> None:
    approval = env.pending()
    b = env.signed_in(env.token("admin"))
    page = b.get(f"/approvals/{approval}")
    assert page.status_code == 200
    assert 'value="approve"' not in page.text
    r = env.forged_vote(b, approval)
    assert r.status_code == 403
    assert env.status(approval) == "pending"


def test_revoked_or_expired_tokens_end_their_sessions_votes(env: Env) -> None:
    approval = env.pending()
    record, alice = env.tokens.create("approver", approver="alice")
    b = env.signed_in(alice)
    page = b.get("/approvals")
    csrf = _value(page.text, "csrf", after=f'name="approval" value="{approval}"')
    env.tokens.revoke(record.id)
    r = b.post("/approvals/vote", data={"approval": approval, "decision": "approve", "csrf": csrf})
    assert r.status_code == 401
    assert env.status(approval) == "pending"
    short = env.token("approver", approver="alice", expires_at=env.clock() + timedelta(minutes=5))
    b2 = env.signed_in(short)
    csrf = _value(b2.get("/approvals").text, "csrf", after=f'name="approval" value="{approval}"')
    env.clock.advance(minutes=5)
    r = b2.post("/approvals/vote", data={"approval": approval, "decision": "approve", "csrf": csrf})
    assert r.status_code == 401
    assert env.status(approval) == "pending"


def test_an_approver_not_named_cannot_vote_even_with_a_valid_form_token(env: Env) -> None:
    approval = env.pending("bobs")  # needs bob
    carol = env.signed_in(env.token("approver", approver="carol"))
    alice = env.signed_in(env.token("approver", approver="alice"))
    for b, who in ((carol, "carol"), (alice, "alice")):
        assert approval not in b.get("/approvals").text
        r = env.forged_vote(b, approval)
        assert r.status_code == 403, who
        assert "APPROVER_NOT_AUTHORIZED" in r.text
    assert env.status(approval) == "pending"
    assert env.engine.get_approval(approval).votes == ()


def test_an_approver_votes_once_only(env: Env) -> None:
    approval = env.pending("pair")  # needs alice and bob
    b = env.signed_in(env.token("approver", approver="alice"))
    csrf = _value(b.get("/approvals").text, "csrf", after=f'name="approval" value="{approval}"')
    form = {"approval": approval, "decision": "approve", "csrf": csrf}
    assert b.post("/approvals/vote", data=form).status_code == 200
    again = b.post("/approvals/vote", data=form)
    assert again.status_code == 409
    assert "Nothing was changed" in again.text
    # a second token for the same approver is the same person: still one vote
    b2 = env.signed_in(env.token("approver", approver="ALICE"))
    r = b2.post("/approvals/vote", data={**form, "csrf": env.forged_csrf(b2, approval)})
    assert r.status_code == 409
    found = env.engine.get_approval(approval)
    assert found.status.value == "pending"
    assert [v.approver for v in found.votes] == ["alice"]


def test_an_org_bound_approver_cannot_vote_on_another_orgs_approval(env: Env) -> None:
    approval = env.pending("bot")  # names alice, but bot is not acme's
    b = env.signed_in(env.token("approver", approver="alice", org_id="acme"))
    assert approval not in b.get("/approvals").text
    assert b.get(f"/approvals/{approval}").status_code == 404
    r = env.forged_vote(b, approval)
    assert r.status_code == 404
    assert env.status(approval) == "pending"


def test_a_vote_must_be_signed_when_the_approval_requires_it(env: Env) -> None:
    policy = _policy("alice")
    policy["approvalConfig"]["requireSignedVotes"] = True
    env.engine.set_policy("strict", policy)
    approval = env.pending("strict")
    b = env.signed_in(env.token("approver", approver="alice"))
    page = b.get("/approvals")
    assert approval in page.text
    assert 'value="approve"' not in page.text  # the command to run instead
    r = env.forged_vote(b, approval)
    assert r.status_code in (403, 409)
    assert env.status(approval) == "pending"


# -- CSRF, cookies, methods -------------------------------------------------------------------


def test_the_vote_form_refuses_cross_site_posts_and_foreign_tokens(env: Env) -> None:
    approval = env.pending()
    other = env.pending()
    b = env.signed_in(env.token("approver", approver="alice"))
    page = b.get("/approvals").text
    csrf = _value(page, "csrf", after=f'name="approval" value="{approval}"')
    signout = _value(page, "csrf")  # the header's sign-out form comes first
    assert signout != csrf
    mallory = env.signed_in(env.token("approver", approver="alice"))
    theirs = env.forged_csrf(mallory, approval)  # valid, but for another session
    form = {"approval": approval, "decision": "approve"}
    refused = [
        ({**form, "csrf": csrf}, {"Origin": "https://evil.example"}),
        ({**form, "csrf": csrf}, {"Origin": "null"}),
        ({**form, "csrf": csrf}, {"Origin": "http://127.0.0.1.evil.example"}),
        ({**form, "csrf": csrf}, {"Sec-Fetch-Site": "cross-site"}),
        ({**form, "csrf": csrf}, {"Sec-Fetch-Site": "same-site"}),
        (form, {}),
        ({**form, "csrf": ""}, {}),
        ({**form, "csrf": "\u00e9"}, {}),  # not ASCII: compare_digest raised, a 500 and a traceback
        ({**form, "csrf": csrf[:-1] + "\u00e9"}, {}),
        ({**form, "csrf": signout}, {}),
        ({**form, "csrf": theirs}, {}),
        ({**form, "approval": other, "csrf": csrf}, {}),
    ]
    for data, headers in refused:
        assert b.post("/approvals/vote", data=data, headers=headers).status_code == 403, headers
    assert env.status(approval) == env.status(other) == "pending"
    ok = b.post("/approvals/vote", data={**form, "csrf": csrf},
                headers={"Origin": BASE, "Sec-Fetch-Site": "same-origin"})  # fmt: skip
    assert ok.status_code == 200
    assert env.status(approval) == "approved"
    assert env.status(other) == "pending"


def test_sign_in_needs_its_nonce_and_sign_out_needs_its_form(env: Env) -> None:
    alice = env.token("approver", approver="alice")
    b = env.browser()
    # no nonce cookie (a cross-site form cannot carry the SameSite=Strict one): refused
    assert b.post("/signin", data={"token": alice, "csrf": "x"}).status_code == 403
    form = b.get("/signin")
    csrf = _value(form.text, "csrf")
    for odd in ("\u00e9", "%FF"):  # with the nonce cookie, anyone could have a 500 so
        assert b.post("/signin", data={"token": alice, "csrf": odd}).status_code == 403
    r = b.post("/signin", data={"token": alice, "csrf": csrf},
               headers={"Origin": "https://evil.example"})  # fmt: skip
    assert r.status_code == 403
    assert "agentpolicy_session" not in b.cookies
    assert b.post("/signin", data={"token": alice, "csrf": csrf}).status_code == 303
    # a cross-site sign-out (without the header form's token) does not end the session
    assert b.post("/signout", data={}).status_code == 403
    assert b.post("/signout", data={"csrf": "\u00e9"}).status_code == 403
    assert b.get("/approvals").status_code == 200


def test_cookies_are_httponly_samesite_strict_and_host_prefixed_over_tls() -> None:
    for options, name, secure in (
        (ServeOptions(sweep_seconds=3600.0), "agentpolicy_session", False),
        (ServeOptions(sweep_seconds=3600.0, secure_cookies=True, loopback_hosts=False),
         "__Host-agentpolicy_session", True),
    ):  # fmt: skip
        e = _make_env(options)
        try:
            b = TestClient(e.app, base_url="https://approvals.example" if secure else BASE,
                           follow_redirects=False)  # fmt: skip
            form = b.get("/signin")
            nonce = form.headers["set-cookie"].lower()
            answer = b.post("/signin", data={"token": e.token("approver", approver="alice"),
                                             "csrf": _value(form.text, "csrf")})  # fmt: skip
            assert answer.status_code == 303
            cookies = answer.headers.get_list("set-cookie")
            session = next(c for c in cookies if c.startswith(name + "="))
            for cookie in (session.lower(), nonce):
                assert "httponly" in cookie
                assert "samesite=strict" in cookie
                assert "path=/" in cookie
                assert ("secure" in cookie.split("; ")) is secure
                assert "domain=" not in cookie
        finally:
            e.engine.close()


def test_a_get_never_votes(env: Env) -> None:
    approval = env.pending()
    link = next(x.token for x in env.engine.approval_links(approval) if x.decision == "approve")
    b = env.browser()
    r = b.get("/approvals/vote", params={"approval": approval, "t": link, "decision": "approve"})
    assert r.status_code in (403, 405)  # the page route answers: a link for another approval
    assert b.get("/approvals/link", params={"t": link}).status_code == 200
    assert (
        b.get(f"/approvals/{approval}", params={"t": link, "decision": "approve"}).status_code
        == 200
    )
    assert env.status(approval) == "pending"


def test_vote_content_type_confusion_changes_nothing(env: Env) -> None:
    approval = env.pending()
    b = env.signed_in(env.token("approver", approver="alice"))
    csrf = _value(b.get("/approvals").text, "csrf", after=f'name="approval" value="{approval}"')
    fields = {"approval": approval, "decision": "approve", "csrf": csrf}
    assert b.post("/approvals/vote", json=fields).status_code == 400
    r = b.post("/approvals/vote", content="&".join(f"{k}={v}" for k, v in fields.items()),
               headers={"Content-Type": "text/plain"})  # fmt: skip
    assert r.status_code == 400
    r = b.post("/approvals/vote", data={**fields, "decision": "APPROVE"})
    assert r.status_code == 400
    assert env.status(approval) == "pending"


# -- one-time links -----------------------------------------------------------------------------


def test_a_link_votes_only_on_its_own_approval_and_an_altered_one_is_refused(env: Env) -> None:
    mine = env.pending()
    other = env.pending()
    link = next(x.token for x in env.engine.approval_links(mine) if x.decision == "approve")
    b = env.browser()
    csrf = _value(b.get("/approvals/link", params={"t": link}).text, "csrf")
    r = b.post("/approvals/vote", data={"approval": other, "t": link, "csrf": csrf,
                                        "decision": "approve"})  # fmt: skip
    assert r.status_code == 403
    assert b.get(f"/approvals/{other}", params={"t": link}).status_code == 403
    altered = link[:-2] + ("AA" if not link.endswith("AA") else "BB")
    assert b.get("/approvals/link", params={"t": altered}).status_code == 403
    alt_csrf = b64(hmac.new(env.tokens.csrf_key(), ("l:" + token_hash(altered)).encode(),
                            hashlib.sha256).digest())  # fmt: skip
    r = b.post("/approvals/vote", data={"approval": mine, "t": altered, "csrf": alt_csrf,
                                        "decision": "approve"})  # fmt: skip
    assert r.status_code in (403, 409)
    assert link not in r.text
    assert altered not in r.text
    assert env.status(mine) == env.status(other) == "pending"


def test_link_tokens_stay_out_of_logs_referers_and_caches(env: Env) -> None:
    approval = env.pending()
    link = next(x.token for x in env.engine.approval_links(approval) if x.decision == "approve")
    page = env.browser().get(f"/approvals/{approval}", params={"t": link})
    assert page.status_code == 200
    assert page.headers.get_list("referrer-policy") == ["origin"]
    assert '<meta name="referrer" content="origin">' in page.text
    assert page.headers["cache-control"] == "no-store"
    # a page refusing the link (another approval's id), and the sign-in page a signed-out
    # /approvals?t= goes to (the token in its next=): their style and script fetches sent the
    # whole URL, the valid token in it, as the Referer (Referrer-Policy and meta same-origin)
    other = env.pending()
    b = env.browser()
    refused = b.get(f"/approvals/{other}", params={"t": link})
    went = b.get("/approvals", params={"t": link}, headers={"Accept": "text/html"})
    signin = b.get(went.headers["location"])
    for answer in (refused, went, signin):
        assert answer.headers.get_list("referrer-policy") == ["origin"], answer.url
        assert '<meta name="referrer"' not in answer.text  # no meta to override the header
    assert link in str(signin.url)
    plain = b.get("/signin")  # no query: nothing to hide from its own origin
    assert plain.headers.get_list("referrer-policy") == ["same-origin"]
    assert '<meta name="referrer"' not in plain.text
    line = f'127.0.0.1:5000 - "GET /approvals/{approval}?x=1&t={link}&y=2 HTTP/1.1" 200'
    assert link not in redact_links(line)
    assert "t=***&y=2" in redact_links(line)
    assert link not in redact_links(f"GET /approvals/link?t={link} HTTP/1.1")


def test_tokens_are_not_echoed_in_error_bodies_and_are_checked_in_constant_time(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append("compare")
        return real(a, b)

    monkeypatch.setattr(tokens_module.hmac, "compare_digest", spy)
    monkeypatch.setattr(service_module.hmac, "compare_digest", spy)
    good = env.token("approver", approver="alice")
    wrong = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    b = env.browser()
    r = b.get("/approvals", headers={"Authorization": f"Bearer {wrong}", "Accept": "text/html"})
    assert r.status_code == 401
    assert calls  # the hash comparison went through hmac.compare_digest
    assert r.json() == {
        "error": {
            "code": "UNAUTHORIZED",
            "message": "the token is not valid (unknown, revoked or expired)",
        }
    }
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert wrong not in r.text
    form = b.get("/signin")
    calls.clear()
    r = b.post("/signin", data={"token": wrong, "csrf": _value(form.text, "csrf")})
    assert r.status_code == 401
    assert len(calls) == 2  # the form's CSRF token, then the token's hash
    assert wrong not in r.text
    assert "Traceback" not in r.text


# -- injection through what the agent writes --------------------------------------------------

XSS = '"><script>alert(1)</script><img src=x onerror=alert(2)>'


def test_agent_text_is_escaped_on_every_page(env: Env) -> None:
    nasty = "acme:" + XSS.replace(" ", "_")  # an identifier: printable, no surrounding space
    env.engine.set_policy(nasty, _policy("alice"))
    approval = env.pending(nasty, recipient="0x" + XSS.replace(" ", "_"),
                           category="c" + XSS.replace(" ", "_"), memo=XSS + "\u202e evil")  # fmt: skip
    link = next(x.token for x in env.engine.approval_links(approval) if x.decision == "approve")
    admin = env.signed_in(env.token("admin", approver="alice"))
    agent = env.token("agent", org_id="acme")
    pages = [
        admin.get("/approvals"),
        admin.get("/approvals", params={"fragment": "1"}),
        admin.get(f"/approvals/{approval}"),
        admin.get("/agents"),
        admin.get("/agents/" + re.sub("[^A-Za-z0-9]", lambda m: f"%{ord(m[0]):02X}", nasty)),
        env.browser().get("/approvals/link", params={"t": link}),
        env.browser().get("/agents", headers={"Authorization": f"Bearer {agent}"}),
    ]
    csrf = _value(pages[2].text, "csrf", after='name="approval"')
    pages.append(admin.post("/approvals/vote", data={"approval": approval, "csrf": csrf,
                                                     "decision": "approve", "comment": XSS}))  # fmt: skip
    for page in pages:
        assert page.status_code == 200, page.request.url
        assert "<script>alert" not in page.text
        assert "<img src=x" not in page.text
        assert '"><script' not in page.text
        if page.headers["content-type"].startswith("text/html") and "fragment" not in str(
            page.request.url
        ):
            assert page.headers["content-security-policy"] == CSP
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[2].text
    # the agent link is percent-encoded: it cannot leave the path or become javascript:
    assert re.search(r'href="/agents/acme%3A%22%3E%3Cscript', pages[2].text)
    assert env.status(approval) == "approved"


def test_odd_approval_ids_in_urls_are_escaped_404s(env: Env) -> None:
    b = env.signed_in(env.token("admin"))
    for odd in ("%3Cscript%3Ealert(1)%3C%2Fscript%3E", "..%2F..%2Fagents%2Fbot",
                "apr_" + "0" * 32 + "_bot", "%22onmouseover=alert(1)"):  # fmt: skip
        r = b.get("/approvals/" + odd)
        assert r.status_code == 404, odd
        assert "<script>alert" not in r.text
        assert '"onmouseover' not in r.text
    r = b.get("/approvals/link")
    assert r.status_code == 400


# -- redirects and hosts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wanted",
    ["//evil.example", "/\\evil.example", "https://evil.example", "\\\\evil.example",
     " //evil.example", "javascript:alert(1)", "/\t/evil.example", "/\r\nSet-Cookie: x=1"],
)  # fmt: skip
def test_sign_in_never_redirects_off_site(env: Env, wanted: str) -> None:
    b = env.browser()
    form = b.get("/signin", params={"next": wanted})
    r = b.post("/signin", data={"token": env.token("approver", approver="alice"),
                                "csrf": _value(form.text, "csrf"), "next": wanted})  # fmt: skip
    assert r.status_code == 303
    location = r.headers["location"]
    assert location.startswith("/")
    assert not location.startswith(("//", "/\\"))
    assert not re.search(r"[\s\\]", location)  # nothing a browser would strip or turn into /
    assert "set-cookie: x" not in str(r.headers).lower()


@pytest.mark.parametrize(
    "host",
    ["evil.example", "localhost.evil.example", "127.0.0.1.nip.io", "evil.example:80",
     "0x7f000001.evil", ""],
)  # fmt: skip
def test_a_loopback_bind_answers_only_loopback_host_names(env: Env, host: str) -> None:
    admin = env.token("admin")
    r = env.browser().get("/agents", headers={"Host": host, "Authorization": f"Bearer {admin}"})
    assert r.status_code == 421
    assert "Budget" not in r.text


def test_loopback_host_names_are_answered(env: Env) -> None:
    for host in ("127.0.0.1", "127.0.0.1:8402", "localhost:8402", "LOCALHOST", "[::1]:8402"):
        assert env.browser().get("/healthz", headers={"Host": host}).status_code == 200, host


# -- roles, and changing the budget ----------------------------------------------------------


def test_read_only_and_page_roles_cannot_write_or_reach_other_surfaces(
    env: Env, served: TestClient
) -> None:
    metrics = env.token("metrics")
    approver = env.token("approver", approver="alice")
    org_admin = env.token("admin", org_id="acme")
    b = env.browser()
    form = b.get("/signin")
    assert b.post("/signin", data={"token": metrics,
                                   "csrf": _value(form.text, "csrf")}).status_code == 401  # fmt: skip
    for token in (metrics, approver):
        r = _mcp_call(served, token, "agent_policy_set", {"agentId": "bot", "policy": {}})
        assert r.status_code == 403
        assert r.json()["error"]["code"] == -32001
    bearer = {"Accept": "application/json"}
    assert (
        b.get("/approvals", headers={**bearer, "Authorization": f"Bearer {metrics}"}).status_code
        == 403
    )
    assert (
        b.get("/agents", headers={**bearer, "Authorization": f"Bearer {approver}"}).status_code
        == 403
    )
    assert b.get("/metrics", headers={"Authorization": f"Bearer {approver}"}).status_code == 403
    assert b.get("/metrics", headers={"Authorization": f"Bearer {org_admin}"}).status_code == 403
    assert env.engine.get_policy("bot").version == 1  # type: ignore[union-attr]


def test_the_agent_cannot_raise_its_budget_or_decide_through_mcp(
    env: Env, served: TestClient
) -> None:
    approval = env.pending()
    agent = env.token("agent", agent_id="bot")
    big = {"limits": {"daily": {"value": "999999999999"}}}
    for name, args in (
        ("agent_policy_set", {"agentId": "bot", "policy": big}),
        ("agent_policy_set", {"policy": big}),
        ("agent_policy_shadow_set", {"agentId": "bot", "policy": big}),
        ("agent_policy_rollback", {"agentId": "bot", "version": 1}),
        ("agent_policy_approvals_decide", {"approvalId": approval, "approver": "alice",
                                           "decision": "approve"}),
        ("agent_policy_approvers_register", {"name": "alice",
                                             "publicKey": "ed25519:0C-hD8UlIHxFv_YmrAoeQGbiWS0W6vRloP32XqLaZfk"}),
        ("agent_policy_delegate", {"childId": "other", "policy": big}),
        ("agent_policy_authorize", {"agentId": "pair", "amount": "1", "recipient": "0xv",
                                    "network": "eip155:8453"}),
    ):  # fmt: skip
        r = _mcp_call(served, agent, name, args)
        assert r.status_code == 200
        result = r.json()["result"]["structuredContent"]
        assert result["success"] is False, name
        assert result["error"]["code"] in ("FORBIDDEN", "INVALID_INPUT"), name
    assert env.engine.get_policy("bot").version == 1  # type: ignore[union-attr]
    assert env.engine.get_policy("bot").policy.limits.daily.value == 1_000_000_000  # type: ignore[union-attr]
    assert env.status(approval) == "pending"
    assert env.engine.list_approvers() == []


# -- bodies ---------------------------------------------------------------------------------------


def test_oversized_and_deeply_nested_bodies_are_clear_4xx_and_change_nothing(
    env: Env, served: TestClient
) -> None:
    agent = env.token("agent", agent_id="bot")
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {agent}",
               "Content-Type": "application/json"}  # fmt: skip
    before = env.engine.history("bot")
    for body in ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000, "{{{"):
        r = served.post("/mcp", content=body, headers=headers)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == -32700
        assert "Traceback" not in r.text
    huge = ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":'
            '"agent_policy_authorize","arguments":{"amount":"1","recipient":"0xv",'
            '"network":"eip155:8453","memo":"' + "x" * 5_000_000 + '"}}}')  # fmt: skip
    r = served.post("/mcp", content=huge, headers=headers)
    assert r.status_code == 413
    b = env.browser()
    r = b.post("/approvals/vote", data={"approval": "a", "decision": "approve",
                                        "comment": "x" * 2_000_000})  # fmt: skip
    assert r.status_code == 413  # refused before it is read (tests/test_serve_limits.py)
    assert "Traceback" not in r.text
    r = b.post("/approvals/vote", data={f"k{i}": "v" for i in range(2000)})
    assert r.status_code == 400
    assert "not a form of this service" in r.text
    assert env.engine.history("bot") == before


# -- refusals are pages, what an approver reads, what /mcp holds open ----------------------------


def test_an_invalid_agent_id_on_the_budget_page_is_a_clear_4xx(env: Env) -> None:
    agent = env.token("agent", org_id="acme")
    r = env.browser().get("/agents/acme:x%20", headers={"Authorization": f"Bearer {agent}"})
    assert r.status_code == 400
    assert "must not have whitespace at either end" in r.text
    admin = env.token("admin")
    r = env.browser().get("/agents/%00", headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 400
    assert "Internal Server Error" not in r.text


def test_any_refusal_of_the_engine_on_a_page_is_a_page_not_a_500(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = env.token("admin")
    aengine = env.app.state.service.aengine
    for error, status in ((NotFoundError("gone", code=ErrorCode.NO_POLICY), 404),
                          (ForbiddenError("no", code=ErrorCode.FORBIDDEN), 403),
                          (ConflictError("busy", code=ErrorCode.BUDGET_CONFLICT), 409)):  # fmt: skip

        async def history(*args: Any, _error: PolicyError = error) -> Any:
            raise _error  # the policy went away between two reads, say

        monkeypatch.setattr(aengine, "history", history)
        r = env.browser().get("/agents/bot", headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == status
        assert f"({error.code})" in r.text


def test_an_approver_not_named_cannot_read_an_approval(env: Env) -> None:
    approval = env.pending("bobs")  # names bob only
    carol = env.token("approver", approver="carol")
    r = env.browser().get(f"/approvals/{approval}", headers={"Authorization": f"Bearer {carol}"})
    assert r.status_code == 404
    assert "0xv" not in r.text  # nothing of the approval
    bob = env.token("approver", approver="BOB")  # named (names are compared case-blind)
    r = env.browser().get(f"/approvals/{approval}", headers={"Authorization": f"Bearer {bob}"})
    assert r.status_code == 200


def test_get_on_mcp_does_not_hold_an_event_stream_open() -> None:
    e = _make_env()
    agent = e.token("agent", agent_id="bot")
    started: dict[str, Any] = {}

    async def run() -> None:
        answered = anyio.Event()
        received: list[int] = []

        async def receive() -> dict[str, Any]:
            received.append(1)
            if len(received) == 1:
                return {"type": "http.request", "body": b"", "more_body": False}
            await answered.wait()  # hang up once the answer has started
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                started.update(message)
                answered.set()

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": "/mcp", "raw_path": b"/mcp", "query_string": b"",
            "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
            "headers": [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {agent}".encode()),
                        (b"accept", b"application/json, text/event-stream"),
                        (b"mcp-protocol-version", b"2025-06-18")],
        }  # fmt: skip
        async with e.app.state.service.manager.run():
            await e.app(scope, receive, send)

    try:
        anyio.run(run)
    finally:
        e.engine.close()
    assert started["status"] == 405
    assert dict(started["headers"])[b"allow"] == b"POST"
