"""``agentpolicy serve``: a wrong method on a path that exists is a 405, and other probed edges.

A method a route does not take is ``405 Method Not Allowed`` with ``Allow``,
as the structured error for a JSON client (and on the API routes) and the
error page for a browser: never a 404 because a broader route took the path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from agentpolicy import PaymentRequest
from tests.test_serve_errors import HTML, JSON, Env, _error, _make

WRONG = ("POST", "PUT", "DELETE", "PATCH", "OPTIONS")
PAGES = [  # (path, the methods it answers)
    ("/", {"GET", "HEAD"}),
    ("/approvals", {"GET", "HEAD"}),
    ("/approvals/vote", {"POST"}),
    ("/approvals/link", {"GET", "HEAD"}),
    ("/approvals/apr_1", {"GET", "HEAD"}),
    ("/agents", {"GET", "HEAD"}),
    ("/agents/bot", {"GET", "HEAD"}),
    ("/signin", {"GET", "HEAD", "POST"}),
    ("/signout", {"POST"}),
    ("/static/app.js", {"GET", "HEAD"}),
    ("/favicon.ico", {"GET", "HEAD"}),
]
API = [("/healthz", {"GET", "HEAD"}), ("/metrics", {"GET", "HEAD"})]


@pytest.fixture
def env() -> Iterator[Env]:
    made = _make()  # test_serve_errors' service: policy "bot", approvals above 100 to alice
    try:
        yield made
    finally:
        made.engine.close()


def _allowed(r: Any) -> set[str]:
    return {m.strip() for m in r.headers["allow"].split(",")}


def _page_405(r: Any, allowed: set[str]) -> None:
    assert r.status_code == 405, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert _allowed(r) == allowed
    assert "Not allowed" in r.text
    assert "Traceback" not in r.text


@pytest.mark.parametrize("head", [False, True])
def test_get_of_the_vote_address_is_a_405_allowing_post_not_a_missing_approval(
    env: Env, head: bool
) -> None:
    """``GET /approvals/vote`` fell to ``/approvals/{id}`` (an approval ``vote``): 404 or 401."""
    d = env.engine.authorize(PaymentRequest("bot", "200000000", "0xv", "eip155:8453"))
    c = env.client()
    method = "HEAD" if head else "GET"
    approver = env.bearer(env.token("approver", approver="alice"))
    r = c.request(method, "/approvals/vote", headers=approver)  # signed in: it was a 404
    assert r.status_code == 405, r.text
    assert _allowed(r) == {"POST"}
    if not head:
        error = _error(r, 405, "METHOD_NOT_ALLOWED")
        assert "POST" in error["message"]
    r = c.request(method, "/approvals/vote", headers=JSON)  # signed out: it was a 401
    assert (r.status_code, _allowed(r)) == (405, {"POST"})
    if not head:
        _page_405(c.get("/approvals/vote", headers=HTML), {"POST"})
    assert env.engine.get_approval(str(d.approval_id)).status.value == "pending"
    assert c.get(f"/approvals/{d.approval_id}", headers=approver).status_code == 200


@pytest.mark.parametrize(("path", "allowed"), PAGES + API)
def test_every_route_answers_a_method_it_does_not_take_with_405_and_allow(
    env: Env, path: str, allowed: set[str]
) -> None:
    c = env.client()
    admin = env.bearer(env.token("admin"))
    for method in ("GET", "HEAD", *WRONG):
        if method in allowed:
            continue
        r = c.request(method, path, headers=admin)
        assert r.status_code == 405, (method, path, r.status_code)
        assert _allowed(r) == allowed, (method, path)
        if method != "HEAD":
            _error(r, 405, "METHOD_NOT_ALLOWED")
            if (path, allowed) in PAGES:
                _page_405(c.request(method, path, headers=HTML), allowed)
            else:  # an API route: JSON whatever the caller accepts
                _error(c.request(method, path, headers=HTML), 405, "METHOD_NOT_ALLOWED")


def test_head_of_the_sign_in_page_is_the_page_without_its_body_not_a_refused_sign_in(
    env: Env,
) -> None:
    """``HEAD /signin`` was taken for the sign-in POST: a 403 about an expired form."""
    c = env.client()
    r = c.head("/signin", headers=HTML)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.content == b""
    assert c.get("/signin", headers=HTML).status_code == 200


async def _asgi(served: Env, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, bytes]:
    """One request straight into the app (no HTTP client to tidy its headers up)."""
    sent: list[dict[str, Any]] = []
    inbound = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return inbound.pop(0) if inbound else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/approvals/vote", "raw_path": b"/approvals/vote", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"host", b"127.0.0.1"), *headers], "state": {}}  # fmt: skip
    with anyio.fail_after(30):
        await served.app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("length", [b"\xb2", "\u0661".encode(), b"-1", b"1e3", b" "])
def test_a_content_length_that_is_no_number_is_a_400_not_a_500(env: Env, length: bytes) -> None:
    """``"²"`` passed ``str.isdigit`` and then failed ``int()``: a 500 with a logged traceback.

    An HTTP server may refuse such a header itself; the app must not depend on it.
    """
    form = [(b"accept", b"application/json"),
            (b"content-type", b"application/x-www-form-urlencoded"),
            (b"content-length", length)]  # fmt: skip
    status, body = anyio.run(_asgi, env, form, b"approval=apr_1&decision=approve")
    assert status == 400, body
    assert b'"INVALID_INPUT"' in body
    assert b"Content-Length" in body


def test_a_refused_metrics_reader_is_named_with_its_article(env: Env) -> None:
    r = env.client().get("/metrics", headers=env.bearer(env.token("agent", agent_id="bot")))
    assert _error(r, 403, "FORBIDDEN")["message"] == "an agent token may not read metrics"
