"""Defects an adversarial probe of ``agentpolicy serve`` found, each over real HTTP.

The service runs in uvicorn on a loopback port (``serve_helpers.Served``);
the browser is an ``httpx`` client that sends what a browser would, cookies
included or (a cross-site request: the cookies are ``SameSite=Strict``) not.
"""

from __future__ import annotations

import html
import logging
import re
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from agentpolicy import PaymentRequest, PolicyEngine
from agentpolicy.testing import ManualClock
from serve_helpers import LINK_SECRET, Served


def _policy(*approvers: str) -> dict[str, Any]:
    return {"limits": {"daily": {"value": "1000000000"}},
            "approvalConfig": {"thresholds": [{"amount": {"value": "100000000"},
                                               "requiredApprovers": 1,
                                               "approvers": list(approvers)}]}}  # fmt: skip


@pytest.fixture
def served() -> Iterator[Served]:
    engine = PolicyEngine(clock=ManualClock(), link_secret=LINK_SECRET)
    engine.set_policy("bot", _policy("alice"))
    try:
        with Served(engine) as s:
            yield s
    finally:
        engine.close()


def _value(page: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]+)"', page)
    assert match is not None, f"no {name} in the page"
    return html.unescape(match.group(1))


def _signed_in(served: Served, token: str) -> httpx.Client:
    browser = httpx.Client(base_url=served.url, follow_redirects=False, timeout=30)
    form = browser.get("/signin")
    moved = browser.post("/signin", data={"token": token, "csrf": _value(form.text, "csrf")})
    assert moved.status_code == 303
    assert browser.cookies.get("agentpolicy_session")
    return browser


def test_a_cross_site_sign_out_without_the_cookie_is_refused_and_deletes_no_cookie(
    served: Served,
) -> None:
    # A cross-site form POSTs to /signout. The browser sends no SameSite=Strict cookie with
    # it, so the service sees no session; it used to answer 303 with a Set-Cookie deleting
    # agentpolicy_session, which a browser applies to a top-level navigation: the person
    # was signed out by any site they visited.
    browser = _signed_in(served, served.token("approver", approver="alice"))
    cross_site = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site",
                  "Accept": "text/html"}  # fmt: skip
    with httpx.Client(base_url=served.url, follow_redirects=False, timeout=30) as stranger:
        for headers in (cross_site, {"Sec-Fetch-Site": "cross-site"},
                        {"Origin": "https://evil.example"}):  # fmt: skip
            r = stranger.post("/signout", data={}, headers=headers)
            assert r.status_code == 403, headers
            assert "set-cookie" not in r.headers, headers
        r = stranger.post("/signout", data={}, headers={**cross_site, "Accept": "application/json"})
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "FORBIDDEN"
        # a same-origin sign-out without a session is still just the way back to /signin
        r = stranger.post("/signout", data={}, headers={"Sec-Fetch-Site": "same-origin"})
        assert r.status_code == 303
    assert browser.get("/approvals").status_code == 200  # still signed in
    browser.close()


def test_the_polled_list_of_a_signed_out_browser_is_a_401_not_the_sign_in_page(
    served: Served,
) -> None:
    # app.js polls /approvals?fragment=1 with Accept: text/html and shows "Your session
    # ended" on a 401. The service answered a signed-out poll with a 303 to /signin, which
    # fetch follows: the script got the sign-in page (200) and put it inside the list, a
    # sign-in form whose next is the bare fragment.
    approval = served.engine.authorize(PaymentRequest("bot", "200000000", "0xv", "eip155:8453"))
    assert approval.approval_id is not None
    created, token = served.tokens.create("approver", approver="alice")
    browser = _signed_in(served, token)
    poll = {"Accept": "text/html"}
    listed = browser.get("/approvals", params={"fragment": "1"}, headers=poll)
    assert listed.status_code == 200
    assert approval.approval_id in listed.text
    served.tokens.revoke(created.id)  # its sessions end at once
    for client in (browser, httpx.Client(base_url=served.url, follow_redirects=True)):
        r = client.get("/approvals", params={"fragment": "1"}, headers=poll)
        assert r.status_code == 401
        assert "location" not in r.headers
        assert 'action="/signin"' not in r.text
        assert approval.approval_id not in r.text
        client.close()
    # the whole page still takes a signed-out browser to /signin, and back here after
    with httpx.Client(base_url=served.url, follow_redirects=False) as page:
        r = page.get("/approvals", headers=poll)
        assert r.status_code == 303
        assert r.headers["location"] == "/signin?next=/approvals"


def test_a_vote_after_the_session_ended_signs_in_back_to_its_approval_not_a_404(
    served: Served,
) -> None:
    # An approver's session ends while the approval is open; Approve sends the browser to
    # sign in. It was sent with next=/approvals/vote, and after signing in to
    # GET /approvals/vote: "There is no approval vote." (404).
    approval = served.engine.authorize(PaymentRequest("bot", "200000000", "0xv", "eip155:8453"))
    approval_id = approval.approval_id
    assert approval_id is not None
    created, token = served.tokens.create("approver", approver="alice")
    browser = _signed_in(served, token)
    page = browser.get(f"/approvals/{approval_id}").text
    csrf = _value(page[page.find('name="approval"') :], "csrf")
    served.tokens.revoke(created.id)
    vote = {"approval": approval_id, "decision": "approve", "csrf": csrf}
    r = browser.post("/approvals/vote", data=vote, headers={"Accept": "text/html"})
    assert r.status_code == 303
    assert r.headers["location"] == f"/signin?next=/approvals/{approval_id}"
    form = browser.get(r.headers["location"])
    moved = browser.post("/signin", data={
        "token": served.token("approver", approver="alice"), "csrf": _value(form.text, "csrf"),
        "next": _value(form.text, "next")})  # fmt: skip
    assert moved.headers["location"] == f"/approvals/{approval_id}"
    shown = browser.get(moved.headers["location"], headers={"Accept": "text/html"})
    assert shown.status_code == 200
    assert 'value="approve"' in shown.text  # the vote form again
    assert served.engine.get_approval(approval_id).status.value == "pending"
    # a form naming no real approval still goes to a page on this site
    browser.cookies.clear()
    r = browser.post("/approvals/vote", data={**vote, "approval": "//evil.example/x"},
                     headers={"Accept": "text/html"})  # fmt: skip
    assert r.headers["location"] == "/signin?next=/approvals/%252F%252Fevil.example%252Fx"
    browser.close()


def test_a_callers_path_writes_no_control_characters_into_the_log(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    # The log records who voted ("approve on apr_... as alice via a session of token ...").
    # A request path is percent-decoded, and a refused bearer token logged it as it was:
    # anyone could put terminal escapes (move the cursor up, erase that line) and a forged
    # vote line after them into that log, without a valid token.
    caplog.set_level(logging.INFO, logger="agentpolicy.serve")
    forged = ("/agents/x%1B%5B1A%1B%5B2KINFO:agentpolicy.serve:approve%20on%20apr_1_bot"
              "%20as%20alice%20via%20a%20session%20of%20token%203f9a")  # fmt: skip
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(f"GET {forged} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n"
                     "Authorization: Bearer nope\r\nConnection: close\r\n\r\n".encode())  # fmt: skip
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 ")
    refused = [r.getMessage() for r in caplog.records if "refused a" in r.getMessage()]
    assert len(refused) == 1
    assert refused[0].isprintable(), repr(refused[0])
    assert "\\x1b[1A" in refused[0]


def test_healthz_keeps_the_stores_words_for_the_log(caplog: pytest.LogCaptureFixture) -> None:
    # /healthz needs no token: it answered anyone with the store's error, which may name a
    # SQLite file's path or a server's host
    from tests.faulty import FaultyStorage

    storage = FaultyStorage()
    engine = PolicyEngine(storage=storage, clock=ManualClock())  # type: ignore[arg-type]
    try:
        with Served(engine) as s:
            storage.down = True
            with caplog.at_level(logging.WARNING, logger="agentpolicy.serve"):
                down = httpx.get(s.url + "/healthz", timeout=30)
            assert down.status_code == 503
            assert down.json() == {"status": "unavailable",
                                   "store": "the store failed (the reason is in the service's log)"}  # fmt: skip
            assert "the store is down (test)" in caplog.text
            storage.down = False
    finally:
        engine.close()


def test_an_approval_not_shown_to_the_caller_reads_as_one_that_does_not_exist(
    served: Served,
) -> None:
    # "There is no approval X." for a missing id, "... for you." for another's: the page
    # told an approver which ids existed (the MCP tools answer both alike)
    served.engine.set_policy("other", _policy("bob"))
    theirs = served.engine.authorize(PaymentRequest("other", "200000000", "0xv", "eip155:8453"))
    assert theirs.approval_id is not None
    missing = theirs.approval_id[:-8] + "0" * 8  # the same shape, no such approval
    browser = _signed_in(served, served.token("approver", approver="alice"))
    answers = []
    for approval_id in (theirs.approval_id, missing):
        for accept in ("text/html", "application/json"):
            r = browser.get(f"/approvals/{approval_id}", headers={"Accept": accept})
            assert r.status_code == 404
            answers.append(r.text.replace(approval_id, "ID"))
    assert answers[:2] == answers[2:]
    browser.close()


def test_a_token_of_a_role_beginning_with_a_vowel_is_an_agent_token(served: Served) -> None:
    # "A agent token may not see this page."
    bearer = f"Bearer {served.token('agent', agent_id='bot')}"
    with httpx.Client(base_url=served.url, timeout=30) as agent:
        r = agent.get("/approvals", headers={"Authorization": bearer, "Accept": "application/json"})
    assert r.status_code == 403
    assert "An agent token may not see this page." in r.text


def test_an_agent_token_sees_no_group_of_a_scope_above_it_on_the_budget_page(
    served: Served,
) -> None:
    # bot/me's page showed its parent's per-recipient groups: the recipient its sibling
    # bot/sibling paid (0xsecret-vendor, 7 USDT reserved) was on it (as agent_policy_budget
    # showed over MCP before)
    engine = served.engine
    engine.set_policy("bot", {
        "limits": {"daily": {"value": "1000000000"}},
        "scopedLimits": [{"name": "vendors", "match": {}, "groupBy": "recipient",
                          "limits": {"daily": {"value": "100000000"}}}]})  # fmt: skip
    for child in ("bot/me", "bot/sibling"):
        engine.delegate("bot", child, {"limits": {"daily": {"value": "50000000"}}})
    paid = engine.authorize(PaymentRequest("bot/sibling", "7000000", "0xsecret-vendor",
                                           "eip155:8453"))  # fmt: skip
    assert paid.allowed
    me = httpx.get(f"{served.url}/agents/bot/me", timeout=30, headers={
        "Authorization": f"Bearer {served.token('agent', agent_id='bot/me')}"})  # fmt: skip
    assert me.status_code == 200
    assert "bot (a budget above it)" in me.text  # its parent's other limits are still shown
    assert "0xsecret-vendor" not in me.text
    admin = httpx.get(f"{served.url}/agents/bot/me", timeout=30,
                      headers={"Authorization": f"Bearer {served.token('admin')}"})  # fmt: skip
    assert "0xsecret-vendor" in admin.text  # an admin sees every group


def test_an_approval_card_shows_no_group_of_a_scope_above_that_the_viewer_may_not_see(
    served: Served,
) -> None:
    # the card of acme:bot's approval showed the per-recipient groups of corp, the budget above
    # it, to an approver and an admin bound to org acme and to a one-time link: the recipient
    # other:bot (another org) paid was on it, where the budget page hides it
    engine = served.engine
    engine.set_policy("corp", {
        "limits": {"daily": {"value": "1000000000"}},
        "scopedLimits": [{"name": "vendors", "match": {}, "groupBy": "recipient",
                          "limits": {"daily": {"value": "900000000"}}}]})  # fmt: skip
    engine.delegate("corp", "acme:bot", _policy("alice"))
    engine.delegate("corp", "other:bot", {"limits": {"daily": {"value": "500000000"}}})
    paid = engine.authorize(PaymentRequest("other:bot", "7000000", "0xsecret-vendor",
                                           "eip155:8453"))  # fmt: skip
    assert paid.allowed
    asked = engine.authorize(PaymentRequest("acme:bot", "200000000", "0xmine", "eip155:8453"))
    assert asked.approval_id is not None
    aid = asked.approval_id

    def card(token: str) -> str:
        r = httpx.get(f"{served.url}/approvals/{aid}", timeout=30,
                      headers={"Authorization": f"Bearer {token}", "Accept": "text/html"})  # fmt: skip
        assert r.status_code == 200
        assert "0xmine" in r.text  # the card itself is shown
        return r.text

    for token in (served.token("approver", approver="alice", org_id="acme"),
                  served.token("admin", org_id="acme")):  # fmt: skip
        assert "0xsecret-vendor" not in card(token)
    link = next(x.token for x in engine.approval_links(aid) if x.decision == "approve")
    by_link = httpx.get(f"{served.url}/approvals/link", params={"t": link}, timeout=30)
    assert by_link.status_code == 200
    assert "0xmine" in by_link.text
    assert "0xsecret-vendor" not in by_link.text
    assert "0xsecret-vendor" in card(served.token("admin"))  # an admin of every org sees it
